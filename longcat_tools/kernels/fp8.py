"""fp8 (e4m3) linear layers: weights scaled per output channel, activations per token.

``y = (x * (1 / sx)) @ (W / sw).T * sx * sw + b`` with ``sw = max|W[o, :]| / 448`` per output
channel (computed once, stored beside the weight) and ``sx = max|x[t, :]| / 448`` per token
(computed on every call; an activation is multiplied by the reciprocal of its scale, rounded to
float32, rather than divided: a correctly rounded division per element nearly doubled the
instructions of the e4m3 row kernels in sm90 SASS, and the product differs from the quotient
only where the quotient sits on an e4m3 rounding boundary). One ``torch._scaled_mm`` runs the
product on e4m3 tensor cores with both scales applied in its epilogue (rowwise scaling: e4m3
tensor cores, sm89+, on torch builds that have it; tests/test_fp8_gpu.py checks it). Why
these granularities: per-channel weight and per-token activation scales are what cuBLASLt
applies in the epilogue at no cost, and one large token or row then cannot flatten the others
(one scale per tensor does). On random unit-variance data the product lands 3.7e-2 (relative)
from fp32, bf16 2.8e-3: e4m3 keeps 3 mantissa bits (tests/test_fp8.py).

``quantize_weight`` and ``dequantize_weight`` are exact inverses up to the e4m3 rounding: the
checkpoint format (``model.fp8``) stores what ``quantize_weight`` returns.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from longcat_tools.kernels.compiled import Compiled, triton_rows
from longcat_tools.model.fp8 import E4M3_MAX

E4M3 = torch.float8_e4m3fn
# the smallest activation scale: float32's smallest normal, so its reciprocal is finite (a row
# whose amax / 448 is smaller takes it, and its values stay within +-448)
MIN_SCALE = 2.0**-126


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[out, in]`` weight -> (e4m3 weight, float32 scale ``[out]``), per output channel.

    ``scale = max|row| / 448`` in float32 (1 for an all-zero row, so every scale is finite and
    positive); the weight is ``row / scale`` rounded to nearest e4m3, clamped to +-448 first
    (float32 division can land a hair above 448)."""
    wf = w.float()
    amax = wf.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / _limit(w.device), torch.ones_like(amax))
    return (wf / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3), scale.squeeze(1)


_LIMITS: dict[torch.device, torch.Tensor] = {}


def _limit(device: torch.device) -> torch.Tensor:
    """448 as a float32 tensor on ``device``: the divisor of every scale. Dividing by a tensor
    rounds correctly everywhere; CUDA divides by a Python number through its float32
    reciprocal, and a compiled kernel divides by a constant approximately, each one ulp off the
    CPU's division now and then."""
    if device not in _LIMITS:
        _LIMITS[device] = torch.full((), E4M3_MAX, dtype=torch.float32, device=device)
    return _LIMITS[device]


def is_e4m3(layer: torch.nn.Module) -> bool:
    """Whether ``layer`` holds an e4m3 ``weight`` (``Linear.to_fp8``); other quantized layers
    (the avatar's INT8 ones) carry a ``weight_scale`` too, so the weight's dtype decides."""
    weight = getattr(layer, "weight", None)
    return weight is not None and weight.dtype == E4M3


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q.float() * scale`` per output row, in float32, then one cast to ``dtype``."""
    return (q.float() * scale.float().reshape(-1, 1)).to(dtype)


def _quantize_rows(x: torch.Tensor, limit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation rows as ``quantize_weight`` scales weight rows, but with the scale at least
    ``MIN_SCALE`` and each row multiplied by its reciprocal: a division of tensors, rounded to
    nearest eagerly on every device and, under ``compiled.eager_division``, compiled too."""
    xf = x.float()
    amax = xf.abs().amax(dim=1, keepdim=True)
    one = torch.ones_like(amax)
    scale = torch.where(amax > 0, (amax / limit).clamp_(min=MIN_SCALE), one)
    return (xf * (one / scale)).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


