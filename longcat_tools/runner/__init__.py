"""The reference runner: our LongCat-Video DiT and the task pipelines on any checkpoint layout.

Public API (external parity tests use exactly this)::

    from longcat_tools.runner import load_transformer, load_pipeline
    dit = load_transformer(path, device="cpu", dtype=torch.float32)
    pipe = load_pipeline(path, device="cpu", dtype=torch.float32)
    result = pipe.generate(task="t2v", prompt="...", latents=noise)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from longcat_tools.runner.loading import load_transformer

if TYPE_CHECKING:
    from longcat_tools.runner.pipeline import Pipeline

__all__ = ["load_pipeline", "load_transformer"]


def load_pipeline(path: Any, device: Any = "cpu", dtype: Any = "fp32", **kwargs: Any) -> Pipeline:
    """Every component of the checkpoint at ``path`` (any layout), ready to ``generate``."""
    from longcat_tools.runner.pipeline import Pipeline

    return Pipeline.load(path, device=device, dtype=dtype, **kwargs)
