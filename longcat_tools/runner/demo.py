"""Every task on one (tiny) checkpoint, at sizes a 2-core CPU runs in seconds, with mp4s out.

Used by ``longcat-tools demo``. Each task feeds the next the way the original demos do: the
distilled t2v output is refined, its first frame drives i2v, its frames are continued.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from longcat_tools.runner.pipeline import LongCatVideoPipeline, Result
from longcat_tools.runner.video import probe, write_mp4

PROMPT = "A cat sits on a sunny windowsill and watches birds fly past the garden."
SIZE = {"height": 32, "width": 32}
FAST = {"steps": 2, "num_frames": 9}
# refine runs BSA; the release's sparsity (0.9375) keeps no key chunk of the 2 at this size,
# half of them keeps one
REFINE_BSA = {"sparsity": 0.5, "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 4]}


@dataclass
class TaskRun:
    name: str
    file: Path
    frames: int
    size: str
    fps: int
    seconds: float


def _uint8(r: Result) -> list[Image.Image]:
    return [Image.fromarray(f) for f in (r.frames * 255).astype(np.uint8)]


def run_all_tasks(ckpt: str | Path, out_dir: str | Path,
                  say: Callable[[str], None] = print) -> list[TaskRun]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = LongCatVideoPipeline.from_pretrained(ckpt)
    results: dict[str, Result] = {}
    runs: list[TaskRun] = []
    tasks: list[tuple[str, Callable[[], Result]]] = [
        ("t2v", lambda: pipe.t2v(PROMPT, **SIZE, **FAST)),
        ("t2v_distill", lambda: pipe.t2v(PROMPT, **SIZE, **FAST, distill=True)),
        ("i2v", lambda: pipe.i2v(_uint8(results["t2v"])[0], PROMPT, **SIZE, **FAST)),
        ("vc", lambda: pipe.vc(_uint8(results["t2v"]), PROMPT, **SIZE, steps=2, num_frames=13,
                               num_cond_frames=5)),
        ("refine", lambda: pipe.refine(_uint8(results["t2v_distill"]), PROMPT, **SIZE,
                                       bsa=REFINE_BSA)),
        ("long", lambda: pipe.long(PROMPT, **SIZE, **FAST, num_cond_frames=5, num_segments=1)),
    ]
    for name, fn in tasks:
        say(f"  run {name} ...")
        t0 = time.perf_counter()
        r = fn()
        results[name] = r
        path = write_mp4(out_dir / f"{name}.mp4", r.frames, r.fps)
        # no sidecar (the tasks ran from Python); one left by an earlier run would describe
        # another video
        Path(f"{path}.json").unlink(missing_ok=True)
        info = probe(path)
        runs.append(TaskRun(name, path, info["frames"], f"{info['width']}x{info['height']}",
                            r.fps, time.perf_counter() - t0))
    return runs
