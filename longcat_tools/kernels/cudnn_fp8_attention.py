"""Dense fp8 attention through cuDNN's fused FP8 SDPA (NVIDIA's ``cudnn`` frontend graph API).

Why cuDNN: at D = 128 the softmax's exponentials cost as much as fp8 tensor-core GEMMs, so an
fp8 forward gains only if it runs them beside the GEMMs (warp-specialized ping-pong, as in
FlashAttention-3). Triton 3.6 does not do that on Hopper, and our Triton fp8 kernel only matches
cuDNN's bf16 attention (``benchmarks/results/fp8_attention.md``); cuDNN's FP8 kernel does.

The recipe is cuDNN's (per tensor), its arithmetic spelled out in
``fp8_attention.reference_per_tensor``:

- q, k, v: e4m3 of ``x * (1 / s)``, one float32 scale ``s`` per tensor (``per_tensor_scales``); k
  and v first lose their means over the sequence (the softmax ignores a vector added to every
  key; a row of P sums to one, so v's mean is added back to O exactly);
- P: e4m3 of ``p * 448`` inside cuDNN;
- O: in q's dtype where this cuDNN gives it; otherwise (Hopper, cuDNN 9.x) e4m3 with the scale
  ``2 * s_v`` (an output row is an average of value rows, so it stays within ``max|v|``; the
  factor 2 leaves room for P's rounding); then one pass multiplies it back and adds v's mean.

Launches: the statistics (``column_stats.tensor_scales``: one read of each of q, k and v),
three scaling passes (one Triton kernel, ``_scale_cast_kernel``, writing token-major
``[B, S, H, D]`` e4m3 copies, V less its mean), cuDNN's attention, and the output pass (O's
scale back, plus V's mean; where cuDNN writes O in bf16 that pass costs one more copy of O).
The scales stay on the GPU, so nothing waits for the host. A graph is built once per shape; a
shape cuDNN refuses is remembered and left to the caller's other paths.
"""

from __future__ import annotations

import functools
import logging

import torch
import triton
import triton.language as tl

from .column_stats import tensor_scales
from .fp8 import E4M3
from .triton_fp8_attention import e4m3_scaled

log = logging.getLogger(__name__)
# tokens a program of the scaling passes takes, and its warps. At 64 tokens and 4 warps the
# e4m3 pass took 249 registers a thread in sm90 SASS (two programs an SM) and 32 instructions an
# element; at 16 and 2, 56 registers and 26 instructions. Chosen offline; on an H100 the three
# passes then moved q, k and v at 480p in about 0.49 ms, 2.8 TB/s (vs_original.md, session 21)
CAST_CONFIG = {"rows": 16, "num_warps": 2}


@triton.jit
def _scale_cast_kernel(X, Y, SCALE, MEAN, sxb, sxh, sxs, syb, syh, sys, H, S,
                       BLOCK: tl.constexpr, D: tl.constexpr, SMOOTH: tl.constexpr,
                       TO_E4M3: tl.constexpr):
    """Rows ``[i * BLOCK, (i + 1) * BLOCK)`` of head ``bh``: ``Y = X * (1 / SCALE[0])`` (X less
    ``MEAN[bh]`` with SMOOTH) as e4m3 with PyTorch's bits (``e4m3_scaled``) (TO_E4M3), or
    ``Y = X * SCALE[0]`` (plus ``MEAN[bh]`` with SMOOTH) in Y's dtype (the output pass). Both
    ``[B, H, S, D]`` by strides."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = i * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, D)
    ok = (rows < S)[:, None]
    r = rows[:, None].to(tl.int64)
    x = tl.load(X + b * sxb + h * sxh + r * sxs + d[None, :], mask=ok, other=0.0).to(tl.float32)
    if TO_E4M3:
        if SMOOTH:
            x = x - tl.load(MEAN + bh * D + d)[None, :]
        y = e4m3_scaled(x, tl.div_rn(1.0, tl.load(SCALE)), Y.dtype.element_ty)
    else:
        if SMOOTH:  # one rounding, whatever the compiler would fuse
            y = tl.fma(x, tl.load(SCALE), tl.load(MEAN + bh * D + d)[None, :])
        else:
            y = x * tl.load(SCALE)
        y = y.to(Y.dtype.element_ty)
    tl.store(Y + b * syb + h * syh + r * sys + d[None, :], y, mask=ok)


def scale_cast(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor,
               mean: torch.Tensor | None = None) -> torch.Tensor:
    """One ``_scale_cast_kernel`` pass from ``x`` into ``y`` (both ``[B, H, S, D]`` views with
    unit stride along D); e4m3 ``y``: less ``mean`` and times ``1 / scale``, else multiplied
    by ``scale`` plus ``mean`` (float32 ``[B, H, D]``)."""
    B, H, S, D = x.shape
    rows = CAST_CONFIG["rows"]
    _scale_cast_kernel[(triton.cdiv(S, rows), B * H)](
        x, y, scale, mean if mean is not None else scale, *x.stride()[:3], *y.stride()[:3], H, S,
        rows, D, mean is not None, y.dtype == E4M3, num_warps=CAST_CONFIG["num_warps"])
    return y


def quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             q_scale: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                        tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The per-tensor recipe's inputs: token-major e4m3 copies of q, k less its mean and v less
    its mean (``scale_cast`` passes), their scales (``tensor_scales``) and v's mean
    ``[B, H, D]``, which the output pass adds back. ``q_scale``: q is e4m3 already, scaled by
    it (``fp8_attention.normed_scale``), and is passed through."""
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    s_q, s_k, s_v, k_mean, v_mean = tensor_scales(q if q_scale is None else None, k, v)
    if q_scale is None:
        q = scale_cast(q, token_major(*q.shape, E4M3, q.device), s_q)
    k8, v8 = (scale_cast(x, token_major(*x.shape, E4M3, x.device), s, mean)
              for x, s, mean in ((k, s_k, k_mean), (v, s_v, v_mean)))
    return q, k8, v8, (s_q if q_scale is None else q_scale, s_k, s_v), v_mean


