"""``examples/bsa_configs/``: one complete config per preset for the real 13.6B DiT, generated
from the preset table (``python -m longcat_tools.bsa.examples --write DIR`` rewrites them; a test
checks that the committed ones still match)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from longcat_tools import schemas
from longcat_tools.bsa.config import SCHEMA, JsonStyle, with_preset
from longcat_tools.model import bsa_presets

README = """\
# BSA example configs

Complete transformer configs for the real 13.6B LongCat-Video DiT (the hub's `dit/config.json`
field set, native flavour: `_class_name LongCatVideoTransformer3DModel`, `num_heads`), one per
block-sparse-attention preset. They are generated from the preset table
`longcat_tools/model/bsa_presets.py` (`python -m longcat_tools.bsa.examples --write
examples/bsa_configs`), and a test checks that they still match it.

| file | preset | enable_bsa | sparsity | cdf_threshold | chunk q = k | intent |
|---|---|---|---|---|---|---|
{table}

To switch a checkpoint, prefer `longcat-tools bsa preset NAME`: it works on every layout and key
flavour, keeps the file's other fields, validates, backs up and writes atomically. Copying one of
these files over `dit/config.json` is only right for the native layout of the real model.
"""


def example_files() -> dict[str, str]:
    """File name -> text: one config per preset that names an example (native flavour, the hub's
    field set), plus the README."""
    from longcat_tools.synth import dit_config  # torch: needed only to regenerate examples

    base = dit_config("real")
    style = JsonStyle()
    files: dict[str, str] = {}
    rows = []
    for p in bsa_presets.examples():
        cfg, _ = with_preset(base, p.name, style)
        schemas.validate(cfg, SCHEMA, f"examples/{bsa_presets.EXAMPLES_FOLDER}/{p.example}")
        files[str(p.example)] = style.dumps(cfg)
        prm = p.params
        cells = (["—"] * 3 if prm is None else
                 [prm["sparsity"], json.dumps(prm["cdf_threshold"]), prm["chunk_3d_shape_q"]])
        rows.append(f"| `{p.example}` | `{p.name}` | {json.dumps(p.enable_bsa)} | "
                    + " | ".join(map(str, cells)) + f" | {p.intent} |")
    files["README.md"] = README.format(table="\n".join(rows))
    return files


def write(folder: Path) -> list[Path]:
    """(Re)write the example files into ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in example_files().items():
        (folder / name).write_text(text)
        written.append(folder / name)
    return written


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m longcat_tools.bsa.examples",
                                 description="Regenerate examples/bsa_configs/ from the table.")
    ap.add_argument("--write", metavar="DIR", required=True, help="folder to (re)write")
    args = ap.parse_args(argv)
    for path in write(Path(args.write)):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
