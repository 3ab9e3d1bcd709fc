"""Fused versions of the DiT's memory-bound glue, for bf16/fp16 runs on the GPU.

The plain path in ``runner.dit`` follows the original op by op: every adaLN modulation, norm,
RoPE and gated residual upcasts a full activation to fp32 and makes several passes over it.
Here each of those becomes one function that computes the same math (fp32 inside, same casts at
the same points) and is handed to ``torch.compile``, so it runs as one or two kernels that read
and write the activation once in its own dtype.

The plain path stays the reference: fp32 runs never come here (``use`` is false), so fp32/CPU
outputs are bit-identical with or without fast ops. When compiling is unavailable or fails, the
same functions run eagerly (correct, just not faster); ``LONGCAT_NO_COMPILE=1`` forces that.

On CUDA with Triton the row-wise glue goes to hand-written kernels instead
(``kernels.triton_norm``: one read and one write per row, residual and norm fused, q/k written
token-major for the attention kernels); ``LONGCAT_NO_TRITON_NORM=1`` turns that off. The
dispatchers below (``adaln``, ``residual_layer_norm``, ``residual``, ``qk_norm_rope``,
``swiglu``, ``head_rms_norm``) pick the Triton kernels or the compiled functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longcat_tools.kernels import fp8
from longcat_tools.kernels.compiled import Compiled
from longcat_tools.kernels.compiled import triton_rows as _rows

_HALF = (torch.bfloat16, torch.float16)
# fp8 runs: the glue hands its GEMM inputs over as e4m3 rows where asked (``e4m3=True``), the
# Triton kernels writing them so directly; False: bf16, which each GEMM then scales in a pass
# of its own (the earlier path). On an H200 that saved 1.05 / 2.38 GiB at the 480p / 720p peak
# and 0.2 / 0.5% of the time (benchmarks/fp8_glue.py, results/vs_original.md).
E4M3_GLUE = True


def use(enabled: bool, x: torch.Tensor) -> bool:
    """Whether to take the fused path: switched on, and a half-precision activation."""
    return enabled and x.dtype in _HALF


# ---- the fused functions (eager definitions; the math of runner.dit's plain path) -------------

def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
              eps: float) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale) + shift`` in fp32, cast back (no affine weights)."""
    xf = x.float()
    return (F.layer_norm(xf, xf.shape[-1:], None, None, eps) * (scale + 1) + shift).to(x.dtype)


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                eps: float) -> torch.Tensor:
    """LayerNorm in fp32 with upcast affine weights, cast back."""
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).to(x.dtype)


def _gated_residual(x: torch.Tensor, h: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``(x + gate * h)`` with the fp32 gate, cast back to x's dtype."""
    return (x + gate * h).to(x.dtype)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def _norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               eps: float) -> torch.Tensor:
    """Per-head RMSNorm then interleaved RoPE in fp32, with the plain path's two roundings."""
    xf = _rms_norm(x, weight, eps).float()
    pairs = xf.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (xf * cos + rotated * sin).type_as(x)


def _swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.silu(a) * b


modulate = Compiled(_modulate)
layer_norm = Compiled(_layer_norm)
gated_residual = Compiled(_gated_residual)
rms_norm = Compiled(_rms_norm)
norm_rope = Compiled(_norm_rope)
swiglu_fused = Compiled(_swiglu)
ALL = (modulate, layer_norm, gated_residual, rms_norm, norm_rope, swiglu_fused,
       fp8.quantize_rows_fused)


def compile_status() -> dict[str, str]:
    """``{function: "compiled" | "eager" | "unused"}`` for reports."""
    out = {}
    for c in ALL:
        out[c.fn.__name__.lstrip("_")] = c.status
    return out


def set_compile(enabled: bool) -> None:
    """Turn compiling on or off for every fused function (off: eager, same math)."""
    for c in ALL:
        c.failed = not enabled
        c.compiled = None


# ---- dispatch: Triton row kernels on CUDA, else the compiled (or eager) functions ----------

def _frames(x: torch.Tensor, frames: int) -> tuple[int, int, int, int]:
    B, N, C = x.shape
    return B, frames, N // frames, C


def _as_rows(h: torch.Tensor, e4m3: bool) -> torch.Tensor | fp8.Rows:
    return fp8.quantize_input(h) if e4m3 and E4M3_GLUE else h


