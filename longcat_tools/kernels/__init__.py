"""Attention kernels for LongCat video: 3D block sparse attention and a dense helper.

``block_sparse_attention`` keeps, for every chunk of query tokens, the kv chunks whose
mean-pooled keys score highest against the pooled query chunk, and attends to those only.
On CUDA with bf16/fp16 it runs Triton kernels (``triton_bsa``); everywhere else the PyTorch
reference (``reference``), which defines the semantics. See ``kernels/README.md``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from . import fp8_attention, reference
from .dense import attention
from .reference import ChunkLayout, Shape3

__all__ = ["ChunkLayout", "attention", "block_sparse_attention", "chunk_layout",
           "select_chunks"]


def chunk_layout(latent_shape: Shape3, chunk: Shape3 = (4, 4, 4)) -> ChunkLayout:
    """The chunk grid of a latent shape (edge chunks ragged when it does not divide)."""
    return ChunkLayout(tuple(int(n) for n in latent_shape), tuple(int(c) for c in chunk))


def _backend(q: torch.Tensor, layout_k: ChunkLayout) -> ModuleType:
    """``triton_bsa`` where its kernels cover the call (CUDA, dtype, head size), else the
    reference."""
    if q.is_cuda:
        from . import triton_bsa

        if triton_bsa.supported(q, layout_k):
            return triton_bsa
    return reference


def select_chunks(q: torch.Tensor, k: torch.Tensor, latent_shape_q: Shape3,
                  latent_shape_k: Shape3, **selection: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected kv chunks per query chunk: ``(indices [B,H,Mq,Kmax] int32, counts [B,H,Mq])``.

    ``selection``: ``sparsity``, ``cdf_threshold``, ``chunk_q``, ``chunk_k`` as for
    :func:`block_sparse_attention`. Indices ascend and rows shorter than ``Kmax`` are padded
    with -1.
    """
    sel = reference.check_args(q, k, k, latent_shape_q, latent_shape_k, **selection)
    return _backend(q, sel.layout_k).select_chunks(q, k, sel.layout_q, sel.layout_k,
                                                    sel.sparsity, sel.cdf_threshold)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           latent_shape_q: Shape3, latent_shape_k: Shape3, *,
                           pv_fp16: bool | None = None, token_major: bool = False,
                           fp8: bool = False, **selection: Any) -> torch.Tensor:
    """3D block sparse attention on ``[B, H, S, D]`` tensors in THW raster order.

    Args:
        q: queries, ``S_q = prod(latent_shape_q)``.
        k, v: keys and values, ``S_k = prod(latent_shape_k)`` (may differ from ``S_q``).
        latent_shape_q, latent_shape_k: ``(T, H, W)`` token grids; need not divide the chunk.
        sparsity: keep ``int((1 - sparsity) * M_k)`` kv chunks per query chunk (keyword, no
            default).
        cdf_threshold: keep the smallest-weight-mass prefix under this threshold instead;
            with both set, keep the larger count. At least one must be set. Default None.
        chunk_q, chunk_k: chunk shapes ``(t, h, w)``, default ``(4, 4, 4)``.
        pv_fp16: Triton path, bf16 inputs: ``P @ V`` in float16 (V copied with a per-head
            power-of-two scale; rel. err ~1.7e-3) or, ``False``, in bf16 like the original's
            kernel (~2.3e-3, as dense SDPA). ``None``: ``FWD_CONFIG["pv_fp16"]``.
        token_major: Triton path: write the output into a ``[B, S_q, H, D]`` tensor and return
            its ``[B, H, S_q, D]`` view, so ``out.transpose(1, 2).reshape(B, S_q, H * D)``
            needs no copy. q, k, v may be any views with unit stride along D.
        fp8: the forward in int8 Q K^T and e4m3 P V where the Triton kernel covers the call
            (``fp8_attention.use(q, "bsa")``; the selection is unchanged).

    The selection arguments are declared (with their defaults) and checked once, in
    ``reference.check_args``.

    Returns:
        ``[B, H, S_q, D]`` in q's dtype and raster order; softmax scale ``D**-0.5``.
    """
    sel = reference.check_args(q, k, v, latent_shape_q, latent_shape_k, **selection)
    if _backend(q, sel.layout_k) is reference or k.dtype != q.dtype or v.dtype != q.dtype:
        return reference.sparse_attention(q, k, v, sel)
    from . import triton_bsa

    lq, lk = sel.layout_q, sel.layout_k
    quantized = fp8 and fp8_attention.use(q, "bsa") and triton_bsa.fp8_covers(lk)
    if quantized:  # the BSA forward's quantized path is the Triton fp8 kernels'
        fp8_attention.count("bsa", fp8_attention.kernels_for(q, "bsa")[0])
    prep = triton_bsa.prepare(q, k, v, lq, lk, sel.sparsity, sel.cdf_threshold, pv_fp16,
                              fp8=quantized)
    out = None
    if token_major:
        B, H, S, D = q.shape
        out = q.new_empty(B, S, H, D).transpose(1, 2)
    return triton_bsa.attend(q, k, v, lq, lk, prep.indices, prep.counts, pv_fp16=pv_fp16,
                             out=out, k_chunks=prep.k_chunks, v_copy=prep.v_copy,
                             fp8=quantized, quantized=prep.quantized)
