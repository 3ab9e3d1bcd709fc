"""``longcat-tools compare DIR``: a contact sheet, a table and the PSNR of one-setting pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from longcat_tools.cli._common import (
    JsonOpt,
    Out,
    QuietOpt,
    VerboseOpt,
    given_pathlib,
    human_bytes,
)
from longcat_tools.compare import (
    DEFAULT_FRAMES,
    DEFAULT_THUMB_HEIGHT,
    SHEET_NAME,
    compare,
    format_db,
)

PROMPT_COLUMN = 40  # characters of the prompt in the table


def compare_cmd(
    folder: Annotated[Path, typer.Argument(
        metavar="DIR", show_default=False, parser=given_pathlib,
        help="Folder of `run` outputs (X.mp4 + X.mp4.json sidecars).")],
    sheet: Annotated[Path | None, typer.Option(
        "--out", "-o", metavar="FILE.png", show_default=False, parser=given_pathlib,
        help=f"Contact sheet to write (default: DIR/{SHEET_NAME}).")] = None,
    frames: Annotated[int, typer.Option(
        "--frames", metavar="N", help="Frames per video, evenly spaced (3: first, middle, "
                                      "last).")] = DEFAULT_FRAMES,
    thumb_height: Annotated[int, typer.Option(
        "--thumb-height", metavar="PX", help="Height of each frame on the sheet.")]
    = DEFAULT_THUMB_HEIGHT,
    json_out: JsonOpt = False, quiet: QuietOpt = False, verbose: VerboseOpt = False,
) -> None:
    """Compare the videos of a folder: a contact sheet (PNG), a table, and the PSNR between
    runs whose settings differ in one field."""
    out = Out(json_out, quiet, verbose)
    result = compare(folder, sheet=sheet, frames=frames, thumb_height=thumb_height)
    for note in result.notes:
        out.warn(note)
    out.say(f"wrote {result.sheet}: {len(result.items)} videos x {result.columns} frames")
    rows = []
    for r in result.table():
        prompt = r["prompt"] or ""
        if len(prompt) > PROMPT_COLUMN:
            prompt = prompt[:PROMPT_COLUMN - 3] + "..."
        mem = r["peak_memory"]
        rows.append([r["file"], prompt, r["seed"], r["bsa"],
                     "-" if r["total_s"] is None else f"{r['total_s']:.2f}",
                     "-" if mem is None else f"{human_bytes(mem['bytes'])} {mem['kind']}"])
    out.table(rows, ["file", "prompt", "seed", "bsa", "total s", "peak memory"])
    out.say()
    if not result.pairs:
        out.say("no two videos differ in exactly one setting: no PSNR")
    else:
        out.say("PSNR of runs that differ in one setting (dB; inf: identical):")
    for p in result.pairs:
        a, b = (str(v) for v in p.values)
        what = f"{p.a} vs {p.b}: {p.setting} {a} -> {b}"
        if p.skipped:
            out.say(f"  {what}: skipped, {p.skipped}")
            continue
        worst = min(p.frame_psnr_db)
        out.say(f"  {what}: mean {format_db(p.mean_psnr_db)} dB, worst frame "
                f"{format_db(worst)} dB ({len(p.frame_psnr_db)} frames)")
        out.detail("    per frame: " + " ".join(format_db(v) for v in p.frame_psnr_db))
    out.result(result.to_json())
