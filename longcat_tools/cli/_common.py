"""What every command shares: the common options, output (human or ``--json``), tables, progress.

Commands stay thin: parse, call the library, print. Human text goes to stdout, or to stderr under
``--json`` so that stdout holds exactly one JSON document.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from longcat_tools.errors import EMPTY_PATH
from longcat_tools.io import jsonio


def given_path(value: str) -> str:
    """A path option as given, '' refused: ``Path('')`` is the current folder, and an empty
    --model fell back to $LONGCAT_TOOLS_MODEL without a word (typer's ``parser``)."""
    if value == "":
        raise typer.BadParameter(EMPTY_PATH)
    return value


def plain_number(kind: type) -> Callable[[str], Any]:
    """A typer ``parser`` for an int or float option that refuses ``_`` between digits: Python
    reads '1_0' as 10, so a LoRA scale or a guidance typed that way ran ten times too strong."""
    from longcat_tools.model.bounds import plain_number as read

    def parse(value: str) -> Any:
        try:
            return read(value, kind)
        except ValueError:
            what = ("a plain number ('_' between digits is not read as a separator)"
                    if "_" in str(value) else "an integer" if kind is int else "a number")
            raise typer.BadParameter(f"'{value}' is not {what}") from None
    parse.__name__ = kind.__name__  # the metavar typer derives from it
    return parse


def given_pathlib(value: str) -> Path:
    """``given_path`` for an option typed ``Path``."""
    return Path(given_path(value))


ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", show_default=False, metavar="PATH", parser=given_path,
    help="Checkpoint folder (default: $LONGCAT_TOOLS_MODEL, else the current folder).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON result on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v",
                                          help="More detail; a traceback on errors.")]


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_CONTROL_OR_BREAK = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def shown(text: object, one_line: bool = False) -> str:
    """``text`` for a terminal: control characters (an escape sequence in a sidecar's prompt or
    a file name) written as ``\\xNN`` instead of acting on the terminal; ``one_line`` (an error,
    a warning, a table cell) escapes line breaks and tabs too, so a name cannot split it. A
    file name's bytes that are not UTF-8 (lone surrogates) are written as ``\\udcNN``: printing
    them raised an error of its own."""
    pattern = _CONTROL_OR_BREAK if one_line else _CONTROL
    text = str(text).encode("utf-8", "backslashreplace").decode("utf-8")
    return pattern.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


# This process's --json state for ``main``'s error document: whether its command's ``Out``
# prints JSON (None until one is made: then ``--json`` on the command line decides), and
# whether it printed its result (then no error document follows).
JSON_STATE = {"on": None, "printed": False}


@dataclass
class Out:
    """Where a command's words go, honouring --json / -q / -v."""

    as_json: bool = False
    quiet: bool = False
    verbose: bool = False

    def __post_init__(self) -> None:
        JSON_STATE["on"] = self.as_json  # off in the ranks a launcher speaks for
        # the library's warnings (stderr, through logging's last resort) obey -q too
        logging.getLogger("longcat_tools").setLevel(logging.ERROR if self.quiet
                                                    else logging.NOTSET)

    @property
    def _stream(self):
        return sys.stderr if self.as_json else sys.stdout

    def say(self, text: str = "") -> None:
        if not self.quiet:
            print(shown(text), file=self._stream, flush=True)

    def detail(self, text: str) -> None:
        if self.verbose and not self.quiet:
            print(shown(text), file=self._stream, flush=True)

    def warn(self, text: str) -> None:
        if not self.quiet:  # -q: errors only
            print(f"warning: {shown(text, one_line=True)}", file=sys.stderr, flush=True)

    def result(self, obj: Any) -> None:
        """The machine-readable result: printed only under --json."""
        if self.as_json:
            print(jsonio.dumps(jsonio.finite(obj), default=str, newline=False), flush=True)
            JSON_STATE["printed"] = True

    def table(self, rows: list[list[Any]], header: list[str]) -> None:
        if not self.quiet:
            print(format_table(rows, header), file=self._stream, flush=True)

    def progress(self, total: int | None, desc: str, unit: str = "B"):
        """A tqdm bar on stderr (bytes by default); silent under -q."""
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024,
                    disable=self.quiet or None, file=sys.stderr, leave=False, dynamic_ncols=True)


def format_table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [[shown(c, True) for c in header]] + [[shown(c, True) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
