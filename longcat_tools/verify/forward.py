"""``verify --forward``: one small DiT forward through the reference runner, as one more check.

The runner is a separate package (``runner``); it is imported only when asked for, so header and
deep checks never pay for it. Contract with it: ``runner.compare.forward_check(path, against=None)``
returns ``{"status": "pass"|"warn"|"fail", "message": str}`` (or raises LongcatError).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from longcat_tools.errors import UsageError
from longcat_tools.verify.report import FAIL, STATUSES, Recorder, Report

Checker = Callable[[Report, Path, "str | None"], None]


def forward_checker() -> Checker:
    """The --forward check, or a UsageError (exit 2) when the runner is not installed."""
    try:
        from runner.compare import forward_check
    except ImportError as e:
        raise UsageError(f"--forward needs the reference runner (runner.compare.forward_check), "
                         f"which this installation lacks ({e}); drop --forward or install the "
                         "full package") from None

    def check(report: Report, root: Path, against: str | None) -> None:
        rec = Recorder(Path(root), report)
        if report.status == FAIL:
            rec.add("transformer", "forward", FAIL, root, "not run: the checks above failed")
            return
        with rec.guard("transformer", "forward", root):
            res = forward_check(Path(root), against=Path(against) if against else None)
            status = res.get("status") if isinstance(res, dict) else None
            if status not in STATUSES:
                rec.add("transformer", "forward", FAIL, root,
                        f"runner returned {res!r}, not a status and message")
                return
            rec.add("transformer", "forward", status, root, str(res.get("message", "")))

    return check
