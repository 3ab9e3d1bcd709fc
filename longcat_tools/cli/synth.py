"""``longcat-tools synth``: write a synthetic checkpoint in the native hub layout (the base model,
or an avatar model beside the base one it reads)."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from longcat_tools.cli._common import (
    JsonOpt,
    Out,
    QuietOpt,
    VerboseOpt,
    given_path,
    human_bytes,
)


def synth_cmd(
    dst: Annotated[str, typer.Argument(
        metavar="DST", parser=given_path,
        help="Folder to create (must not exist unless --force). For an avatar "
        "model it holds LongCat-Video/ and the avatar's folder.")],
    model: Annotated[str, typer.Option(help="Which model: base, avatar-1.0 or avatar-1.5.")] =
    "base",
    preset: Annotated[str, typer.Option(help="Model dimensions: tiny, small or real.")] = "tiny",
    depth: Annotated[int | None, typer.Option(min=1, help="Number of DiT blocks (default: the "
                                              "preset's).")] = None,
    dtype: Annotated[str, typer.Option(help="Storage dtype of the weights: fp32 or bf16.")] =
    "fp32",
    sparse: Annotated[bool, typer.Option(help="Leave tensor data as file holes (valid headers, "
                                         "almost no disk) for header-level tests at full scale.")]
    = False,
    seed: Annotated[int, typer.Option(help="Seed of every random tensor.")] = 0,
    force: Annotated[bool, typer.Option(help="Replace DST if it exists.")] = False,
    json_out: JsonOpt = False, quiet: QuietOpt = False, verbose: VerboseOpt = False,
) -> None:
    """Write a checkpoint in the NATIVE hub layout with random weights (tiny, small or real).

    An avatar model is written with its base (tokenizer, text encoder, VAE): DST/LongCat-Video/
    and DST/LongCat-Video-Avatar[-1.5]/, the tree the avatar's loaders expect.
    """
    from longcat_tools.synth import PRESETS, synth

    out = Out(json_out, quiet, verbose)
    t0 = time.perf_counter()
    with out.progress(None, f"synth {preset}") as bar:
        r = synth(dst, preset, depth=depth, dtype=dtype, sparse=sparse, seed=seed,
                  force=force, progress=bar.update, model=model)
    secs = time.perf_counter() - t0
    if r.avatar is None:
        out.say(f"wrote {r.path} ({preset}: {PRESETS[preset].note})")
    else:
        out.say(f"wrote {r.avatar} ({preset} {r.model}; the table counts its DiT)\n"
                f"wrote {r.base} (its base model: tokenizer, text encoder, VAE)")
    out.table([["DiT tensors", f"{r.dit_tensors:,}"], ["DiT parameters", f"{r.dit_parameters:,}"],
               ["DiT bytes", f"{r.dit_bytes:,}"], ["files", r.files],
               ["disk used", human_bytes(r.bytes_on_disk)], ["time", f"{secs:.1f} s"]],
              ["", "value"])
    out.result({"path": str(r.path), "preset": r.preset, "layout": "native",
                "dit_tensors": r.dit_tensors, "dit_parameters": r.dit_parameters,
                "dit_bytes": r.dit_bytes, "files": r.files, "bytes_on_disk": r.bytes_on_disk,
                "sparse": sparse, "seconds": round(secs, 3),
                **({} if r.avatar is None else {"model": r.model, "avatar": str(r.avatar),
                                                "base": str(r.base)})})
