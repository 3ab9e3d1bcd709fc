"""Rewrite the `--help` blocks of the docs/ pages from the live CLI: `python docs/generate.py`.

Each page holds the help of its commands between markers, as the terminal prints it:

    <!-- help:begin longcat-tools bsa enable --help -->
    ```text
    Usage: longcat-tools bsa enable [OPTIONS]
    ...
    ```
    <!-- help:end -->

`longcat-tools --help` goes in docs/README.md, `longcat-tools NAME ...` in docs/NAME.md. The help
is rendered in a child process with a fixed environment (width, no colour, no terminal), so the
pages come out the same on every machine; tests/test_docs.py fails when a page and the CLI differ.
A command without a block gets one appended to its page (a new page for a new command): move it
where it belongs and document its flags. `--check` writes nothing and exits 1 when a page is stale.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
PROG = "longcat-tools"
# Click clamps help to 80 columns and keeps 2 spare, so 78 is what any terminal of 80 columns or
# more shows; it is passed to click directly, whatever the terminal says.
WIDTH = 78
# The child's environment: terminal size and colour switches pinned, our own settings dropped.
PINNED_ENV = {"COLUMNS": "80", "LINES": "24", "TERMINAL_WIDTH": "80", "NO_COLOR": "1",
              "_TYPER_FORCE_DISABLE_TERMINAL": "1", "PYTHONIOENCODING": "utf-8"}
DROPPED_ENV = ("FORCE_COLOR", "CLICOLOR_FORCE", "PY_COLORS", "TTY_COMPATIBLE", "TTY_INTERACTIVE",
               "TYPER_USE_RICH", "_TYPER_FORCE_TERMINAL", "PYTHONSTARTUP")
# Options every command shares; docs/README.md documents them once.
COMMON_OPTIONS = {"--help", "--json", "--quiet", "--verbose"}
BLOCK = re.compile(r"<!-- help:begin (?P<cmd>[^>]*?) -->\n.*?<!-- help:end -->", re.S)


def block_key(path: tuple[str, ...]) -> str:
    return " ".join((PROG, *path, "--help"))


def page_for(path: tuple[str, ...]) -> str:
    return f"{path[0]}.md" if path else "README.md"


def format_block(key: str, help_text: str) -> str:
    return f"<!-- help:begin {key} -->\n```text\n{help_text}\n```\n<!-- help:end -->"


def _dump() -> dict[str, dict]:
    """In the child: {block key: {path, help, options}} for every command, in CLI order."""
    import contextlib
    import io

    import typer

    from longcat_tools.cli import app

    root = typer.main.get_command(app)
    found: dict[str, dict] = {}

    def visit(cmd, path: tuple[str, ...]) -> None:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = root.main(args=[*path, "--help"], prog_name=PROG, standalone_mode=False,
                           terminal_width=WIDTH, max_content_width=WIDTH)
        if rc not in (0, None):
            raise SystemExit(f"{block_key(path)} exited {rc}")
        options = [[o for o in (*p.opts, *p.secondary_opts) if o.startswith("--")]
                   for p in cmd.params if p.param_type_name == "option"]
        found[block_key(path)] = {"path": list(path), "help": buf.getvalue().rstrip() ,
                                  "options": options}
        for name, sub in getattr(cmd, "commands", {}).items():
            if not getattr(sub, "hidden", False):
                visit(sub, (*path, name))

    visit(root, ())
    return found


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    for k in list(env):
        if k in DROPPED_ENV or k.startswith("LONGCAT_TOOLS_"):
            del env[k]
    env.update(PINNED_ENV)
    return env


def render_all(env: dict[str, str] | None = None) -> dict[str, dict]:
    """The help of every command, rendered by the installed package in a pinned environment."""
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--dump"],
                       capture_output=True, text=True, env=child_env(env), cwd=DOCS)
    if r.returncode != 0:
        raise RuntimeError(f"rendering the CLI help failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout)


def blocks_in(text: str) -> list[str]:
    return [m["cmd"] for m in BLOCK.finditer(text)]


def prose(text: str) -> str:
    """The page without its generated blocks."""
    return BLOCK.sub("", text)


def regenerate(text: str, helps: dict[str, dict], keys: list[str]) -> str:
    """The page with every block of `keys` rewritten; missing ones appended at the end."""
    def fill(m: re.Match) -> str:
        key = m["cmd"]
        return format_block(key, helps[key]["help"]) if key in helps else m[0]

    out = BLOCK.sub(fill, text)
    missing = [k for k in keys if k not in blocks_in(text)]
    for key in missing:
        out = out.rstrip("\n") + f"\n\n## `{key.removesuffix(' --help')}`\n\n" + \
            format_block(key, helps[key]["help"]) + "\n"
    return out


def expected_pages(helps: dict[str, dict], docs: Path = DOCS) -> dict[Path, tuple[str, str]]:
    """{page: (text on disk, text it should have)} for every page a command belongs on."""
    by_page: dict[str, list[str]] = {}
    for key, info in helps.items():
        by_page.setdefault(page_for(tuple(info["path"])), []).append(key)
    pages = {}
    for name, keys in by_page.items():
        path = docs / name
        old = path.read_text() if path.exists() else f"# `{keys[0].removesuffix(' --help')}`\n"
        pages[path] = (old, regenerate(old, helps, keys))
    return pages


def short_diff(old: str, new: str, name: str, lines: int = 40) -> str:
    diff = list(difflib.unified_diff(old.splitlines(), new.splitlines(), f"{name} (docs)",
                                     f"{name} (CLI)", n=1, lineterm=""))
    more = f"\n... {len(diff) - lines} more lines" if len(diff) > lines else ""
    return "\n".join(diff[:lines]) + more


def main(argv: list[str]) -> int:
    if argv == ["--dump"]:
        print(json.dumps(_dump()))
        return 0
    check = argv == ["--check"]
    if argv and not check:
        print("usage: python docs/generate.py [--check]", file=sys.stderr)
        return 2
    stale = 0
    for path, (old, new) in expected_pages(render_all()).items():
        if old == new and path.exists():
            continue
        stale += 1
        if check:
            print(short_diff(old, new, path.name))
        else:
            path.write_text(new)
            print(f"updated {path.relative_to(DOCS.parent)}")
    if check and stale:
        print(f"{stale} page(s) out of date: run `python docs/generate.py`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
