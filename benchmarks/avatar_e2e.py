"""End to end on one GPU: ``run --task ai2v --distill --int8`` on a real-size Avatar-1.5 tree.

The tree is ``synth --model avatar-1.5 --preset real --sparse`` (every name and shape, no data),
then the files this run reads get random data (``densify``): the INT8 DiT (synth's own values,
the original's quantization of the bf16 draw), the DMD LoRA, whisper, UMT5 and the VAE. The two
bf16 DiT folders the run does not read (``base_model/``, the base's ``dit/``) stay holes: 56 GB
the GPU machine's disk cannot hold beside the rest.

Each setting is one ``longcat-tools run`` in a fresh process, as users run it, one speaker, 480p
and 93 frames, 8 DMD steps, without vocal separation (onnxruntime is not installed there):
- ``int8``: all resident;
- ``int8+offload``: ``--offload all``, the 24 GB recipe of ``docs/avatar.md``.
Time by stage and peak GPU memory come from the sidecar. Rows of settings already in the
output JSON and not run now are kept (a device call may hold one setting only).

  PYTHONPATH=. python3 benchmarks/avatar_e2e.py --tree /tmp/avatar           # on the GPU
  PYTHONPATH=. python3 benchmarks/avatar_e2e.py --tree /tmp/av --small       # CPU logic check
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from longcat_tools.io.safetensors import read_header, tensor_bytes
from longcat_tools.model import avatar
from longcat_tools.synth import synth
from longcat_tools.synth_avatar import avatar_dit_config, int8_specs
from longcat_tools.synth_presets import random_tensor

MODEL = "avatar-1.5"
SETTINGS = {"int8": [], "int8+offload": ["--offload", "all"]}
RATE = 16_000


def densify(files: list[Path], value, threads: int) -> int:
    """Write ``value(file, name, info)`` into each tensor's place in ``files``; bytes written."""
    jobs = []
    for path in files:
        fd = os.open(path, os.O_WRONLY)
        jobs += [(fd, path, info) for info in read_header(path).tensors.values()]

    def fill(job) -> int:
        fd, path, info = job
        data = tensor_bytes(value(path, info.name, info))
        assert len(data) == info.nbytes, info.name
        os.pwrite(fd, data, info.begin)
        return info.nbytes

    try:
        with ThreadPoolExecutor(threads) as pool:
            return sum(pool.map(fill, jobs))
    finally:
        for fd in {j[0] for j in jobs}:
            os.fsync(fd)
            os.close(fd)


def build_tree(dst: Path, preset: str) -> dict:
    """The sparse tree, with data in every file an INT8 ai2v --distill run reads."""
    t0 = time.perf_counter()
    synth(dst, preset, model=MODEL, dtype="bf16", sparse=True)
    version = avatar.VERSIONS[MODEL]
    folder = dst / version.folder
    base = dst / avatar.BASE_FOLDER
    int8 = {s.name: s for s in int8_specs(avatar_dit_config(MODEL, preset),
                                          version.dit_folders[0], 0, torch.bfloat16)}
    int8_dir = folder / version.int8_folder

    def value(path: Path, name: str, info) -> torch.Tensor:
        if path.parent == int8_dir:
            return int8[name].produce()
        return random_tensor(f"{path.parent.name}/{name}", info.shape, 0, info.torch_dtype)

    files = [*int8_dir.glob("*.safetensors"), folder / version.lora,
             *(folder / "whisper-large-v3").glob("*.safetensors"),
             *(base / "text_encoder").glob("*.safetensors"), *(base / "vae").glob("*.safetensors")]
    written = densify(files, value, os.cpu_count() or 1)
    return {"tree_s": round(time.perf_counter() - t0, 1), "densified_gb": round(written / 1e9, 2),
            "files": len(files)}


def media(folder: Path, height: int, width: int, seconds: float) -> tuple[Path, Path]:
    """A face-sized random image and a voiced tone (syllable envelope) as 16-bit WAV."""
    face = folder / "face.png"
    rng = np.random.RandomState(0)
    Image.fromarray((rng.rand(height, width, 3) * 255).astype(np.uint8)).save(face)
    t = np.arange(int(RATE * seconds)) / RATE
    x = 0.4 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    wav = folder / "speech.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes((x * 32767).astype("<i2").tobytes())
    return face, wav


def run(a: argparse.Namespace, name: str, face: Path, wav: Path) -> dict:
    video = a.work / f"{name.replace('+', '_')}.mp4"
    cmd = [sys.executable, "-m", "longcat_tools", "run", "-m",
           str(a.tree / avatar.VERSIONS[MODEL].folder), "--task", "ai2v", "--image", str(face),
           "--audio", str(wav), "-p", "A woman talks to the camera in a bright studio.",
           "--distill", "--int8", "--no-vocal-separation", "--frames", str(a.frames),
           "--out", str(video), "-q", "--device", a.device, *SETTINGS[name]]
    if a.small:
        cmd += ["--height", "32", "--width", "32", "--dtype", "fp32"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        return {"run": name, "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    doc = json.loads(Path(f"{video}.json").read_text())
    mem = doc["peak_memory"]
    peak = mem.get("gpu_max_allocated_bytes")
    return {"run": name, "process_s": round(wall, 2), "total_s": doc["total_s"],
            "timings_s": doc["timings_s"],
            "peak_alloc_gib": None if peak is None else round(peak / 2**30, 2)}


def table(doc: dict) -> str:
    i = doc["info"]
    lines = [f"# Avatar-1.5 ai2v --distill --int8 end to end, {i['device']}, {i['date']}", "",
             f"torch {i['torch']}; {i['task']}; tree: {json.dumps(i['tree'])}", "",
             "| setting | process s | total s | load s | denoise s | peak alloc GiB |",
             "|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        if "error" in r:
            lines.append(f"| {r['run']} | error: {r['error']} | | | | |")
            continue
        t = r["timings_s"]
        lines.append(f"| {r['run']} | {r['process_s']} | {r['total_s']} | {t.get('load', '')} | "
                     f"{t.get('denoise', '')} | {r['peak_alloc_gib'] or ''} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, required=True, help="where the sparse tree goes")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--small", action="store_true", help="CPU logic check (tiny tree)")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    a = ap.parse_args()
    a.device = "cpu" if a.small else "cuda"
    a.frames = 9 if a.small else 93
    a.work = a.tree.parent / f"{a.tree.name}-work"
    a.work.mkdir(parents=True, exist_ok=True)
    tree = build_tree(a.tree, "tiny" if a.small else "real") if not a.tree.exists() else {}
    print(f"tree: {json.dumps(tree)}", flush=True)
    face, wav = media(a.work, 480, 832, 6.0)
    rows = []
    for name in a.settings.split(","):
        rows.append(run(a, name, face, wav))
        print(json.dumps(rows[-1]), flush=True)
    out_json = a.out / "avatar_e2e.json"
    if out_json.exists():
        before = json.loads(out_json.read_text())
        ran = {r["run"] for r in rows}
        rows = [r for r in before["rows"] if r["run"] not in ran] + rows
        tree = tree or before["info"].get("tree", {})
    device = torch.cuda.get_device_name(0) if a.device == "cuda" else platform.processor()
    doc = {"info": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "device": device, "torch": torch.__version__, "tree": tree,
        "task": f"ai2v, 1 speaker, {a.frames} frames, --distill --int8, no vocal separation"},
        "rows": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(doc, indent=1) + "\n")
    text = table(doc)
    (a.out / "avatar_e2e.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
