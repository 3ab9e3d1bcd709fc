"""Benchmark ``convert`` against ``cp`` on the real DiT dimensions, and its peak memory.

For each depth: write a real-dimension checkpoint (random fp32 DiT and LoRAs; VAE, tokenizer and
scheduler as synth writes them; no text encoder, whose 22 GB the conversion only hard-links or
streams like the DiT), then time, under the same cache conditions:

* ``cp``: ``cp -r dit lora`` into a fresh folder, then ``sync``;
* ``cp+sha256sum``: the same plus ``sha256sum`` of the copies (convert also writes
  checksums.sha256 of what it writes);
* ``convert keep`` / ``convert bf16``: ``longcat-tools convert`` in a fresh process (it fsyncs
  what it writes), then ``sync``;

each after reading the input once (``cat > /dev/null``), so the input is in the page cache for
all and all end with the output on disk (the page cache cannot be dropped here: no root). With
``--cold`` each run instead starts from an input that is not in the page cache: every DiT and
LoRA file is re-written with O_DIRECT (``dd oflag=direct``) and renamed over the old one, as a
freshly downloaded or long-unread checkpoint would be; results go to ``convert_cold.json``. The
order alternates between repeats. Rates are input bytes (DiT + LoRA files) / wall time; the
"streaming" ratio uses convert's own time (plan to rename, without the ~2 s Python + torch
start). Peak RSS is the convert process's ``VmHWM``.

    python benchmarks/convert.py --depths 4 8 --work /tmp/lcbench --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_source(path: Path, depth: int) -> int:
    """A real-dimension native checkpoint without a text encoder (the VAE stays a file hole:
    convert only links it); returns DiT+LoRA bytes."""
    import torch

    from longcat_tools import synth as s
    from longcat_tools.io.safetensors import write_file, write_sharded

    if path.exists():
        shutil.rmtree(path)
    s.synth(path, "real", depth=depth, sparse=True)  # layout, configs, VAE, tokenizer
    shutil.rmtree(path / "text_encoder")
    shutil.rmtree(path / "dit")
    shutil.rmtree(path / "lora")
    (path / "dit").mkdir()
    (path / "lora").mkdir()
    cfg = s.dit_config("real", depth)
    s.write_json(path / "dit" / "config.json", cfg)
    p = s.PRESETS["real"]
    # hub-like shards: about 10 GB each at full depth, so several at depth 4-8 too
    write_sharded(path / "dit", "diffusion_pytorch_model", s.dit_specs(cfg, 0, torch.float32),
                  2 * s.GB, s.ST_METADATA)
    for kind, fname in (("cfg_step", "cfg_step_lora.safetensors"),
                        ("refinement", "refinement_lora.safetensors")):
        write_file(path / "lora" / fname, s.lora_specs(cfg, kind, p.lora_rank, 0, torch.float32),
                   s.ST_METADATA)
    return sum(f.stat().st_size for d in ("dit", "lora") for f in (path / d).iterdir())


COLD = False


def warm(path: Path) -> None:
    """Put the input in the page cache, or (``--cold``) make sure it is not."""
    if not COLD:
        subprocess.run(f"find {path} -type f -exec cat {{}} + > /dev/null", shell=True,
                       check=True)
        return
    for d in ("dit", "lora"):
        for f in sorted((path / d).iterdir()):
            tmp = f.with_name(f.name + ".cold")
            subprocess.run(["dd", f"if={f}", f"of={tmp}", "bs=8M", "oflag=direct",
                            "status=none"], check=True)
            os.replace(tmp, f)
    subprocess.run(["sync"], check=True)


def run_cp(src: Path, work: Path, hashed: bool = False) -> dict:
    """``cp -r dit lora`` + ``sync``; with ``hashed`` also ``sha256sum`` of the copies (what
    convert's checksums.sha256 gives on top of the copy)."""
    dst = work / "cp"
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir()
    warm(src)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(src / "dit"), str(src / "lora"), str(dst)], check=True)
    if hashed:
        subprocess.run(f"cd {dst} && find . -type f -print0 | xargs -0 sha256sum > "
                       "/dev/null", shell=True, check=True)
    subprocess.run(["sync"], check=True)
    secs = time.perf_counter() - t0
    shutil.rmtree(dst)
    subprocess.run(["sync"], check=True)
    return {"what": "cp+sha256sum" if hashed else "cp", "seconds": round(secs, 3), "load": load}


