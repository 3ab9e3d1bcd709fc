"""Dense attention through the fastest kernel available.

FlashAttention-3, where installed, goes first on Hopper (``kernels.fa3``: faster than cuDNN's, at
the same error). Then PyTorch's SDPA: there cuDNN's fused attention ran 1.8x faster
than the default flash backend (bf16, D=128, long video sequences), so it goes first.
``sdpa_kernel(..., set_priority=True)`` skips a backend whose input checks fail (CPU, fp32, odd
head sizes); a backend that passes the checks but still fails at run time is remembered and
skipped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import fa3, fp8_attention
from .fp8 import Rows

_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
             SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_cudnn_failed: set[tuple] = set()
# fp8 self-attention from the qkv projection in two passes fewer where FA3 takes it
# (``fp8_self_attention``); False: q and O by the generic passes (the benchmarks' baseline)
FUSED_FP8 = True


def _prefer_cudnn(q: torch.Tensor) -> bool:
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if torch.cuda.get_device_capability(q.device)[0] < 9:
        return False
    return (q.dtype, q.shape[-1], q.device.index) not in _cudnn_failed


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fp8: bool = False
              ) -> torch.Tensor:
    """Non-causal softmax attention, scale ``D**-0.5``, on ``[B, H, S, D]`` tensors (by FA3, a
    view of a token-major tensor).

    ``fp8``: quantized, by the first of ``fp8_attention.DENSE_KERNELS`` that takes the call
    (bf16 where none does), its output written token-major (a ``[B, S, H, D]``
    tensor's view), so merging the heads is free."""
    for kernel in fp8_attention.kernels_for(q, "dense") if fp8 else []:
        B, H, S, D = q.shape
        out = q.new_empty(B, S, H, D).transpose(1, 2)
        if kernel.attention(q, k, v, out=out) is not None:
            fp8_attention.count("dense", kernel)
            return out
    if fa3.covers(q):
        out = fa3.forward(q, k, v)
        if out is not None:
            return out
    return sdpa(q, k, v)


def fp8_self_attention(qkv: torch.Tensor, heads: int, q_weight: torch.Tensor,
                       k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       eps: float) -> Rows | None:
    """The DiT's dense self-attention in fp8, from its qkv projection ``[B, N, 3C]`` (q and k
    through RMSNorm and RoPE) to its output projection's e4m3 ``Rows``, where FA3's FP8
    forward is the first quantized kernel that covers it (``fa3_fp8_attention.from_qkv``).
    None: the caller normalises q and k and calls ``attention``."""
    if not FUSED_FP8:
        return None
    B, N, _ = qkv.shape
    v = qkv.view(B, N, 3, heads, -1)[:, :, 2].transpose(1, 2)
    found = fp8_attention.kernels_for(v, "dense")
    if not found or not hasattr(found[0], "from_qkv"):
        return None
    rows = found[0].from_qkv(qkv, heads, q_weight, k_weight, cos, sin, eps)
    if rows is not None:
        fp8_attention.count("dense", found[0])
    return rows


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch's SDPA, cuDNN's backend first on Hopper: dense attention where FA3 is not
    installed."""
    if _prefer_cudnn(q):
        try:
            with sdpa_kernel(_PRIORITY, set_priority=True):
                return F.scaled_dot_product_attention(q, k, v)
        except RuntimeError:
            _cudnn_failed.add((q.dtype, q.shape[-1], q.device.index))
    return F.scaled_dot_product_attention(q, k, v)
