"""The two attention calls the DiT makes, behind one seam.

Dense attention is ``kernels.attention`` (PyTorch SDPA with the fastest backend on GPU) when the
``kernels`` package is installed, else plain SDPA; both use the softmax scale ``D**-0.5`` of the
original's flash-attention calls. Block sparse attention is ``kernels.block_sparse_attention``
(Triton on CUDA, its PyTorch reference elsewhere).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from longcat_tools.errors import LongcatError

if TYPE_CHECKING:
    from runner.dit import BSAParams

try:
    import kernels as _kernels
except ImportError:  # the kernels package is optional for dense runs
    _kernels = None


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal softmax attention on ``[B, H, S, D]``."""
    if _kernels is not None and q.is_cuda:
        return _kernels.attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def block_sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 latent_shape_q: tuple[int, int, int], latent_shape_k: tuple[int, int, int],
                 params: BSAParams) -> torch.Tensor:
    """3D block sparse attention with the transformer config's ``bsa_params``."""
    if _kernels is None or not hasattr(_kernels, "block_sparse_attention"):
        raise LongcatError("block sparse attention needs the 'kernels' package of longcat-tools "
                           "(install it, or run with --bsa off)")
    return _kernels.block_sparse_attention(
        q, k, v, latent_shape_q, latent_shape_k, sparsity=params.sparsity,
        cdf_threshold=params.cdf_threshold, chunk_q=tuple(params.chunk_q),
        chunk_k=tuple(params.chunk_k))
