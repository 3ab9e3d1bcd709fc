"""``longcat-tools lora``: attach, list, detach, export and fuse LoRA adapters."""

from __future__ import annotations

from typing import Annotated

import typer

from longcat_tools.cli._common import (
    JsonOpt,
    ModelOpt,
    Out,
    QuietOpt,
    VerboseOpt,
    given_path,
    human_bytes,
    plain_number,
)
from longcat_tools.errors import LongcatError

lora_app = typer.Typer(
    name="lora", no_args_is_help=True, add_completion=False, rich_markup_mode=None,
    help="Attach, list, detach, export and fuse LoRA adapters (native, FastVideo, PEFT and "
         "ComfyUI formats, converted exactly).")

ForceOpt = Annotated[bool, typer.Option("--force", help="Replace what is already there.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Check everything, write nothing.")]


@lora_app.command("attach")
def attach_cmd(
    lora_file: Annotated[str, typer.Argument(metavar="LORA_FILE", parser=given_path,
                                             help="Adapter .safetensors file (any format).")],
    name: Annotated[str, typer.Option("--name", help="Name to store it under (lora/NAME/).",
                                      show_default=False)],
    model: ModelOpt = None,
    scale: Annotated[float, typer.Option(help="Default scale recorded for the adapter.",
                                         parser=plain_number(float))] = 1.0,
    fmt: Annotated[str, typer.Option("--format", help="Source format: auto, native, fastvideo, "
                                     "peft or comfy (auto reads it from the key names).")] = "auto",
    adapter_config: Annotated[str | None, typer.Option(
        "--adapter-config", metavar="JSON", parser=given_path,
        help="PEFT adapter_config.json giving the alphas "
        "(default: the file's metadata, else adapter_config.json beside it).")] = None,
    force: ForceOpt = False, dry_run: DryRunOpt = False,
    json_out: JsonOpt = False, quiet: QuietOpt = False, verbose: VerboseOpt = False,
) -> None:
    """Check an adapter against this checkpoint, convert it to the checkpoint's key flavour and
    store it as lora/NAME/, recorded in lora/adapters.json."""
    from longcat_tools.lora import attach

    out = Out(json_out, quiet, verbose)
    with out.progress(None, "attach") as bar:
        r = attach(model, lora_file, name, scale=scale, fmt=fmt, adapter_config=adapter_config,
                   force=force, dry_run=dry_run, progress=bar.update)
    for note in r.notes:
        out.warn(note)
    verb = "would attach" if r.dry_run else "attached"
    out.say(f"{verb} '{r.name}': {r.source} ({r.source_format}, {r.modules} modules) -> "
            f"{r.path} ({r.format}, {human_bytes(r.nbytes)})")
    for other in r.registered_also:
        out.say(f"registered the adapter found in place: '{other}'")
    out.result({"name": r.name, "file": str(r.path), "source": str(r.source),
                "source_format": r.source_format, "format": r.format, "modules": r.modules,
                "bytes": r.nbytes, "dry_run": r.dry_run, "notes": r.notes,
                "registered_also": r.registered_also,
                "record": r.record.to_json() if r.record else None,
                "seconds": round(r.seconds, 3)})


@lora_app.command("list")
def list_cmd(model: ModelOpt = None, json_out: JsonOpt = False, quiet: QuietOpt = False,
             verbose: VerboseOpt = False) -> None:
    """List the adapters of a checkpoint: registered and found in lora/, each checked (exit 1
    when one has a problem)."""
    from longcat_tools.lora import list_adapters

    out = Out(json_out, quiet, verbose)
    ckpt, items = list_adapters(model)
    if not items:
        out.say(f"{ckpt.lora_dir}: no adapters")
    else:
        out.table([[i.name, i.path.relative_to(ckpt.lora_dir).as_posix(), i.format or "-",
                    i.rank or "-", f"{i.alpha:g}" if i.alpha is not None else "-",
                    f"{i.default_scale:g}" if i.default_scale is not None else "-",
                    i.modules if i.modules is not None else "-",
                    human_bytes(i.nbytes) if i.nbytes is not None else "-",
                    "yes" if i.registered else "no", i.status] for i in items],
                  ["name", "file", "format", "rank", "alpha", "scale", "modules", "size",
                   "registered", "status"])
        for i in items:
            if i.record and i.record.description:
                out.detail(f"{i.name}: {i.record.description}")
    out.result({"checkpoint": str(ckpt.root), "layout": ckpt.layout, "flavour": ckpt.flavour,
                "adapters": [i.to_json(ckpt.lora_dir) for i in items]})
    bad = [i for i in items if i.status != "ok"]
    if bad:  # a check failed: exit 1, as verify does
        raise LongcatError(f"{len(bad)} of {len(items)} adapters have a problem; the first, "
                           f"'{bad[0].name}': {bad[0].status}")


