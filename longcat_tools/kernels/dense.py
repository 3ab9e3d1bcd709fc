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

_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
             SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_cudnn_failed: set[tuple] = set()


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
