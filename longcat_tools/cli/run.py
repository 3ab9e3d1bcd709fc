"""``longcat-tools run``: every LongCat-Video task on any checkpoint layout, through our runner.

The options are ``runner.settings.RunSettings``'s fields (default, help and flags declared there
once); this module adds the command-line-only ones (``--gpus``, ``--json``, ``-q``, ``-v``) and
the ones that take a list (``--lora-scale``, the repeatable ``--audio``).
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, get_args, get_type_hints

import typer

from longcat_tools.cli._common import (
    JSON_STATE,
    JsonOpt,
    ModelOpt,
    Out,
    QuietOpt,
    VerboseOpt,
    given_path,
    human_bytes,
    plain_number,
)
from longcat_tools.errors import LongcatError, UsageError
from longcat_tools.runner.settings import RunSettings

DEFAULT_OUT = next(f.default for f in fields(RunSettings) if f.name == "out")
DEFAULT_SEED = next(f.default for f in fields(RunSettings) if f.name == "seed")
DEFAULT_OUT_DIR = "out"
AUDIO_HELP = next(f.metadata["help"] for f in fields(RunSettings) if f.name == "audio")


def run_cmd(
    ctx: typer.Context,
    prompts: Annotated[str | None, typer.Option(
        "--prompts", metavar="FILE", parser=given_path,
        help="Prompt list: one prompt a line, or JSONL with "
        "prompt, negative_prompt, image, video, seed, out per line (a matrix run).")] = None,
    seeds: Annotated[str | None, typer.Option(
        "--seeds", metavar="LIST", help="Comma list of seeds, one video each (a matrix "
        "run).")] = None,
    out_dir: Annotated[str, typer.Option(
        "--out-dir", metavar="DIR", parser=given_path,
        help="Folder of a matrix run: one mp4 + sidecar per video "
        "and manifest.json.")] = DEFAULT_OUT_DIR,
    lora_scale: Annotated[str, typer.Option(
        "--lora-scale", metavar="SCALE", help="Scale of the hub LoRAs the run activates "
        "(distilled, refinement); a comma list makes a matrix run.")] = "1",
    audio: Annotated[list[str] | None, typer.Option(
        "--audio", metavar="FILE", parser=given_path, help=AUDIO_HELP)] = None,
    gpus: Annotated[int, typer.Option(help="Use N GPUs of this machine (N processes): one "
                                      "video is split over them (context parallel), a matrix "
                                      "run gives each whole videos (data parallel).")] = 1,
    data_parallel: Annotated[int, typer.Option(
        "--data-parallel", hidden=True,
        help="This process is one of N data-parallel ranks (RANK) of a matrix run.")] = 1,
    json_out: JsonOpt = False, quiet: QuietOpt = False, verbose: VerboseOpt = False,
    **options: Any,
) -> None:
    """Run a LongCat-Video task and write an H.264 mp4 plus a JSON sidecar; with --prompts,
    --seeds or a --bsa list, every combination in one process (weights loaded once)."""
    from dataclasses import replace

    from longcat_tools.runner import matrix
    from longcat_tools.runner.settings import validate

    if os.environ.get("RANK", "0") != "0":  # rank 0 of a context-parallel job speaks for it
        json_out, quiet = False, True
    if data_parallel > 1:  # the launcher prints the result; rank 0 shows its own progress
        json_out = False
    out = Out(json_out, quiet, verbose)
    scales = matrix.parse_scales(lora_scale)
    settings = RunSettings(**options, audio=audio or None, lora_scale=scales[0])
    if matrix.is_matrix(prompts, seeds, settings.bsa, scales):
        run_matrix_cmd(ctx, out, settings, prompts, seeds, out_dir, gpus, data_parallel, quiet,
                       scales)
        return
    if out_dir != DEFAULT_OUT_DIR:  # ignored: the one video went to --out
        validate(settings)  # a bad value named first: '--bsa OFF' is no list, yet no choice
        raise UsageError(f"--out-dir {out_dir}: is for a matrix run (--prompts, --seeds or a "
                         "list of --bsa or --lora-scale values); one video is written to --out")
    if gpus != 1:
        from longcat_tools.runner.launch import check_gpus, launch, without_option

        if gpus < 2 or settings.cp != 1:
            raise UsageError(f"--gpus {gpus}: use 2 or more GPUs, without --cp (--cp is for "
                             "processes started by torchrun)")
        check_gpus(gpus, settings.device)
        validate(replace(settings, cp=gpus))
        JSON_STATE["on"] = False  # rank 0 speaks for the run, errors included
        raise typer.Exit(launch(gpus, without_option(command_line(ctx), "--gpus")))
    validate(settings)  # a bad option costs a second, not the runner's imports (diffusers)
    from longcat_tools.runner.job import run_job
    from longcat_tools.runner.pipeline import Reporter, quiet_libraries

    reporter = Reporter(show=not quiet, say=out.say)
    with quiet_libraries():  # the whole run: this process prints only our own lines
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


def run_matrix_cmd(ctx: typer.Context, out: Out, settings: RunSettings, prompts: str | None,
                   seeds: str | None, out_dir: str, gpus: int, data_parallel: int,
                   quiet: bool, scales: list[float]) -> None:
    """A matrix run: plan and check every video, then run them here or, with ``--gpus N``, in
    N processes that take every N-th video each (the launcher writes the manifest)."""
    from dataclasses import replace

    from longcat_tools.runner import matrix
    from longcat_tools.runner.settings import resolve_device

    seed_list = matrix.parse_seeds(seeds) if seeds is not None else None  # a bad entry first
    bsa_list = matrix.parse_bsa(settings.bsa)
    if Path(out_dir).exists() and not Path(out_dir).is_dir():  # was named as every --out
        raise UsageError(f"--out-dir {out_dir}: is not a folder")
    if gpus < 1:
        raise UsageError(f"--gpus {gpus}: use 1 or more")
    if settings.cp != 1:
        raise UsageError("--cp with a list: context parallel splits one video; a matrix run "
                         "takes --gpus N and gives each GPU whole videos")
    if settings.out != DEFAULT_OUT:
        raise UsageError(f"--out {settings.out}: names one video; a matrix run writes into "
                         "--out-dir")
    if seed_list is not None and settings.seed != DEFAULT_SEED:  # ignored for the list's
        raise UsageError(f"--seed {settings.seed} with --seeds: each video takes its seed from "
                         "the list; drop --seed")
    if gpus > 1 and settings.device not in ("auto", "cuda", "cpu"):
        raise UsageError(f"--device {settings.device} with --gpus {gpus}: each process takes "
                         "its own GPU (use --device auto or cuda)")
    if gpus > 1:
        from longcat_tools.runner.launch import check_gpus

        check_gpus(gpus, settings.device)
    rank = int(os.environ.get("RANK", "0")) if data_parallel > 1 else 0
    if data_parallel > 1 and settings.device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            settings = replace(settings, device=f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
    items = matrix.plan(settings, out_dir, prompts, seed_list, bsa_list,
                        scales if len(scales) > 1 else None)
    failed = None
    if gpus > 1:
        from longcat_tools.runner.launch import launch, without_option

        out.say(f"{len(items)} videos into {out_dir}/ over {gpus} processes")
        code = launch(gpus, without_option(command_line(ctx), "--gpus"), "--data-parallel")
        # also after a failed process: the manifest says which videos are missing
        manifest = matrix.write_manifest(items, resolve_device(settings.device))
        if code:
            missing = sum(e["status"] != "done" for e in manifest["items"])
            failed = LongcatError(f"a process failed (exit {code}); {missing} of {len(items)} "
                                  "videos missing (run the same command again to finish them)")
    else:
        from tqdm import tqdm

        from longcat_tools.runner.pipeline import Reporter, quiet_libraries

        def say(text: str) -> None:  # above the progress bars, not through them
            with tqdm.external_write_mode():
                out.say(text)

        say(f"{len(items)} videos into {out_dir}/")
        reporter = Reporter(show=not quiet, say=say if out.verbose else None)
        with quiet_libraries():
            for _ in matrix.run_matrix(items, reporter, say=say, share=(rank, data_parallel)):
                pass
        if data_parallel > 1:
            return
        manifest = json.loads((Path(out_dir) / matrix.MANIFEST).read_text())
    out.table([[str(e["index"]), e["file"], e["status"], f"{e.get('total_s', 0):.2f} s"]
               for e in manifest["items"]], ["#", "file", "status", "time"])
    out.result(manifest)
    if failed is not None:  # after the manifest, as verify fails after its report
        raise failed


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
        if not meta.get("cli", True):
            continue
        if f.name in SHARED:
            annotation = SHARED[f.name]
        else:
            extra = {"metavar": meta["metavar"]} if meta["metavar"] else {}
            kinds = set(get_args(hints[f.name]) or (hints[f.name],)) - {type(None)}
            if kinds in ({int}, {float}):  # '1_0' read as 10
                extra["parser"] = plain_number(kinds.pop())
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
