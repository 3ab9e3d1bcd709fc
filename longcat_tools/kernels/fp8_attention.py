"""fp8-mode attention: what the quantized kernels compute, in PyTorch, and when they run.

Three kernels: ``triton_fp8_attention`` (ours, dense and inside the BSA forward) and, before it
for dense calls (``DENSE_KERNELS``), ``fa3_fp8_attention`` where FlashAttention-3 is built and
``cudnn_fp8_attention`` where NVIDIA's ``cudnn`` frontend is installed. This module holds
their arithmetic as plain tensor code (``reference``, ``reference_per_tensor``: every
quantization step, on any device), so tests can hold the kernels to it; which kinds an fp8 model
quantizes by default (``ENABLED``; a model's ``fp8_attention`` overrides it); and which kernel
takes a call asked to quantize (``kernels_for``), counted in ``CALLS``.

The Triton kernels' quantization, per ``[B, H]`` head:
- q: int8, ``round(q / s)`` half away from zero, one float32 scale ``s = amax / 127`` per token;
- k: its mean over the sequence subtracted (the softmax does not see a vector added to every
  key), then like q (dense), or with one scale for the whole head (block sparse,
  ``key_scale="head"``: no multiply per score, 6-7% faster at 0.2% more error;
  ``kernels/README.md``);
- v: e4m3, one scale per channel over the whole sequence (amax / 448);
- p = exp(s - max) <= 1 as e4m3 of ``p * 448``; the row sums use p before quantization.
"""

from __future__ import annotations

import importlib
import logging
from collections import Counter
from types import ModuleType

import torch

from longcat_tools.model import fp8 as fp8_format

from .fp8 import E4M3, E4M3_MAX, MIN_SCALE

log = logging.getLogger(__name__)

# Which attention an fp8 model runs quantized unless told otherwise (``run --fp8-attention
# auto``; a model's ``fp8_attention``), dense and block sparse; starts as
# ``model.fp8.ATTENTION_DEFAULT``: both (benchmarks/results/vs_original.md).
KINDS = fp8_format.ATTENTION_KINDS
ENABLED = {kind: kind in fp8_format.ATTENTION_DEFAULT for kind in KINDS}
# The quantized kernels a dense call tries, in order; the first that builds for the shape runs,
# else bf16. On an H100 at 480p, cuDNN's (V less its mean) left a whole forward 6.540% from
# fp32 and ours 6.543%, as bf16 attention does (the fp8 GEMMs' error); with cuDNN's the forward
# took 2.545 s against 3.068 s with attention in bf16, and a distill step 2.51 s against 2.99 s
# with ours (benchmarks/results/vs_original.md). Without NVIDIA's frontend
# (``longcat-tools[fp8]``) cuDNN's does not build and ours runs. FlashAttention-3's FP8
# forward, where built, runs cuDNN's recipe faster (``kernels.fa3``).
DENSE_KERNELS = ["fa3", "cudnn", "triton"]
# warned once: the kinds asked to quantize with no kernel; "cudnn", ours ran for want of its
# frontend
_WARNED: set[str] = set()
_NEEDS = {"fa3": "FlashAttention-3's FP8 forward needs FA3 built from its sources "
                 "(flash-attention/hopper) with FP8 and the head size, and a Hopper GPU",
          "cudnn": "cuDNN's FP8 attention needs NVIDIA's frontend (pip install "
                   "nvidia-cudnn-frontend), a Hopper or newer GPU, bf16/fp16 and a head size "
                   "that is a power of two from 16 to 256",
          "triton": "our Triton kernels need bf16/fp16, an sm89+ GPU and a head size that is a "
                    "power of two from 32 to 256"}
# Quantized attention calls per "kind kernel" since the last clear (a run's sidecar reports
# them, so a run says which kernel took its calls, if any).
CALLS: Counter[str] = Counter()


def int8_scale(amax: torch.Tensor) -> torch.Tensor:
    """The int8 scale of values up to ``amax``: ``amax / 127``, 1 where there are none (0)."""
    return torch.where(amax > 0, amax / 127.0, 1.0)


def _int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x through int8 as ``round(x / scale)`` half away from zero, in float32."""
    y = x / scale
    return torch.trunc(y + torch.copysign(torch.full_like(y, 0.5), y)).clamp(-127, 127) * scale


def _int8_rows(x: torch.Tensor) -> torch.Tensor:
    """x through int8 with a scale per row (amax / 127; 1 for an all-zero row), in float32."""
    return _int8(x, int8_scale(x.abs().amax(dim=-1, keepdim=True)))


def _e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The e4m3 value of ``x * (1 / scale)`` (clamped to +-448) times ``scale``, in float32:
    the kernels multiply by the scale's reciprocal (``fp8.quantize_rows``)."""
    inv = torch.ones_like(scale) / scale
    return (x * inv).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).to(torch.float32) * scale


