"""fp8-mode attention: what the int8/e4m3 kernel computes, in PyTorch, and when it runs.

``triton_fp8_attention`` is the kernel. This module holds its arithmetic as plain tensor code
(``reference``: every quantization step the kernel takes, on any device), so tests can hold the
kernel to it, and ``use``, the one place that decides whether a call takes the kernel.

Quantization, per ``[B, H]`` head:
- q: int8, ``round(q / s)`` half away from zero, one float32 scale ``s = amax / 127`` per token;
- k: its mean over the sequence subtracted (the softmax does not see a vector added to every
  key), then like q;
- v: e4m3, one scale per channel over the whole sequence (amax / 448);
- p = exp(s - max) <= 1 as e4m3 of ``p * 448``; the row sums use p before quantization.
"""

from __future__ import annotations

import torch

from .fp8 import E4M3, E4M3_MAX

# Whether ``--precision fp8`` also runs attention quantized (on sm_89+ CUDA with Triton),
# dense and block sparse. Both off: on an H100 neither made a DiT forward faster by more than 1%
# (benchmarks/results/fp8_attention.md), for 17 times bf16's error.
ENABLED = {"dense": False, "bsa": False}


def _int8_rows(x: torch.Tensor) -> torch.Tensor:
    """x through int8 with a scale per row (amax / 127; 1 for an all-zero row), in float32."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, 1.0)
    y = x / scale
    return torch.trunc(y + torch.copysign(torch.full_like(y, 0.5), y)).clamp(-127, 127) * scale


def _e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The e4m3 value of ``x / scale`` times ``scale``, in float32."""
    return (x / scale).to(E4M3).to(torch.float32) * scale


def key_mean(k: torch.Tensor) -> torch.Tensor:
    """The mean of k over the sequence, float32 ``[B, H, D]``: what smoothing subtracts."""
    return k.mean(dim=2, dtype=torch.float32)


def value_scales(v: torch.Tensor) -> torch.Tensor:
    """v's e4m3 scales, one per channel over the sequence (amax / 448, 1 for an all-zero
    channel), float32 ``[B, H, D]``. One read of v and no temporary (``abs`` would write a
    copy of v: 0.7 GB at 720p)."""
    lo, hi = torch.aminmax(v, dim=2)
    amax = torch.maximum(hi, -lo).to(torch.float32)
    return torch.where(amax > 0, amax / E4M3_MAX, 1.0)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The kernels' arithmetic with a global row maximum (a kernel's running maximum quantizes
    ``p`` against a smaller one until the row's maximum is seen); float32 ``[B, H, Sq, D]``.

    ``allowed``: ``[B, H, Sq, Sk]`` keys each query may see (block sparse attention; the mean
    of k is still over all keys, as the kernel takes it); a row with none gives zeros."""
    k = k.to(torch.float32) - key_mean(k)[:, :, None]
    vd = _e4m3(v.to(torch.float32), value_scales(v)[:, :, None])
    q = q.to(torch.float32)
    s = _int8_rows(q) @ _int8_rows(k).transpose(-1, -2) * q.shape[-1] ** -0.5
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    top = s.amax(dim=-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isinf(top), 0.0, top))
    pq = (p * E4M3_MAX).to(E4M3).to(torch.float32) / E4M3_MAX  # the kernels' rounding
    total = p.sum(dim=-1, keepdim=True)
    return (pq @ vd) / torch.where(total == 0, 1.0, total)


def use(q: torch.Tensor, kind: str = "dense") -> bool:
    """Whether an attention call (``kind``: dense or bsa) of an fp8 run takes the quantized
    kernel; the BSA caller has checked the Triton path covers the rest of the call."""
    if not (ENABLED[kind] and q.is_cuda):
        return False
    from . import triton_fp8_attention

    return triton_fp8_attention.supported(q)
