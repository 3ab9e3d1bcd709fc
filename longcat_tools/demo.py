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

from longcat_tools.checkpoint import layouts
from longcat_tools.errors import UsageError
from longcat_tools.io.atomic import check_named, check_outside_checkpoints, check_parent
from longcat_tools.io.safetensors import read_header
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


def step_convert(ctx: DemoContext) -> str:
    from longcat_tools.convert import convert

    dst = ctx.out / "tiny-converted"
    r = convert(ctx.paths["native"], dst, force=True)
    ctx.paths["converted"] = dst
    dit = sum(len(j.tensors) for j in r.plan.jobs if j.group == "transformer")
    loras = "+".join(r.plan.loras)
    return (f"{dst}: {dit} DiT tensors (FastVideo keys), LoRA {loras}, "
            f"{r.bytes_written / 1e6:.1f} MB written, {r.files_linked} files linked")


def step_verify(ctx: DemoContext) -> str:
    from longcat_tools.errors import LongcatError
    from longcat_tools.verify import verify

    head = verify(ctx.paths["native"])
    deep = verify(ctx.paths["native"], deep=True)
    for r in (head, deep):
        if r.status == "fail":
            bad = r.failures()[0]
            raise LongcatError(f"verify failed on the demo checkpoint: {bad.file}: {bad.message}")
    return (f"header level {head.status} ({len(head.checks)} checks, {head.seconds:.2f} s); "
            f"--deep {deep.status} ({deep.stats['bytes_read']:,} bytes read)")


def step_bsa(ctx: DemoContext) -> str:
    from longcat_tools import bsa

    ckpt = layouts.detect(ctx.paths["native"])
    bsa.update(ckpt, lambda cfg, style: bsa.with_preset(cfg, "720p-balanced", style))
    st = bsa.status(ckpt)
    ctx.say(f"  bsa preset 720p-balanced -> status: {st['attention']}")
    bsa.restore(ckpt)  # leave the demo checkpoint as synth wrote it for the steps after this one
    bsa.backup_path(ckpt.config_path).unlink()
    return f"preset {st['preset']} applied, status read, restored (BSA off again)"


def step_lora(ctx: DemoContext) -> str:
    """Export the distillation LoRA as PEFT, attach that file under a new name, list, and use
    it: fused into a copy of the checkpoint, checked against W + delta."""
    from longcat_tools import lora

    ckpt = layouts.detect(ctx.paths["native"])
    peft = ctx.out / "lora-demo" / "cfg_step_peft.safetensors"
    peft.parent.mkdir(exist_ok=True)
    lora.export(ckpt, "distilled", "peft", peft, force=True)
    r = lora.attach(ckpt, peft, "demo-peft", force=True)
    _, items = lora.list_adapters(ckpt)
    ctx.say(f"  lora list: {', '.join(f'{i.name} ({i.format}, rank {i.rank})' for i in items)}")
    fused = ctx.out / "tiny-native-fused"
    lora.fuse(ckpt, [("demo-peft", 1.0)], fused, force=True)
    err, n = lora.fuse_error(ckpt, fused, [("demo-peft", 1.0)])
    if not err < 1e-6:
        raise RuntimeError(f"fused weights differ from W + delta (relative error {err:.2e})")
    return (f"PEFT export attached as '{r.name}' ({r.modules} modules, {r.source_format} -> "
            f"{r.format}); {len(items)} adapters listed; fused into {n} weights, max rel. error "
            f"{err:.1e}")
def step_run(ctx: DemoContext) -> str:
    from longcat_tools.runner.demo import run_all_tasks

    runs = run_all_tasks(ctx.paths["native"], ctx.out / "videos", say=ctx.say)
    return f"{ctx.out / 'videos'}: " + ", ".join(f"{r.name} {r.frames}f {r.size}" for r in runs)


STEPS: list[tuple[str, Callable[[DemoContext], str]]] = [
    ("synth", step_synth),
    ("inspect", step_inspect),
    ("convert", step_convert),
    ("verify", step_verify),
    ("bsa", step_bsa),
    ("lora", step_lora),
    ("run", step_run),
]


def run_demo(out: Path, say: Callable[[str], None] = print) -> list[StepResult]:
    check_named(out)  # '' wrote the demo's folders into the current one
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder; name a folder for the demo")
    check_parent(out)
    check_outside_checkpoints(out, "the demo's folder")
    try:
        out.mkdir(exist_ok=True)
    except OSError as e:  # /proc/x: an internal error
        raise UsageError(f"--out {out}: cannot make the folder ({e.strerror or e}); name a "
                         "writable folder") from None
    ctx = DemoContext(out, say)
    results = []
    for name, fn in STEPS:
        say(f"[{len(results) + 1}/{len(STEPS)}] {name} ...")
        t0 = time.perf_counter()
        detail = fn(ctx)
        results.append(StepResult(name, time.perf_counter() - t0, detail))
    return results
