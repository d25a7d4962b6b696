"""What the tests and the benchmarks share: starting workers and reading what they say.

Not part of the distribution: the wheel ships ``client/`` and ``server/`` only.
"""
