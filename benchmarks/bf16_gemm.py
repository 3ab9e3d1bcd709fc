"""The DiT's bf16 GEMMs in other layouts and libraries, alternating on one GPU: time and
TFLOP/s, to find whether any beats ``F.linear`` as the DiT calls it.

  PYTHONPATH=. python3 benchmarks/bf16_gemm.py --out DIR   # on the GPU: a table, bf16_gemm.json

Why: the GEMMs are most of a forward (2.57 of 4.26 s at 720p/93 on an H100,
``results/dit_forward_profile.json``) and ran at 660-700 TFLOP/s, against ~790 for an 8192^3
product on the same cards. Variants of one layer's product, each checked equal to the first
within bf16 rounding:
- ``F.linear``: ``x @ W^T`` with ``W`` ``[N, K]`` row-major, as the DiT stores it;
- ``x @ Wt``: the weight kept transposed, ``[K, N]`` row-major (cuBLAS's other layout);
- ``cublaslt``: ``F.linear`` with ``torch.backends.cuda.preferred_blas_library("cublaslt")``;
- for w1 and w3, one GEMM of both weights concatenated (``N = 2F``) instead of two.
Shapes: the real config's layers at 480p/93 (37,440 tokens) and 720p refine/93 (84,480),
random unit-variance activations, N(0, 0.02) weights. The order rotates each round.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bsa_ab import rotated  # noqa: E402

from longcat_tools.model.keymap import RELEASE_DIMS  # noqa: E402

TOKENS = {"480p/93": 24 * 30 * 52, "720p/93": 24 * 44 * 80}
H, FF = RELEASE_DIMS.hidden_size, RELEASE_DIMS.ffn_hidden
# name: K, N, bias, how many such GEMMs a block runs
LAYERS = {"qkv": (H, 3 * H, True, 1), "proj": (H, H, True, 1), "cross q": (H, H, True, 1),
          "w1, w3": (H, FF, False, 2), "w2": (FF, H, False, 1)}


def _lt(fn):
    """``fn`` run with cuBLASLt as torch's preferred BLAS library."""
    def run():
        prev = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            return fn()
        finally:
            torch.backends.cuda.preferred_blas_library(prev)
    return run


def variants(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, pair: bool) -> dict:
    """label -> a callable computing the layer (both w1 and w3 where ``pair``)."""
    wt = w.t().contiguous()
    if pair:
        w2 = torch.randn_like(w) * 0.02
        w12, wt2 = torch.cat([w, w2]), w2.t().contiguous()
        return {"F.linear": lambda: (F.linear(x, w), F.linear(x, w2)),
                "x @ Wt": lambda: (x @ wt, x @ wt2),
                "cublaslt": _lt(lambda: (F.linear(x, w), F.linear(x, w2))),
                "concatenated": lambda: F.linear(x, w12).chunk(2, dim=-1)}
    if b is None:
        return {"F.linear": lambda: F.linear(x, w), "x @ Wt": lambda: x @ wt,
                "cublaslt": _lt(lambda: F.linear(x, w))}
    return {"F.linear": lambda: F.linear(x, w, b), "x @ Wt": lambda: torch.addmm(b, x, wt),
            "cublaslt": _lt(lambda: F.linear(x, w, b))}


def measure(rounds: int, rep_ms: float) -> list[dict]:
    import triton.testing

    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for size, M in TOKENS.items():
        for name, (K, N, bias, count) in LAYERS.items():
            x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
            w = (torch.randn(N, K, device="cuda", generator=g) * 0.02).bfloat16()
            b = (torch.randn(N, device="cuda", generator=g) * 0.02).bfloat16() if bias else None
            fns = variants(x, w, b, count == 2)
            first = torch.cat([t.float() for t in _tuple(fns["F.linear"]())], -1)
            for label, fn in fns.items():
                got = torch.cat([t.float() for t in _tuple(fn())], -1)
                err = ((got - first).norm() / first.norm()).item()
                assert err < 1e-2, f"{size} {name} {label}: differs by {err:.2e}"
            times: dict[str, list[float]] = {label: [] for label in fns}
            for r in range(rounds):
                for label, fn in rotated(list(fns.items()), r):
                    times[label].append(triton.testing.do_bench(
                        fn, warmup=25, rep=rep_ms, return_mode="median"))
            flop = 2 * M * K * N * count
            for label, t in times.items():
                ms = statistics.median(t)
                rows.append(dict(size=size, layer=name, M=M, K=K, N=N, gemms=count,
                                 variant=label, median_ms=round(ms, 4),
                                 times_ms=[round(v, 4) for v in t],
                                 tflops=round(flop / ms / 1e9, 1)))
                print(f"{size} {name} {label}: {ms:.3f} ms {rows[-1]['tflops']} TFLOP/s",
                      flush=True)
            del x, w, b, fns
    return rows


def _tuple(y):
    return y if isinstance(y, tuple) else (y,)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rep-ms", type=float, default=200.0)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    import triton

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda,
            "default_blas": str(torch.backends.cuda.preferred_blas_library())}
    rows = measure(args.rounds, args.rep_ms)
    lines = ["| size | layer | M x K x N | " + " | ".join(dict.fromkeys(r["variant"] for r in rows))
             + " |"]
    labels = list(dict.fromkeys(r["variant"] for r in rows))
    lines.append("|---|---|---|" + "---|" * len(labels))
    for (size, layer), group in _groups(rows).items():
        by = {r["variant"]: r for r in group}
        r0 = group[0]
        cells = [f"{by[v]['median_ms']:.3f} ms ({by[v]['tflops']:.0f})" if v in by else ""
                 for v in labels]
        lines.append(f"| {size} | {layer} | {r0['M']} x {r0['K']} x {r0['N']}"
                     f"{' (x2)' if r0['gemms'] == 2 else ''} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bf16_gemm.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1)
                                             + "\n")


def _groups(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault((r["size"], r["layer"]), []).append(r)
    return out


if __name__ == "__main__":
    main()