def key_mean(k: torch.Tensor) -> torch.Tensor:
    """The mean of k over the sequence, float32 ``[B, H, D]``: what smoothing subtracts."""
    return k.mean(dim=2, dtype=torch.float32)


def value_scales(v: torch.Tensor) -> torch.Tensor:
    """v's e4m3 scales, one per channel over the sequence (amax / 448, 1 for an all-zero
    channel), float32 ``[B, H, D]``."""
    amax = _amax(v, dim=2)
    return torch.where(amax > 0, amax / E4M3_MAX, 1.0)


def _amax(x: torch.Tensor, **dim: int) -> torch.Tensor:
    """``max|x|`` (over ``dim``) in float32, in one read of x and no temporary (``abs`` would
    write a copy: 0.7 GB for v at 720p)."""
    lo, hi = torch.aminmax(x, **dim)
    return torch.maximum(hi, -lo).to(torch.float32)


def per_tensor_scales(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                 torch.Tensor]:
    """The per-tensor recipe's e4m3 scales of q, k less its mean and v less its mean (float32
    scalars, ``tensor_scale``), and the means of k and v ``[B, H, D]``.

    v loses its mean because cuDNN's O is e4m3 on Hopper: O = P (v - mean) + mean exactly
    (a row of P sums to one), so the rounding of O falls on what varies between queries, not
    on the mean that diffuse attention mostly returns (on such rows an e4m3 O of raw v lands
    ~2.6% from fp32, against ~0.2% smoothed; ``reference_per_tensor``)."""
    k_mean, v_mean = key_mean(k), key_mean(v)
    amax = (_amax(q), _amax_less(k, k_mean), _amax_less(v, v_mean))
    s_q, s_k, s_v = (tensor_scale(a) for a in amax)
    return s_q, s_k, s_v, k_mean, v_mean


def tensor_scale(amax: torch.Tensor) -> torch.Tensor:
    """A per-tensor e4m3 scale from its ``max|x|``: ``amax / 448``, at least ``MIN_SCALE``
    (its reciprocal stays finite), 1 for an all-zero (or NaN) tensor."""
    return torch.where(amax > 0, (amax / E4M3_MAX).clamp(min=MIN_SCALE), 1.0)


def normed_scale(weight: torch.Tensor) -> torch.Tensor:
    """q's e4m3 scale bounded from its RMSNorm ``weight`` ``[D]``, known before q is.

    A normalised row has ``sum(x**2) <= D``, so no channel exceeds ``sqrt(D) * max|weight|``,
    and RoPE only rotates pairs of channels; ``2**-5`` more covers the bf16 roundings on the way.
    So the fused norm can write q as e4m3 at once (``triton_norm.head_norm_rope``) instead of
    writing bf16, reading it for its maximum and again to scale it. e4m3 is floating point:
    a scale a few times the measured one only moves q's smallest values (below ~4e-4 of the
    weight) into subnormals."""
    bound = weight.detach().abs().amax().float() * (weight.shape[-1] ** 0.5 * (1 + 2**-5))
    return tensor_scale(bound)


