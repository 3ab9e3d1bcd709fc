"""DiT forward side by side: the original LongCat-Video, ours in bf16 and ours in fp8.

All three use the same random weights, on one GPU, in one run. Each forward is also compared with
an fp32 forward of ours.

The original is imported from a checkout given with ``--original``, a scratch copy of
meituan-longcat/LongCat-Video that is never committed here. Only one thing is added around it:
a ``flash_attn`` stand-in module. Its ``flash_attn_func`` and ``flash_attn_varlen_func`` call
cuDNN SDPA, and the config sets ``enable_flashattn2`` so the original's own attention code calls
them. Its BSA path is its own Triton kernel, unchanged.

Order of work, to bound GPU memory:
1. ours in bf16, with random weights;
2. the original, given ours' state dict and timed per shape, then freed;
3. ours timed per shape (fast path);
4. an fp32 copy of ours, for the reference outputs, then freed (the bf16 one waits on the host);
5. ours converted in place by ``to_fp8`` and timed with the default fp8 attention
   (``kernels.fp8_attention``: dense by FlashAttention-3's or cuDNN's kernel where installed,
   else ours; BSA by ours);
6. on a GPU, the same with attention in bf16, with dense attention by one kernel each (dense
   shapes), with the glue writing bf16 and with float32 accumulation: ``FP8_VARIANTS``
   (``--fp8-variants`` picks).

Where FlashAttention-3 is installed, ours takes dense attention through it (``kernels.fa3``),
the original through cuDNN's SDPA as issue #21 sets; "ours bf16, sdpa" is ours without FA3.
(The original's own ``enable_flashattn3`` path unpacks ``flash_attn_func``'s result as FA3's
betas returned it, a tuple; today's FA3 returns the output alone.)

The timestep is 632 (``dit_forward.inputs``), a bf16 value: the DiT rounds timesteps to its
dtype, as the original does, so the former 631 reached a bf16 model as 632 and the fp32 one as
631. That, not the depth, put bf16 25% from fp32 at 480p; with 632 it is 1.8%.
``--init damped`` also scales the adaLN gate rows down (``--damp``), shrinking what each block
adds to the residual stream.

Usage:

  PYTHONPATH=. python3 benchmarks/vs_original.py --original /path/to/LongCat-Video
  PYTHONPATH=. python3 benchmarks/vs_original.py --original ... --init damped
  PYTHONPATH=. python3 benchmarks/vs_original.py --original ... --small   # CPU logic check
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import time
import types
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from dit_forward import SHAPES, SMALL_SHAPES, build, inputs, rel, time_forward  # noqa: E402
from fp8_attention import torch_statistics  # noqa: E402

from longcat_tools.kernels import dense, fa3  # noqa: E402
from longcat_tools.kernels import fp8 as fp8_kernels  # noqa: E402
from longcat_tools.runner import fast_ops  # noqa: E402
from longcat_tools.synth import dit_config  # noqa: E402


class Fp8Variant(NamedTuple):
    """One fp8 row: which attention kind also runs quantized (the model's ``fp8_attention``:
    None, the default kinds; "off", none), which kernels a dense call may take
    (``fp8_attention.DENSE_KERNELS``; None, the default's), whether the glue writes the GEMM
    inputs in e4m3 (``fast_ops.E4M3_GLUE``), whether the GEMMs accumulate fast
    (``kernels.fp8.FAST_ACCUM``) and whether the fp8 attention's statistics run as PyTorch
    reductions (``fp8_attention``'s, as before session 21) instead of ``kernels.column_stats``
    (the benchmark's ``torch_statistics``), and whether dense self-attention goes from the qkv
    projection to the output projection's e4m3 rows in one chain (``kernels.dense.FUSED_FP8``).
    A variant with one kind runs only on the shapes that use it (the BSA shapes attend
    sparsely throughout)."""

    kind: str | None = None
    kernels: list[str] | None = None
    e4m3_glue: bool = True
    fast_accum: bool = True
    torch_stats: bool = False
    fused: bool = True


# The default quantizes both kinds, so "bf16 attn" is the BSA shapes' fp8 forward with the BSA
# in bf16.
FP8_VARIANTS = {"ours fp8": Fp8Variant(), "ours fp8, bf16 attn": Fp8Variant("off"),
                "ours fp8+dense attn triton": Fp8Variant("dense", ["triton"]),
                "ours fp8+dense attn cudnn": Fp8Variant("dense", ["cudnn"]),
                "ours fp8, glue writes bf16": Fp8Variant(e4m3_glue=False),
                "ours fp8, fp32 accumulation": Fp8Variant(fast_accum=False),
                "ours fp8, statistics by PyTorch": Fp8Variant(torch_stats=True, fused=False),
                "ours fp8, q and O by separate passes": Fp8Variant(fused=False)}
TARGETS = {  # issue #21: time ratio to the original on one GPU, same weights
    **{("480p/93 dense", v): 0.45 for v in FP8_VARIANTS},
    **{("720p refine/93 BSA 0.9375", v): 0.40 for v in FP8_VARIANTS},
    ("480p/93 dense", "ours bf16"): 0.70, ("720p refine/93 BSA 0.9375", "ours bf16"): 0.52,
}
BSA = {"sparsity": 0.9375, "cdf_threshold": None, "chunk_3d_shape_q": [4, 4, 4],
       "chunk_3d_shape_k": [4, 4, 4]}


@contextlib.contextmanager
def without_fa3():
    """Dense attention as where FlashAttention-3 is not installed."""
    saved = fa3.build
    fa3.build = lambda: fa3.Build(None, frozenset(), frozenset())
    try:
        yield
    finally:
        fa3.build = saved


def flash_attn_standin() -> types.ModuleType:
    """``flash_attn`` for the original, on PyTorch's SDPA with cuDNN's backend first on Hopper
    (``kernels.dense.sdpa``, ours where FlashAttention-3 is not installed)."""
    from longcat_tools.kernels.dense import sdpa

    mod = types.ModuleType("flash_attn")

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, **_):
        assert softmax_scale in (None, q.shape[-1] ** -0.5), softmax_scale
        return sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               softmax_scale=None, **_):
        outs = []
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        for i in range(len(cq) - 1):
            qi, ki, vi = (t.transpose(0, 1)[None] for t in (q[cq[i]:cq[i + 1]],
                                                            k[ck[i]:ck[i + 1]],
                                                            v[ck[i]:ck[i + 1]]))
            outs.append(F.scaled_dot_product_attention(qi, ki, vi, scale=softmax_scale)[0]
                        .transpose(0, 1))
        return torch.cat(outs, 0)

    mod.flash_attn_func = flash_attn_func
    mod.flash_attn_varlen_func = flash_attn_varlen_func
    return mod


def original_model(path: Path, config: dict, device: str, dtype: torch.dtype):
    sys.modules.setdefault("flash_attn", flash_attn_standin())
    sys.path.insert(0, str(path))
    from longcat_video.modules.longcat_video_dit import LongCatVideoTransformer3DModel

    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    cfg.update(enable_flashattn2=True, enable_flashattn3=False, enable_xformers=False,
               cp_split_hw=[1, 1], enable_bsa=False, bsa_params=BSA)
    with torch.device("meta"):
        model = LongCatVideoTransformer3DModel(**cfg)
    return torch.nn.Module.to(model, dtype).to_empty(device=device).eval().requires_grad_(False)


def damp(model, factor: float) -> None:
    """Scale the gate rows (msa and mlp: chunks 2 and 5 of 6) of every block's adaLN."""
    with torch.no_grad():
        for block in model.blocks:
            lin = block.adaLN_modulation[1]
            c = lin.weight.shape[0] // 6
            for j in (2, 5):
                lin.weight[j * c:(j + 1) * c] *= factor
                lin.bias[j * c:(j + 1) * c] *= factor


def parse_bsa_variants(text: str) -> dict[str, dict[str, int]]:
    """``"k=v,k=v;k=v"`` -> ``{"k=v,k=v": {k: v, ...}, ...}``; ValueError on a malformed item."""
    variants = {}
    for variant in filter(None, (v.strip() for v in text.split(";"))):
        settings = {}
        for item in variant.split(","):
            key, sep, value = item.partition("=")
            if not sep or not key.strip() or not value.strip().lstrip("-").isdigit():
                raise ValueError(f"{item!r} is not KEY=INTEGER")
            settings[key.strip()] = int(value)
        variants[variant] = settings
    return variants


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--original", type=Path, required=True, help="LongCat-Video checkout")
    ap.add_argument("--small", action="store_true", help="CPU logic check at tiny sizes")
    ap.add_argument("--shapes", default="480p/93 dense,720p refine/93 BSA 0.9375")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--init", choices=("random", "damped"), default="random")
    ap.add_argument("--damp", type=float, default=0.1)
    ap.add_argument("--no-fp32", action="store_true", help="skip the fp32 reference")
    ap.add_argument("--bsa-variants", default="",
                    help="extra bf16 rows on the BSA shapes, one per ';'-separated list of "
                         "triton_bsa.FWD_CONFIG settings, e.g. 'kv_passes=1;kv_passes=3'")
    ap.add_argument("--fp32-shapes", default="480p/93 dense",
                    help="shapes given an fp32 reference forward (slow: about 10x bf16)")
    ap.add_argument("--fp8-variants", default=";".join(FP8_VARIANTS),
                    help=f"the fp8 rows to run, ';'-separated (of: {'; '.join(FP8_VARIANTS)})")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    a = ap.parse_args()
    fp8_variants = [v.strip() for v in a.fp8_variants.split(";") if v.strip()]
    if set(fp8_variants) - set(FP8_VARIANTS):
        ap.error(f"--fp8-variants: no variant {', '.join(set(fp8_variants) - set(FP8_VARIANTS))}")
    try:
        bsa_variants = parse_bsa_variants(a.bsa_variants)
    except ValueError as e:
        ap.error(f"--bsa-variants: {e}")
    if bsa_variants and not a.small:
        from longcat_tools.kernels import triton_bsa

        unknown = {k for v in bsa_variants.values() for k in v} - set(triton_bsa.FWD_CONFIG)
        if unknown:
            ap.error(f"--bsa-variants: no FWD_CONFIG key {', '.join(sorted(unknown))} (keys: "
                     f"{', '.join(triton_bsa.FWD_CONFIG)})")

    start = time.perf_counter()
    device = "cpu" if a.small else "cuda"
    table = SMALL_SHAPES if a.small else SHAPES
    # on the CPU the original's BSA (a Triton kernel) cannot run: dense only
    shapes = {"small dense": table["small dense"]} if a.small \
        else {k: table[k] for k in a.shapes.split(",")}
    preset, depth = ("small", 2) if a.small else ("real", None)
    # the original's fp32 regions are CUDA autocast: on the CPU everything runs in fp32
    dtype = torch.float32 if a.small else torch.bfloat16
    ours = build(preset, depth, device, dtype, seed=0)
    if a.init == "damped":
        damp(ours, a.damp)
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
            "torch": torch.__version__, "python": platform.python_version(),
            "original": str(a.original), "init": a.init,
            "damp": a.damp if a.init == "damped" else None, "batch": 1, "reps": a.reps,
            "params": sum(p.numel() for p in ours.parameters())}
    rows: list[dict] = []
    outs: dict[tuple[str, str], torch.Tensor] = {}
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"vs_original_{a.init}.json"

    def save() -> None:
        if device == "cuda":  # the kv passes each BSA shape's first call measured fastest
            from longcat_tools.kernels import triton_bsa

            info["kv_passes_timed"] = {str(k): n for k, n in triton_bsa._TIMED.items()}
        (out_dir / name).write_text(json.dumps({"info": info, "rows": rows}, indent=1))

    def timed(model, variant: str, bsa_on, only: list[str] | None = None,
              reps: int | None = None) -> None:
        for shape, (latent, bsa) in shapes.items():
            if only is not None and shape not in only:
                continue
            args = inputs(latent, ours.dims.caption_channels, device, seed=1)
            bsa_on(model, bsa)
            try:
                med, times, peak, res, out = time_forward(model, args, device, reps or a.reps,
                                                          warm_up=reps is None)
            except torch.OutOfMemoryError:  # e.g. the original at 189 frames on 80 GB
                row = {"shape": shape, "variant": variant, "error": "out of memory"}
            else:
                outs[(shape, variant)] = out.float().cpu()
                del out
                row = {"shape": shape, "variant": variant, "median_s": round(med, 4),
                       "times_s": [round(t, 4) for t in times],
                       "peak_alloc_gib": round(peak, 2), "peak_reserved_gib": round(res, 2)}
            if device == "cuda":
                torch.cuda.empty_cache()  # out of the handler: its traceback held activations
            rows.append(row)
            save()
            print(json.dumps(row), flush=True)

    def ours_bsa(model, on: bool) -> None:
        model.enable_bsa(BSA) if on else model.disable_bsa()

    def orig_bsa(model, on: bool) -> None:
        model.enable_bsa() if on else model.disable_bsa()

    orig = original_model(a.original, dit_config(preset, depth=depth), device, dtype)
    orig.load_state_dict(ours.state_dict(), strict=True)
    timed(orig, "original bf16", orig_bsa)
    del orig
    if device == "cuda":
        torch.cuda.empty_cache()
    ours.enable_fast_ops(device == "cuda")
    timed(ours, "ours bf16", ours_bsa)
    if device == "cuda" and fa3.build().func is not None:  # dense by cuDNN's SDPA instead
        with without_fa3():
            timed(ours, "ours bf16, sdpa", ours_bsa,
                  only=[shape for shape, (_, bsa) in shapes.items() if not bsa])
    for variant in bsa_variants if device == "cuda" else []:
        from longcat_tools.kernels import triton_bsa  # the BSA forward's settings, one row each

        saved_cfg = dict(triton_bsa.FWD_CONFIG)
        triton_bsa.FWD_CONFIG.update(bsa_variants[variant])
        try:
            timed(ours, f"ours bf16, {variant}", ours_bsa,
                  only=[shape for shape, (_, bsa) in shapes.items() if bsa])
        finally:
            triton_bsa.FWD_CONFIG.update(saved_cfg)
    fp32_shapes = None if a.small else a.fp32_shapes.split(",")
    if not a.no_fp32 and fp32_shapes is not None and not set(fp32_shapes) & set(shapes):
        print(f"note: no fp32 reference: --fp32-shapes {a.fp32_shapes!r} names none of the "
              "shapes run", flush=True)
    if not a.no_fp32:
        # the bf16 copy waits in host memory: both (27 + 54 GB) do not fit an 80 GB card
        ours.to("cpu")
        ref = build(preset, depth, device, torch.float32, seed=0)
        ref.load_state_dict(ours.state_dict())
        ref.enable_fast_ops(False)
        # one cold forward each: a reference, not a timing
        timed(ref, "ours fp32", ours_bsa, reps=1, only=fp32_shapes)
        del ref
        if device == "cuda":
            torch.cuda.empty_cache()
        ours.to(device)
    ours.to_fp8()
    from longcat_tools.kernels import fp8_attention

    saved = list(fp8_attention.DENSE_KERNELS)
    defaults = fast_ops.E4M3_GLUE, fp8_kernels.FAST_ACCUM, dense.FUSED_FP8
    for variant in fp8_variants:
        kind, kernels, glue, fast_accum, torch_stats, fused = FP8_VARIANTS[variant]
        if (kind is not None or torch_stats) and device != "cuda":
            continue
        ours.fp8_attention = None if kind is None else frozenset({kind} - {"off"})
        fp8_attention.DENSE_KERNELS[:] = kernels or saved
        fp8_attention.CALLS.clear()
        fast_ops.E4M3_GLUE, fp8_kernels.FAST_ACCUM, dense.FUSED_FP8 = glue, fast_accum, fused
        one_kind = kind in fp8_attention.KINDS
        with torch_statistics(torch_stats):
            try:
                timed(ours, variant, ours_bsa, only=None if not one_kind else
                      [shape for shape, (_, bsa) in shapes.items() if bsa == (kind == "bsa")])
            finally:
                fp8_attention.DENSE_KERNELS[:] = saved
                fast_ops.E4M3_GLUE, fp8_kernels.FAST_ACCUM, dense.FUSED_FP8 = defaults
        for row in rows:  # which kernel took the quantized calls, if any did
            if row["variant"] == variant:
                row["quantized_calls"] = dict(fp8_attention.CALLS)
    ours.fp8_attention = None
    timings = [r for r in rows if "error" not in r]
    for row in timings:
        shape, variant = row["shape"], row["variant"]
        base = next((r for r in timings
                     if r["shape"] == shape and r["variant"] == "original bf16"), None)
        row["ratio_to_original"] = base and round(row["median_s"] / base["median_s"], 3)
        if (shape, variant) in TARGETS:
            row["target"] = TARGETS[(shape, variant)]
        for other in ("ours fp32", "ours bf16"):
            if (shape, other) in outs and other != variant:
                row[f"rel_err_vs_{other.split()[1]}"] = rel(outs[(shape, variant)],
                                                            outs[(shape, other)])
    info["total_wall_s"] = round(time.perf_counter() - start, 1)
    save()
    print(f"\n{'shape':<28} {'variant':<20} {'time (s)':>9} {'vs orig':>8} {'target':>7} "
          f"{'peak GiB':>9} {'err vs fp32':>12} {'err vs bf16':>12}")
    for r in timings:
        print(f"{r['shape']:<28} {r['variant']:<20} {r['median_s']:>9.3f} "
              f"{r['ratio_to_original'] or float('nan'):>8.3f} {r.get('target', ''):>7} "
              f"{r['peak_alloc_gib']:>9} {r.get('rel_err_vs_fp32', float('nan')):>12.3e} "
              f"{r.get('rel_err_vs_bf16', float('nan')):>12.3e}")


if __name__ == "__main__":
    main()
