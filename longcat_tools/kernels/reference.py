"""PyTorch reference for 3D block sparse attention (any device, any float dtype).

This module defines the semantics that the Triton path in ``triton_bsa`` must reproduce;
the tests compare the two, and the public API falls back to it on CPU and for dtypes or
head sizes that the kernels do not cover.

Layout. Tokens arrive in THW raster order, ``[B, H, S, D]`` with ``S = T * Hh * W``. A
chunk of shape ``(t, h, w)`` groups ``t * h * w`` neighbouring tokens; chunks are numbered
T-major, then H, then W, like the original LongCat kernel. When an axis does not divide by
the chunk, the grid is rounded up (``ceil(T / t)`` chunks along T, ...) and the chunks on
the far edge of that axis hold fewer real tokens. Those edge chunks:

* are pooled over their real tokens only (the mean divides by the real count);
* take part in selection like any other chunk;
* contribute only their real tokens as keys (the missing tokens are masked out);
* as query chunks, produce outputs only for their real tokens.

On divisible shapes this is exactly the original's algorithm.

Selection (per batch, head and query chunk):

* score = mean-pooled q-chunk . mean-pooled k-chunk, *unscaled*;
* ``sparsity`` alone: keep ``int((1 - sparsity) * Mk)`` chunks with the highest scores;
* ``cdf_threshold`` alone: softmax(score * D**-0.5) sorted descending, keep the longest
  prefix whose cumulative sum is <= threshold (``searchsorted(..., right=True)``); a query
  chunk may keep nothing, and then its output is zero;
* both: keep ``max`` of the two counts.

Precision of selection. As in the original, pooled means are rounded to the input dtype
and scores to the input dtype too (the original's bf16 ``matmul`` output). To make the
result reproducible across devices and kernels, both are computed exactly and then rounded
by one path, :func:`round_float64` (float64 -> float32 -> dtype, each step
round-to-nearest-even): pooling sums in float64, and a score is the exact dot product of the
pooled means held on a fixed-point grid (:func:`fixed_point`: 21 bits below each chunk's
largest mean, so every bf16 mean at least 2**-13 times it, fp16 2**-10, is exact), whatever
order a device sums in. Equal scores are broken towards the lower chunk index; the CDF
arithmetic runs in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from longcat_tools.model.chunks import ChunkGrid, Shape3, kept_per_query


class ChunkLayout(ChunkGrid):
    """A chunk grid (``model.chunks``) with the token indices the kernels gather by."""

    def token_index(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Raster index of every chunk slot, ``[M, C]`` int64, and whether it is a real token."""
        (T, H, W), (t, h, w), (nt, nh, nw) = self.latent, self.chunk, self.grid
        ar = lambda n: torch.arange(n, device=device)  # noqa: E731
        tt = (ar(nt)[:, None] * t + ar(t)[None, :]).view(nt, 1, 1, t, 1, 1)
        hh = (ar(nh)[:, None] * h + ar(h)[None, :]).view(1, nh, 1, 1, h, 1)
        ww = (ar(nw)[:, None] * w + ar(w)[None, :]).view(1, 1, nw, 1, 1, w)
        full = (nt, nh, nw, t, h, w)
        valid = ((tt < T) & (hh < H) & (ww < W)).expand(full)
        index = torch.where(valid, (tt * H + hh) * W + ww, 0).expand(full)
        shape = (nt * nh * nw, t * h * w)
        return index.reshape(shape), valid.reshape(shape)

    def counts(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Number of real tokens in each chunk, ``[M]`` int64."""
        return self.token_index(device)[1].sum(-1)


@dataclass(frozen=True)
class Selection:
    """The checked arguments of one call: the chunk layouts of q and k and the selection rule."""

    layout_q: ChunkLayout
    layout_k: ChunkLayout
    sparsity: float | None
    cdf_threshold: float | None


def check_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    latent_shape_q: Shape3,
    latent_shape_k: Shape3,
    *,
    sparsity: float | None,
    cdf_threshold: float | None = None,
    chunk_q: Shape3 = (4, 4, 4),
    chunk_k: Shape3 = (4, 4, 4),
) -> Selection:
    """Validate the public arguments (the one place their defaults are declared); raise
    ``ValueError`` with a readable message."""
    if sparsity is None and cdf_threshold is None:
        raise ValueError("set sparsity, cdf_threshold or both")
    if sparsity is not None and not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    if cdf_threshold is not None and not 0.0 <= cdf_threshold <= 1.0:
        raise ValueError(f"cdf_threshold must be in [0, 1], got {cdf_threshold}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [B, H, S, D]")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share B, H and D")
    shapes = []
    for name, x, lat, ch in (("q", q, latent_shape_q, chunk_q), ("k", k, latent_shape_k, chunk_k)):
        lat, ch = tuple(int(n) for n in lat), tuple(int(c) for c in ch)
        if len(lat) != 3 or len(ch) != 3:
            raise ValueError(f"latent_shape_{name} and chunk_{name} must have 3 entries (T, H, W)")
        if min(lat) < 1 or min(ch) < 1:
            raise ValueError(f"latent_shape_{name} {lat} and chunk_{name} {ch} must be positive")
        if math.prod(lat) != x.shape[2]:
            raise ValueError(
                f"latent_shape_{name} {lat} holds {math.prod(lat)} tokens, {name} has {x.shape[2]}"
            )
        shapes.append(ChunkLayout(lat, ch))  # type: ignore[arg-type]
    return Selection(shapes[0], shapes[1], sparsity, cdf_threshold)


def to_chunks(x: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    """``[B, H, S, D]`` raster -> ``[B, H, M, C, D]`` chunks, missing edge tokens zero."""
    index, valid = layout.token_index(x.device)
    out = x[:, :, index.reshape(-1)].unflatten(2, index.shape)
    return out * valid[..., None].to(x.dtype)


def from_chunks(xc: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    """Inverse of :func:`to_chunks`: ``[B, H, M, C, D]`` -> ``[B, H, S, D]``."""
    index, valid = layout.token_index(xc.device)
    B, Hh, _, _, D = xc.shape
    out = xc.new_empty(B, Hh, layout.num_tokens, D)
    out[:, :, index[valid]] = xc[:, :, valid]
    return out


def pool(x: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    """Mean of each chunk over its real tokens, ``[B, H, M, D]`` in x's dtype.

    Summed in float64 (exact for bf16/fp16 data), rounded by :func:`round_float64`.
    """
    xc = to_chunks(x, layout).double()
    counts = layout.counts(x.device).double()
    mean = xc.sum(3) / counts[:, None]
    return round_float64(mean, x.dtype)


def round_float64(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 -> float32 -> ``dtype``, each step round-to-nearest-even, on every device.

    The one rounding of pooled means and scores, spelled out because it is two roundings: a
    value whose float32 rounding lands exactly halfway between two bf16/fp16 values then
    rounds to even, which can be one ulp off rounding the float64 value directly (about one
    random score in 2**17 for bf16). torch's own float64 -> bf16/fp16 cast goes through
    float32 the same way; the Triton kernels round identically. float32/float64 inputs get
    float32 values.
    """
    return x.float().to(dtype)


# Magnitude bits of a pooled mean on the score grid: three 7-bit slices, which int8 tensor
# cores multiply exactly (``triton_bsa._score_kernel``).
GRID_BITS = 21
GRID_DTYPES = (torch.bfloat16, torch.float16)


def pow2(n: torch.Tensor) -> torch.Tensor:
    """``2.0 ** n`` in float64, exact (built from the bits) for integer n in -1022..1023."""
    return ((n.to(torch.int64) + 1023) << 52).view(torch.float64)


def fixed_point(xbar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled means ``[..., M, D]`` (bf16/fp16) on a per-chunk fixed-point grid:
    ``(ints, e)`` with ``xbar ~ ints * 2**(e - GRID_BITS)`` and ``|ints| < 2**GRID_BITS``.

    ``e`` ``[..., M]``: the least integer with ``max|x| < 2**e``, at least -125 (float32's
    exponent field). ``ints``: float64 holding integers, ``x * 2**(GRID_BITS - e)`` truncated
    toward zero, so a mean at least ``2**(p - GRID_BITS)`` times its chunk's largest is exact
    (p: the dtype's significand bits, 8 for bf16, 11 for fp16: 2**-13 and 2**-10) and a
    smaller one may lose low bits. Why a grid: products of 21-bit integers and their sums over
    D <= 2048 are exact in float64 (and in int8 slices on tensor cores), in any order.
    """
    x = xbar.double()
    e = torch.frexp(x.abs().amax(-1)).exponent.clamp(min=-125)
    return torch.trunc(x * pow2(GRID_BITS - e)[..., None]), e


def exact_scores(qbar: torch.Tensor, kbar: torch.Tensor) -> torch.Tensor:
    """Unscaled pooled scores ``[B, H, Mq, Mk]`` float64, before rounding.

    bf16/fp16 means: the exact dot product of their :func:`fixed_point` values (an exact
    float64 matmul of integers below ``2**42 * D``, scaled by powers of two), the same on
    every device and in ``triton_bsa``'s int8 kernel. float32/float64 inputs (reference only):
    their float64 dot product, whose last bit may depend on the device's summation order.
    """
    if qbar.dtype not in GRID_DTYPES:
        kt = kbar.transpose(-1, -2).to(torch.float64, memory_format=torch.contiguous_format)
        return torch.matmul(qbar.double(), kt)
    qi, qe = fixed_point(qbar)
    ki, ke = fixed_point(kbar)
    dot = torch.matmul(qi, ki.transpose(-1, -2).contiguous())
    return dot * pow2(qe - GRID_BITS)[..., None] * pow2(ke - GRID_BITS)[..., None, :]


def round_scores(score64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`exact_scores` rounded to ``dtype`` (:func:`round_float64`), held in float32 (the
    selection's working type; float32 too for float64 inputs)."""
    return round_float64(score64, dtype).float()


def scores(qbar: torch.Tensor, kbar: torch.Tensor) -> torch.Tensor:
    """Unscaled pooled scores ``[B, H, Mq, Mk]`` float32, holding values rounded to the dtype:
    :func:`exact_scores` rounded by :func:`round_float64`."""
    return round_scores(exact_scores(qbar, kbar), qbar.dtype)


def selection_counts(
    score: torch.Tensor, sparsity: float | None, cdf_threshold: float | None, head_dim: int
) -> torch.Tensor:
    """Number of kv chunks each query chunk keeps, ``[B, H, Mq]`` int32."""
    mk = score.shape[-1]
    topk = kept_per_query(sparsity, mk)
    if cdf_threshold is None:
        if topk is None:
            raise ValueError("set sparsity, cdf_threshold or both")
        return torch.full(score.shape[:-1], topk, dtype=torch.int32, device=score.device)
    weights = torch.softmax(score.float() * head_dim**-0.5, dim=-1)
    cdf = torch.sort(weights, dim=-1, descending=True, stable=True).values.cumsum(-1)
    thr = torch.full((*score.shape[:-1], 1), cdf_threshold, dtype=cdf.dtype, device=cdf.device)
    n = torch.searchsorted(cdf.contiguous(), thr, right=True).squeeze(-1).clamp_(max=mk)
    if topk is not None:
        n = n.clamp(min=topk)
    return n.to(torch.int32)


def select_from_scores(score: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Selected chunk indices ``[B, H, Mq, max(counts)]`` int32, ascending, padded with -1.

    Row r keeps its ``counts[r]`` highest scores; equal scores go to the lower index.
    """
    kmax = int(counts.max()) if counts.numel() else 0
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :kmax]
    keep = torch.arange(kmax, device=score.device) < counts[..., None]
    order = torch.where(keep, order, score.shape[-1])
    order = torch.sort(order, dim=-1).values
    return torch.where(order == score.shape[-1], -1, order).to(torch.int32)


def select_chunks(
    q: torch.Tensor,
    k: torch.Tensor,
    layout_q: ChunkLayout,
    layout_k: ChunkLayout,
    sparsity: float | None,
    cdf_threshold: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool, score and select: ``(indices [B,H,Mq,Kmax] int32 ascending, counts [B,H,Mq])``."""
    score = scores(pool(q, layout_q), pool(k, layout_k))
    counts = selection_counts(score, sparsity, cdf_threshold, q.shape[-1])
    return select_from_scores(score, counts), counts


def chunk_mask(indices: torch.Tensor, counts: torch.Tensor, num_chunks_k: int) -> torch.Tensor:
    """Boolean ``[B, H, Mq, Mk]`` mask of the selected kv chunks."""
    mask = torch.zeros(*indices.shape[:-1], num_chunks_k + 1, dtype=torch.bool,
                       device=indices.device)
    idx = torch.where(indices < 0, num_chunks_k, indices).long()
    mask.scatter_(-1, idx, True)
    del counts  # implied by the -1 padding
    return mask[..., :num_chunks_k]


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout_q: ChunkLayout,
    layout_k: ChunkLayout,
    mask: torch.Tensor,
    block_bytes: int = 1 << 28,
) -> torch.Tensor:
    """Attention of every query token to the real tokens of its selected kv chunks.

    Computed in float32 (float64 for float64 inputs), a few query chunks at a time to bound
    memory; rows with no selected chunk give zeros. Returns ``[B, H, Sq, D]`` in q's dtype.
    """
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc = to_chunks(q, layout_q).to(acc_dtype)  # B H Mq Cq D
    kc = to_chunks(k, layout_k).to(acc_dtype).flatten(2, 3)  # B H Mk*Ck D
    vc = to_chunks(v, layout_k).to(acc_dtype).flatten(2, 3)
    key_valid = layout_k.token_index(q.device)[1].reshape(-1)  # Mk*Ck
    B, Hh, Mq, Cq, D = qc.shape
    scale = D**-0.5
    out = torch.empty_like(qc)
    step = max(1, block_bytes // max(1, B * Hh * Cq * kc.shape[2] * qc.element_size()))
    for m0 in range(0, Mq, step):
        m1 = min(Mq, m0 + step)
        s = torch.einsum("bhmcd,bhnd->bhmcn", qc[:, :, m0:m1], kc) * scale
        allowed = mask[:, :, m0:m1].repeat_interleave(layout_k.chunk_size, dim=-1)
        allowed = allowed & key_valid
        s = s.masked_fill(~allowed[:, :, :, None, :], float("-inf"))
        mx = s.amax(-1, keepdim=True)
        p = torch.exp(s - torch.where(torch.isinf(mx), 0.0, mx))
        denom = p.sum(-1, keepdim=True)
        o = torch.einsum("bhmcn,bhnd->bhmcd", p, vc)
        out[:, :, m0:m1] = o / torch.where(denom == 0, 1.0, denom)
    return from_chunks(out, layout_q).to(q.dtype)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     sel: Selection) -> torch.Tensor:
    """Select, mask and attend: the reference path after :func:`check_args`."""
    indices, counts = select_chunks(q, k, sel.layout_q, sel.layout_k, sel.sparsity,
                                    sel.cdf_threshold)
    mask = chunk_mask(indices, counts, sel.layout_k.num_chunks)
    return masked_attention(q, k, v, sel.layout_q, sel.layout_k, mask)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           latent_shape_q: Shape3, latent_shape_k: Shape3,
                           **selection: Any) -> torch.Tensor:
    """Reference block sparse attention: ``kernels.block_sparse_attention`` without the Triton
    path (``selection``: sparsity, cdf_threshold, chunk_q, chunk_k as there)."""
    return sparse_attention(q, k, v, check_args(q, k, v, latent_shape_q, latent_shape_k,
                                                **selection))
