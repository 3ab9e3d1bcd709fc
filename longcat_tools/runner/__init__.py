"""The reference runner: our LongCat-Video DiT and the task pipelines on any checkpoint layout.

Public API (external parity tests use exactly this)::

    from longcat_tools.runner import load_transformer, load_pipeline
    dit = load_transformer(path, device="cpu", dtype=torch.float32)
    pipe = load_pipeline(path, device="cpu", dtype=torch.float32)
    result = pipe.generate(task="t2v", prompt="...", latents=noise)

    from longcat_tools.runner import RunSettings, run_job   # what `longcat-tools run` does
    doc = run_job(RunSettings(model=path, task="t2v", prompt="..."), Reporter())

Names load on first use, so the command line (which reads ``runner.settings``) starts without
torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from longcat_tools.runner.job import run_job
    from longcat_tools.runner.loading import load_transformer
    from longcat_tools.runner.pipeline import LongCatVideoPipeline, Reporter
    from longcat_tools.runner.settings import RunSettings

__all__ = ["Reporter", "RunSettings", "load_pipeline", "load_transformer", "run_job"]
_LAZY = {"load_transformer": "loading", "run_job": "job", "RunSettings": "settings",
         "Reporter": "pipeline"}


def load_pipeline(path: Any, device: Any = "cpu", dtype: Any = "fp32",
                  **kwargs: Any) -> LongCatVideoPipeline:
    """Every component of the checkpoint at ``path`` (any layout), ready to ``generate``
    (``LongCatVideoPipeline.from_pretrained`` with the runner's argument names)."""
    from longcat_tools.runner.pipeline import LongCatVideoPipeline

    return LongCatVideoPipeline.from_pretrained(path, torch_dtype=dtype, device=device, **kwargs)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
