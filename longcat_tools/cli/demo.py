"""``longcat-tools demo``: the whole chain on the built-in tiny checkpoint, with a summary."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from longcat_tools.cli._common import (
    JsonOpt,
    Out,
    QuietOpt,
    VerboseOpt,
    given_pathlib,
)


def demo_cmd(
    out_dir: Annotated[Path, typer.Option(
        "--out", metavar="DIR", parser=given_pathlib,
        help="Where the demo writes its checkpoints and videos (reused on every run).")]
    = Path("longcat-demo"),
    json_out: JsonOpt = False, quiet: QuietOpt = False, verbose: VerboseOpt = False,
) -> None:
    """Synthesize the tiny checkpoint and run every step of the tool on it."""
    from longcat_tools.demo import run_demo

    out = Out(json_out, quiet, verbose)
    t0 = time.perf_counter()
    results = run_demo(out_dir, out.say)
    total = time.perf_counter() - t0
    out.say()
    out.table([[r.name, f"{r.seconds:.1f} s", r.detail] for r in results],
              ["step", "time", "result"])
    out.say(f"\ndemo finished in {total:.1f} s; outputs in {out_dir}/")
    out.result({"out": str(out_dir), "seconds": round(total, 3),
                "steps": [{"name": r.name, "seconds": round(r.seconds, 3), "detail": r.detail}
                          for r in results]})