def token_major(B: int, H: int, S: int, D: int, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """A ``[B, H, S, D]`` view of a new ``[B, S, H, D]`` tensor: the layout the DiT merges
    heads from without a copy, and the one every buffer of this module uses."""
    return torch.empty(B, S, H, D, dtype=dtype, device=device).transpose(1, 2)


def _dims(t: torch.Tensor) -> dict[str, list[int]]:
    return {"dim": list(t.shape), "stride": list(t.stride())}


class _Plan:
    """One built cuDNN graph for a shape: its tensors, workspace and output kind. ``build``
    False: the operation graph only, for a caller that picks its own execution plans
    (benchmarks/cudnn_attention_plans.py)."""

    def __init__(self, handle: int, B: int, H: int, Sq: int, Sk: int, D: int,
                 out_dtype: torch.dtype, device: torch.device, out_e4m3: bool,
                 build: bool = True) -> None:
        import cudnn

        f8, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        g = cudnn.pygraph(io_data_type=f8, intermediate_data_type=f32, compute_data_type=f32,
                          handle=handle)
        layout = torch.device("meta")  # the buffers' dims and strides, nothing allocated
        qs = token_major(B, H, Sq, D, E4M3, layout)
        ks = token_major(B, H, Sk, D, E4M3, layout)
        self.q, self.k, self.v = (g.tensor(name=n, data_type=f8, **_dims(t))
                                  for n, t in (("q", qs), ("k", ks), ("v", ks)))
        one = {"dim": [1, 1, 1, 1], "stride": [1, 1, 1, 1], "data_type": f32}
        self.scalars = [g.tensor(name=n, **one) for n in
                        ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s",
                         "scale_o")]
        o, _, amax_s, amax_o = g.sdpa_fp8(self.q, self.k, self.v, *self.scalars,
                                          generate_stats=False, attn_scale=D ** -0.5,
                                          use_causal_mask=False)
        o_type = f8 if out_e4m3 else getattr(cudnn.data_type, _OUT_TYPES[out_dtype])
        o.set_output(True).set_data_type(o_type).set_dim(list(qs.shape)).set_stride(
            list(qs.stride()))
        for a in (amax_s, amax_o):
            a.set_output(True).set_data_type(f32).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1])
        self.o, self.amax = o, (amax_s, amax_o)
        g.validate()
        g.build_operation_graph()
        self.graph, self.out_e4m3 = g, out_e4m3
        self.amax_out = torch.empty(2, dtype=torch.float32, device=device)
        if build:
            g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
            g.check_support()
            g.build_plans()
            self.workspace = torch.empty(g.get_workspace_size(), dtype=torch.uint8,
                                         device=device)

    def pack(self, q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, scalars: torch.Tensor,
             o: torch.Tensor) -> dict:
        """The variant pack: the e4m3 copies, ``o``, and ``scalars`` (float32 ``[6]`` in the
        order of ``self.scalars``)."""
        step = scalars.element_size()
        pack = {self.q: q8.data_ptr(), self.k: k8.data_ptr(), self.v: v8.data_ptr(),
                self.o: o.data_ptr(), self.amax[0]: self.amax_out.data_ptr(),
                self.amax[1]: self.amax_out.data_ptr() + step}
        pack.update({t: scalars.data_ptr() + i * step for i, t in enumerate(self.scalars)})
        return pack

    def run(self, handle: int, q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor,
            scalars: torch.Tensor, o: torch.Tensor) -> None:
        """Attention of the e4m3 copies into ``o`` (see ``pack``)."""
        import cudnn

        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(o.device).cuda_stream)
        self.graph.execute(self.pack(q8, k8, v8, scalars, o), self.workspace, handle=handle)


