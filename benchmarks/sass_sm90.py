"""Registers, spills and loop instructions of our kernels compiled for sm90, without a GPU.

Why: occupancy (programs an SM) follows from registers and shared memory, and an issue-bound
loop from its instruction count; both can be read before device time is spent. Triton
compiles for a ``GPUTarget`` with its bundled ptxas, and its bundled ``cuobjdump`` reads the
cubin. The forward's loop body is counted from its first mbarrier wait to its backward
branch. The row kernels compile as launched: pointers and integers that are multiples of 16
marked so (wide loads); unmarked, their counts came out nearly twice as high. The BSA forward
compiles unmarked, as it was first read; marking its pointers changes its loop by at most 8
instructions (its K and V come by TMA). ``--base`` adds an earlier ``triton_bsa.py`` (see
``bsa_ab.py``) for a before/after, ``--base-kernels`` an earlier kernels folder's row kernels
(see ``row_kernels.py``).

    PYTHONPATH=. python3 benchmarks/sass_sm90.py --base /tmp/base_bsa.py
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bsa_ab import load_base  # noqa: E402
from row_kernels import load_base as load_base_kernels  # noqa: E402

from longcat_tools.kernels import triton_bsa as TB  # noqa: E402
from longcat_tools.kernels import triton_norm as TN  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
# the 720p forward's launch: 64-token chunks, D = 128, one kv step per chunk, 4 warps
FWD = dict(CTQ=4, CHQ=4, CWQ=4, CQ=64, CTK=4, CHK=4, CWK=4, CK=64, BLOCK_M=64, BLOCK_N=64,
           KV_SPLIT=1, HEAD_DIM=128, EVEN_Q=True, EVEN_K=True, TMA=True, LOAD_STATE=False,
           STORE_STATE=False)
# label, fp8, num_stages, maxnreg (None: the compiler's choice), constexpr changes
VARIANTS = [("bf16", False, 2, None, {}), ("bf16, 1 stage, maxnreg 128", False, 1, 128, {}),
            ("bf16, 1 stage, maxnreg 128, ragged k", False, 1, 128, {"EVEN_K": False}),
            ("bf16, 1 stage, maxnreg 128, kv pass", False, 1, 128,
             {"LOAD_STATE": True, "STORE_STATE": True}),
            ("fp8", True, 2, None, {}), ("fp8, maxnreg 168", True, 2, 168, {}),
            ("fp8, maxnreg 168, ragged k", True, 2, 168, {"EVEN_K": False}),
            ("fp8, maxnreg 168, kv pass", True, 2, 168, {"LOAD_STATE": True, "STORE_STATE": True}),
            ("fp8, maxnreg 128", True, 2, 128, {})]


def compile_stats(fn, signature: dict, constexprs: dict, aligned: tuple[str, ...] = (),
                  **options) -> dict:
    """``aligned``: arguments a launch marks divisible by 16 (pointers to 16-byte aligned
    tensors, integers that are multiples of 16), as Triton specializes them: wide loads."""
    names = fn.arg_names
    constexprs = {k: v for k, v in constexprs.items() if k in names}  # an earlier kernel's
    sig = {n: "constexpr" if n in constexprs else signature.get(n, "i32") for n in names}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    cubin = Path("/tmp") / f"sass_sm90_{fn.__name__}.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    usage = subprocess.run([BIN / "cuobjdump", "-res-usage", cubin], capture_output=True,
                           text=True, check=True).stdout
    sass = subprocess.run([BIN / "cuobjdump", "-sass", cubin], capture_output=True, text=True,
                          check=True).stdout
    # (address, instruction text) of each instruction
    code = [(int(m.group(1), 16), m.group(2).strip()) for m in
            re.finditer(r"^\s*/\*([0-9a-f]{4,})\*/\s*([^;]*);", sass, re.MULTILINE)]
    ops = [text.split()[1 if text.startswith("@") else 0].split(".")[0] for _, text in code]
    stats = {k.lower(): int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    stats.update(shared_bytes=kernel.metadata.shared, instructions=len(ops),
                 spill_instructions=ops.count("LDL") + ops.count("STL"))
    first_wait = next((i for i, (_, text) in enumerate(code) if "TRYWAIT" in text), None)
    if first_wait is not None:
        back = next((i for i, (at, text) in enumerate(code) if i > first_wait
                     and (target := re.search(r"BRA (0x[0-9a-f]+)", text))
                     and int(target.group(1), 16) < at), None)
        if back is not None:
            body = Counter(ops[first_wait:back + 1])
            stats.update(loop_instructions=sum(body.values()),
                         loop_spills=body["LDL"] + body["STL"])
    return stats


def forward(module, fp8: bool, stages: int, maxnreg: int | None, changes: dict) -> dict:
    sig = {"Q": "*bf16", "Out": "*bf16", "IDX": "*i32", "CNT": "*i32", "START": "*i32",
           "STOP": "*i32", "SM": "*fp32", "SL": "*fp32", "SACC": "*fp32", "qk_scale": "fp32",
           "KS": "*fp32", "VS": "*fp32",
           "KD": "tensordesc<i8[64, 128]>" if fp8 else "tensordesc<bf16[64, 128]>",
           "VD": "tensordesc<fp8e4nv[128, 64]>" if fp8 else "tensordesc<fp16[64, 128]>"}
    options = dict(num_warps=4, num_stages=stages)
    if maxnreg:
        options["maxnreg"] = maxnreg
    return compile_stats(module._bsa_fwd_kernel, sig, {**FWD, "FP8": fp8, **changes}, **options)


# the row kernels at the 720p/93 shapes: label, kernel, pointer and float arguments (the rest
# i32), constexprs, the ROW_WARPS entry and the block (padded row); each is
# compiled at its warps and at twice as many. Integers are multiples of 16 there, but T.
_ROWS = dict(ROWS=TN.ROWS_PER_PROGRAM, BLOCK_C=4096, RES_MODE=TN.RES_GATED,
             NORM_MODE=TN.NORM_MODULATE)
_ROWS_SIG = {**dict.fromkeys(["X", "RES", "W", "BIAS", "XOUT"], "*bf16"),
             **dict.fromkeys(["GATE", "SHIFT", "SCALE", "YSCALE"], "*fp32"), "eps": "fp32"}
_SWIGLU_E4M3_SIG = {"A": "*bf16", "B": "*bf16", "Q": "*fp8e4nv", "SCALE": "*fp32"}
_E4M3_ROWS_SIG = {"X": "*bf16", "Q": "*fp8e4nv", "SCALE": "*fp32", "MEAN": "*fp32"}
_HEAD_SIG = {"SRC": "*bf16", "W": "*bf16", "COS": "*fp32", "SIN": "*fp32", "OUT": "*bf16",
             "Q8": "*fp8e4nv", "QSCALE": "*fp32", "eps": "fp32"}
_HEAD = dict(H_PAD=32, D=128, PARTS=2, ROPE=True)
ROW_KERNELS = [
    ("fused_rows, adaln gated", "_rows_kernel", {**_ROWS_SIG, "YOUT": "*bf16"},
     {**_ROWS, "Q8": False}, "fused_rows", 4096),
    ("fused_rows, adaln gated, e4m3", "_rows_kernel", {**_ROWS_SIG, "YOUT": "*fp8e4nv"},
     {**_ROWS, "Q8": True}, "fused_rows_e4m3", 4096),
    ("swiglu", "_swiglu_kernel", {"A": "*bf16", "B": "*bf16", "H": "*bf16", "n": "i64"},
     {"BLOCK": 4096}, "swiglu", 4096),
    ("swiglu, e4m3", "_swiglu_e4m3_kernel", _SWIGLU_E4M3_SIG, {"BLOCK_K": 16384},
     "swiglu_e4m3", 16384),
    ("e4m3_rows, C = 4096", "_e4m3_rows_kernel", _E4M3_ROWS_SIG,
     {"BLOCK_K": 4096, "ADD_MEAN": False}, "e4m3_rows", 4096),
    ("e4m3_rows plus a mean (fp8 attention's output)", "_e4m3_rows_kernel", _E4M3_ROWS_SIG,
     {"BLOCK_K": 4096, "ADD_MEAN": True}, "e4m3_rows", 4096),
    ("head_norm_rope, q and k", "_head_norm_rope_kernel", _HEAD_SIG,
     {**_HEAD, "Q_E4M3": False}, "head_norm_rope", 4096),
    ("head_norm_rope, q as e4m3", "_head_norm_rope_kernel", _HEAD_SIG,
     {**_HEAD, "Q_E4M3": True}, "head_norm_rope", 4096),
]


def row_kernel_stats(module) -> list[dict]:
    """The row kernels of ``module`` (a triton_norm), compiled as launched at 720p/93."""
    rows = []
    for label, name, sig, constexprs, key, block in ROW_KERNELS:
        fn = getattr(module, name)
        aligned = tuple(n for n in fn.arg_names if n not in constexprs and n not in ("T", "eps"))
        warps = TN._row_warps(key, block)
        for w in (warps, 2 * warps):
            rows.append(dict(kernel=label, variant=f"{w} warps",
                             **compile_stats(fn, sig, constexprs, aligned, num_warps=w)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, default=None, help="an earlier triton_bsa.py")
    ap.add_argument("--base-kernels", type=Path, default=None,
                    help="an earlier kernels folder, for its row kernels (see row_kernels.py)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    rows = []
    row_modules = [("current", TN)]
    if args.base_kernels:
        row_modules.append(("base", load_base_kernels(args.base_kernels)))
    for copy, module in row_modules:
        rows += [dict(r, copy=copy) for r in row_kernel_stats(module)]
    modules = [("current", TB)] + ([("base", load_base(args.base))] if args.base else [])
    for copy, module in modules:
        for label, fp8, stages, maxnreg, changes in VARIANTS:
            rows.append(dict(kernel="bsa forward", copy=copy, variant=label,
                             **forward(module, fp8, stages, maxnreg, changes)))
        rows.append(dict(kernel="select", copy=copy, variant="2,048 keys, bf16 scores, 4 warps",
                         **compile_stats(module._select_kernel,
                                         {"S": "*fp64", "CNT": "*i32", "IDX": "*i32",
                                          "stride_srow": "i64", "stride_irow": "i64"},
                                         dict(MK_PAD=2048, LOW_BIT=16, DTYPE=tl.bfloat16),
                                         num_warps=4)))
    from longcat_tools.kernels import column_stats as CS
    from longcat_tools.kernels import cudnn_fp8_attention as C

    cast = C.CAST_CONFIG
    for to_e4m3, src, dst in ((True, "*bf16", "*fp8e4nv"), (False, "*bf16", "*bf16")):
        rows.append(dict(kernel="fp8 attention scale_cast", copy="current",
                         variant=f"{'to e4m3' if to_e4m3 else 'output pass'}, D = 128, "
                                 f"{cast['rows']} rows, {cast['num_warps']} warps",
                         **compile_stats(C._scale_cast_kernel,
                                         {"X": src, "Y": dst, "SCALE": "*fp32", "MEAN": "*fp32",
                                          **dict.fromkeys(["sxb", "sxh", "sxs", "syb", "syh",
                                                           "sys"], "i64")},
                                         dict(BLOCK=cast["rows"], D=128, SMOOTH=True,
                                              TO_E4M3=to_e4m3),
                                         ("X", "Y", "SCALE", "MEAN"),
                                         num_warps=cast["num_warps"])))
    stats = CS.STATS_CONFIG
    rows.append(dict(kernel="slice stats (fp8 scales)", copy="current",
                     variant=f"D = 128, {stats['block']} rows a step, {stats['num_warps']} warps",
                     **compile_stats(CS._slice_stats_kernel,
                                     {"X": "*bf16", "SUM": "*fp32", "LO": "*fp32", "HI": "*fp32",
                                      "sxb": "i64", "sxh": "i64", "sxs": "i64"},
                                     dict(SLICE=stats["slice"], BLOCK=stats["block"], D=128),
                                     ("X", "SUM", "LO", "HI"), num_warps=stats["num_warps"])))
    lines = ["| kernel | copy | variant | registers | stack B | shared B | instructions | LDL+STL "
             "| loop instructions | loop spills |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['copy']} | {r['variant']} | {r['reg']} | {r['stack']} | "
              f"{r['shared_bytes']} | {r['instructions']} | {r['spill_instructions']} | "
              f"{r.get('loop_instructions', '')} | {r.get('loop_spills', '')} |" for r in rows]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sass_sm90.json").write_text(json.dumps(
        {"triton": triton.__version__, "target": "cuda sm90", "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
