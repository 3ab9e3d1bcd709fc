"""``longcat-tools bsa``: switch and inspect block sparse attention in a checkpoint's config."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from longcat_tools.cli._common import JsonOpt, ModelOpt, Out, QuietOpt, VerboseOpt

bsa_app = typer.Typer(
    name="bsa", no_args_is_help=True, add_completion=False, rich_markup_mode=None,
    help="Block sparse attention: status, enable, disable, preset NAME, presets, restore, check. "
         "Writes go to the transformer config (dit/ or transformer/config.json; every DiT "
         "folder's of an avatar checkpoint): validated, atomic, locked against concurrent "
         "writers, with one config.json.bak.")

DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the diff; write nothing.")]
NoBackupOpt = Annotated[bool, typer.Option("--no-backup",
                                           help="Do not refresh config.json.bak.")]
SparsityOpt = Annotated[str | None, typer.Option(
    "--sparsity", metavar="S", show_default=False,
    help="Fraction of key chunks dropped, 0 < S < 1 (0.9375 keeps 6.25%); 'none' for cdf-only.")]
CdfOpt = Annotated[str | None, typer.Option(
    "--cdf-threshold", metavar="C", show_default=False,
    help="Keep key chunks until their softmax mass reaches C, 0 < C <= 1; 'none' to clear. With "
         "a sparsity too, each query keeps the larger of both counts.")]
ChunkQOpt = Annotated[str | None, typer.Option(
    "--chunk-q", metavar="T,H,W", show_default=False,
    help="Query chunk in latent tokens (frames, rows, columns), e.g. 4,4,4; --chunk-k follows "
         "it unless given.")]
ChunkKOpt = Annotated[str | None, typer.Option("--chunk-k", metavar="T,H,W", show_default=False,
                                               help="Key chunk in latent tokens.")]


def _params_args(sparsity: str | None, cdf: str | None, chunk_q: str | None,
                 chunk_k: str | None) -> dict[str, Any]:
    from longcat_tools import bsa

    args: dict[str, Any] = {}
    if sparsity is not None:
        args["sparsity"] = bsa.parse_fraction(sparsity, "--sparsity", inclusive_one=False)
    if cdf is not None:
        args["cdf_threshold"] = bsa.parse_fraction(cdf, "--cdf-threshold", inclusive_one=True)
    if chunk_q is not None:
        args["chunk_q"] = bsa.parse_chunk(chunk_q, "--chunk-q")
    if chunk_k is not None:
        args["chunk_k"] = bsa.parse_chunk(chunk_k, "--chunk-k")
    return args


def _report(out: Out, action: str, ckpts, updates) -> None:
    """Each config's outcome; the JSON result is one config's document, or for several (an
    avatar's DiT folders) ``{"action", "configs": [...]}``."""
    docs = [_report_one(out, action, c, u) for c, u in zip(ckpts, updates, strict=True)]
    out.result(docs[0] if len(docs) == 1 else {"action": action, "checkpoint": str(
        ckpts[0].root), "layout": ckpts[0].layout, "configs": docs})


def _report_one(out: Out, action: str, ckpt, u) -> dict[str, Any]:
    from longcat_tools import bsa

    where = u.path
    if u.dry_run:
        if u.changed:
            out.say(u.diff().rstrip("\n"))
        out.say(f"dry run: {where} {'would change' if u.changed else 'is unchanged'}; "
                "nothing written")
    elif u.written:
        bak = f" (previous version in {u.backup.name})" if u.backup else ""
        out.say(f"{action}: wrote {where}{bak}")
    else:
        out.say(f"{action}: {where} already has these settings; nothing written")
    for note in u.notes:  # a replaced invalid bsa_params must not pass unseen
        out.say(f"  {note}")
    out.say(f"attention: {bsa.attention_path(u.config)}")
    return ({"action": action, "config": str(where), "layout": ckpt.layout,
                "changed": u.changed, "written": u.written, "dry_run": u.dry_run,
                "backup": str(u.backup) if u.backup else None, "diff": u.diff(),
                "notes": u.notes, "enable_bsa": u.config.get("enable_bsa"),
                "bsa_params": u.config.get("bsa_params"),
                "attention": bsa.attention_path(u.config)})


@bsa_app.command("status")
def status_cmd(model: ModelOpt = None, json_out: JsonOpt = False, quiet: QuietOpt = False,
               verbose: VerboseOpt = False) -> None:
    """Show enable_bsa, bsa_params, the matching preset and the attention path the runner takes;
    warn on inconsistent settings."""
    from longcat_tools import bsa

    out = Out(json_out, quiet, verbose)
    ckpts = bsa.open_configs(model)
    docs = [_status_one(out, bsa.status(c)) for c in ckpts]
    out.result(docs[0] if len(docs) == 1 else {"checkpoint": str(ckpts[0].root),
                                                "layout": ckpts[0].layout, "configs": docs})


def _status_one(out: Out, st: dict[str, Any]) -> dict[str, Any]:
    params = st["bsa_params"]
    if isinstance(params, dict):
        shown = ", ".join(f"{k} {json.dumps(v)}" for k, v in params.items())
    else:
        shown = json.dumps(params)
    preset = st["preset"] or ("none (BSA off)" if st["enable_bsa"] is not True else "custom")
    if not st["preset"] and st["params_match"]:
        preset += f"; params equal {', '.join(st['params_match'])}"
    out.table([["checkpoint", f"{st['checkpoint']} ({st['layout_description']})"],
               ["config", st["config"]],
               ["enable_bsa", str(st["enable_bsa"]).lower()],
               ["bsa_params", shown],
               ["preset", preset],
               ["backup", st["backup"] or "none"]], ["", "value"])
    out.say(f"attention: {st['attention']}")
    for n in st["notes"]:
        out.say(f"note: {n}")
    for w in st["warnings"]:
        out.warn(w)
    return st


@bsa_app.command("enable")
def enable_cmd(sparsity: SparsityOpt = None, cdf_threshold: CdfOpt = None,
               chunk_q: ChunkQOpt = None, chunk_k: ChunkKOpt = None,
               model: ModelOpt = None, dry_run: DryRunOpt = False, no_backup: NoBackupOpt = False,
               json_out: JsonOpt = False, quiet: QuietOpt = False,
               verbose: VerboseOpt = False) -> None:
    """Set enable_bsa true. With no options, the params the config keeps (e.g. after `disable`)
    come back as they were; a config without valid params gets 720p-balanced (sparsity 0.9375,
    chunks 4,4,4). Options replace only the fields they name."""
    from longcat_tools import bsa

    out = Out(json_out, quiet, verbose)
    args = _params_args(sparsity, cdf_threshold, chunk_q, chunk_k)
    ckpts = bsa.open_configs(model)
    u = bsa.update_all(ckpts, lambda cfg, style: bsa.with_enabled(cfg, style, **args),
                       backup=not no_backup, dry_run=dry_run)
    _report(out, "enable", ckpts, u)


@bsa_app.command("disable")
def disable_cmd(model: ModelOpt = None, dry_run: DryRunOpt = False,
                no_backup: NoBackupOpt = False, json_out: JsonOpt = False,
                quiet: QuietOpt = False, verbose: VerboseOpt = False) -> None:
    """Set enable_bsa false and keep bsa_params, so `enable` brings them back."""
    from longcat_tools import bsa

    out = Out(json_out, quiet, verbose)
    ckpts = bsa.open_configs(model)
    u = bsa.update_all(ckpts, bsa.with_disabled, backup=not no_backup, dry_run=dry_run)
    _report(out, "disable", ckpts, u)


@bsa_app.command("preset")
def preset_cmd(name: Annotated[str, typer.Argument(metavar="NAME", help="A preset from `bsa "
                                                   "presets`, e.g. 720p-balanced or 480p.")],
               model: ModelOpt = None, dry_run: DryRunOpt = False,
               no_backup: NoBackupOpt = False, json_out: JsonOpt = False,
               quiet: QuietOpt = False, verbose: VerboseOpt = False) -> None:
    """Write a preset's enable_bsa and bsa_params (every other field kept)."""
    from longcat_tools import bsa
    from longcat_tools.model import bsa_presets

    out = Out(json_out, quiet, verbose)
    bsa_presets.get(name)  # an unknown name fails before the checkpoint is looked at
    ckpts = bsa.open_configs(model)
    u = bsa.update_all(ckpts, lambda cfg, style: bsa.with_preset(cfg, name, style),
                       backup=not no_backup, dry_run=dry_run)
    _report(out, f"preset {name}", ckpts, u)


@bsa_app.command("presets")
def presets_cmd(json_out: JsonOpt = False, quiet: QuietOpt = False,
                verbose: VerboseOpt = False) -> None:
    """List the presets: the values each writes and the share of key chunks it keeps."""
    from longcat_tools import schemas
    from longcat_tools.model import bsa_presets

    out = Out(json_out, quiet, verbose)
    folder = schemas.data_dir("examples") / bsa_presets.EXAMPLES_FOLDER
    rows, docs = [], []
    for p in bsa_presets.PRESETS.values():
        prm = p.params or {}
        example = folder / p.example if p.example and (folder / p.example).is_file() else None
        cells = [json.dumps(prm[k]) for k in ("sparsity", "cdf_threshold")] if prm else ["-"] * 2
        rows.append([p.name, json.dumps(p.enable_bsa), *cells,
                     ",".join(map(str, prm["chunk_3d_shape_q"])) if prm else "-", p.keeps,
                     p.intent])
        docs.append({"name": p.name, "enable_bsa": p.enable_bsa, "bsa_params": p.params,
                     "keeps": p.keeps, "intent": p.intent, "origin": p.origin,
                     "default_for_enable": p.name == bsa_presets.DEFAULT_ENABLE,
                     "example": str(example) if example else None})
    out.table(rows, ["preset", "enable_bsa", "sparsity", "cdf", "chunk q=k", "keeps", "intent"])
    out.say(f"\n`bsa enable` on a config without params writes {bsa_presets.DEFAULT_ENABLE}; "
            f"480p-bsa, 704p-* and 768p-balanced come from {bsa_presets.FASTVIDEO}.")
    out.say(f"Example configs for the real model: {folder}")
    out.result({"presets": docs, "default_for_enable": bsa_presets.DEFAULT_ENABLE})


@bsa_app.command("restore")
def restore_cmd(model: ModelOpt = None, dry_run: DryRunOpt = False, json_out: JsonOpt = False,
                quiet: QuietOpt = False, verbose: VerboseOpt = False) -> None:
    """Bring config.json.bak back. The two swap, so a second restore undoes the first."""
    from longcat_tools import bsa

    out = Out(json_out, quiet, verbose)
    ckpts = bsa.open_configs(model)
    u = bsa.restore_all(ckpts, dry_run=dry_run)
    _report(out, "restore", ckpts, u)


def _fmt_flops(x: float | None) -> str:
    if x is None:
        return "depends on content"
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} FLOP"