def adaln(x: torch.Tensor, frames: int, shift: torch.Tensor, scale: torch.Tensor, eps: float,
          res: torch.Tensor | None = None, gate: torch.Tensor | None = None,
          e4m3: bool = False) -> tuple[torch.Tensor, torch.Tensor | fp8.Rows]:
    """``x' = x [+ [gate *] res]`` then ``(x', LayerNorm(x') * (1 + scale) + shift)``.

    ``x``, ``res``: ``[B, N, C]``; ``shift``/``scale``/``gate``: per frame ``[B, T, 1, C]``.
    ``e4m3``: the second result as ``fp8.Rows`` (for fp8 GEMMs): ``fp8.quantize_input`` of the
    bf16 result, which the Triton kernel writes directly (``kernels.triton_norm``).
    """
    tn = _rows(x)
    if tn is not None:
        x_new, h = tn.fused_rows(x, frames, res=res, gate=gate, norm="modulate", shift=shift,
                                 scale=scale, eps=eps, e4m3=e4m3 and E4M3_GLUE)
        return (x if x_new is None else x_new), h
    fr = _frames(x, frames)
    if res is not None:
        x = residual(x, frames, res, gate)
    return x, _as_rows(modulate(x.view(fr), shift, scale, eps).view(x.shape), e4m3)


def residual(x: torch.Tensor, frames: int, res: torch.Tensor,
             gate: torch.Tensor | None) -> torch.Tensor:
    """``x + gate * res`` (fp32 gate, per frame) or ``x + res``, in x's dtype."""
    tn = _rows(x)
    if tn is not None:
        return tn.fused_rows(x, frames, res=res, gate=gate)[0]
    if gate is None:
        return x + res
    fr = _frames(x, frames)
    return gated_residual(x.view(fr), res.view(fr), gate).view(x.shape)


def residual_layer_norm(x: torch.Tensor, frames: int, res: torch.Tensor, gate: torch.Tensor,
                        weight: torch.Tensor, bias: torch.Tensor, eps: float,
                        e4m3: bool = False) -> tuple[torch.Tensor, torch.Tensor | fp8.Rows]:
    """``x' = x + gate * res``, then ``(x', LayerNorm(x'; weight, bias))``; ``e4m3`` as in
    ``adaln``."""
    tn = _rows(x)
    if tn is not None:
        return tn.fused_rows(x, frames, res=res, gate=gate, norm="layer_norm", weight=weight,
                             bias=bias, eps=eps, e4m3=e4m3 and E4M3_GLUE)
    x = residual(x, frames, res, gate)
    return x, _as_rows(layer_norm(x, weight, bias, eps), e4m3)


def qk_norm_rope(qkv: torch.Tensor, heads: int, q_weight: torch.Tensor,
                 k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k ``[B, H, N, D]`` of the qkv projection ``[B, N, 3C]``: RMSNorm, then RoPE.

    With the Triton kernels both are views of token-major tensors (one pass for both).
    """
    B, N, _ = qkv.shape
    tn = _rows(qkv)
    if tn is not None and tn.supported(heads, q_weight.shape[0]):
        q, k = tn.head_norm_rope(qkv, heads, [q_weight, k_weight], cos, sin, eps)
        return q, k
    q, k = qkv.view(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)[:2]
    return norm_rope(q, q_weight, cos, sin, eps), norm_rope(k, k_weight, cos, sin, eps)


def swiglu(a: torch.Tensor, b: torch.Tensor, e4m3: bool = False) -> torch.Tensor | fp8.Rows:
    """The FFN's ``silu(a) * b``, in one pass; ``e4m3`` as in ``adaln``."""
    tn = _rows(a)
    if tn is not None and a.is_contiguous() and b.is_contiguous() and a.shape == b.shape \
            and a.dtype == b.dtype:
        return tn.swiglu(a, b, e4m3=e4m3 and E4M3_GLUE)
    return _as_rows(swiglu_fused(a, b), e4m3)


def head_rms_norm(x: torch.Tensor, heads: int, weight: torch.Tensor,
                  eps: float) -> torch.Tensor:
    """Per-head RMSNorm of ``x`` ``[B, N, C]``, returned as ``[B, H, N, D]``."""
    B, N, C = x.shape
    tn = _rows(x)
    if tn is not None and tn.supported(heads, weight.shape[0]):
        return tn.head_norm_rope(x, heads, [weight], None, None, eps)[0]
    return rms_norm(x.view(B, N, heads, C // heads), weight, eps).transpose(1, 2)