# Fused, the scaling is one kernel that reads the activation once and writes e4m3, instead of
# eager's fp32 copy and four more passes, with the same bits (it rounds as eager does):
# Triton's ``triton_norm.e4m3_rows`` on CUDA, else this function compiled (with
# ``LONGCAT_NO_TRITON_NORM=1``; where Triton is missing, inductor cannot compile it either and
# it runs eagerly).
quantize_rows_fused = Compiled(_quantize_rows, eager_bits=True)


def quantize_rows(x: torch.Tensor, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, K]`` activations -> (e4m3 ``[N, K]``, float32 scale ``[N, 1]``), per row (token):
    ``e4m3(x * (1 / scale))``; ``fused``: in one kernel (see ``quantize_rows_fused``), same
    bits."""
    rows = triton_rows(x) if fused and x.is_contiguous() else None
    if rows is not None:
        return rows.e4m3_rows(x)
    return (quantize_rows_fused if fused else _quantize_rows)(x, _limit(x.device))


# Whether the e4m3 GEMMs accumulate in the tensor cores' own precision (``use_fast_accum``)
# rather than promoting to float32 along K: on an H200 at 480p/93's shapes 0.88-0.94x the time,
# 2.1-3.0e-3 from float32 products of the same operands instead of 1.7e-3, against ~3.7e-2 for
# quantizing them (benchmarks/results/fp8_attention.md, benchmarks/fp8_gemm.py).
FAST_ACCUM = True


def scaled_mm_ok(in_features: int, out_features: int) -> bool:
    """Whether ``torch._scaled_mm`` takes these sizes (both multiples of 16)."""
    return in_features % 16 == 0 and out_features % 16 == 0


class Rows(NamedTuple):
    """An activation scaled to e4m3 per token, what ``linear`` reads in its place: made once for
    layers that share an input (the FFN's w1 and w3), or by the kernel that computed the
    activation (``triton_norm``'s ``e4m3=True``), which then never writes it in bf16."""

    q: torch.Tensor  # e4m3 [..., K]
    scale: torch.Tensor  # float32 [..., 1]
    dtype: torch.dtype  # the activation's, and so the GEMM output's

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def device(self) -> torch.device:
        return self.q.device


def quantize_input(x: torch.Tensor) -> Rows:
    """``x [..., K]`` as ``linear`` scales it (per token, one kernel on CUDA)."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # _scaled_mm takes a row-major mat1
    q, s = quantize_rows(x2, fused=x2.is_cuda)
    return Rows(q.view(x.shape), s.view(*x.shape[:-1], 1), x.dtype)


def linear(x: torch.Tensor | Rows, weight: torch.Tensor, scale: torch.Tensor,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with an e4m3 ``weight`` and its ``[out]`` scale, of an activation or of its
    ``Rows``; output in the activation's dtype.

    bf16 inputs on CUDA run one rowwise-scaled e4m3 GEMM (the bias added in its epilogue;
    rowwise scaling gives bf16 out only on some torch builds, so fp16 is not sent there). Other
    dtypes, sizes ``_scaled_mm`` refuses, and the CPU (whose ``_scaled_mm`` takes one scale per
    tensor up to torch 2.11) multiply the dequantized operands in float32: the same operands,
    slower."""
    out_features, in_features = weight.shape
    rows = x if isinstance(x, Rows) else quantize_input(x)
    xq = rows.q.reshape(-1, in_features)  # a copy only for a strided slice of rows
    sx = rows.scale.reshape(-1, 1)
    if sx.data_ptr() % 16:  # a slice of a frame's tokens: give cuBLASLt an aligned pointer
        sx = sx.clone()
    if xq.is_cuda and rows.dtype == torch.bfloat16 and scaled_mm_ok(in_features, out_features):
        y = torch._scaled_mm(xq, weight.t(), scale_a=sx, scale_b=scale.float().view(1, -1),
                             bias=None if bias is None else bias.to(rows.dtype),
                             out_dtype=rows.dtype, use_fast_accum=FAST_ACCUM)
    else:
        y = F.linear(xq.float() * sx, dequantize_weight(weight, scale),
                     None if bias is None else bias.float()).to(rows.dtype)
    return y.reshape(*rows.shape[:-1], out_features)
