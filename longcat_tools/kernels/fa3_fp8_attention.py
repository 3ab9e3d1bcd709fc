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

``from_qkv`` is the DiT's dense self-attention from its qkv projection to its output
projection's e4m3 rows, with two passes fewer: q comes out of the fused RMSNorm + RoPE as e4m3
with a scale bounded from its norm weight (``fp8_attention.normed_scale``), never as bf16 with
statistics and a scaling pass of its own; and the output pass adds v's mean on the way to the
projection's per-token e4m3 (``triton_norm.e4m3_rows``), never writing O in bf16.
"""

from __future__ import annotations

import torch

from . import fa3
from .fp8 import E4M3, Rows

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


def from_qkv(qkv: torch.Tensor, heads: int, q_weight: torch.Tensor, k_weight: torch.Tensor,
             cos: torch.Tensor, sin: torch.Tensor, eps: float) -> Rows | None:
    """Dense self-attention of a qkv projection ``[B, N, 3 * H * D]`` (q and k through
    RMSNorm and RoPE, ``triton_norm.head_norm_rope``'s arguments), in e4m3 through FA3: the
    heads merged, as the per-token e4m3 ``Rows`` ``[B, N, H * D]`` that the output projection
    reads. None where FA3 does not take it (before any work, once it has refused)."""
    from . import triton_norm  # Triton: CUDA only
    from .cudnn_fp8_attention import quantize
    from .fp8_attention import normed_scale

    B, N, _ = qkv.shape
    D = q_weight.shape[0]
    v = qkv.view(B, N, 3, heads, D)[:, :, 2].transpose(1, 2)
    if not supported(v) or fa3.refused(v, v, E4M3):
        return None
    with torch.cuda.device(qkv.device):
        s_q = normed_scale(q_weight)
        q8, k = triton_norm.head_norm_rope(qkv, heads, [q_weight, k_weight], cos, sin, eps,
                                           q_scale=s_q)
        q8, k8, v8, scales, v_mean = quantize(q8, k, v, q_scale=s_q)
        o = fa3.forward(q8, k8, v8, **{f"{n}_descale": s.expand(B, heads)
                                       for n, s in zip("qkv", scales, strict=True)})
        if o is None:
            return None
        rows, scale = triton_norm.e4m3_rows(o.transpose(1, 2).reshape(B * N, heads * D),
                                            v_mean.reshape(B, heads * D))
    return Rows(rows.view(B, N, -1), scale.view(B, N, 1), qkv.dtype)
