"""``longcat-tools convert``: native hub layout <-> model_index.json layout, base and avatar
checkpoints (parse, call, print)."""

from __future__ import annotations

from typing import Annotated

import typer

from longcat_tools.cli._common import (
    JsonOpt,
    Out,
    QuietOpt,
    VerboseOpt,
    format_table,
    given_path,
    human_bytes,
)


def _gb(n: int) -> str:
    return human_bytes(n)


def convert_cmd(
    src: Annotated[str, typer.Option("--src", metavar="SRC", show_default=False, parser=given_path,
                                     help="Source checkpoint: native hub layout, converted "
                                     "(model_index.json), FastVideo's single-file output, or a "
                                     "ComfyUI single-file DiT (.safetensors, bf16 or "
                                     "fp8_e4m3fn_scaled), or a LongCat-Video-Avatar folder.")],
    dst: Annotated[str, typer.Option("--dst", metavar="DST", show_default=False, parser=given_path,
                                     help="Output folder (written as DST.partial, renamed at "
                                     "the end; must not exist unless --force).")],
    keys: Annotated[str | None, typer.Option(
        "--keys", metavar="fastvideo|native", show_default=False,
        help="Key flavour of transformer/ and the LoRA files (default fastvideo; --to native "
        "implies native).")] = None,
    to: Annotated[str, typer.Option("--to", metavar="converted|native|comfy",
                                    help="Target layout: converted (model_index.json), "
                                    "native (the hub layout, reverses a conversion) or comfy "
                                    "(the DiT alone as DST/diffusion_model.safetensors for "
                                    "ComfyUI-WanVideoWrapper).")]
    = "converted",
    dtype: Annotated[str, typer.Option("--dtype", metavar="keep|bf16|fp16|fp32|fp8",
                                       help="Cast the transformer, LoRA and text encoder "
                                       "weights (the VAE is kept). fp8: the DiT's block GEMM "
                                       "weights in e4m3 with a scale per output channel, the "
                                       "rest bf16 (for run --precision fp8).")] = "keep",
    max_shard_size: Annotated[str | None, typer.Option(
        "--max-shard-size", metavar="SIZE", show_default=False,
        help="Largest transformer shard (5GB = 5e9 bytes, 5GiB = 5*2^30). Default 5GB; an "
        "avatar's INT8 folder: 4GiB, as the original splits it.")] = None,
    link: Annotated[bool | None, typer.Option(
        "--link/--copy", show_default=False,
        help="Hard-link unchanged files (tokenizer, VAE, ...) or copy them (default: link).")]
    = None,
    lora: Annotated[str, typer.Option("--lora", metavar="all|none|NAME,...",
                                      help="Which LoRA adapters to convert, by the names "
                                      "`lora list` shows.")] = "all",
    int8: Annotated[str, typer.Option(
        "--int8", metavar="keep|quantize|dequantize|drop",
        help="LongCat-Video-Avatar 1.5 only: keep base_model_int8/ as it is, write it from "
        "base_model/ (the original's quantization), write base_model/ from it (float32 "
        "int8 x scale, one cast to --dtype, bf16 for keep), or leave it out.")] = "keep",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (files, tensors, "
                                          "bytes) and write nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace DST if it is a checkpoint.")]
    = False,
    json_out: JsonOpt = False, quiet: QuietOpt = False, verbose: VerboseOpt = False,
) -> None:
    """Convert a checkpoint between the native hub layout and the model_index.json layout."""
    from longcat_tools import convert as conv

    out = Out(json_out, quiet, verbose)
    p = conv.plan(src, dst, to=to, keys=keys, dtype=dtype, max_shard_size=max_shard_size,
                  link=link, lora=lora, force=force, int8=int8)
    out.say(f"{p.src.root}: {p.src.describe()} -> {p.dst}: {p.target_layout}, dtype {p.dtype}")
    rows = [[g["group"], g["files"], g["tensors"] or "", _gb(g["bytes_in"]), _gb(g["bytes_out"]),
             g["how"]] for g in p.groups()]
    rows.append(["total", len(p.jobs) + 1, p.tensors, _gb(p.bytes_in), _gb(p.bytes_out),
                 f"{_gb(p.bytes_to_write)} to write"])
    out.table(rows, ["output", "files", "tensors", "in", "out", "how"])
    for note in p.notes:
        out.say(f"note: {note}")
    if verbose and not quiet:
        out.say(format_table([[j.rel, j.kind, len(j.tensors) or "", _gb(j.bytes_out)]
                              for j in p.jobs], ["file", "how", "tensors", "bytes"]))
    if dry_run:
        need, free = conv.check_room(p)
        out.say(f"dry run: nothing written ({_gb(need)} needed, {_gb(free)} free)")
        out.result({**p.describe(), "dry_run": True, "bytes_needed": need, "bytes_free": free})
        return
    with out.progress(p.bytes_to_write, "convert") as bar:
        r = conv.execute(p, bar.update)
    out.say(f"wrote {p.dst} in {r.seconds:.1f} s")
    out.table([["tensors", f"{r.tensors:,}"],
               ["read", f"{_gb(r.bytes_read)} ({r.bytes_read / r.seconds / 1e9:.2f} GB/s)"
                if r.seconds else _gb(r.bytes_read)],
               ["written", f"{_gb(r.bytes_written)} ({r.gb_per_s:.2f} GB/s)"],
               ["files", f"{r.files_written} written, {r.files_linked} linked, "
                         f"{r.files_copied} copied"],
               ["checksums", f"{conv.MANIFEST} ({r.manifest_entries} files)"],
               ["peak memory", _gb(r.peak_rss)]], ["", "value"])
    out.result(r.describe())
