"""Other ways to write the BSA select kernel, timed against ``triton_bsa._select_kernel``
(issue #21: the 720p selection's target is 0.6 ms, and the select is 0.57 ms of it).

The kernel finds each row's k-th largest score by 16 one-bit passes (bf16), then compacts the
picks in ascending order. Each variant below returns the same indices (checked) and is timed
on bf16 scores of random normal values, and of values rounded to quarters (many ties):

* ``hist<L>``  a radix select of L bits a level, counted with ``tl.histogram`` (16 / L levels);
* ``packed``   two bits a pass, the three counts packed in one int64 sum (8 passes);
* ``rows<R>``  the current algorithm on R rows a program (reductions along the row axis);
* ``floor``    only what every variant pays besides the passes: the load, the keys, one
  reduction and the compaction (its picks are not a selection; not compared).

    PYTHONPATH=. python3 benchmarks/select_variants.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bsa_kernel import versions  # noqa: E402

from longcat_tools.kernels import triton_bsa as TB  # noqa: E402

HEADS = 32
SHAPES = {"720p": (1320, 82), "720p-48f": (2640, 165)}  # kv chunks, picks a query chunk (0.9375)
LOW_BIT = tl.constexpr(16)  # bf16 scores: the low 16 bits of their float32 bits are zero


@triton.jit
def _keys(S, row, Mk, stride_srow, MK_PAD: tl.constexpr):
    """The row's scores as unsigned keys in float order (``_select_kernel``'s), padding 0."""
    n = tl.arange(0, MK_PAD)
    valid = n < Mk
    s = tl.load(S + row * stride_srow + n, mask=valid, other=0.0).to(tl.float32)
    bits = s.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)
    key = tl.where(bits < 0, ~bits, bits ^ -2147483648).to(tl.uint32, bitcast=True)
    return n, valid, tl.where(valid, key >> LOW_BIT, 0).to(tl.int32, bitcast=True)


@triton.jit
def _hist_kernel(S, CNT, IDX, Mk, KMAX, stride_srow, stride_irow, MK_PAD: tl.constexpr,
                 L: tl.constexpr, LEVELS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n, valid, key = _keys(S, row, Mk, stride_srow, MK_PAD)
    k = tl.load(CNT + row)
    b = tl.arange(0, 1 << L)
    need = k
    prefix = tl.zeros([], dtype=tl.int32)
    for lvl in tl.static_range(LEVELS):
        shift = (LEVELS - 1 - lvl) * L
        if lvl == 0:
            match = valid
        else:
            match = valid & ((key >> (shift + L)) == prefix)
        h = tl.histogram((key >> shift) & ((1 << L) - 1), 1 << L, mask=match)
        at_or_above = tl.sum(h, axis=0) - tl.cumsum(h, axis=0) + h
        digit = tl.max(tl.where(at_or_above >= need, b, -1), axis=0)
        need = need - tl.sum(tl.where(b > digit, h, 0), axis=0)
        prefix = (prefix << L) | digit
    TB.ascending_picks(IDX + row * stride_irow, n, valid, key, prefix, k, KMAX)


@triton.jit
def _packed_kernel(S, CNT, IDX, Mk, KMAX, stride_srow, stride_irow, MK_PAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n, valid, key = _keys(S, row, Mk, stride_srow, MK_PAD)
    k = tl.load(CNT + row)
    kth = tl.zeros([], dtype=tl.int32)
    for p in tl.static_range(8):
        shift = 14 - 2 * p
        c1, c2, c3 = kth | (1 << shift), kth | (2 << shift), kth | (3 << shift)
        s = tl.sum(tl.where(key >= c1, 1, 0).to(tl.int64)
                   + tl.where(key >= c2, 65536, 0).to(tl.int64)
                   + tl.where(key >= c3, 4294967296, 0), axis=0)
        kth = tl.where((s >> 32).to(tl.int32) >= k, c3,
                       tl.where(((s >> 16) & 0xFFFF).to(tl.int32) >= k, c2,
                                tl.where((s & 0xFFFF).to(tl.int32) >= k, c1, kth)))
    TB.ascending_picks(IDX + row * stride_irow, n, valid, key, kth, k, KMAX)


@triton.jit
def _rows_kernel(S, CNT, IDX, ROWS, Mk, KMAX, stride_srow, stride_irow, MK_PAD: tl.constexpr,
                 R: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    row_ok = row < ROWS
    n = tl.arange(0, MK_PAD)
    valid = (n < Mk)[None, :] & row_ok[:, None]
    s = tl.load(S + row[:, None] * stride_srow + n[None, :], mask=valid, other=0.0)
    bits = s.to(tl.float32).to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)
    key = tl.where(bits < 0, ~bits, bits ^ -2147483648).to(tl.uint32, bitcast=True)
    key = tl.where(valid, key >> LOW_BIT, 0)
    k = tl.load(CNT + row, mask=row_ok, other=0)
    kth = tl.zeros([R], dtype=tl.uint32)
    for bit in tl.static_range(31 - LOW_BIT, -1, -1):
        cand = kth | (1 << bit)
        kth = tl.where(tl.sum((key >= cand[:, None]).to(tl.int32), axis=1) >= k, cand, kth)
    above = (key > kth[:, None]) & valid
    need = k - tl.sum(above.to(tl.int32), axis=1)
    tie = (key == kth[:, None]) & valid
    upto = tl.cumsum(above.to(tl.int32) | (tie.to(tl.int32) << 16), axis=1)
    ties_upto = upto >> 16
    take = above | (tie & (ties_upto <= need[:, None]))
    pos = (upto & 0xFFFF) + tl.minimum(ties_upto, need[:, None]) - 1
    out = IDX + row[:, None] * stride_irow
    tl.store(out + pos, n[None, :], mask=take)
    tl.store(out + n[None, :], tl.full([R, MK_PAD], -1, tl.int32),
             mask=(n[None, :] >= k[:, None]) & (n < KMAX)[None, :] & row_ok[:, None])


@triton.jit
def _floor_kernel(S, CNT, IDX, Mk, KMAX, stride_srow, stride_irow, MK_PAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n, valid, key = _keys(S, row, Mk, stride_srow, MK_PAD)
    top = tl.max(key, axis=0)
    # not a selection: more than k keys may lie above the threshold, so it takes all Mk (no
    # position below 0) into a row of MK_PAD (``run``)
    TB.ascending_picks(IDX + row * stride_irow, n, valid, key, tl.where(top > 3, top - 3, top),
                       Mk, KMAX)


def run(variant: str, score: torch.Tensor, counts: torch.Tensor, kmax: int, warps: int
        ) -> torch.Tensor:
    """Indices ``[B, H, Mq, kmax]`` by ``variant``: current, hist<L>, packed, rows<R>, floor."""
    if variant == "current":
        TB.SELECT_CONFIG["warps"] = warps
        try:
            return TB.select(score, counts, kmax, torch.bfloat16)
        finally:
            TB.SELECT_CONFIG["warps"] = 0
    B, H, Mq, Mk = score.shape
    pad = triton.next_power_of_2(Mk)
    width = pad if variant == "floor" else kmax
    idx = torch.empty(B, H, Mq, width, device=score.device, dtype=torch.int32)
    args = (score, counts, idx, Mk, kmax, score.stride(2), idx.stride(2), pad)
    rows = B * H * Mq
    if variant.startswith("hist"):
        L = int(variant[4:])
        _hist_kernel[(rows,)](*args, L, -(-16 // L), num_warps=warps)
    elif variant == "packed":
        _packed_kernel[(rows,)](*args, num_warps=warps)
    elif variant.startswith("rows"):
        R = int(variant[4:])
        _rows_kernel[(triton.cdiv(rows, R),)](score, counts, idx, rows, *args[3:], R,
                                              num_warps=warps)
    elif variant == "floor":
        _floor_kernel[(rows,)](*args, num_warps=warps)
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    return idx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="current,hist8,hist4,packed,rows1,rows2,rows4,floor")
    ap.add_argument("--warps", default="2,4,8", help="num_warps tried for each variant")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    a = ap.parse_args()
    dev = torch.device("cuda")

    def bench(fn) -> float:
        return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))

    rows = []
    for shape, (mk, kept) in SHAPES.items():
        for scores in ("normal", "quarters (ties)"):
            torch.manual_seed(0)
            s = torch.randn(1, HEADS, mk, mk, device=dev)
            score = (s if scores == "normal" else (s * 4).round() / 4).to(torch.bfloat16)
            counts = torch.full((1, HEADS, mk), kept, dtype=torch.int32, device=dev)
            edge = counts.clone()  # edge counts, checked with every index kept
            edge[0, 0, :7] = torch.tensor([0, 1, 2, mk, mk - 1, 17, 3])
            want = run("current", score, edge, mk, 4)
            for variant in a.variants.split(","):
                for warps in map(int, a.warps.split(",")):
                    row = {"shape": shape, "scores": scores, "variant": variant,
                           "num_warps": warps}
                    try:
                        if variant != "floor":
                            row["equal"] = torch.equal(run(variant, score, edge, mk, warps),
                                                       want)
                        args = (variant, score, counts, kept, warps)
                        row["ms"] = bench(lambda args=args: run(*args))
                    except Exception as e:  # noqa: BLE001 - a variant that fails to compile
                        row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
                    rows.append(row)
                    print(json.dumps(row), flush=True)

    print(f"\n{'shape':<10} {'scores':<16} {'variant':<8} {'warps':>5} {'ms':>8}  equal")
    for r in rows:
        ms = f"{r['ms']:.3f}" if "ms" in r else "error"
        print(f"{r['shape']:<10} {r['scores']:<16} {r['variant']:<8} {r['num_warps']:>5} "
              f"{ms:>8}  {r.get('equal', '')}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "select_variants.json").write_text(json.dumps({"meta": versions(dev), "rows": rows},
                                                         indent=1))


if __name__ == "__main__":
    main()
