"""Loading a checkpoint onto the GPU against ``loading.READ_THREADS`` (reads in flight).

The DiT alone (``load_transformer``), UMT5 alone (transformers' ``from_pretrained`` then
``.to``, and with ``device_map``), and the whole pipeline's load
(``LongCatVideoPipeline.from_pretrained``), each thread count in the order given, all in this
process, page cache warm (read the files once before). Seconds, GPU-synchronised.

  PYTHONPATH=. python3 benchmarks/load_threads.py CKPT --threads 4,8,16,4,8,16
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import time
from pathlib import Path

import torch

from longcat_tools.runner import loading
from longcat_tools.runner.pipeline import LongCatVideoPipeline


def timed(make):
    """(what ``make`` returned, seconds), the GPU synchronised on both sides."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    made = make()
    torch.cuda.synchronize()
    return made, time.perf_counter() - t0


def free() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", type=Path, help="a checkpoint (synth --preset real)")
    ap.add_argument("--threads", default="4,8,16,4,8,16")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    a = ap.parse_args()
    from transformers import UMT5EncoderModel

    counts = [int(x) for x in a.threads.split(",")]
    torch.zeros(1, device="cuda")
    rows = []

    def row(what: str, threads: int | None, seconds: float) -> None:
        rows.append({"what": what, "threads": threads, "s": round(seconds, 2)})
        print(f"{what:<40} {threads or '':>7} {seconds:8.2f}", flush=True)

    print(f"{'load':<40} {'threads':>7} {'s':>8}")
    for n in counts:
        loading.READ_THREADS = n
        model, s = timed(lambda: loading.load_transformer(a.ckpt, "cuda", torch.bfloat16))
        row("DiT (load_transformer)", n, s)
        del model
        free()
    te = str(a.ckpt / "text_encoder")
    for kw in ({}, {"device_map": "cuda"}):
        def umt5(kw=kw):
            m = UMT5EncoderModel.from_pretrained(te, torch_dtype=torch.bfloat16,
                                                 use_safetensors=True, **kw)
            return m if kw else m.to("cuda")
        model, s = timed(umt5)
        row(f"UMT5 (from_pretrained, {'device_map' if kw else '.to'})", None, s)
        del model
        free()
    for n in counts:
        loading.READ_THREADS = n
        pipe, s = timed(lambda: LongCatVideoPipeline.from_pretrained(a.ckpt, torch_dtype="bf16",
                                                                     device="cuda"))
        row("pipeline (from_pretrained)", n, s)
        del pipe
        free()
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "python": platform.python_version(), "ckpt": str(a.ckpt), "cpus": os.cpu_count()}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "load_threads.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