@bsa_app.command("check")
def check_cmd(
    height: Annotated[int, typer.Option("--height", help="Video height in pixels.")],
    width: Annotated[int, typer.Option("--width", help="Video width in pixels.")],
    frames: Annotated[int, typer.Option("--frames", help="Number of video frames (4k+1).")],
    cp: Annotated[int, typer.Option("--cp", help="Context-parallel size (GPUs sharing one "
                                    "video).")] = 1,
    refine: Annotated[bool, typer.Option("--refine", help="FRAMES is the refinement stage's "
                                         "output (2x the 480p video): latent frames are padded "
                                         "to a multiple of 4 as that stage does.")] = False,
    preset: Annotated[str | None, typer.Option("--preset", metavar="NAME", show_default=False,
                                               help="Use a preset's params instead of the "
                                               "config's.")] = None,
    sparsity: SparsityOpt = None, cdf_threshold: CdfOpt = None, chunk_q: ChunkQOpt = None,
    chunk_k: ChunkKOpt = None, model: ModelOpt = None, json_out: JsonOpt = False,
    quiet: QuietOpt = False, verbose: VerboseOpt = False,
) -> None:
    """Token grid, chunk counts, divisibility, chunks kept per query and attention FLOPs for one
    video size. Params: the checkpoint's (--model, $LONGCAT_TOOLS_MODEL or the current folder),
    else 720p-balanced; dimensions: the checkpoint's, else the real 13.6B model's."""
    from longcat_tools import bsa
    from longcat_tools.checkpoint import layouts
    from longcat_tools.errors import UsageError
    from longcat_tools.model import bsa_presets, chunks, keymap

    out = Out(json_out, quiet, verbose)
    args = _params_args(sparsity, cdf_threshold, chunk_q, chunk_k)
    try:
        root = layouts.resolve_model(model)
    except UsageError:
        root = None
    source, dims, params, why = "the real 13.6B model", keymap.RELEASE_DIMS, None, \
        "no checkpoint given"
    if root is not None:
        ckpt = bsa.open_configs(root)[0]  # an avatar's DiT folders share one architecture
        cfg = bsa.read_config(ckpt)
        dims = keymap.dit_dims(cfg, str(ckpt.config_path))
        source = str(ckpt.config_path)
        params, why = bsa.kept_params(cfg), "the config has no valid BSA params"
        params_from = source + ("" if cfg.get("enable_bsa") is True else " (BSA is off there)")
    if preset is not None:
        params, why = bsa_presets.get(preset).params, f"{preset} is dense attention"
        params_from = f"preset {preset}"
    if params is None:
        params = bsa_presets.PRESETS[bsa_presets.DEFAULT_ENABLE].params
        params_from = f"{bsa_presets.DEFAULT_ENABLE}: {why}"
    if args:
        params = bsa.with_enabled({"bsa_params": params}, **args)[0]["bsa_params"]
        params_from += ", changed by options"
    r = bsa.check(height, width, frames, params, cp=cp, refine=refine, dims=dims)
    r["params_from"], r["dims_from"] = params_from, source
    T, H, W = r["token_grid"]
    out.say(f"video {height}x{width} (H x W), {r['frames_used']} frames -> latent "
            f"{'x'.join(map(str, r['latent']))} -> token grid {T}x{H}x{W} = {r['tokens']:,} "
            f"tokens (patch {'x'.join(map(str, r['patch']))})")
    if cp > 1:
        out.say(f"cp {cp}: split H x W by {r['cp_split_hw']} -> {r['rank_grid']} per rank; the "
                f"kernel sees {r['kernel_grid']} (rank tiles one after another)")
    out.say(f"params: {bsa.describe_params(params)} [from {params_from}]")
    rows = []
    for i, axis in enumerate(chunks.AXES):
        row: list[Any] = [axis, r["kernel_grid"][i]]
        for side in (r["q"], r["k"]):
            e = side["edge"][i]
            row += [side["chunk"][i], side["counts"][i],
                    "yes" if not e else f"no: edge chunk of {e}"]
        rows.append(row)
    out.table(rows, ["axis", "tokens", "q chunk", "q chunks", "q divides", "k chunk", "k chunks",
                     "k divides"])
    mq, mk = r["q"]["chunks"], r["k"]["chunks"]
    kept = r["kept_per_query"]
    kept_txt = (f"{kept:,} of {mk:,} key chunks ({r['kept_fraction'] * 100:.2f}%)"
                if kept is not None else f"adaptive, 0 to {mk:,} key chunks")
    if r["mode"] == "max":
        kept_txt = "at least " + kept_txt
    out.say(f"chunks: {mq:,} query x {mk:,} key ({r['q']['tokens_per_chunk']} / "
            f"{r['k']['tokens_per_chunk']} tokens each); kept per query chunk: {kept_txt}")
    f = r["flops"]
    out.say(f"attention FLOPs per block ({r['heads']} heads x {r['head_dim']}): dense "
            f"{_fmt_flops(f['dense_per_block'])}, kept {_fmt_flops(f['kept_per_block'])} "
            f"+ gating {_fmt_flops(f['gating_per_block'])}; per forward ({r['depth']} blocks): "
            f"dense {_fmt_flops(f['dense_per_forward'])}, kept "
            f"{_fmt_flops(f['kept_per_forward'])}" + (f"; per rank: 1/{cp} of these" if cp > 1
                                                       else ""))
    out.say("original kernel: " + (
        "not called (dense attention)" if r["original_kernel_ok"] is None else
        "runs (every axis divides)" if r["original_kernel_ok"] else
        "asserts (an axis does not divide); ours uses edge chunks"))
    for n in r["notes"]:
        out.say(f"note: {n}")
    for w in r["warnings"]:
        out.warn(w)
    out.result(r)