def _amax_less(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``max|x - mean|`` over a ``[B, H, S, D]`` tensor from its per-channel extremes
    (``x - mean`` rises with x), in the float32 the scaling pass subtracts in."""
    lo, hi = torch.aminmax(x, dim=2)
    return torch.maximum(hi.float() - mean, mean - lo.float()).amax()


def reference_per_tensor(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         out_e4m3: bool = False, p_scale: float = E4M3_MAX,
                         q_scale: torch.Tensor | None = None) -> torch.Tensor:
    """cuDNN's FP8 recipe (``cudnn_fp8_attention``; FA3's with ``p_scale=256``) in float32
    ``[B, H, Sq, D]``: q, and k and v less their means, through e4m3 with
    ``per_tensor_scales``, p as e4m3 of ``p * p_scale`` against the row's maximum, row sums of
    p before rounding; ``out_e4m3``: O (less v's mean) through e4m3 with the scale
    ``2 * s_v``, as cuDNN's on Hopper; ``q_scale``: q's scale given (``normed_scale``). Where a
    kernel's rounding of p differs (a running maximum), the GPU tests allow for it."""
    s_q, s_k, s_v, k_mean, v_mean = per_tensor_scales(q, k, v)
    s_q = s_q if q_scale is None else q_scale
    k = k.to(torch.float32) - k_mean[:, :, None]
    v = v.to(torch.float32) - v_mean[:, :, None]
    qd, kd, vd = (_e4m3(x.to(torch.float32), s) for x, s in ((q, s_q), (k, s_k), (v, s_v)))
    s = qd @ kd.transpose(-1, -2) * q.shape[-1] ** -0.5
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))
    pq = (p * p_scale).to(E4M3).to(torch.float32) / p_scale
    o = (pq @ vd) / p.sum(dim=-1, keepdim=True)
    return (_e4m3(o, 2 * s_v) if out_e4m3 else o) + v_mean[:, :, None]


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              allowed: torch.Tensor | None = None, key_scale: str = "token") -> torch.Tensor:
    """The kernels' arithmetic with a global row maximum (a kernel's running maximum quantizes
    ``p`` against a smaller one until the row's maximum is seen); float32 ``[B, H, Sq, D]``.

    ``allowed``: ``[B, H, Sq, Sk]`` keys each query may see (block sparse attention; the mean
    of k is still over all keys, as the kernel takes it); a row with none gives zeros.
    ``key_scale``: "token" (the dense kernel) or "head" (the block sparse forward)."""
    k = k.to(torch.float32) - key_mean(k)[:, :, None]
    vd = _e4m3(v.to(torch.float32), value_scales(v)[:, :, None])
    q = q.to(torch.float32)
    if key_scale == "head":
        kq = _int8(k, int8_scale(k.abs().amax(dim=(-2, -1), keepdim=True)))
    elif key_scale == "token":
        kq = _int8_rows(k)
    else:
        raise ValueError(f"key_scale {key_scale!r}: 'token' or 'head'")
    s = _int8_rows(q) @ kq.transpose(-1, -2) * q.shape[-1] ** -0.5
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    top = s.amax(dim=-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isinf(top), 0.0, top))
    pq = (p * E4M3_MAX).to(E4M3).to(torch.float32) / E4M3_MAX  # the kernels' rounding
    total = p.sum(dim=-1, keepdim=True)
    return (pq @ vd) / torch.where(total == 0, 1.0, total)


def quantized_kernel(name: str) -> ModuleType | None:
    """The module of a ``DENSE_KERNELS`` entry (imported on first use: both need CUDA), None
    where it cannot be imported (a CUDA build without Triton)."""
    try:
        return importlib.import_module(f".{name}_fp8_attention", __package__)
    except ImportError:
        return None


def default_kinds() -> frozenset[str]:
    """The kinds ``ENABLED`` turns on: what an fp8 model quantizes by default."""
    return frozenset(kind for kind, on in ENABLED.items() if on)


def kernels_for(q: torch.Tensor, kind: str = "dense") -> list[ModuleType]:
    """The quantized kernels that cover an attention call asked to quantize (``kind``: dense
    or bsa), in the order to try them: dense, those of ``DENSE_KERNELS``; bsa, the Triton
    kernel (the BSA caller has checked the rest of the call). Empty: it stays in bf16."""
    if not q.is_cuda:
        return []
    names = DENSE_KERNELS if kind == "dense" else ["triton"]
    modules = [quantized_kernel(name) for name in names]
    found = [m for m in modules if m is not None and m.supported(q)]
    cudnn = dict(zip(names, modules, strict=True)).get("cudnn")
    if not found and kind not in _WARNED:
        _WARNED.add(kind)
        log.warning("fp8 %s attention: no quantized kernel covers %s %s here (%s); attending "
                    "in %s", kind, q.dtype, tuple(q.shape),
                    "; ".join(_NEEDS.get(n, f"no kernel {n!r}") for n in names)
                    or "none is listed", q.dtype)
    elif (found and cudnn is not None and "cudnn" not in _WARNED
          and modules.index(found[0]) > names.index("cudnn") and cudnn.only_frontend_missing(q)):
        _WARNED.add("cudnn")
        log.warning("fp8 dense attention: our Triton kernel runs. cuDNN's is faster on this "
                    "GPU (a 480p forward 17%% faster on an H100) and needs NVIDIA's cuDNN "
                    "frontend 1.13+ over cuDNN 9.1+: pip install nvidia-cudnn-frontend "
                    "(or longcat-tools[fp8])")
    return found


def use(q: torch.Tensor, kind: str = "dense") -> bool:
    """Whether a quantized kernel covers the call (``kernels_for``)."""
    return bool(kernels_for(q, kind))


def count(kind: str, kernel: ModuleType) -> None:
    """One quantized call of ``kind`` by ``kernel`` into ``CALLS`` (``"dense cudnn"``, ...)."""
    CALLS[f"{kind} {kernel.__name__.rsplit('.', 1)[-1].removesuffix('_fp8_attention')}"] += 1
