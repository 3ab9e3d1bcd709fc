"""Loading a checkpoint onto the GPU against ``loading.READ_THREADS`` (reads in flight).

The DiT alone (``load_transformer``), UMT5 alone (transformers' ``from_pretrained`` then
``.to``, and with ``device_map``), and the whole pipeline's load
(``LongCatVideoPipeline.from_pretrained``), each thread count in the order given, all in this
process. Seconds, GPU-synchronised. Warm by default: the files are in the page cache when
they were read shortly before (the first load of a kind warms it; the default thread list
repeats each count for that reason).

``--cold``: before every load, the checkpoint's files leave the page cache
(``posix_fadvise(DONTNEED)``, no root needed; ``fsync`` first, as dirty pages of a checkpoint
written just before cannot be dropped), so each load reads the disk. The row gives the fraction
of the files' pages still cached after the eviction (``mincore``; 0 is a cold load).

  PYTHONPATH=. python3 benchmarks/load_threads.py CKPT --threads 4,8,16,4,8,16
  PYTHONPATH=. python3 benchmarks/load_threads.py CKPT --threads 8 --cold
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import mmap
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


def evict(root: Path) -> float:
    """Drop every file under ``root`` from the page cache; the fraction of their pages still
    cached afterwards (dirty pages, or a file system that ignores the advice, stay)."""
    cached = total = 0
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.stat().st_size == 0:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            c, t = resident_pages(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        cached, total = cached + c, total + t
    return cached / max(total, 1)


_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mmap.restype = ctypes.c_void_p
_LIBC.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_RESIDENT = bytes(b & 1 for b in range(256))  # mincore: bit 0 of each byte, the rest reserved


def resident_pages(fd: int, size: int) -> tuple[int, int]:
    """(pages of the file in the page cache, its pages), by ``mincore`` over a mapping of it."""
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    addr = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    try:
        vec = (ctypes.c_ubyte * pages)()
        if _LIBC.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return bytes(vec).translate(_RESIDENT).count(1), pages
    finally:
        _LIBC.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", type=Path, help="a checkpoint (synth --preset real)")
    ap.add_argument("--threads", default="4,8,16,4,8,16")
    ap.add_argument("--cold", action="store_true", help="evict the files before every load")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    a = ap.parse_args()
    from transformers import UMT5EncoderModel

    counts = [int(x) for x in a.threads.split(",")]
    torch.zeros(1, device="cuda")
    rows = []

    def row(what: str, threads: int | None, seconds: float) -> None:
        rows.append({"what": what, "threads": threads, "s": round(seconds, 2),
                     "cached_before": cached})
        print(f"{what:<40} {threads or '':>7} {seconds:8.2f} {cached if a.cold else 'warm':>9}",
              flush=True)

    def before() -> None:
        nonlocal cached
        cached = round(evict(a.ckpt), 4) if a.cold else None

    cached = None
    print(f"{'load':<40} {'threads':>7} {'s':>8} {'cached':>9}")
    for n in counts:
        loading.READ_THREADS = n
        before()
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
        before()
        model, s = timed(umt5)
        row(f"UMT5 (from_pretrained, {'device_map' if kw else '.to'})", None, s)
        del model
        free()
    for n in counts:
        loading.READ_THREADS = n
        before()
        pipe, s = timed(lambda: LongCatVideoPipeline.from_pretrained(a.ckpt, torch_dtype="bf16",
                                                                     device="cuda"))
        row("pipeline (from_pretrained)", n, s)
        del pipe
        free()
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "python": platform.python_version(), "ckpt": str(a.ckpt), "cpus": os.cpu_count(),
            "page_cache": "cold: evicted before every load" if a.cold else "warm"}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "load_threads_cold.json" if a.cold else "load_threads.json"
    (out / name).write_text(json.dumps({"info": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
