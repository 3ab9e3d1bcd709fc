"""``longcat-tools schema``: list the JSON Schemas or print one, for use in other CI systems."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from longcat_tools.cli._common import JsonOpt, Out, QuietOpt, VerboseOpt


def schema_cmd(
    name: Annotated[str | None, typer.Argument(
        metavar="NAME", show_default=False,
        help="Schema to print (default: list them all).")] = None,
    json_out: JsonOpt = False, quiet: QuietOpt = False, verbose: VerboseOpt = False,
) -> None:
    """List the JSON Schemas (draft 2020-12) the tool validates with, or print one."""
    from longcat_tools import schemas

    out = Out(json_out, quiet, verbose)
    if name is not None:
        print(json.dumps(schemas.load(name), indent=2))
        return
    rows = [{"name": n, "id": schemas.load(n)["$id"], "title": schemas.load(n).get("title", "")}
            for n in schemas.names()]
    out.table([[r["name"], r["title"]] for r in rows], ["name", "title"])
    out.say(f"\nprint one with `longcat-tools schema NAME`; files in {schemas.data_dir('schemas')}")
    out.result(rows)
