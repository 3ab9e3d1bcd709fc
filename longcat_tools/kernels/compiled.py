"""A function through ``torch.compile`` on first use, eager for good once compiling fails.

Memory-bound glue (the DiT's norms and residuals, fp8's per-token scaling) is written as plain
PyTorch and compiled into one or two kernels that read and write the activation once; without
a working compiler the same function runs eagerly (correct, just slower).
``LONGCAT_NO_COMPILE=1`` forces eager. On CUDA the hand-written Triton row kernels
(``triton_rows``) take precedence where they cover the call.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)


def eager_division() -> dict[str, bool] | None:
    """Inductor options under which ``x / y`` in float32 rounds as eager does (Triton's ``/`` is
    an approximate division otherwise); None where this torch has no such option."""
    from torch._inductor import config

    if hasattr(config, "eager_numerics"):  # torch >= 2.12
        return {"eager_numerics.division_rounding": True}
    if hasattr(config, "emulate_divison_rounding"):  # the name before (sic)
        return {"emulate_divison_rounding": True}
    return None


_TRITON_ROWS: Any = None  # kernels.triton_norm once imported, False where it cannot be


def triton_rows(x: torch.Tensor) -> Any:
    """``kernels.triton_norm`` (Triton row kernels) for a CUDA ``x`` where they can run, else
    None: the glue then takes its ``Compiled`` function (``LONGCAT_NO_TRITON_NORM=1`` asks for
    that too)."""
    global _TRITON_ROWS
    if not x.is_cuda or os.environ.get("LONGCAT_NO_TRITON_NORM", "") not in ("", "0"):
        return None
    if _TRITON_ROWS is None:
        try:
            from . import triton_norm

            _TRITON_ROWS = triton_norm
        except Exception as exc:  # noqa: BLE001 - no Triton: the compiled path
            log.warning("Triton row kernels unavailable (%s); using torch.compile", exc)
            _TRITON_ROWS = False
    return _TRITON_ROWS or None


class Compiled:
    """``fn`` through ``torch.compile`` on first use; eager for good once compiling fails.

    ``eager_bits``: the compiled kernel must give eager's bits (float32 division rounded as
    eager rounds it); where this torch cannot promise that, ``fn`` runs eagerly."""

    def __init__(self, fn: Callable[..., Any], eager_bits: bool = False) -> None:
        self.fn = fn
        self.eager_bits = eager_bits
        self.compiled: Callable[..., Any] | None = None
        self.failed = os.environ.get("LONGCAT_NO_COMPILE", "") not in ("", "0")

    def __call__(self, *args: Any) -> Any:
        if self.failed:
            return self.fn(*args)
        try:
            if self.compiled is None:
                options = eager_division() if self.eager_bits else {}
                if options is None:
                    raise RuntimeError("this torch cannot round division as eager does")
                self.compiled = torch.compile(self.fn, fullgraph=True, options=options)
            return self.compiled(*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
            log.warning("torch.compile of %s failed (%s: %s); running it eagerly",
                        self.fn.__name__, type(exc).__name__, str(exc).splitlines()[0][:200])
            self.failed = True
            return self.fn(*args)

    @property
    def status(self) -> str:
        return "eager" if self.failed else "compiled" if self.compiled is not None else "unused"