@lora_app.command("detach")
def detach_cmd(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Adapter to remove.")],
    model: ModelOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Also delete a file of the release at "
                                        "the top of lora/ (the hub's adapters).")] = False,
    dry_run: DryRunOpt = False,
    json_out: JsonOpt = False, quiet: QuietOpt = False, verbose: VerboseOpt = False,
) -> None:
    """Remove an adapter: its registry entry and its files."""
    from longcat_tools.lora import detach

    out = Out(json_out, quiet, verbose)
    r = detach(model, name, force=force, dry_run=dry_run)
    verb = "would remove" if r.dry_run else "removed"
    what = ", ".join(str(p) for p in r.removed) or "no files (they were already gone)"
    out.say(f"detached '{r.name}': {verb} {what}" if not r.dry_run
            else f"would detach '{r.name}': {verb} {what}")
    out.result({"name": r.name, "removed": [str(p) for p in r.removed],
                "was_registered": r.was_registered, "dry_run": r.dry_run})


@lora_app.command("export")
def export_cmd(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Adapter to export.")],
    fmt: Annotated[str, typer.Option("--format", help="native, fastvideo, peft or comfy.",
                                     show_default=False)],
    out_file: Annotated[str, typer.Option("--out", metavar="FILE", parser=given_path,
                                          help="Output .safetensors file.", show_default=False)],
    model: ModelOpt = None,
    keys: Annotated[str | None, typer.Option(
        help="PEFT only: module names, native (default; SimpleTuner, diffusers on the native "
             "class) or fastvideo.")] = None,
    dtype: Annotated[str, typer.Option(help="keep, fp32, bf16 or fp16 for the A/B "
                                       "matrices.")] = "keep",
    force: ForceOpt = False,
    json_out: JsonOpt = False, quiet: QuietOpt = False, verbose: VerboseOpt = False,
) -> None:
    """Write an adapter in another format (the effective update is kept exactly)."""
    from longcat_tools.lora import export

    out = Out(json_out, quiet, verbose)
    with out.progress(None, "export") as bar:
        r = export(model, name, fmt, out_file, keys=keys, dtype=dtype, force=force,
                   progress=bar.update)
    extra = f" + {r.config_path}" if r.config_path else ""
    out.say(f"exported '{r.name}' as {r.format}{f' ({r.keys} names)' if r.keys else ''}: "
            f"{r.path}{extra} ({r.modules} modules, {human_bytes(r.nbytes)})")
    out.result({"name": r.name, "file": str(r.path), "format": r.format, "keys": r.keys,
                "modules": r.modules, "bytes": r.nbytes,
                "adapter_config": str(r.config_path) if r.config_path else None,
                "seconds": round(r.seconds, 3)})


@lora_app.command("fuse")
def fuse_cmd(
    names: Annotated[str, typer.Argument(metavar="NAME[:SCALE][,NAME...]",
                                         help="Adapters to merge, each with an optional scale.")],
    dst: Annotated[str, typer.Option("--dst", metavar="DST", parser=given_path,
                                     help="New checkpoint folder.",
                                     show_default=False)],
    model: ModelOpt = None,
    scale: Annotated[float | None, typer.Option(
        help="Scale for every adapter without its own (default: each one's default "
             "scale).", parser=plain_number(float))] = None,
    copy: Annotated[bool, typer.Option("--copy", help="Copy unchanged files instead of "
                                       "hard-linking them.")] = False,
    int8: Annotated[str | None, typer.Option(
        "--int8", metavar="quantize|drop",
        help="LongCat-Video-Avatar 1.5 only: re-quantize base_model_int8/ from the fused "
             "base_model/ (quantize, the default) or leave it out (drop).",
        show_default=False)] = None,
    force: ForceOpt = False, dry_run: DryRunOpt = False,
    json_out: JsonOpt = False, quiet: QuietOpt = False, verbose: VerboseOpt = False,
) -> None:
    """Write a new checkpoint whose DiT has the adapters merged in (no adapter at run time)."""
    from longcat_tools.lora import FusePlan, fuse, parse_adapter_list

    out = Out(json_out, quiet, verbose)
    wanted = parse_adapter_list(names)
    with out.progress(None, "fuse") as bar:
        r = fuse(model, wanted, dst, scale=scale, link=not copy, force=force, dry_run=dry_run,
                 progress=bar.update, int8_mode=int8)
    plan = r if isinstance(r, FusePlan) else r.plan
    adapters = ", ".join(f"{a.name} x{a.scale:g}" for a in plan.adapters)
    folders = (f" in {', '.join(f.name + '/' for f in plan.folders)}"
               if plan.ckpt.avatar is not None else "")
    for warning in plan.warnings:
        out.warn(warning)
    if isinstance(r, FusePlan):
        out.say(f"would fuse {adapters} into {plan.weights} DiT tensors of "
                f"{len(plan.shards)} shards{folders} "
                f"({human_bytes(plan.bytes_to_write)} to write) -> {plan.dst}")
        for note in plan.notes:
            out.say(note)
        out.result({**plan.describe(), "dry_run": True})
        return
    out.say(f"fused {adapters} into {plan.weights} DiT tensors{folders} -> {plan.dst} "
            f"({len(plan.shards)} shards rewritten, {r.files_linked} files linked, "
            f"{r.files_copied} copied, {r.seconds:.1f} s)")
    for note in plan.notes:
        out.say(note)
    out.result({**plan.describe(), "dry_run": False, "files_linked": r.files_linked,
                "files_copied": r.files_copied, "tensors_written": r.tensors_written,
                "seconds": round(r.seconds, 3)})
