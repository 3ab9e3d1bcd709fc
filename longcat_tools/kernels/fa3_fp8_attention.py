"""Dense fp8 attention through FlashAttention-3's FP8 forward (``kernels.fa3``; Hopper only).

Why FA3: at D = 128 an fp8 attention gains only if the softmax's exponentials run beside the
e4m3 GEMMs; FA3's two warp groups take turns (ping-pong) and issue the next tile's Q K^T during
this tile's softmax, faster than cuDNN's FP8 SDPA (``kernels.fa3``).

The recipe is ``cudnn_fp8_attention``'s, by the same passes (``quantize``): q, and k and v less
their means, as e4m3 with one float32 scale per tensor, which FA3 takes as descales per
(batch, head). Inside, FA3 rounds p to e4m3 as ``p * 256`` against its running maximum (cuDNN:
``p * 448``; ``fp8_attention.reference_per_tensor(p_scale=256)``) and writes O in bf16 (so v's
mean needs no smoothing for O's sake, only for v's rounding). One pass then adds v's mean in
float32 and rounds once to q's dtype (an fp16 call's O is rounded to bf16 first).
"""

from __future__ import annotations

import torch

from . import fa3

_ONES: dict[torch.device, torch.Tensor] = {}


def supported(q: torch.Tensor) -> bool:
    """Whether FA3 may take the call: bf16/fp16 q on a Hopper GPU, D a power of two (the
    scaling pass's tiles) that the installed FA3 has with its FP8 forward."""
    D = q.shape[-1]
    return (q.dtype in (torch.bfloat16, torch.float16) and D & (D - 1) == 0
            and fa3.covers(q, torch.float8_e4m3fn))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Non-causal softmax attention, scale ``D**-0.5``, in e4m3 through FA3; ``[B, H, Sq, D]``
    in q's dtype, token-major unless ``out`` (a ``[B, H, Sq, D]`` view) is given. None where
    FA3 refuses the shape (the caller takes another path).

    q, k, v: bf16/fp16 ``[B, H, S, D]`` views (e.g. of the qkv projection)."""
    from .cudnn_fp8_attention import quantize, scale_cast, token_major  # Triton: CUDA only

    if fa3.refused(q, k, torch.float8_e4m3fn):  # before its passes
        return None
    B, H, Sq, D = q.shape
    with torch.cuda.device(q.device):
        q8, k8, v8, scales, v_mean = quantize(q, k, v)
        o = fa3.forward(q8, k8, v8, **{f"{n}_descale": s.expand(B, H)
                                       for n, s in zip("qkv", scales, strict=True)})
        if o is None:
            return None
        if q.device not in _ONES:
            _ONES[q.device] = torch.ones(1, device=q.device)
        result = out if out is not None else token_major(B, H, Sq, D, q.dtype, q.device)
        return scale_cast(o, result, _ONES[q.device], v_mean)
