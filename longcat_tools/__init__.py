"""longcat-tools: convert, verify, configure and run LongCat-Video checkpoints.

The diffusers classes load on first use (the command line starts without torch)::

    from longcat_tools import LongCatVideoPipeline, LongCatTransformer3DModel
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["LongCatTransformer3DModel", "LongCatVideoPipeline", "__version__"]
_LAZY = {"LongCatTransformer3DModel": "longcat_tools.runner.dit",
         "LongCatVideoPipeline": "longcat_tools.runner.pipeline"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
