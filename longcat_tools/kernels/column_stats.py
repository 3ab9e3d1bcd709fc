"""Per-head channel statistics of a ``[B, H, S, D]`` tensor over its sequence, on the GPU.

What the fp8 recipes scale by (``fp8_attention``'s ``key_mean``, ``value_scales`` and
``per_tensor_scales``, their PyTorch definitions): the mean of each channel, and the extremes
of the channels, of ``x - mean`` or of ``x``. Two launches, read top to bottom:

1. ``_slice_stats_kernel``  one read of x (a strided view, e.g. of the qkv projection):
                            float32 column sums, minima and maxima of each slice of
                            ``STATS_CONFIG["slice"]`` tokens of a head;
2. ``_head_stats_kernel``   per head, the slices reduced: the channels' means, minima and
                            maxima, and ``max|x - mean|`` (else ``max|x|``) over the head.

Why: as PyTorch reductions over the strided views these were five reads of q, k and v and some
twenty small launches a dense fp8 call (about 1.4 ms of passes at 480p on an H200, with the
scaling casts), and two reductions in the fp8 BSA call (26 ms of a 720p forward on an H100).
The float32 sums run in another order than PyTorch's, so a mean may differ in its last bits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .fp8 import E4M3_MAX
from .fp8_attention import tensor_scale

# tokens of one head a program reduces (its slice), rows a step, warps: 80 registers a thread
# in sm90 SASS (six programs an SM). Untuned: q, k and v at 480p took 0.57 ms on an H100
# (with the small launches), about 1.6 TB/s (benchmarks/results/vs_original.md, session 21)
STATS_CONFIG = {"slice": 1024, "block": 16, "num_warps": 4}


@triton.jit
def _slice_stats_kernel(X, SUM, LO, HI, sxb, sxh, sxs, H, S,
                        SLICE: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr):
    """Slice ``i`` (rows ``[i * SLICE, (i + 1) * SLICE)``) of head ``bh`` of x ``[B, H, S, D]``:
    float32 column sums, minima and maxima into ``[slices, B * H, D]`` (a NaN shows in the
    sums only)."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    x = X + (bh // H).to(tl.int64) * sxb + (bh % H).to(tl.int64) * sxh
    d = tl.arange(0, D)
    total = tl.zeros([BLOCK, D], dtype=tl.float32)
    lo = tl.full([BLOCK, D], float("inf"), tl.float32)
    hi = tl.full([BLOCK, D], float("-inf"), tl.float32)
    for r0 in tl.range(0, SLICE, BLOCK):
        rows = i * SLICE + r0 + tl.arange(0, BLOCK)
        ok = (rows < S)[:, None]
        t = tl.load(x + rows[:, None].to(tl.int64) * sxs + d[None, :], mask=ok,
                    other=0.0).to(tl.float32)
        total += t
        lo = tl.minimum(lo, tl.where(ok, t, float("inf")))
        hi = tl.maximum(hi, tl.where(ok, t, float("-inf")))
    out = (i * tl.num_programs(1) + bh) * D + d
    tl.store(SUM + out, tl.sum(total, axis=0))
    tl.store(LO + out, tl.min(lo, axis=0))
    tl.store(HI + out, tl.max(hi, axis=0))


