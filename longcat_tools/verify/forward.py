"""``verify --forward``: one small DiT forward through the reference runner, as one more check.

The runner is a separate package (``runner``); it is imported only when asked for, so header and
deep checks never pay for it. Contract: ``runner.compare.forward_check(path, against=None)``
returns a dict with ``ok`` (bool) and ``problems`` (one line each), plus what it measured
(``layout``, ``output_shape``, ``rel_diff``, ``max_abs_diff`` with ``against``); a
``{"status", "message"}`` dict is read too. It may raise LongcatError.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from longcat_tools.errors import UsageError
from longcat_tools.verify.report import FAIL, PASS, STATUSES, Recorder, Report

Checker = Callable[[Report, Path, "str | None"], None]


def forward_checker() -> Checker:
    """The --forward check, or a UsageError (exit 2) when the runner is not installed."""
    try:
        from longcat_tools.runner.compare import forward_check
    except ImportError as e:
        raise UsageError(f"--forward needs the reference runner (runner.compare.forward_check), "
                         f"which this installation lacks ({e}); drop --forward or install the "
                         "full package") from None

    def check(report: Report, root: Path, against: str | None) -> None:
        rec = Recorder(Path(root), report)
        if report.status == FAIL:
            rec.add("transformer", "forward", FAIL, root, "not run: the checks above failed")
            return
        t0 = time.perf_counter()
        with rec.guard("transformer", "forward", root):
            res = forward_check(Path(root), against=Path(against) if against else None)
            status, message = _verdict(res)
            rec.add("transformer", "forward", status, root, message)
        report.seconds += time.perf_counter() - t0

    return check


def _verdict(res: object) -> tuple[str, str]:
    """(status, message) of the runner's answer."""
    if not isinstance(res, dict):
        return FAIL, f"runner returned {res!r}, not a report"
    if res.get("status") in STATUSES:
        return res["status"], str(res.get("message", ""))
    if "ok" not in res:
        return FAIL, f"runner returned {sorted(res)}, without ok/problems"
    if not res["ok"]:
        return FAIL, "; ".join(map(str, res.get("problems") or ["forward check failed"]))
    msg = (f"forward on the {res.get('layout', '?')} weights: output {res.get('output_shape')}, "
           "finite")
    if "against" in res:
        msg += (f"; against {res['against']}: relative difference {res.get('rel_diff', 0):.3g}, "
                f"max |diff| {res.get('max_abs_diff', 0):.3g}")
    return PASS, msg
