"""The two attention calls the DiT makes, behind one seam.

Dense attention is ``kernels.attention``: PyTorch SDPA with the fastest backend available (cuDNN
on Hopper), with the softmax scale ``D**-0.5`` of the original's flash-attention calls. Block
sparse attention is ``kernels.block_sparse_attention`` (Triton on CUDA, its PyTorch reference
elsewhere).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from longcat_tools import kernels

if TYPE_CHECKING:
    from longcat_tools.runner.dit import BSAParams


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal softmax attention on ``[B, H, S, D]``."""
    return kernels.attention(q, k, v)


def block_sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 latent_shape_q: tuple[int, int, int], latent_shape_k: tuple[int, int, int],
                 params: BSAParams, fast: bool = False) -> torch.Tensor:
    """3D block sparse attention with the transformer config's ``bsa_params``.

    ``fast`` (the fused path of bf16 runs): ``P @ V`` in bf16 as in the original's kernel
    instead of the kernels' float16 default, so V is read in place from the qkv projection
    with no copy; the output is written token-major so the projection reads it as is.
    """
    return kernels.block_sparse_attention(
        q, k, v, latent_shape_q, latent_shape_k, sparsity=params.sparsity,
        cdf_threshold=params.cdf_threshold, chunk_q=tuple(params.chunk_q),
        chunk_k=tuple(params.chunk_k), pv_fp16=False if fast else None, token_major=fast)