@triton.jit
def _head_stats_kernel(SUM, LO, HI, MEAN, CLO, CHI, AMAX, S, SLICES, BH,
                       SLICES_PAD: tl.constexpr, SMOOTH: tl.constexpr, BLOCK: tl.constexpr,
                       D: tl.constexpr):
    """Head ``bh`` from its slices: its channels' means, minima and maxima (float32 ``[D]``)
    into ``MEAN``, ``CLO``, ``CHI``, and ``max|x - mean|`` with SMOOTH (``x - mean`` rises with
    x, so the channels' extremes bound it), else ``max|x|``, into ``AMAX[bh]``; NaN where a
    channel has one, as PyTorch's reductions."""
    bh = tl.program_id(0)
    d = tl.arange(0, D)
    total = tl.zeros([BLOCK, D], dtype=tl.float32)
    lo = tl.full([BLOCK, D], float("inf"), tl.float32)
    hi = tl.full([BLOCK, D], float("-inf"), tl.float32)
    for s0 in tl.range(0, SLICES_PAD, BLOCK):
        sl = s0 + tl.arange(0, BLOCK)
        ok = (sl < SLICES)[:, None]
        at = (sl[:, None] * BH + bh) * D + d[None, :]
        total += tl.load(SUM + at, mask=ok, other=0.0)
        lo = tl.minimum(lo, tl.load(LO + at, mask=ok, other=float("inf")))
        hi = tl.maximum(hi, tl.load(HI + at, mask=ok, other=float("-inf")))
    total = tl.sum(total, axis=0)
    nan = total != total
    lo = tl.where(nan, total, tl.min(lo, axis=0))
    hi = tl.where(nan, total, tl.max(hi, axis=0))
    mean = tl.div_rn(total, S.to(tl.float32))
    tl.store(MEAN + bh * D + d, mean)
    tl.store(CLO + bh * D + d, lo)
    tl.store(CHI + bh * D + d, hi)
    if SMOOTH:
        amax = tl.maximum(hi - mean, mean - lo)
    else:
        amax = tl.maximum(hi, -lo)
    any_nan = tl.sum(nan.to(tl.int32), axis=0) > 0
    tl.store(AMAX + bh, tl.where(any_nan, float("nan"), tl.max(amax, axis=0)))


class Stats(NamedTuple):
    """float32 ``[B, H, D]`` channel means, minima and maxima over the sequence, and
    ``[B, H]`` ``max|x - mean|`` (smoothed) or ``max|x|``."""

    mean: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    amax: torch.Tensor


def column_stats(x: torch.Tensor, smooth: bool = False) -> Stats:
    """The statistics of a CUDA ``[B, H, S, D]`` tensor (any strides but unit along D; D a
    power of two), in one read of it and two launches."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    B, H, S, D = x.shape
    slices = triton.cdiv(S, STATS_CONFIG["slice"])
    parts = torch.empty(3, slices, B * H, D, dtype=torch.float32, device=x.device)
    _slice_stats_kernel[(slices, B * H)](x, *parts, *x.stride()[:3], H, S,
                                         STATS_CONFIG["slice"], STATS_CONFIG["block"], D,
                                         num_warps=STATS_CONFIG["num_warps"])
    channels = torch.empty(3, B, H, D, dtype=torch.float32, device=x.device)
    amax = torch.empty(B, H, dtype=torch.float32, device=x.device)
    pad = triton.next_power_of_2(slices)
    _head_stats_kernel[(B * H,)](*parts, *channels, amax, S, slices, B * H, pad, smooth,
                                 min(16, pad), D, num_warps=4)
    return Stats(*channels, amax)


def key_mean(k: torch.Tensor) -> torch.Tensor:
    """``fp8_attention.key_mean``: k's mean over the sequence, float32 ``[B, H, D]``."""
    return column_stats(k).mean


def value_scales(v: torch.Tensor) -> torch.Tensor:
    """``fp8_attention.value_scales``: amax / 448 of each channel, 1 for an all-zero one."""
    s = column_stats(v)
    amax = torch.maximum(s.hi, -s.lo)
    return torch.where(amax > 0, amax / E4M3_MAX, 1.0)


def tensor_scales(q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor
                  ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor,
                             torch.Tensor]:
    """``fp8_attention.per_tensor_scales``: the e4m3 scales of q, k less its mean and v less
    its mean, and the means of k and v, in one read of each (q None: its scale None, q
    already scaled)."""
    stats = [column_stats(k, smooth=True), column_stats(v, smooth=True)]
    if q is not None:
        stats.insert(0, column_stats(q))
    scales = tensor_scale(torch.stack([s.amax.amax() for s in stats])).unbind()
    s_q = scales[0] if q is not None else None
    return s_q, *scales[-2:], stats[-2].mean, stats[-1].mean
