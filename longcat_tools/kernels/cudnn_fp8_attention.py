"""Dense fp8 attention through cuDNN's fused FP8 SDPA (NVIDIA's ``cudnn`` frontend graph API).

Why cuDNN: at D = 128 the softmax's exponentials cost as much as fp8 tensor-core GEMMs, so an
fp8 forward gains only if it runs them beside the GEMMs (warp-specialized ping-pong, as in
FlashAttention-3). Triton 3.6 does not do that on Hopper, and our Triton fp8 kernel only matches
cuDNN's bf16 attention (``benchmarks/results/fp8_attention.md``); cuDNN's FP8 kernel does.

The recipe is cuDNN's (per tensor), its arithmetic spelled out in
``fp8_attention.reference_per_tensor``:

- q, k, v: e4m3 of ``x / s``, one float32 scale ``s`` per tensor (``per_tensor_scales``); k
  and v first lose their means over the sequence (the softmax ignores a vector added to every
  key; a row of P sums to one, so v's mean is added back to O exactly);
- P: e4m3 of ``p * 448`` inside cuDNN;
- O: in q's dtype where this cuDNN gives it; otherwise (Hopper, cuDNN 9.x) e4m3 with the scale
  ``2 * s_v`` (an output row is an average of value rows, so it stays within ``max|v|``; the
  factor 2 leaves room for P's rounding); then one pass multiplies it back and adds v's mean.

Launches: the statistics (``_column_stats_kernel``, one read of each of q, k and v: column
sums, minima and maxima per slice of rows; ``_tensor_scales_kernel`` reduces them to the means
and the scales), three scaling passes (``_scale_cast_kernel``, writing token-major
``[B, S, H, D]`` e4m3 copies, V less its mean), cuDNN's attention, and the output pass (O's
scale back, plus V's mean; where cuDNN writes O in bf16 that pass costs one more copy of O).
The statistics used to be PyTorch reductions: five reads over the strided views and some
twenty small launches a call. The scales stay on the GPU, so nothing waits for the host. A
graph is built once per shape; a shape cuDNN refuses is remembered and left to the caller's
other paths.
"""

from __future__ import annotations

import functools
import logging

import torch
import triton
import triton.language as tl

from .fp8 import E4M3, E4M3_MAX
from .triton_fp8_attention import e4m3_div

log = logging.getLogger(__name__)
ROWS = 64  # tokens per program of the scaling pass
# the statistics pass: tokens of one head a program reduces (its slice), rows a step, warps
# (80 registers a thread in sm90 SASS: six programs an SM; untimed, a first guess)
STATS_CONFIG = {"slice": 1024, "block": 16, "num_warps": 4}


