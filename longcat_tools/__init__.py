"""longcat-tools: convert, verify, configure and run LongCat-Video checkpoints."""

__version__ = "0.1.0"
