"""Many videos: one matrix run (`run --seeds A,B,C,D`) against one `run` per seed.

Each mode runs `longcat-tools run` as a user does (a fresh process per command) on the same
checkpoint and prompt, t2v distilled; it reports the wall time of the commands, the time spent
loading (the sidecars' `load` stage; the matrix loads once) and its share.

  PYTHONPATH=. python3 benchmarks/matrix.py --synth /tmp/real --device cuda          # make it
  PYTHONPATH=. python3 benchmarks/matrix.py -m /tmp/real --device cuda --modes separate,matrix
  PYTHONPATH=. python3 benchmarks/matrix.py --synth /tmp/tiny --preset tiny --device cpu \\
      --height 32 --width 32 --frames 9 --steps 2                                   # logic check

The page cache is warmed first (one untimed 1-step run), so both modes read warm files. With
``--modes`` one call can run one mode, when a device call cannot hold both; the other modes'
results already in ``--out`` are kept, and separate runs of other seeds join this call's, so
several calls give one table.
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
from pathlib import Path

PROMPT = "A red panda eats bamboo in the snow, close-up, soft light"
MODES = ("separate", "matrix")


def cli(*args: str) -> float:
    """Run ``longcat-tools ARGS`` in a fresh process; its wall time."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "longcat_tools", *args], capture_output=True,
                       text=True)
    if r.returncode:
        sys.exit(f"longcat-tools {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return time.perf_counter() - t0


def sidecar(path: Path) -> dict:
    return json.loads(path.with_name(path.name + ".json").read_text())


def run_separate(common: list[str], seeds: list[int], out: Path) -> dict:
    rows = []
    for seed in seeds:
        mp4 = out / "separate" / f"{seed}.mp4"
        wall = cli("run", *common, "--seed", str(seed), "--out", str(mp4))
        doc = sidecar(mp4)
        start = doc.get("process_age_at_start_s")  # interpreter start, imports, checks
        rows.append({"seed": seed, "wall_s": round(wall, 2),
                     "load_s": doc["timings_s"].get("load", 0.0), "total_s": doc["total_s"],
                     "startup_s": start, "exit_s": None if start is None
                     else round(wall - start - doc["total_s"], 2)})
    return separate(rows)


def separate(rows: list[dict]) -> dict:
    """The separate mode's totals over its videos (one command each)."""
    wall = sum(r["wall_s"] for r in rows)
    load = sum(r["load_s"] for r in rows)
    return {"mode": "separate", "commands": len(rows), "wall_s": round(wall, 2),
            "load_s": round(load, 2), "load_share": round(load / wall, 3), "videos": rows}


def merged(kept: list[dict], results: list[dict]) -> list[dict]:
    """This call's results over those already in the JSON: modes not run now are kept, and
    separate videos of other seeds join this call's (so 4 seeds can take 2 calls)."""
    done = {r["mode"] for r in results}
    out = [r for r in kept if r["mode"] not in done]
    for r in results:
        old = next((k for k in kept if k["mode"] == r["mode"] == "separate"), None)
        if old is not None:
            seeds = {v["seed"] for v in r["videos"]}
            r = separate([v for v in old["videos"] if v["seed"] not in seeds] + r["videos"])
        out.append(r)
    return out


def run_matrix(common: list[str], seeds: list[int], out: Path) -> dict:
    folder = out / "matrix"
    wall = cli("run", *common, "--seeds", ",".join(map(str, seeds)), "--out-dir", str(folder))
    manifest = json.loads((folder / "manifest.json").read_text())
    rows = [{"seed": e["seed"], "total_s": e["total_s"]} for e in manifest["items"]]
    load = manifest["load_s"]
    return {"mode": "matrix", "commands": 1, "wall_s": round(wall, 2), "load_s": round(load, 2),
            "load_share": round(load / wall, 3), "videos": rows}


def table(doc: dict) -> str:
    i = doc["info"]
    lines = [f"# Matrix run vs separate runs, {i['device']}, {i['date']}", "",
             f"{len(doc['seeds'])} seeds, t2v distilled, {i['size']}, checkpoint {i['model']}",
             "", "| mode | commands | wall s | load s | load share | s per video (mean) |",
             "|---|---|---|---|---|---|"]
    for r in doc["results"]:
        per = sum(v["total_s"] for v in r["videos"]) / len(r["videos"])
        lines.append(f"| {r['mode']} | {r['commands']} | {r['wall_s']:.1f} | {r['load_s']:.1f} "
                     f"| {100 * r['load_share']:.0f}% | {per:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", type=Path, help="checkpoint (any layout)")
    ap.add_argument("--synth", type=Path, help="write a synthetic checkpoint here first")
    ap.add_argument("--preset", default="real", help="synth preset (real: the 13.6B layout)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seeds", default="42,123,456,789")
    ap.add_argument("--no-warm", action="store_true",
                    help="skip the page-cache warm-up (an earlier call on this machine did it)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--height", default="480")
    ap.add_argument("--width", default="832")
    ap.add_argument("--frames", default="93")
    ap.add_argument("--steps", default="16")
    ap.add_argument("--out", type=Path,
                    default=Path(os.environ.get("OUT", "benchmarks/results")) / "matrix.json")
    a = ap.parse_args()
    modes = a.modes.split(",")
    if any(m not in MODES for m in modes):
        ap.error(f"--modes takes {', '.join(MODES)}")
    model = a.model or a.synth
    if model is None:
        ap.error("give -m CKPT or --synth DST")
    if a.synth is not None and not a.synth.exists():
        a.synth.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        cli("synth", str(a.synth), "--preset", a.preset, "--dtype", "bf16", "-q")
        print(f"synth {a.preset}: {time.perf_counter() - t0:.0f} s", flush=True)
    seeds = [int(s) for s in a.seeds.split(",")]
    work = a.out.parent / "matrix-work"
    base = ["-m", str(model), "-p", PROMPT, "--distill", "--device", a.device, "-q",
            "--height", a.height, "--width", a.width]
    common = [*base, "--frames", a.frames, "--steps", a.steps]
    if not a.no_warm:
        cli("run", *base, "--frames", "5", "--steps", "1", "--out", str(work / "warm.mp4"))
    results = [(run_separate if m == "separate" else run_matrix)(common, seeds, work)
               for m in modes]
    device = a.device
    if a.device.startswith("cuda"):
        import torch

        device = torch.cuda.get_device_name(0)
    if a.out.exists():
        results = merged(json.loads(a.out.read_text())["results"], results)
    doc = {"info": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                    "device": device, "python": platform.python_version(),
                    "model": str(model), "size": f"{a.width}x{a.height}x{a.frames}, "
                                                 f"{a.steps} steps"},
           "seeds": sorted({v["seed"] for r in results for v in r["videos"]}),
           "results": results}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    text = table(doc)
    a.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
