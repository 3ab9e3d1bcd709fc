"""The DiT's row kernels (``kernels/triton_norm``) at the 720p/93 shapes, timed alternately.

Each case is one call the fast path makes per block (84,480 tokens, C = 4096, SwiGLU width
11,008), timed as in ``bsa_ab.py``: every variant once a round, the order rotating, the median
of the rounds. ``--base`` adds an earlier commit's kernels folder, loaded as a second package,
for a before/after in one process; today's outputs must equal its bit for bit (the kernels'
math is fixed: only their code may change), else the run exits non-zero (``--math-changed``:
it reports them only). A ``ROW_WARPS`` variant runs only on the cases of its kernel. GB/s
counts each input read once and each output written once, the floor of any kernel; an H100
SXM's HBM3 peaks at 3,350 GB/s.

    mkdir /tmp/base && git archive REV longcat_tools/kernels \\
        | tar -x --strip-components=2 -C /tmp/base
    PYTHONPATH=. python3 benchmarks/row_kernels.py --base /tmp/base --out DIR
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bsa_ab import add_ab_args, rotated  # noqa: E402
from bsa_kernel import bench, versions  # noqa: E402

from longcat_tools.kernels import triton_norm as TN  # noqa: E402

TOKENS, FRAMES, C, FFN, HEADS = 84_480, 24, 4096, 11_008, 32
# label, ROW_WARPS overrides (today's kernels; the warps named are those at these shapes)
VARIANTS: list[tuple[str, dict]] = [
    ("today", {}),
    ("today, fused_rows 16 warps", {"fused_rows": (256, 16)}),
    ("today, fused_rows_e4m3 16 warps", {"fused_rows_e4m3": (256, 16)}),
    ("today, swiglu_e4m3 16 warps", {"swiglu_e4m3": (1024, 16)}),
    ("today, e4m3_rows 8 warps", {"e4m3_rows": (512, 16)}),
]


def load_base(folder: Path) -> types.ModuleType:
    """``folder`` (a kernels package) as ``longcat_tools.kernels._base``; its triton_norm."""
    package = types.ModuleType("longcat_tools.kernels._base")
    package.__path__ = [str(folder)]
    sys.modules[package.__name__] = package
    return importlib.import_module(package.__name__ + ".triton_norm")


def cases(dev: torch.device) -> dict[str, tuple[Callable, float, set[str]]]:
    """name -> (callable taking the module, bytes read and written, its ROW_WARPS keys)."""
    g = torch.Generator(dev).manual_seed(0)

    def rnd(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device=dev, generator=g).to(dtype)

    x, res = rnd(1, TOKENS, C), rnd(1, TOKENS, C)
    gate, shift, scale = (rnd(1, FRAMES, 1, C, dtype=torch.float32) for _ in range(3))
    weight, bias = rnd(C), rnd(C)
    a, b = rnd(TOKENS, FFN), rnd(TOKENS, FFN)
    qkv = rnd(1, TOKENS, 3 * C)
    cos, sin = rnd(TOKENS, 128, dtype=torch.float32), rnd(TOKENS, 128, dtype=torch.float32)
    qw, kw = rnd(128), rnd(128)
    row = TOKENS * C * 2  # one bf16 [N, C] tensor
    mod = dict(norm="modulate", shift=shift, scale=scale)
    fr, fr8 = {"fused_rows"}, {"fused_rows_e4m3"}
    return {
        "residual (gated)": (lambda m: m.fused_rows(x, FRAMES, res=res, gate=gate), 3 * row,
                             fr),
        "adaln, gated residual": (
            lambda m: m.fused_rows(x, FRAMES, res=res, gate=gate, **mod), 4 * row, fr),
        "adaln, gated residual, e4m3": (
            lambda m: m.fused_rows(x, FRAMES, res=res, gate=gate, e4m3=True, **mod),
            3.5 * row, fr8),
        "residual + layer_norm, e4m3": (
            lambda m: m.fused_rows(x, FRAMES, res=res, gate=gate, norm="layer_norm",
                                   weight=weight, bias=bias, e4m3=True), 3.5 * row, fr8),
        "swiglu": (lambda m: m.swiglu(a, b), 3 * TOKENS * FFN * 2, {"swiglu"}),
        "swiglu, e4m3": (lambda m: m.swiglu(a, b, e4m3=True), 2.5 * TOKENS * FFN * 2,
                         {"swiglu_e4m3"}),
        "e4m3_rows": (lambda m: m.e4m3_rows(x[0]), 1.5 * row, {"e4m3_rows"}),
        "head_norm_rope": (lambda m: m.head_norm_rope(qkv, HEADS, [qw, kw], cos, sin, 1e-6),
                           4 * row + 2 * cos.numel() * 4, {"head_norm_rope"}),
    }


def flat(out: object) -> list[torch.Tensor]:
    """The tensors of a kernel's result, in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if out is None or not isinstance(out, tuple | list):
        return []
    return [t for o in out for t in flat(o)]


