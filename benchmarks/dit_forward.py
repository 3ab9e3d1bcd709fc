"""One DiT forward at the real LongCat-Video size: plain path vs fused glue, time and peak memory.

Builds the real 13.58B config on the GPU with random bf16 weights (meta device, ``to_empty``,
random fill: no download), then times one forward (B=1) per shape and variant and compares the
fused path's output with the plain path's. Shapes: 480p/93 frames dense (latent 24x60x104,
37,440 tokens), 720p refine/93 with BSA 0.9375 (24x88x160, 84,480 tokens), optionally the
189-frame refine (48x88x160). The original LongCat-Video cannot run here (it needs flash-attn or
xformers), so ratios are to figures of the original measured earlier on an H100 (said so in the
table); benchmarks/vs_original.py runs the original side by side instead.

  PYTHONPATH=. python3 benchmarks/dit_forward.py              # on the GPU machine
  PYTHONPATH=. python3 benchmarks/dit_forward.py --profile    # kernel time by category

Variants: "plain" (the reference path), "fast" (fused glue: Triton row kernels on CUDA, BSA with
bf16 P @ V and token-major output), "fast-compiled" (the same with the glue through
torch.compile instead of the Triton row kernels: the difference is what the row kernels gain).
  PYTHONPATH=. python3 benchmarks/dit_forward.py --small      # logic check on CPU, tiny sizes
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longcat_tools.kernels import compiled  # noqa: E402
from longcat_tools.runner import fast_ops  # noqa: E402
from longcat_tools.runner.dit import LongCatTransformer3DModel  # noqa: E402
from longcat_tools.synth import dit_config  # noqa: E402

# The original's DiT forward measured earlier on one H100 80GB, random bf16 weights, B=1.
ORIGINAL = {"480p/93 dense": (4.82, 30.3), "720p refine/93 BSA 0.9375": (7.85, 36.4),
            "720p refine/93 dense": (15.78, 36.4)}
TARGET = {"480p/93 dense": 0.72, "720p refine/93 BSA 0.9375": 0.55}

SHAPES = {  # name: (latent C,T,H,W, bsa)
    "480p/93 dense": ((16, 24, 60, 104), False),
    "720p refine/93 BSA 0.9375": ((16, 24, 88, 160), True),
    "720p refine/189 BSA 0.9375": ((16, 48, 88, 160), True),
}
SMALL_SHAPES = {
    "small dense": ((16, 4, 16, 16), False),
    "small BSA 0.9375": ((16, 8, 16, 32), True),
}


def build(preset: str, depth: int | None, device: str, dtype: torch.dtype, seed: int):
    """The DiT with random weights, made directly on ``device`` (no fp32 copy on the way)."""
    with torch.device("meta"):
        model = LongCatTransformer3DModel.from_config(dit_config(preset, depth=depth))
    model = torch.nn.Module.to(model, dtype).to_empty(device=device)  # ModelMixin.to warns
    random_fill(model, device, seed)
    return model.eval().requires_grad_(False)


def random_fill(model, device: str, seed: int) -> None:
    """Random weights in place: unit-variance outputs, norm scales near one, small biases."""
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
            elif "norm" in name:
                p.normal_(1.0, 0.1, generator=g)
            else:
                p.normal_(0.0, 0.02, generator=g)


def inputs(latent: tuple[int, ...], caption_channels: int, device: str, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(1, *latent, generator=g, device=device)
    y = torch.randn(1, 1, 512, caption_channels, generator=g, device=device)
    mask = torch.zeros(1, 512, dtype=torch.long, device=device)
    mask[:, :180] = 1
    # 632: a bf16 value, so every dtype sees the same timestep (the DiT rounds it to its own)
    return x, torch.tensor([632.0], device=device), y, mask


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_forward(model, args, device: str, reps: int, warm_up: bool = True):
    """(median seconds, all times, peak allocated GiB, peak reserved GiB, output).

    Without ``warm_up`` the times include compiling, autotuning and cuDNN plans."""
    with torch.inference_mode():
        if warm_up:
            out = model(*args)
            sync(device)
            del out
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            out = model(*args)
            sync(device)
            times.append(time.perf_counter() - t0)
            if _ < reps - 1:
                del out
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    res = torch.cuda.max_memory_reserved() / 2**30 if device == "cuda" else float("nan")
    return statistics.median(times), times, peak, res, out


CATEGORIES = (  # (category, substrings of kernel names), first match wins
    ("bsa (triton)", ("_bsa_fwd", "_chunk_pass", "_chunk_quant", "_select_kernel", "f64f64")),
    ("row kernels (triton)", ("_rows_kernel", "_head_norm_rope", "_swiglu")),
    ("fused glue (inductor)", ("triton_",)),
    ("sdpa (cudnn/flash)", ("cudnn", "fmha", "flash", "attention", "sm90_flash")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas")),
    ("copy/cast", ("copy", "Copy", "cast", "Cast")),
)


def profile(model, args, device: str) -> dict[str, float]:
    """GPU kernel milliseconds of one forward, by category (after a warm-up)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    with torch.inference_mode():
        model(*args)
        sync(device)
        acts = [ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU]
        with tprofile(activities=acts) as prof:
            model(*args)
            sync(device)
    cats: dict[str, float] = {}
    top: dict[str, float] = {}
    for e in prof.key_averages():
        ms = (e.device_time_total if device == "cuda" else e.self_cpu_time_total) / 1e3
        if ms <= 0:
            continue
        cat = next((c for c, keys in CATEGORIES if any(k in e.key for k in keys)), "other")
        cats[cat] = cats.get(cat, 0.0) + ms
        top[e.key[:90]] = ms
    cats = {k: round(v, 1) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])}
    cats["top kernels"] = {k: round(v, 1) for k, v in
                           sorted(top.items(), key=lambda kv: -kv[1])[:30]}
    return cats


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