@triton.jit
def _column_stats_kernel(X, SUM, LO, HI, sxb, sxh, sxs, H, S,
                         SLICE: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr):
    """Slice ``i`` (rows ``[i * SLICE, (i + 1) * SLICE)``) of head ``bh`` of x ``[B, H, S, D]``:
    float32 column sums, minima and maxima into ``[slices, B * H, D]`` (a NaN shows in the
    sums only)."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    x = X + (bh // H).to(tl.int64) * sxb + (bh % H).to(tl.int64) * sxh
    d = tl.arange(0, D)
    total = tl.zeros([BLOCK, D], dtype=tl.float32)
    lo = tl.full([BLOCK, D], float("inf"), tl.float32)
    hi = tl.full([BLOCK, D], float("-inf"), tl.float32)
    for r0 in tl.range(0, SLICE, BLOCK):
        rows = i * SLICE + r0 + tl.arange(0, BLOCK)
        ok = (rows < S)[:, None]
        t = tl.load(x + rows[:, None].to(tl.int64) * sxs + d[None, :], mask=ok,
                    other=0.0).to(tl.float32)
        total += t
        lo = tl.minimum(lo, tl.where(ok, t, float("inf")))
        hi = tl.maximum(hi, tl.where(ok, t, float("-inf")))
    out = (i * tl.num_programs(1) + bh) * D + d
    tl.store(SUM + out, tl.sum(total, axis=0))
    tl.store(LO + out, tl.min(lo, axis=0))
    tl.store(HI + out, tl.max(hi, axis=0))


@triton.jit
def _tensor_scales_kernel(SUM, LO, HI, MEAN, AMAX, S, SLICES, BH, SLICES_PAD: tl.constexpr,
                          SMOOTH: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr):
    """Head ``bh`` from its slices' statistics: with SMOOTH its mean over the sequence into
    ``MEAN[bh]`` (float32 ``[D]``), and ``max|x - mean|`` (else ``max|x|``) into ``AMAX[bh]``:
    ``x - mean`` rises with x, so the extremes of the columns bound it."""
    bh = tl.program_id(0)
    d = tl.arange(0, D)
    total = tl.zeros([BLOCK, D], dtype=tl.float32)
    lo = tl.full([BLOCK, D], float("inf"), tl.float32)
    hi = tl.full([BLOCK, D], float("-inf"), tl.float32)
    for s0 in tl.range(0, SLICES_PAD, BLOCK):
        sl = s0 + tl.arange(0, BLOCK)
        ok = (sl < SLICES)[:, None]
        at = (sl[:, None] * BH + bh) * D + d[None, :]
        total += tl.load(SUM + at, mask=ok, other=0.0)
        lo = tl.minimum(lo, tl.load(LO + at, mask=ok, other=float("inf")))
        hi = tl.maximum(hi, tl.load(HI + at, mask=ok, other=float("-inf")))
    lo = tl.min(lo, axis=0)
    hi = tl.max(hi, axis=0)
    total = tl.sum(total, axis=0)
    if SMOOTH:
        mean = tl.div_rn(total, S.to(tl.float32))
        tl.store(MEAN + bh * D + d, mean)
        amax = tl.maximum(hi - mean, mean - lo)
    else:
        amax = tl.maximum(hi, -lo)
    nan = tl.sum((total != total).to(tl.int32), axis=0) > 0  # as PyTorch's reductions
    tl.store(AMAX + bh, tl.where(nan, float("nan"), tl.max(amax, axis=0)))


def tensor_scales(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                             torch.Tensor]:
    """``fp8_attention.per_tensor_scales`` in one read of each tensor (``[B, H, S, D]`` views
    with unit stride along D), two Triton launches a tensor; the means are float32 sums in
    another order, so they may differ from PyTorch's in the last bits."""
    B, H, S, D = q.shape
    means = torch.empty(3, B, H, D, dtype=torch.float32, device=q.device)  # q's: unused
    amax = torch.empty(3, B * H, dtype=torch.float32, device=q.device)
    for i, x in enumerate((q, k, v)):
        Sx = x.shape[2]
        slices = triton.cdiv(Sx, STATS_CONFIG["slice"])
        stats = torch.empty(3, slices, B * H, D, dtype=torch.float32, device=q.device)
        _column_stats_kernel[(slices, B * H)](x, *stats, *x.stride()[:3], H, Sx,
                                              STATS_CONFIG["slice"], STATS_CONFIG["block"], D,
                                              num_warps=STATS_CONFIG["num_warps"])
        _tensor_scales_kernel[(B * H,)](*stats, means[i], amax[i], Sx, slices,
                                        B * H, triton.next_power_of_2(slices), i > 0,
                                        min(16, triton.next_power_of_2(slices)), D, num_warps=4)
    top = amax.amax(dim=1)
    s_q, s_k, s_v = torch.where(top > 0, top / E4M3_MAX, 1.0).unbind()
    return s_q, s_k, s_v, means[1], means[2]


@triton.jit
def _scale_cast_kernel(X, Y, SCALE, MEAN, sxb, sxh, sxs, syb, syh, sys, H, S,
                       BLOCK: tl.constexpr, D: tl.constexpr, SMOOTH: tl.constexpr,
                       TO_E4M3: tl.constexpr):
    """Rows ``[i * BLOCK, (i + 1) * BLOCK)`` of head ``bh``: ``Y = X / SCALE[0]`` (X less
    ``MEAN[bh]`` with SMOOTH) as e4m3 with PyTorch's bits (``e4m3_div``) (TO_E4M3), or
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
        y = e4m3_div(x, tl.load(SCALE), Y.dtype.element_ty)
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
    unit stride along D); e4m3 ``y``: less ``mean`` and divided by ``scale``, else multiplied
    by ``scale`` plus ``mean`` (float32 ``[B, H, D]``)."""
    B, H, S, D = x.shape
    _scale_cast_kernel[(triton.cdiv(S, ROWS), B * H)](
        x, y, scale, mean if mean is not None else scale, *x.stride()[:3], *y.stride()[:3], H, S,
        ROWS, D, mean is not None, y.dtype == E4M3)
    return y


def quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                        tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The per-tensor recipe's inputs: token-major e4m3 copies of q, k less its mean and v less
    its mean (three ``scale_cast`` passes), their scales (``tensor_scales``) and v's mean
    ``[B, H, D]``, which the output pass adds back."""
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    s_q, s_k, s_v, k_mean, v_mean = tensor_scales(q, k, v)
    copies = (scale_cast(x, token_major(*x.shape, E4M3, x.device), s, mean)
              for x, s, mean in ((q, s_q, None), (k, s_k, k_mean), (v, s_v, v_mean)))
    return *copies, (s_q, s_k, s_v), v_mean


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
