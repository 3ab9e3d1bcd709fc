"""Every execution plan cuDNN's heuristics offer for the DiT's dense attention, timed: is there
a faster FP8 (or bf16) plan than the one ``kernels.cudnn_fp8_attention`` builds (heuristic A's
first)?

  PYTHONPATH=. python3 benchmarks/cudnn_attention_plans.py [--tokens 37440]   # on the GPU

B=1, 32 heads, D=128, token-major q/k/v as the DiT lays them out, random values (a plan's speed
does not depend on them). FP8: ``sdpa_fp8`` with e4m3 O (what cuDNN 9.x builds on Hopper);
bf16: ``sdpa``; both beside torch's SDPA on its cuDNN and flash backends. Prints a table and
writes ``cudnn_attention_plans.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from fp8_attention import bench_ms
from torch.nn.attention import SDPBackend, sdpa_kernel

from longcat_tools.kernels import cudnn_fp8_attention as cfa

B, H, D = 1, 32, 128


def token_major(S: int, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16)
    return x.to(dtype).transpose(1, 2)


def bf16_graph(cudnn, handle, q, k, v, o):
    """(graph, variant pack) of cuDNN's bf16 SDPA of q, k, v into o (ours has no bf16 graph:
    torch's SDPA runs bf16 attention)."""
    bf, f32 = cudnn.data_type.BFLOAT16, cudnn.data_type.FLOAT
    g = cudnn.pygraph(io_data_type=bf, intermediate_data_type=f32, compute_data_type=f32,
                      handle=handle)
    tq, tk, tv = (g.tensor(name=n, data_type=bf, dim=list(t.shape), stride=list(t.stride()))
                  for n, t in zip("qkv", (q, k, v), strict=True))
    to, _ = g.sdpa(tq, tk, tv, generate_stats=False, attn_scale=D ** -0.5,
                   use_causal_mask=False)
    to.set_output(True).set_dim(list(o.shape)).set_stride(list(o.stride()))
    g.validate()
    g.build_operation_graph()
    return g, {tq: q.data_ptr(), tk: k.data_ptr(), tv: v.data_ptr(), to: o.data_ptr()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=37440, help="480p/93: 37440")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    a = ap.parse_args()
    import cudnn

    S = a.tokens
    flops = 4 * B * H * S * S * D
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    rows = []

    def add(kind: str, plan: str, t: float) -> None:
        rows.append({"kind": kind, "plan": plan, "ms": round(t, 3),
                     "tflops": round(flops / t / 1e9, 1)})
        print(f"{kind:<5} {plan:<22} {t:>8.2f} ms {flops / t / 1e9:>7.0f} TFLOP/s", flush=True)

    q, k, v = (token_major(S, torch.bfloat16) for _ in range(3))
    for name, backend in (("torch cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("torch flash", SDPBackend.FLASH_ATTENTION)):
        with sdpa_kernel([backend]):
            add("bf16", name, bench_ms(lambda: F.scaled_dot_product_attention(q, k, v), "cuda"))
    # fp8: our plan's graph (kernels.cudnn_fp8_attention) without its plans; O in e4m3
    fp8 = cfa._Plan(handle, B, H, S, S, D, torch.bfloat16, torch.device("cuda"), True,
                    build=False)
    q8, k8, v8 = (token_major(S, torch.float8_e4m3fn) for _ in range(3))
    o8 = cfa.token_major(B, H, S, D, torch.float8_e4m3fn, torch.device("cuda"))
    scalars = torch.tensor([1, 1, 1, 1 / 448, 448, 1], device="cuda")
    o = token_major(S, torch.bfloat16)
    for kind, (g, pack) in (("fp8", (fp8.graph, fp8.pack(q8, k8, v8, scalars, o8))),
                            ("bf16", bf16_graph(cudnn, handle, q, k, v, o))):
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK])
        for i in range(g.get_execution_plan_count()):
            try:
                g.build_plan_at_index(i)
            except Exception as e:  # noqa: BLE001 - a plan cuDNN lists but cannot build
                rows.append({"kind": kind, "plan": i, "error": str(e).splitlines()[0][:200]})
                continue
            ws = torch.empty(max(1, g.get_workspace_size_plan_at_index(i)), dtype=torch.uint8,
                             device="cuda")
            add(kind, f"{i}: {g.get_plan_name_at_index(i)}",
                bench_ms(lambda g=g, pack=pack, ws=ws, i=i: g.execute_plan_at_index(
                    pack, ws, i, handle=handle), "cuda"))
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "cudnn_frontend": cudnn.__version__, "cudnn_backend": cudnn.backend_version(),
            "tokens": S, "heads": H, "head_dim": D}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cudnn_attention_plans.json").write_text(json.dumps({"info": info, "rows": rows},
                                                               indent=1))


if __name__ == "__main__":
    main()
