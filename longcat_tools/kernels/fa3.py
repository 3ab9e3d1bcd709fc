"""FlashAttention-3 (``flash_attn_interface``, optional): dense attention on Hopper.

Where a user has built FA3 (it is not on PyPI: ``flash-attention/hopper``), its forward takes
the DiT's dense attention before cuDNN's SDPA: on an H200 at 480p/93 its bf16 forward took
0.83x cuDNN's time and its FP8 forward 0.89x cuDNN's FP8 SDPA, each at the same or lower error
against fp32 (``benchmarks/results/fp8_attention.md``). This module finds the build and what it
has (head sizes, fp16, FP8, backward: its ``flash_attn_config`` build flags) and runs the
bf16/fp16 forward; ``fa3_fp8_attention`` runs the FP8 one.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)

HEAD_DIMS = (64, 96, 128, 192, 256)  # the sizes FA3 compiles; a build may leave some out


class Build(NamedTuple):
    """What the installed FA3 has: its forward (None: not installed), head sizes, dtypes
    (``torch.float8_e4m3fn`` for its FP8 forward) and whether it has a backward."""

    func: Callable | None
    head_dims: frozenset[int]
    dtypes: frozenset[torch.dtype]
    backward: bool = False


@functools.cache
def build() -> Build:
    """The installed FA3, read once."""
    try:
        from flash_attn_interface import flash_attn_func
    except Exception:  # noqa: BLE001 - not installed, or built for another torch/CUDA
        return Build(None, frozenset(), frozenset())
    try:
        from flash_attn_config import CONFIG

        off = {k.removeprefix("FLASHATTENTION_DISABLE_") for k, v in
               CONFIG["build_flags"].items() if v}
    except (ImportError, KeyError, TypeError, AttributeError):  # a build with no record
        off = set()
    kinds = {torch.bfloat16: "", torch.float16: "FP16", torch.float8_e4m3fn: "FP8"}
    return Build(flash_attn_func, frozenset(d for d in HEAD_DIMS if f"HDIM{d}" not in off),
                 frozenset(t for t, flag in kinds.items() if flag not in off),
                 "BACKWARD" not in off)


def covers(q: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether FA3 takes attention on q's GPU and head size in ``dtype`` (q's by default): a
    Hopper (sm90) GPU, a build that has both, and its backward where q needs a gradient."""
    b = build()
    return (b.func is not None and q.is_cuda and q.shape[-1] in b.head_dims
            and (dtype or q.dtype) in b.dtypes
            and (b.backward or not (q.requires_grad and torch.is_grad_enabled()))
            and torch.cuda.get_device_capability(q.device) == (9, 0))


_REFUSED: set[tuple] = set()  # calls FA3 raised on: the caller's other paths take them


def refused(q: torch.Tensor, k: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether FA3 refused this call's shape before (in ``dtype``, q's by default)."""
    return _key(q, k, dtype) in _REFUSED


def _key(q: torch.Tensor, k: torch.Tensor, dtype: torch.dtype | None) -> tuple:
    return (dtype or q.dtype, *q.shape, k.shape[2], q.device.index)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor | None:
    """FA3's non-causal forward of ``[B, H, S, D]`` views (unit stride along D), scale
    ``D**-0.5`` unless ``softmax_scale`` is in ``kw``; the output ``[B, H, Sq, D]`` as a view
    of a token-major tensor. None where FA3 refuses the call (remembered, logged once); out of
    memory and CUDA faults are raised, not remembered."""
    key = _key(q, k, None)
    if key in _REFUSED:
        return None
    kw.setdefault("softmax_scale", q.shape[-1] ** -0.5)
    try:  # FA3 takes [B, S, H, D]
        o = build().func(*(x.transpose(1, 2) for x in (q, k, v)), causal=False, **kw)
    except RuntimeError as e:  # its checks: not this call
        if isinstance(e, torch.OutOfMemoryError) or "CUDA error" in str(e):
            raise  # not a refusal: nothing to remember
        _REFUSED.add(key)
        log.warning("FlashAttention-3 refused %s attention of q %s, k length %d (%s); another "
                    "kernel takes it", q.dtype, tuple(q.shape), k.shape[2],
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None
    o = o[0] if isinstance(o, tuple) else o  # its betas also return the logsumexp
    return o.transpose(1, 2)