def same_bits(a: object, b: object) -> bool:
    """Whether two results hold the same tensors, byte for byte (NaN payloads included)."""
    ta, tb = flat(a), flat(b)
    return len(ta) == len(tb) and all(
        x.shape == y.shape and torch.equal(x.view(torch.uint8), y.view(torch.uint8))
        for x, y in zip(ta, tb, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, default=None, help="an earlier kernels folder")
    ap.add_argument("--math-changed", action="store_true",
                    help="the base rounds differently on purpose (e.g. before session 21's "
                         "reciprocal e4m3 scaling): report differing bits, do not fail")
    add_ab_args(ap, rep_ms=100.0)
    args = ap.parse_args()
    dev = torch.device("cuda")
    meta = versions(dev)
    print(json.dumps(meta), flush=True)
    all_variants = [(label, TN, cfg) for label, cfg in VARIANTS]
    if args.base is not None:
        all_variants.insert(0, (args.base_label, load_base(args.base), {}))
    defaults = dict(TN.ROW_WARPS)
    rows = []
    for name, (call, nbytes, keys) in cases(dev).items():
        variants = [v for v in all_variants if not v[2] or keys & v[2].keys()]
        times: dict[str, list[float]] = {label: [] for label, *_ in variants}
        bits: dict[str, bool] = {}
        reference = None
        try:
            for r in range(args.rounds):
                for label, module, cfg in rotated(variants, r):
                    TN.ROW_WARPS.clear()
                    TN.ROW_WARPS.update(defaults, **cfg)
                    if label not in bits:
                        out = call(module)
                        reference = out if reference is None else reference
                        bits[label] = same_bits(out, reference)
                    times[label].append(bench(lambda m=module, c=call: c(m), args.rep_ms))
        finally:
            TN.ROW_WARPS.clear()
            TN.ROW_WARPS.update(defaults)
        for label, _module, cfg in variants:
            ms = statistics.median(times[label])
            rows.append(dict(case=name, variant=label, config=cfg, ms=ms, ms_rounds=times[label],
                             gb_s=nbytes / ms / 1e6, same_bits_as_first=bits[label]))
            print(f"{name} | {label}: {ms:.3f} ms, {nbytes / ms / 1e6:.0f} GB/s, "
                  f"bits {'same' if bits[label] else 'DIFFER'}", flush=True)
    lines = ["| case | variant | ms (median) | rounds | GB/s | same bits |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['variant']} | {r['ms']:.3f} | "
              f"{' / '.join(f'{t:.3f}' for t in r['ms_rounds'])} | {r['gb_s']:.0f} | "
              f"{'yes' if r['same_bits_as_first'] else 'NO'} |" for r in rows]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "row_kernels.json").write_text(
        json.dumps({"meta": meta, "shape": dict(tokens=TOKENS, frames=FRAMES, channels=C,
                                                ffn=FFN, heads=HEADS), "rows": rows},
                   indent=1) + "\n")
    if not args.math_changed and any(r["variant"] == "today" and not r["same_bits_as_first"]
                                     for r in rows):
        sys.exit("today's kernels changed bits against the base: see the table")


if __name__ == "__main__":
    main()
