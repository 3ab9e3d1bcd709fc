"""``longcat-tools verify``: the CI gate that no incomplete, corrupt or hostile checkpoint passes.

``verify(path)`` returns a ``Report`` of independent checks (pass/warn/fail, file, reason);
``Report.to_json()`` is the ``--json`` document (schemas/verify_report.schema.json).
"""

from longcat_tools.verify.checkpoint import verify
from longcat_tools.verify.report import FAIL, PASS, WARN, Check, Report

__all__ = ["verify", "Check", "Report", "PASS", "WARN", "FAIL"]
