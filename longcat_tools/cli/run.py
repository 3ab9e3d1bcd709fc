"""``longcat-tools run``: every LongCat-Video task on any checkpoint layout, through our runner.

The options are ``runner.settings.RunSettings``'s fields (default, help and flags declared there
once); this module adds the command-line-only ones (``--gpus``, ``--json``, ``-q``, ``-v``).
"""

from __future__ import annotations

import inspect
import os
import sys
from dataclasses import fields
from typing import Annotated, Any, get_type_hints

import typer

from longcat_tools.cli._common import JsonOpt, ModelOpt, Out, QuietOpt, VerboseOpt, human_bytes
from longcat_tools.errors import LongcatError
from longcat_tools.runner.settings import RunSettings


def run_cmd(
    ctx: typer.Context,
    gpus: Annotated[int, typer.Option(help="Split the DiT over N GPUs of this machine (starts "
                                      "N processes, context parallel).")] = 1,
    json_out: JsonOpt = False, quiet: QuietOpt = False, verbose: VerboseOpt = False,
    **options: Any,
) -> None:
    """Run a LongCat-Video task and write an H.264 mp4 plus a JSON sidecar."""
    from dataclasses import replace

    from longcat_tools.runner.job import run_job, validate
    from longcat_tools.runner.pipeline import Reporter

    if os.environ.get("RANK", "0") != "0":  # rank 0 of a context-parallel job speaks for it
        json_out, quiet = False, True
    out = Out(json_out, quiet, verbose)
    settings = RunSettings(**options)
    if gpus != 1:
        from longcat_tools.runner.launch import launch, without_option

        if gpus < 2 or settings.cp != 1:
            raise LongcatError(f"--gpus {gpus}: use 2 or more GPUs, without --cp (--cp is for "
                               "processes started by torchrun)")
        validate(replace(settings, cp=gpus))
        raise typer.Exit(launch(gpus, without_option(command_line(ctx), "--gpus")))
    reporter = Reporter(show=not quiet, say=out.say)
    doc = run_job(settings, reporter, say=out.say)
    v = doc["video"]
    out.say(f"wrote {doc['output']}: {v['frames']} frames {v['width']}x{v['height']} at "
            f"{v['fps']:g} fps (sidecar {doc['output']}.json)")
    mem = doc["peak_memory"]
    peak = mem.get("gpu_max_allocated_bytes", mem["cpu_max_rss_bytes"])
    out.table([[k, f"{t:.2f} s"] for k, t in doc["timings_s"].items()]
              + [["total", f"{doc['total_s']:.2f} s"], ["peak memory", human_bytes(peak)]],
              ["stage", "time"])
    out.result(doc)


def command_line(ctx: typer.Context) -> list[str]:
    """The arguments this command line was given (``main`` passes them as the context's
    ``obj``), to start the same command again in other processes."""
    obj = ctx.find_root().obj
    return list(obj["argv"]) if isinstance(obj, dict) and "argv" in obj else sys.argv[1:]


SHARED = {"model": ModelOpt}  # RunSettings fields that every command declares alike


def _settings_options() -> list[inspect.Parameter]:
    """One typer option per RunSettings field, as the field declares it."""
    hints = get_type_hints(RunSettings)
    params = []
    for f in fields(RunSettings):
        meta = f.metadata
        if f.name in SHARED:
            annotation = SHARED[f.name]
        else:
            extra = {"metavar": meta["metavar"]} if meta["metavar"] else {}
            annotation = Annotated[hints[f.name], typer.Option(*meta["flags"], help=meta["help"],
                                                               **extra)]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                        default=f.default, annotation=annotation))
    return params


def _signature() -> inspect.Signature:
    own = [p for p in inspect.signature(run_cmd, eval_str=True).parameters.values()
           if p.kind is not inspect.Parameter.VAR_KEYWORD]
    ctx, cli_only = own[0], [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own[1:]]
    return inspect.Signature([ctx.replace(kind=inspect.Parameter.KEYWORD_ONLY),
                              *_settings_options(), *cli_only])


run_cmd.__signature__ = _signature()  # type: ignore[attr-defined]
