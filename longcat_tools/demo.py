"""The README's main job on the built-in tiny checkpoint: every step the tool has, in a row.

Each step is a function ``(ctx) -> detail`` that raises on failure; ``run_demo`` times them and
returns a summary the CLI prints as a table.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from longcat_tools import layouts
from longcat_tools.safetensors_io import read_header
from longcat_tools.synth import synth


@dataclass
class DemoContext:
    out: Path
    say: Callable[[str], None]
    paths: dict[str, Path] = field(default_factory=dict)


@dataclass
class StepResult:
    name: str
    seconds: float
    detail: str


def step_synth(ctx: DemoContext) -> str:
    dst = ctx.out / "tiny-native"
    r = synth(dst, "tiny", force=True)
    ctx.paths["native"] = dst
    return f"{dst}: {r.dit_tensors} DiT tensors, {r.dit_parameters:,} parameters"


def step_inspect(ctx: DemoContext) -> str:
    ckpt = layouts.detect(ctx.paths["native"])
    shards = layouts.transformer_shards(ckpt)
    params = 0
    for path in sorted(set(shards.values())):
        params += sum(math.prod(t.shape) for t in read_header(path).tensors.values())
    return f"layout {ckpt.describe()}, {len(shards)} tensors in {len(set(shards.values()))} shards"


def step_run(ctx: DemoContext) -> str:
    from runner.demo import run_all_tasks

    runs = run_all_tasks(ctx.paths["native"], ctx.out / "videos", say=ctx.say)
    return f"{ctx.out / 'videos'}: " + ", ".join(f"{r.name} {r.frames}f {r.size}" for r in runs)


STEPS: list[tuple[str, Callable[[DemoContext], str]]] = [
    ("synth", step_synth),
    ("inspect", step_inspect),
    ("run", step_run),
]


def run_demo(out: Path, say: Callable[[str], None] = print) -> list[StepResult]:
    out.mkdir(parents=True, exist_ok=True)
    ctx = DemoContext(out, say)
    results = []
    for name, fn in STEPS:
        say(f"[{len(results) + 1}/{len(STEPS)}] {name} ...")
        t0 = time.perf_counter()
        detail = fn(ctx)
        results.append(StepResult(name, time.perf_counter() - t0, detail))
    return results
