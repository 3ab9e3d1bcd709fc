"""The verify report: independent checks, each pass, warn or fail with a file and a reason.

Checks never stop each other: a check that hits a LongcatError records it as its own failure and
the next check runs, so one report names every fault of a checkpoint, not only the first.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from longcat_tools.errors import LongcatError, UsageError

PASS, WARN, FAIL = "pass", "warn", "fail"
STATUSES = (PASS, WARN, FAIL)
MAX_LISTED = 4  # names quoted in one message before "and N more"


@dataclass(frozen=True)
class Check:
    component: str  # "checkpoint", "dit"/"transformer", "text_encoder", "vae", "lora", ...
    name: str  # what was checked: "files", "config", "index", "header", "shapes", ...
    status: str  # pass | warn | fail
    file: str  # relative to the checkpoint ("." for the folder itself)
    message: str


@dataclass
class Report:
    path: str
    layout: str | None = None
    flavour: str | None = None
    deep: bool = False
    strict: bool = False
    checks: list[Check] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def status(self) -> str:
        found = {c.status for c in self.checks}
        return FAIL if FAIL in found else WARN if WARN in found else PASS

    @property
    def ok(self) -> bool:
        """What the exit code says: no failure, and no warning under --strict."""
        return self.status == PASS or (self.status == WARN and not self.strict)

    def count(self, status: str) -> int:
        return sum(c.status == status for c in self.checks)

    def failures(self) -> list[Check]:
        bad = [c for c in self.checks if c.status == FAIL]
        return bad or ([c for c in self.checks if c.status == WARN] if self.strict else [])

    def to_json(self, tool: str | None = None) -> dict[str, Any]:
        """The document ``--json`` prints; valid against schemas/verify_report.schema.json."""
        doc: dict[str, Any] = {
            "path": self.path, "layout": self.layout, "flavour": self.flavour,
            "status": self.status, "ok": self.ok, "deep": self.deep, "strict": self.strict,
            "checks": [asdict(c) for c in self.checks],
            "summary": {s: self.count(s) for s in STATUSES} | self.stats,
            "seconds": round(self.seconds, 3),
        }
        if tool:
            doc["tool"] = tool
        return doc


def count(n: int, word: str) -> str:
    """``1 tensor``, ``2 tensors``, ``1,022 tensors``."""
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def listing(items: list[str] | set[str], limit: int = MAX_LISTED) -> str:
    """``a, b, c (and 7 more)``: enough names to act on, never a wall of text."""
    items = sorted(items) if isinstance(items, set) else list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")



def _at_path_start(prefix: str) -> re.Pattern[str]:
    """``prefix`` where a path starts (not inside another path: ``../vk/x`` keeps its ``vk/``)."""
    return re.compile(r"(?<![\w./~-])" + re.escape(prefix))


class Recorder:
    """Collects checks for one checkpoint and turns errors into failed checks."""

    def __init__(self, root: Path, report: Report, cache_roots: tuple[Path, ...] = ()):
        self.root = root
        self.report = report
        # Real folders files may resolve into: the checkpoint itself, or for a Hugging Face cache
        # snapshot its repo's cache folder (files are links into blobs/, hub.snapshot_roots).
        self.cache_roots = cache_roots
        self.allowed: tuple[Path, ...] = cache_roots or (root.resolve(),)
        # Other folders whose files rows name relative to the checkpoint (an avatar's base).
        self.aliases: tuple[tuple[Path, str], ...] = ()

    def beside(self, folder: Path, cache_roots: tuple[Path, ...] = ()) -> Recorder:
        """A recorder into the same report for a sibling folder of the checkpoint (an avatar's
        ``../LongCat-Video``): its files are contained in that folder and named
        ``../<folder>/...`` in the rows."""
        other = Recorder(self.root, self.report, cache_roots)
        other.allowed = cache_roots or (folder.resolve(),)
        other.aliases = ((folder, f"../{folder.name}"),)
        return other

    def rel(self, path: Path | str) -> str:
        p = Path(path)
        for folder, alias in self.aliases:
            try:
                return (Path(alias) / p.relative_to(folder)).as_posix()
            except ValueError:
                continue
        try:
            rel = p.relative_to(self.root)
        except ValueError:
            return str(p)
        return rel.as_posix() or "."

    def tidy(self, message: str, file: Path | str | None = None) -> str:
        """Drop the leading ``<file>: `` of a LongcatError (the row names the file) and write other
        paths inside the checkpoint relative to it."""
        if file is not None:
            for prefix in (f"{file}: ", f"{self.rel(file)}: "):
                if message.startswith(prefix):
                    message = message[len(prefix):]
                    break
        for folder, alias in self.aliases:
            message = _at_path_start(f"{folder}/").sub(lambda _, a=alias: f"{a}/", message)
        return _at_path_start(f"{self.root}/").sub("", message)

    def add(self, component: str, name: str, status: str, file: Path | str,
            message: str) -> Check:
        assert status in STATUSES
        c = Check(component, name, status, self.rel(file), self.tidy(message, file))
        self.report.checks.append(c)
        return c

    def ok(self, component: str, name: str, file: Path | str, message: str) -> Check:
        return self.add(component, name, PASS, file, message)

    def warn(self, component: str, name: str, file: Path | str, message: str) -> Check:
        return self.add(component, name, WARN, file, message)

    def fail(self, component: str, name: str, file: Path | str, message: str) -> Check:
        return self.add(component, name, FAIL, file, message)

    @contextmanager
    def guard(self, component: str, name: str, file: Path | str) -> Iterator[None]:
        """Run a check body; a LongcatError it raises becomes this check's failure."""
        try:
            yield
        except UsageError:  # the command line is wrong, not the checkpoint: exit 2
            raise
        except LongcatError as e:
            self.fail(component, name, file, str(e))
        except Exception as e:  # noqa: BLE001 - a gate fails closed, and the other checks still run
            self.fail(component, name, file, f"unexpected error ({type(e).__name__}: {e}); "
                      "please report it")
