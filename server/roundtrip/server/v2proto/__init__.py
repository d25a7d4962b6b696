"""Generated messages of the Open Inference Protocol (``protos/inference``); ``make protos``."""