VARIANTS = {  # name: (fast ops, Triton row kernels)
    "plain": (False, False),
    "fast": (True, True),
    "fast-compiled": (True, False),
}


def bsa_precision(latent: tuple[int, int, int], heads: int, device: str) -> dict[str, float]:
    """Relative error of the BSA kernel vs float64 attention over the same chunks, random
    bf16 q/k/v, for P @ V in float16 (kernels' default) and in bf16 (the DiT's fast path)."""
    from longcat_tools import kernels
    from longcat_tools.kernels import reference as R

    g = torch.Generator(device=device).manual_seed(3)
    n = math.prod(latent)
    q, k, v = (torch.randn(1, heads, n, 128, generator=g, device=device, dtype=torch.bfloat16)
               for _ in range(3))
    lay = R.ChunkLayout(latent, (4, 4, 4))
    idx, cnt = kernels.select_chunks(q, k, latent, latent, sparsity=0.9375)
    ref = R.masked_attention(q.double(), k.double(), v.double(), lay, lay,
                             R.chunk_mask(idx, cnt, lay.num_chunks))
    out = {"latent": list(latent), "heads": heads}
    for name, pv in (("pv_fp16", True), ("pv_bf16", False)):
        got = kernels.block_sparse_attention(q, k, v, latent, latent, sparsity=0.9375,
                                             pv_fp16=pv, token_major=not pv)
        out[name] = rel(got, ref)
    out["bf16_rounding_floor"] = rel(ref.to(torch.bfloat16), ref)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="CPU logic check at tiny sizes")
    ap.add_argument("--shapes", default=None, help="comma-separated shape names (default: all)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--deadline", type=float, default=1e9,
                    help="seconds: start no new (shape, variant) after this much wall time")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--profile", action="store_true",
                    help="only the fused path: kernel time of one forward by category")
    ap.add_argument("--fp8", action="store_true",
                    help="with --profile: the model converted by to_fp8 (e4m3 GEMMs)")
    ap.add_argument("--fp8-attention", default="",
                    help="with --fp8: attention kinds run quantized too (bsa, dense)")
    ap.add_argument("--no-compile", action="store_true", help="fused functions run eagerly")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated, from {','.join(VARIANTS)}")
    ap.add_argument("--no-precision", action="store_true", help="skip the BSA precision check")
    a = ap.parse_args()
    if a.fp8 and not a.profile:
        ap.error("--fp8 goes with --profile (vs_original.py times the fp8 forward)")
    from longcat_tools.model.fp8 import ATTENTION_KINDS

    bad = set(filter(None, a.fp8_attention.split(","))) - set(ATTENTION_KINDS)
    if bad or (a.fp8_attention and not a.fp8):
        ap.error(f"--fp8-attention takes {' and/or '.join(ATTENTION_KINDS)}, with --fp8 "
                 f"(got {a.fp8_attention!r})")

    start = time.perf_counter()
    device = "cpu" if a.small else "cuda"
    dtype = torch.bfloat16
    shapes = SMALL_SHAPES if a.small else SHAPES
    if a.shapes:
        shapes = {k: v for k, v in shapes.items() if k in a.shapes.split(",")}
    if a.no_compile:
        fast_ops.set_compile(False)
    model = build("small" if a.small else "real", 2 if a.small else None, device, dtype, seed=0)
    nparams = sum(p.numel() for p in model.parameters())
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        "torch": torch.__version__, "python": platform.python_version(),
        "params": nparams, "dtype": str(dtype), "batch": 1, "reps": a.reps,
        "build_s": round(time.perf_counter() - start, 2),
        "weights_gib": (round(torch.cuda.memory_allocated() / 2**30, 2) if device == "cuda"
                        else None),
        "baseline": "earlier H100 figures for the original (not run here)",
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    print(f"built {nparams / 1e9:.2f}B params in {info['build_s']} s", flush=True)
    rows = []
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    variants = a.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant {unknown[0]!r} (choose from {', '.join(VARIANTS)})")
    result_name = "dit_forward_profile.json" if a.profile else "dit_forward.json"

    def save() -> None:
        (out_dir / result_name).write_text(json.dumps({"info": info, "rows": rows}, indent=1))

    if device == "cuda" and not a.no_precision and not a.profile:
        prec = bsa_precision((24, 44, 80), 2, device)
        info["bsa_precision_vs_fp64"] = prec
        print("BSA rel err vs fp64:", json.dumps(prec), flush=True)

    if a.profile and a.fp8:
        model.to_fp8()
        kinds = [k for k in a.fp8_attention.split(",") if k]
        model.fp8_attention = frozenset(kinds)
        result_name = f"dit_forward_profile_fp8{''.join('_' + k for k in kinds)}.json"
    for name, (latent, bsa) in shapes.items():
        args = inputs(latent, model.dims.caption_channels, device, seed=1)
        if bsa:
            model.enable_bsa({"sparsity": 0.9375})
        else:
            model.disable_bsa()
        ref = None
        if a.profile:
            model.enable_fast_ops(True)
            if time.perf_counter() - start < a.deadline:
                prof = profile(model, args, device)
                variant = f"fast fp8{'+' + a.fp8_attention if a.fp8_attention else ''}" \
                    if a.fp8 else "fast"
                rows.append({"shape": name, "variant": variant, "profile_ms": prof})
                save()
                print(name, json.dumps(prof, indent=1), flush=True)
            continue
        for variant in variants:
            if time.perf_counter() - start > a.deadline:
                print(f"skip {name} {variant}: past the {a.deadline:.0f} s deadline", flush=True)
                rows.append({"shape": name, "variant": variant, "skipped": "deadline"})
                continue
            fast, triton_rows = VARIANTS[variant]
            model.enable_fast_ops(fast)
            os.environ["LONGCAT_NO_TRITON_NORM"] = "0" if triton_rows else "1"
            t0 = time.perf_counter()
            try:
                med, times, peak, res, out = time_forward(model, args, device, a.reps)
            except torch.OutOfMemoryError as exc:
                rows.append({"shape": name, "variant": variant, "error": f"OOM: {exc}"[:300]})
                torch.cuda.empty_cache()
                continue
            row = {"shape": name, "variant": variant, "latent": list(latent),
                   "tokens": latent[1] * latent[2] * latent[3] // 4, "median_s": round(med, 4),
                   "times_s": [round(t, 4) for t in times], "peak_alloc_gib": round(peak, 2),
                   "peak_reserved_gib": round(res, 2),
                   "stage_wall_s": round(time.perf_counter() - t0, 1)}
            if not torch.isfinite(out).all():
                row["nonfinite"] = True
            if variant == "plain":
                ref = out.float().cpu()
            else:
                row["glue"] = ("triton row kernels" if triton_rows and compiled._TRITON_ROWS
                               else "torch.compile")
                row["compile"] = fast_ops.compile_status()
                if ref is not None:
                    row["rel_err_vs_plain"] = rel(out.float().cpu(), ref)
            if name in ORIGINAL:
                orig_t, orig_mem = ORIGINAL[name]
                row["ratio_to_original"] = round(med / orig_t, 3)
                row["original_s"], row["original_peak_gib"] = orig_t, orig_mem
            del out
            rows.append(row)
            save()
            print(json.dumps(row), flush=True)
        ref = None
        if device == "cuda":
            torch.cuda.empty_cache()
    info["total_wall_s"] = round(time.perf_counter() - start, 1)
    save()
    if a.profile:
        return

    lines = [f"# DiT forward, {info['device']}, torch {info['torch']}, "
             f"triton {info.get('triton', '-')}, {info['date']}", "",
             f"{nparams / 1e9:.2f}B params, bf16 random weights, B=1, 512 text tokens (180 valid),"
             f" median of {a.reps} after a warm-up. Original = earlier H100 figures (not run "
             "here: it needs flash-attn/xformers).", "",
             "| shape | variant | time (s) | peak alloc (GiB) | vs original | target | "
             "rel err vs plain |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "median_s" not in r:
            lines.append(f"| {r['shape']} | {r['variant']} | {r.get('skipped') or r.get('error')}"
                         " | | | | |")
            continue
        ratio = r.get("ratio_to_original")
        tgt = TARGET.get(r["shape"])
        lines.append(f"| {r['shape']} | {r['variant']} | {r['median_s']:.3f} | "
                     f"{r['peak_alloc_gib']:.1f} | {'' if ratio is None else f'{ratio:.2f}x'} | "
                     f"{'' if tgt is None else f'<= {tgt}x'} | "
                     f"{r.get('rel_err_vs_plain', ''):{'.2e' if 'rel_err_vs_plain' in r else ''}}"
                     " |")
    prec = info.get("bsa_precision_vs_fp64")
    if prec:
        lines += ["", f"BSA kernel rel err vs fp64 (random bf16 q/k/v, latent {prec['latent']}, "
                  f"{prec['heads']} heads, 0.9375): P @ V in float16 {prec['pv_fp16']:.2e}, "
                  f"in bf16 (fast path) {prec['pv_bf16']:.2e}; rounding the fp64 result to "
                  f"bf16 alone {prec['bf16_rounding_floor']:.2e}."]
    md = "\n".join(lines) + "\n"
    (out_dir / "dit_forward.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
