"""Block sparse attention forward variants, timed alternately on one GPU.

Why alternately: a card warms up over a long benchmark and later rows run a few percent
slower (``results/vs_original.md``, session 17), more than the effects measured here. Each
round times every variant once; the table gives the median of the rounds.

A variant is ``triton_bsa.FWD_CONFIG`` overrides on the current kernel, or with ``--base`` a
second copy of ``triton_bsa.py`` (e.g. from an earlier commit) under its own defaults, for a
before/after in one process. The selection is computed once and shared. The order rotates
from round to round, so no variant always runs first or last.

    git show REV:longcat_tools/kernels/triton_bsa.py > /tmp/base_bsa.py
    PYTHONPATH=. python3 benchmarks/bsa_ab.py --base /tmp/base_bsa.py --out DIR

``--select`` times the select kernel (top-k of the float64 scores) of the two copies instead,
alternately, and checks that they pick the same chunks. ``--call`` times the whole BSA call
(P V in bf16, and fp8) and its part before the forward, and checks the outputs are equal.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bsa_kernel import CHUNK, HEAD_DIM, HEADS, SHAPES, bench, sampled_error, versions  # noqa: E402

from longcat_tools.kernels import reference as R  # noqa: E402
from longcat_tools.kernels import triton_bsa as TB  # noqa: E402
from longcat_tools.model.chunks import kept_per_query  # noqa: E402

# label, fp8, FWD_CONFIG overrides. 255 registers: the compiler's choice (uncapped); pv_fp16
# 0: P V in bf16, as the DiT runs it. results/bsa_ab_caps_h100.json ran before the caps were
# the defaults, its labels naming overrides ("fp8 maxnreg 168" is today's "fp8", its "fp8"
# today's "fp8, uncapped"; its "bf16 1 stage, maxnreg 128" today's "bf16").
VARIANTS = [("fp8", True, {}),
            ("fp8, uncapped", True, {"fp8_maxnreg": 255}),
            ("bf16", False, {}),
            ("bf16, uncapped, 2 stages", False, {"maxnreg": 255, "num_stages": 2}),
            ("bf16, P V in bf16", False, {"pv_fp16": 0}),
            ("bf16, P V in bf16, uncapped, 2 stages", False,
             {"pv_fp16": 0, "maxnreg": 255, "num_stages": 2})]


def rotated(items: list, r: int) -> list:
    """``items`` in round ``r``'s order: each starts a round in turn, so none always runs first
    or last."""
    turn = r % len(items)
    return items[turn:] + items[:turn]


def add_ab_args(ap: argparse.ArgumentParser, rep_ms: float) -> None:
    """The options every alternating A/B here shares."""
    ap.add_argument("--base-label", default="base", help="its variants' name")
    ap.add_argument("--rounds", type=int, default=3, choices=range(1, 100), metavar="N")
    ap.add_argument("--rep-ms", type=float, default=rep_ms)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")


def load_base(path: Path):
    """``path`` as a second module of the kernels package (its relative imports resolve)."""
    spec = importlib.util.spec_from_file_location("longcat_tools.kernels._bsa_base", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def random_inputs(name: str, dev: torch.device, n: int
                  ) -> tuple[tuple[int, int, int], R.ChunkLayout, list[torch.Tensor]]:
    """Shape ``name``'s latent, its chunk layout and ``n`` random bf16 ``[1, H, S, D]`` tensors
    (seed 0: every mode times the same q, k, v)."""
    lat = SHAPES[name]
    torch.manual_seed(0)
    xs = [torch.randn(1, HEADS, math.prod(lat), HEAD_DIM, device=dev, dtype=torch.bfloat16)
          for _ in range(n)]
    return lat, R.ChunkLayout(lat, CHUNK), xs


def select_ab(args: argparse.Namespace, base, dev: torch.device) -> list[dict]:
    """The select kernel of this copy and of ``base`` on the same float64 scores,
    alternately; their picks must be equal."""
    rows = []
    for name in args.shapes.split(","):
        lat, layout, (q, k) = random_inputs(name, dev, 2)
        score = R.exact_scores(TB.pool(q, layout), TB.pool(k, layout))
        kmax = kept_per_query(args.sparsity, layout.num_chunks)
        counts = torch.full(score.shape[:-1], kmax, dtype=torch.int32, device=dev)
        variants = [("current", TB), (args.base_label, base)]
        picks = [m.select(score, counts, kmax, torch.bfloat16) for _, m in variants]
        assert torch.equal(*picks), "the two select kernels picked different chunks"
        times: dict[str, list[float]] = {label: [] for label, _ in variants}
        for r in range(args.rounds):
            for label, module in rotated(variants, r):
                times[label].append(bench(functools.partial(
                    module.select, score, counts, kmax, torch.bfloat16), args.rep_ms))
                print(f"{name} round {r} select {label}: {times[label][-1]:.3f} ms", flush=True)
        rows += [dict(shape=name, latent=lat, sparsity=args.sparsity, variant=f"select {label}",
                      ms=statistics.median(t), ms_rounds=t, same_picks=True)
                 for label, t in times.items()]
    return rows


def _call(module, q, k, v, lq, lk, sparsity: float, fp8: bool, prep_only: bool = False,
          copy_v: int = 1):
    """The BSA call as ``kernels.block_sparse_attention`` makes it with P V in bf16 (the DiT's
    path) or in fp8, from ``module``'s functions: ``prepare`` where it has it, else the
    earlier ``select_chunks_and_copy_k`` and the copies inside ``attend``. ``prep_only``:
    stop before the forward (the selection and the copies; a base makes its copies of v, or
    fp8 ones of k and v, by their own launches). ``copy_v``: ``SELECT_CONFIG["copy_v"]`` for
    this call, where ``module`` has it."""
    if hasattr(module, "prepare"):
        module.SELECT_CONFIG["copy_v"] = copy_v
        try:
            p = module.prepare(q, k, v, lq, lk, sparsity, None, pv_fp16=False, fp8=fp8)
        finally:
            module.SELECT_CONFIG["copy_v"] = 1
        if prep_only:
            return p
        return module.attend(q, k, v, lq, lk, p.indices, p.counts, pv_fp16=False,
                             k_chunks=p.k_chunks, v_copy=p.v_copy, fp8=fp8,
                             quantized=p.quantized)
    idx, counts, kc = module.select_chunks_and_copy_k(q, k, lq, lk, sparsity, None,
                                                      copy_k=not fp8)
    if prep_only:
        return idx, counts, kc, (module.quantized_copies(k, v, lk) if fp8
                                 else module._v_copy(v, lk, False))
    return module.attend(q, k, v, lq, lk, idx, counts, pv_fp16=False, k_chunks=kc, fp8=fp8)


def call_ab(args: argparse.Namespace, base, dev: torch.device) -> list[dict]:
    """The whole call (and its part before the forward) of this copy, of this copy with v
    copied by its own launch (``SELECT_CONFIG["copy_v"] = 0``) and of ``base``, alternately;
    the outputs must be bit-equal."""
    rows = []
    for name in args.shapes.split(","):
        lat, lq, (q, k, v) = random_inputs(name, dev, 3)
        lk = lq
        variants = [("current", TB, 1), ("current, v copied apart", TB, 0),
                    (args.base_label, base, 1)]
        for fp8 in (False, True):
            if fp8 and torch.cuda.get_device_capability(dev) < (8, 9):
                continue
            kind = "fp8" if fp8 else "bf16"
            outs = [_call(module, q, k, v, lq, lk, args.sparsity, fp8, copy_v=copy_v)
                    for _, module, copy_v in variants]
            assert all(torch.equal(o, outs[0]) for o in outs), f"{name} {kind}: outputs differ"
            times: dict[tuple[str, bool], list[float]] = {}
            for r in range(args.rounds):
                for label, module, copy_v in rotated(variants, r):
                    for prep_only in (True, False):
                        fn = functools.partial(_call, module, q, k, v, lq, lk, args.sparsity,
                                               fp8, prep_only, copy_v)
                        times.setdefault((label, prep_only), []).append(bench(fn, args.rep_ms))
                        print(f"{name} {kind} round {r} {label} "
                              f"{'prep' if prep_only else 'call'}: "
                              f"{times[label, prep_only][-1]:.3f} ms", flush=True)
            rows += [dict(shape=name, latent=lat, sparsity=args.sparsity,
                          variant=f"{kind} {'prep' if prep_only else 'call'} {label}",
                          ms=statistics.median(t), ms_rounds=t, same_output=True)
                     for (label, prep_only), t in times.items()]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="720p,720p-48f")
    ap.add_argument("--sparsity", type=float, default=0.9375)
    ap.add_argument("--base", type=Path, default=None, help="an earlier triton_bsa.py")
    ap.add_argument("--select", action="store_true", help="the select kernels (needs --base)")
    ap.add_argument("--call", action="store_true", help="the whole call (needs --base)")
    ap.add_argument("--variants", default=None,
                    help="labels of VARIANTS to time, separated by ';' (default: all)")
    add_ab_args(ap, rep_ms=150.0)
    args = ap.parse_args()
    if (args.select or args.call) and args.base is None:
        ap.error("--select and --call compare with --base")
    dev = torch.device("cuda")
    meta = versions(dev)
    print(json.dumps(meta), flush=True)
    if args.select or args.call:
        mode = "select" if args.select else "call"
        rows = (select_ab if args.select else call_ab)(args, load_base(args.base), dev)
        print("\n".join(f"| {r['shape']} | {r['variant']} | {r['ms']:.3f} | "
                        f"{' / '.join(f'{t:.3f}' for t in r['ms_rounds'])} |" for r in rows))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"bsa_ab_{mode}.json").write_text(
            json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        return
    chosen = args.variants.split(";") if args.variants else [label for label, *_ in VARIANTS]
    unknown = set(chosen) - {label for label, *_ in VARIANTS}
    if unknown:
        ap.error(f"unknown variants: {', '.join(sorted(unknown))}")
    variants = [(label, TB, fp8, cfg) for label, fp8, cfg in VARIANTS if label in chosen]
    if args.base is not None:
        base = load_base(args.base)
        variants = [(f"{args.base_label} fp8", base, True, {}),
                    (f"{args.base_label} bf16", base, False, {})] + variants
    defaults = dict(TB.FWD_CONFIG)
    rows = []
    for name in args.shapes.split(","):
        lat, lq, (q, k, v) = random_inputs(name, dev, 3)
        lk = lq
        indices, counts = TB.select_chunks(q, k, lq, lk, args.sparsity, None)
        times: dict[str, list[float]] = {label: [] for label, *_ in variants}
        errs = {}
        try:
            for r in range(args.rounds):
                for label, module, fp8, cfg in rotated(variants, r):
                    TB.FWD_CONFIG.clear()
                    TB.FWD_CONFIG.update(defaults, **cfg)
                    fn = functools.partial(module.attend, q, k, v, lq, lk, indices, counts,
                                           fp8=fp8)
                    if label not in errs:
                        errs[label] = sampled_error(q, k, v, lq, lk, indices, counts, fn(),
                                                    heads=1, n_chunks=32)
                    times[label].append(bench(fn, args.rep_ms))
                    print(f"{name} round {r} {label}: {times[label][-1]:.3f} ms", flush=True)
        finally:
            TB.FWD_CONFIG.clear()
            TB.FWD_CONFIG.update(defaults)
        for label, _module, fp8, cfg in variants:
            rows.append(dict(shape=name, latent=lat, sparsity=args.sparsity, variant=label,
                             fp8=fp8, config=cfg, ms=statistics.median(times[label]),
                             ms_rounds=times[label], rel_err_vs_fp32=errs[label]))
    lines = ["| shape | variant | attend ms (median of rounds) | rounds | rel err vs fp32 |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['variant']} | {r['ms']:.3f} | "
              f"{' / '.join(f'{t:.2f}' for t in r['ms_rounds'])} | {r['rel_err_vs_fp32']:.2e} |"
              for r in rows]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bsa_ab.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1)
                                          + "\n")


if __name__ == "__main__":
    main()
