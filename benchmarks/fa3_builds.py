"""FlashAttention-3 builds against each other: the same kernels compiled another way.

Why: FA3's own setup.py compiles with ptxas 12.8 ("gives the best perf currently"); our
build (``build_fa3.sh``) used CUDA 13.0's. Two builds cannot load in one process (both are
``flash_attn_3._C``), so each round runs one child process per build, in turn, with that
build first on ``PYTHONPATH``; a child times FA3's bf16 forward and its FP8 forward (the
kernel alone, on e4m3 copies made once) at the DiT's dense shapes. The table gives each
build's median over the rounds.

    PYTHONPATH=. python3 benchmarks/fa3_builds.py /tmp/fa3 /tmp/fa3_ptxas128 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bsa_ab import rotated  # noqa: E402
from fp8_attention import HEAD_DIM, HEADS, SHAPES, bench_ms  # noqa: E402


def shape_times(name: str, S: int) -> dict[str, float]:
    """FA3's bf16 and FP8 forwards at one shape, on the DiT's strided q, k, v views (FP8: the
    kernel alone, on e4m3 copies made once by ``cudnn_fp8_attention.quantize``)."""
    import torch

    from longcat_tools.kernels import fa3
    from longcat_tools.kernels.cudnn_fp8_attention import quantize

    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(1, S, 3, HEADS, HEAD_DIM, device="cuda", generator=g, dtype=torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q8, k8, v8, scales, _ = quantize(q, k, v)
    descales = {f"{n}_descale": s.expand(1, HEADS) for n, s in zip("qkv", scales, strict=True)}
    assert fa3.forward(q, k, v) is not None, "FA3 refused the bf16 call"
    assert fa3.forward(q8, k8, v8, **descales) is not None, "FA3 refused the FP8 call"
    return {f"{name} bf16": bench_ms(lambda: fa3.forward(q, k, v), "cuda"),
            f"{name} fp8": bench_ms(lambda: fa3.forward(q8, k8, v8, **descales), "cuda")}


def child() -> None:
    """One build's times, ``{"shape kind": ms}``, as a JSON line on stdout."""
    times = {}
    for name, S in SHAPES.items():
        times.update(shape_times(name, S))
    print(json.dumps(times), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("builds", nargs="*", type=Path, help="folders with flash_attn_interface.py")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child()
        return
    if not args.builds:
        ap.error("name at least one build folder")
    times: dict[str, dict[str, list[float]]] = {str(b): {} for b in args.builds}
    for r in range(args.rounds):
        for build in rotated(list(args.builds), r):
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(build.resolve()), os.environ.get("PYTHONPATH", "")])}
            run = subprocess.run([sys.executable, __file__, "--child"], env=env,
                                 capture_output=True, text=True, timeout=600)
            if run.returncode != 0:
                sys.exit(f"{build}: {run.stderr.strip().splitlines()[-1:]}")
            for key, ms in json.loads(run.stdout.strip().splitlines()[-1]).items():
                times[str(build)].setdefault(key, []).append(ms)
            print(f"round {r} {build}: {run.stdout.strip().splitlines()[-1]}", flush=True)
    rows = [dict(build=b, case=c, ms=statistics.median(t), ms_rounds=t)
            for b, cases in times.items() for c, t in cases.items()]
    print("| build | case | ms (median) | rounds |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['build']} | {r['case']} | {r['ms']:.3f} | "
              f"{' / '.join(f'{t:.2f}' for t in r['ms_rounds'])} |")
    import datetime

    import torch

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "shapes": SHAPES, "heads": HEADS, "head_dim": HEAD_DIM, "rounds": args.rounds}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fa3_builds.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1)
                                              + "\n")


if __name__ == "__main__":
    main()
