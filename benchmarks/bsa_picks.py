"""What the BSA selection picks inside the DiT, against random q and k, and what that does to
the forward's kv passes (issue #21).

``kv_passes_for`` was sized on random q, k, v, whose picks spread over every kv chunk of a
head; in the 720p/189 forward one pass then measured slightly faster than the three the rule
takes. This run shows why, in one process:

* one forward of the real-size DiT (random weights, ``dit_forward.build``) per BSA shape,
  every BSA call's picks summarised: per head, the share of its kv chunks that any query chunk
  picked; per window of consecutive query chunks as wide as the programs in flight (SMs x
  programs an SM), the distinct kv chunks and their K + V bytes, which L2 has to hold;
* the same for random q, k at that shape;
* the attend (with its K and V copies) of one block's own q, k, v and picks (the middle
  block), timed in 1, 2 and 3 kv passes, alternating, next to the same on random q, k, v.

    PYTHONPATH=. python3 benchmarks/bsa_picks.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bsa_kernel import bench, kv_passes, versions  # noqa: E402
from dit_forward import SHAPES, build, inputs  # noqa: E402

from longcat_tools import kernels  # noqa: E402
from longcat_tools.kernels import triton_bsa  # noqa: E402

SPARSITY = 0.9375
CHUNK = (4, 4, 4)
PROGRAMS_PER_SM = 4  # the bf16 forward's: 128 registers, one stage (triton_bsa._REGISTER_CAP)


def pick_stats(indices: torch.Tensor, mk: int, window: int, kv_bytes: int) -> dict:
    """Per head: the share of kv chunks picked at all; per window of ``window`` consecutive
    query chunks: the distinct kv chunks picked and their bytes (``kv_bytes`` a chunk)."""
    B, H, mq, kmax = indices.shape
    idx = torch.where(indices < 0, mk, indices).long().reshape(B * H, mq, kmax)
    seen = torch.zeros(B * H, mk + 1, dtype=torch.bool, device=idx.device)
    seen.scatter_(1, idx.reshape(B * H, -1), True)
    per_head = seen[:, :mk].sum(1).float() / mk
    n_win = -(-mq // window)
    pad = n_win * window - mq
    if pad:
        idx = torch.cat([idx, torch.full((B * H, pad, kmax), mk, device=idx.device,
                                         dtype=idx.dtype)], 1)
    win = torch.zeros(B * H, n_win, mk + 1, dtype=torch.bool, device=idx.device)
    win.scatter_(2, idx.reshape(B * H, n_win, window * kmax), True)
    distinct = win[:, :, :mk].sum(2).float()
    return {"heads_share_picked_mean": float(per_head.mean()),
            "heads_share_picked_min": float(per_head.min()),
            "window_distinct_mean": float(distinct.mean()),
            "window_distinct_max": float(distinct.max()),
            "window_mb_mean": float(distinct.mean()) * kv_bytes / 1e6,
            "window_mb_max": float(distinct.max()) * kv_bytes / 1e6}


def time_passes(call, rounds: int, rep_ms: float) -> dict:
    """Median ms of ``call`` in 1, 2 and 3 kv passes, the three alternating ``rounds`` times."""
    times: dict[int, list[float]] = {1: [], 2: [], 3: []}
    for _ in range(rounds):
        for n in times:
            with kv_passes(n):
                times[n].append(bench(call, rep_ms))
    return {f"attend_{n}_pass_ms": statistics.median(t) for n, t in times.items()}


def run_shape(model, shape: str, window: int, rounds: int, rep_ms: float) -> dict:
    """One forward of ``model`` at ``shape`` with every BSA call's picks summarised; its middle
    block's attend and random q, k, v's timed in 1, 2 and 3 kv passes."""
    latent, bsa = SHAPES[shape]
    assert bsa, f"{shape}: not a BSA shape"
    heads, head_dim = model.dims.num_heads, model.dims.head_dim
    kv_bytes = 64 * head_dim * 2 * 2  # a chunk's K and V in bf16
    attend, middle = triton_bsa.attend, model.dims.depth // 2
    calls: list[dict] = []
    kept: dict = {}

    def recording(q, k, v, lq, lk, indices, counts, **kw):
        if len(calls) == middle:
            kept.update(q=q.clone(), k=k.clone(), v=v.clone(), lq=lq, lk=lk,
                        indices=indices.clone(), counts=counts.clone(),
                        pv_fp16=kw.get("pv_fp16"), fp8=kw.get("fp8", False))
        calls.append(pick_stats(indices, lk.num_chunks, window, kv_bytes))
        return attend(q, k, v, lq, lk, indices, counts, **kw)

    triton_bsa.attend = recording
    try:
        with torch.inference_mode():
            model(*inputs(latent, model.dims.caption_channels, "cuda", seed=1))
    finally:
        triton_bsa.attend = attend
    lq, lk = kept["lq"], kept["lk"]
    tokens = lq.latent
    row = {"shape": shape, "tokens": list(tokens), "kv_chunks": lk.num_chunks,
           "bsa_calls": len(calls), "auto_kv_passes": triton_bsa.kv_passes_for(lk, head_dim),
           "dit": {key: statistics.median(c[key] for c in calls) for key in calls[0]},
           "dit_middle_block": calls[middle]}
    with torch.inference_mode():
        row["dit_middle_block"].update(time_passes(
            lambda: attend(kept["q"], kept["k"], kept["v"], lq, lk, kept["indices"],
                           kept["counts"], pv_fp16=kept["pv_fp16"], fp8=kept["fp8"]),
            rounds, rep_ms))
        kept.clear()
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, heads, math.prod(tokens), head_dim, device="cuda",
                               dtype=torch.bfloat16) for _ in range(3))
        indices, counts = kernels.select_chunks(q, k, tokens, tokens, sparsity=SPARSITY,
                                                chunk_q=CHUNK, chunk_k=CHUNK)
        row["random_qkv"] = pick_stats(indices, lk.num_chunks, window, kv_bytes)
        row["random_qkv"].update(time_passes(
            lambda: attend(q, k, v, lq, lk, indices, counts, pv_fp16=False), rounds, rep_ms))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="720p refine/93 BSA 0.9375,720p refine/189 BSA 0.9375")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rep-ms", type=float, default=300.0)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    a = ap.parse_args()
    dev = torch.device("cuda")
    window = torch.cuda.get_device_properties(dev).multi_processor_count * PROGRAMS_PER_SM
    model = build("real", None, "cuda", torch.bfloat16, seed=0)
    model.enable_fast_ops(True)
    model.enable_bsa({"sparsity": SPARSITY})
    info = {**versions(dev), "window_query_chunks": window, "sparsity": SPARSITY,
            "rounds": a.rounds, "weights": "random (dit_forward.build, seed 0)"}
    rows = []
    for shape in a.shapes.split(","):
        rows.append(run_shape(model, shape, window, a.rounds, a.rep_ms))
        torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)

    print(f"\n{'shape':<28} {'picks':<14} {'heads picked':>12} {'window MB':>10} "
          f"{'1 / 2 / 3 kv passes, ms':>26}")
    for r in rows:
        for name, s in (("DiT block", r["dit_middle_block"]), ("random q, k", r["random_qkv"])):
            t = " / ".join(f"{s[f'attend_{n}_pass_ms']:.2f}" for n in (1, 2, 3))
            print(f"{r['shape']:<28} {name:<14} {s['heads_share_picked_mean']:>12.1%} "
                  f"{s['window_mb_mean']:>10.1f} {t:>26}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bsa_picks.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
