"""docs/ against the live CLI: each page's `--help` blocks are what the installed package prints,
every option is written about outside them, and the README and docs link only inside the repo.

The pages are found from this file (the checkout's docs/ next to tests/), the help comes from the
installed `longcat_tools`, so this runs the same against the wheel in CI. The fix for a failure
is almost always `python docs/generate.py`, then documenting any new flag.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _load_generator():
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


@pytest.fixture(scope="module")
def helps() -> dict[str, dict]:
    return gen.render_all()


def test_every_command_has_a_page_with_its_current_help(helps):
    assert "longcat-tools --help" in helps and "longcat-tools bsa enable --help" in helps
    problems = []
    known = set(helps)
    for page in sorted(DOCS.glob("*.md")):
        for key in gen.blocks_in(page.read_text()):
            if key not in known:
                problems.append(f"docs/{page.name}: a block for `{key}`, which is no command")
    for key, info in helps.items():
        page = DOCS / gen.page_for(tuple(info["path"]))
        if not page.exists():
            problems.append(f"`{key}`: no page docs/{page.name}")
            continue
        text = page.read_text()
        blocks = {m["cmd"]: m[0] for m in gen.BLOCK.finditer(text)}
        count = gen.blocks_in(text).count(key)
        if count != 1:
            problems.append(f"docs/{page.name}: {count} blocks for `{key}` (want 1)")
        elif blocks[key] != gen.format_block(key, info["help"]):
            problems.append(f"docs/{page.name}: `{key}` differs from the CLI:\n"
                            + gen.short_diff(blocks[key], gen.format_block(key, info["help"]),
                                             page.name, lines=20))
    assert not problems, ("the docs do not match the CLI (run `python docs/generate.py`):\n"
                          + "\n".join(problems))


def test_every_option_is_documented_outside_the_help_block(helps):
    missing = []
    for key, info in helps.items():
        page = DOCS / gen.page_for(tuple(info["path"]))
        if not page.exists():
            continue  # reported by the test above
        prose = gen.prose(page.read_text())
        for names in info["options"]:
            if not names or set(names) & gen.COMMON_OPTIONS:
                continue
            if not any(re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", prose) for n in names):
                missing.append(f"docs/{page.name}: `{key.removesuffix(' --help')}` "
                               f"{' / '.join(names)}")
    assert not missing, "options without a word in their page:\n" + "\n".join(missing)


def test_help_rendering_ignores_the_callers_terminal(helps, monkeypatch):
    """Width and colour settings of whoever runs the generator must not change a page."""
    for k, v in {"COLUMNS": "40", "LINES": "10", "TERMINAL_WIDTH": "40", "FORCE_COLOR": "1",
                 "CLICOLOR_FORCE": "1", "TERM": "xterm-256color", "TTY_COMPATIBLE": "1",
                 "LONGCAT_TOOLS_MODEL": "/nonexistent"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("NO_COLOR", raising=False)
    again = gen.render_all()
    assert {k: v["help"] for k, v in again.items()} == {k: v["help"] for k, v in helps.items()}
    for key, info in helps.items():
        assert "\x1b" not in info["help"], f"{key}: colour codes in the help"
        wide = [line for line in info["help"].splitlines() if len(line) > gen.WIDTH]
        assert not wide, f"{key}: lines wider than {gen.WIDTH} columns: {wide[:2]}"


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", ["README.md", *[f"docs/{p.name}" for p in DOCS.glob("*.md")]])
def test_links_stay_inside_the_repo_or_go_to_public_urls(page):
    text = (ROOT / page).read_text()
    bad = []
    for target in LINK.findall(text):
        if target.startswith(("https://", "http://", "#")):
            continue
        path = (ROOT / page).parent / target.split("#")[0]
        if not path.resolve().is_relative_to(ROOT) or not path.exists():
            bad.append(target)
    assert not bad, f"{page}: links that lead nowhere in the repo: {bad}"
    assert not re.search(r"\bSPEC\b|shared folder|\.\./shared", text), \
        f"{page}: refers to material outside the repo"
