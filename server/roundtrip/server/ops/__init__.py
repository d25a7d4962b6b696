"""What an operator watches and tunes: metrics and their HTTP port, JSON logs, the garbage
collector's settings for serving, the event loop, and giving freed memory back to the OS.

The ground floor: it imports nothing else of the worker's (``tests/test_layering.py``).
"""