def run_convert(src: Path, work: Path, dtype: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    dst = work / f"out-{dtype}"
    shutil.rmtree(dst, ignore_errors=True)
    warm(src)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "longcat_tools", "convert", "--src", str(src),
                        "--dst", str(dst), "--dtype", dtype, "--json", "-q"],
                       capture_output=True, text=True, env=env)
    subprocess.run(["sync"], check=True)
    secs = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(p.stderr)
    r = json.loads(p.stdout)
    shutil.rmtree(dst)
    subprocess.run(["sync"], check=True)
    return {"what": f"convert {dtype}", "seconds": round(secs, 3), "load": load,
            "inner_seconds": r["seconds"], "bytes_written": r["bytes_written"],
            "tensors": r["tensors_written"], "peak_rss_bytes": r["peak_rss_bytes"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--work", type=Path, default=Path("/tmp/lcbench"))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--keep-sources", action="store_true",
                    help="Keep (and reuse) the synthetic sources under --work.")
    ap.add_argument("--cold", action="store_true",
                    help="Start every run from an input that is not in the page cache.")
    args = ap.parse_args()
    global COLD
    COLD = args.cold
    import torch

    from longcat_tools import synth
    from longcat_tools.model import keymap

    args.work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.work).free
    print(f"free disk at {args.work}: {free / 1e9:.1f} GB")
    rows = []
    for depth in args.depths:
        src = args.work / f"real-d{depth}"
        t0 = time.perf_counter()
        if args.keep_sources and (src / "dit" / "config.json").is_file():
            nbytes = sum(f.stat().st_size for d in ("dit", "lora") for f in (src / d).iterdir())
        else:
            nbytes = make_source(src, depth)
        print(f"depth {depth}: {nbytes / 1e9:.2f} GB of DiT+LoRA ready in "
              f"{time.perf_counter() - t0:.0f} s")
        dims = keymap.dit_dims(synth.dit_config("real", depth))
        largest = max(4 * math.prod(s) for _, s in keymap.native_tensor_specs(dims))
        for rep in range(args.repeats):
            order = ["cp", "keep", "bf16", "cp+sha"]
            if rep % 2:
                order.reverse()
            got = {}
            for what in order:
                got[what] = (run_cp(src, args.work) if what == "cp"
                             else run_cp(src, args.work, True) if what == "cp+sha"
                             else run_convert(src, args.work, what))
                print(json.dumps(got[what]), flush=True)
            cp_s = got["cp"]["seconds"]
            for dtype in ("keep", "bf16"):
                c = got[dtype]
                rows.append({"depth": depth, "repeat": rep, "dtype": dtype, "bytes_in": nbytes,
                             "largest_tensor_bytes": largest, "cp_seconds": cp_s,
                             "cp_sha256sum_seconds": got["cp+sha"]["seconds"],
                             "cp_load": got["cp"]["load"], "convert_load": c["load"],
                             "convert_seconds": c["seconds"],
                             "convert_inner_seconds": c["inner_seconds"],
                             "bytes_written": c["bytes_written"], "tensors": c["tensors"],
                             "peak_rss_bytes": c["peak_rss_bytes"],
                             "ratio_end_to_end": round(cp_s / c["seconds"], 3),
                             "ratio_streaming": round(cp_s / c["inner_seconds"], 3)})
        if not args.keep_sources:
            shutil.rmtree(src)
    hdr = ["depth", "dtype", "rep", "input GB", "cp s", "cp+sha s", "convert s", "inner s",
           "cp GB/s",
           "conv GB/s", "ratio", "ratio streaming", "peak RSS MB", "largest MB", "load"]
    table = [[r["depth"], r["dtype"], r["repeat"], f"{r['bytes_in'] / 1e9:.2f}", r["cp_seconds"],
              r["cp_sha256sum_seconds"], r["convert_seconds"], r["convert_inner_seconds"],
              f"{r['bytes_in'] / r['cp_seconds'] / 1e9:.3f}",
              f"{r['bytes_in'] / r['convert_seconds'] / 1e9:.3f}", r["ratio_end_to_end"],
              r["ratio_streaming"], f"{r['peak_rss_bytes'] / 2**20:.0f}",
              f"{r['largest_tensor_bytes'] / 2**20:.0f}",
              f"{r['cp_load']:.1f}/{r['convert_load']:.1f}"] for r in rows]
    from longcat_tools.cli._common import format_table

    print(format_table(table, hdr))
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"date": datetime.date.today().isoformat(), "machine": platform.platform(),
           "cpus": os.cpu_count(), "python": platform.python_version(),
           "torch": torch.__version__, "cold": args.cold, "method": __doc__, "rows": rows}
    out = args.out / ("convert_cold.json" if args.cold else "convert.json")
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