_OUT_TYPES = {torch.bfloat16: "BFLOAT16", torch.float16: "HALF"}  # cudnn.data_type names
_PLANS: dict[tuple, _Plan | None] = {}
_HANDLES: dict[int, int] = {}
_P_SCALES: dict[torch.device, torch.Tensor] = {}


MIN_FRONTEND = (1, 13)  # sdpa_fp8's generate_stats


@functools.cache
def _frontend() -> bool:
    """Whether NVIDIA's ``cudnn`` frontend (1.13+) imports and its backend has FP8 SDPA
    (cuDNN 9.1+)."""
    try:
        import cudnn

        version = tuple(int(p) for p in cudnn.__version__.split(".")[:2])
        return version >= MIN_FRONTEND and cudnn.backend_version() >= 90100
    except Exception:  # noqa: BLE001 - not installed, or no libcudnn it can load
        return False


def supported(q: torch.Tensor) -> bool:
    """Whether this path may take the call: CUDA Hopper or newer, bf16/fp16, D a power of two
    in 16..256 (the scaling pass's tiles), and the ``cudnn`` frontend installed
    (``pip install nvidia-cudnn-frontend``)."""
    return _covers(q) and _frontend()


def only_frontend_missing(q: torch.Tensor) -> bool:
    """Whether this path would take the call but for NVIDIA's frontend (worth telling users:
    it is the faster fp8 attention on such a GPU)."""
    return _covers(q) and not _frontend()


def _covers(q: torch.Tensor) -> bool:
    D = q.shape[-1]
    return (q.is_cuda and q.dtype in _OUT_TYPES and 16 <= D <= 256 and D & (D - 1) == 0
            and torch.cuda.get_device_capability(q.device)[0] >= 9)


def _plan(B: int, H: int, Sq: int, Sk: int, D: int, dtype: torch.dtype,
          device: torch.device) -> tuple[int, _Plan | None]:
    """The handle and graph for a shape: O in ``dtype`` if cuDNN builds that, else e4m3;
    None (remembered, and logged once) if cuDNN supports neither."""
    import cudnn

    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _HANDLES:
        with torch.cuda.device(index):
            _HANDLES[index] = cudnn.create_handle()
    handle = _HANDLES[index]
    key = (B, H, Sq, Sk, D, dtype, index)
    if key not in _PLANS:
        _PLANS[key] = None
        refusals = []
        for out_e4m3 in (False, True):
            try:
                _PLANS[key] = _Plan(handle, B, H, Sq, Sk, D, dtype, device, out_e4m3)
                break
            except (cudnn.cudnnGraphNotSupportedError, RuntimeError) as e:  # not this graph
                refusals.append(str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
        if _PLANS[key] is None:
            log.warning("cuDNN builds no FP8 attention for q %s, k length %d (%s); another "
                        "kernel takes it", (B, H, Sq, D), Sk, "; ".join(refusals))
    return handle, _PLANS[key]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Non-causal softmax attention, scale ``D**-0.5``, in e4m3 through cuDNN; ``[B, H, Sq, D]``
    in q's dtype, token-major unless ``out`` (a ``[B, H, Sq, D]`` view) is given. None when
    cuDNN builds no graph for this shape (the caller takes another path). A plan's workspace
    is shared: calls on one stream at a time.

    q, k, v: bf16/fp16 ``[B, H, S, D]`` views with unit stride along D (e.g. of the qkv
    projection)."""
    with torch.cuda.device(q.device):
        return _attention(q, k, v, out)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               out: torch.Tensor | None) -> torch.Tensor | None:
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    handle, plan = _plan(B, H, Sq, Sk, D, q.dtype, q.device)
    if plan is None:
        return None
    q8, k8, v8, (s_q, s_k, s_v), v_mean = quantize(q, k, v)
    if q.device not in _P_SCALES:  # descale_s, scale_s: p goes to e4m3 as p * 448
        _P_SCALES[q.device] = torch.tensor([1 / 448.0, 448.0], device=q.device)
    s_o = 2 * s_v if plan.out_e4m3 else torch.ones_like(s_v)  # O's dequantizing multiplier
    scalars = torch.cat([torch.stack([s_q, s_k, s_v]), _P_SCALES[q.device],
                         (1 / s_o).reshape(1)])
    o = token_major(B, H, Sq, D, E4M3 if plan.out_e4m3 else q.dtype, q.device)
    plan.run(handle, q8, k8, v8, scalars, o)
    result = out if out is not None else token_major(B, H, Sq, D, q.dtype, q.device)
    return scale_cast(o, result, s_o.reshape(1), v_mean)  # v's mean back, in float32
