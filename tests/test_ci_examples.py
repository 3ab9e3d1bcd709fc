"""examples/ci: the pre-commit/CI script's contract and the GitHub Actions workflow's shape."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

CI = Path(__file__).resolve().parents[1] / "examples" / "ci"
SCRIPT = CI / "verify-checkpoint.sh"

FAKE = """#!/bin/sh
printf '%s\\n' "$@" > "$FAKE_ARGS"
cat "$FAKE_REPORT"
exit "$FAKE_RC"
"""


@pytest.fixture
def run_script(tmp_path):
    """Run the script with a fake `longcat-tools` on PATH that prints a given report."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "longcat-tools"
    fake.write_text(FAKE)
    fake.chmod(0o755)

    def run(report: object, rc: int, *args: str, extra: str = ""):
        (tmp_path / "report").write_text(report if isinstance(report, str)
                                         else json.dumps(report))
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
               "FAKE_REPORT": str(tmp_path / "report"), "FAKE_RC": str(rc),
               "FAKE_ARGS": str(tmp_path / "args"), "LONGCAT_REPORT_DIR": str(tmp_path / "out"),
               "LONGCAT_VERIFY_ARGS": extra}
        env.pop("LONGCAT_TOOLS_MODEL", None)
        p = subprocess.run(["sh", str(SCRIPT), *args], capture_output=True, text=True, env=env)
        called = (tmp_path / "args").read_text().split("\n")[:-1] if (
            tmp_path / "args").exists() else None
        return p, called

    return run


def test_a_good_report_passes_and_is_kept(run_script, tmp_path):
    good = {"ok": True, "checks": [{"name": "index", "status": "ok", "message": "fine"}]}
    p, called = run_script(good, 0, "meituan-longcat/LongCat-Video@main",
                           extra="--against-hub --manifest m.json")
    assert p.returncode == 0, p.stdout + p.stderr
    assert called == ["verify", "meituan-longcat/LongCat-Video@main", "--json",
                      "--against-hub", "--manifest", "m.json"]
    assert p.stdout.startswith("PASS meituan-longcat/LongCat-Video@main: verify exit 0")
    kept = tmp_path / "out" / "meituan-longcat_LongCat-Video_main.verify.json"
    assert json.loads(kept.read_text()) == good


def test_a_bad_report_fails_with_verify_exit_code_and_names_the_problem(run_script):
    bad = {"ok": False, "checks": [
        {"name": "shards", "status": "ok"},
        {"name": "hub", "status": "sha256",
         "message": "dit/diffusion_pytorch_model-00002-of-00006.safetensors: sha256 differs"}]}
    p, _ = run_script(bad, 1, "ckpt")
    assert p.returncode == 1
    assert "FAIL ckpt" in p.stdout and "1 problem(s)" in p.stdout
    assert "[sha256] dit/diffusion_pytorch_model-00002-of-00006.safetensors" in p.stdout


@pytest.mark.parametrize("report,rc,want", [
    ({"ok": False}, 0, 1),          # exit 0 but the report says no
    ("not json", 0, 1),             # unreadable report
    ("", 2, 2),                     # a usage error keeps its status
])
def test_the_script_never_passes_a_doubtful_report(run_script, report, rc, want):
    p, _ = run_script(report, rc, "ckpt")
    assert p.returncode == want and "FAIL ckpt" in p.stdout


def test_several_checkpoints_fail_if_any_fails(run_script, tmp_path):
    p, called = run_script({"ok": False}, 1, "a", "b")
    assert p.returncode == 1 and p.stdout.count("FAIL") == 2 and called[1] == "b"


def test_no_checkpoint_is_a_usage_error(run_script):
    p, called = run_script({"ok": True}, 0)
    assert p.returncode == 2 and called is None and "LONGCAT_TOOLS_MODEL" in p.stderr


def test_the_workflow_verifies_offline_fails_on_a_bad_report_and_keeps_it():
    doc = yaml.safe_load((CI / "verify-checkpoint.yml").read_text())
    triggers = doc.get("on", doc.get(True))  # YAML 1.1 reads a bare `on` as true
    assert {"workflow_dispatch", "workflow_call"} <= set(triggers)
    steps = doc["jobs"]["verify"]["steps"]
    uses = [s.get("uses", "").split("@")[0] for s in steps]
    for action in ("actions/checkout", "actions/setup-python", "actions/cache",
                   "actions/upload-artifact"):
        assert action in uses
    runs = "\n".join(s.get("run", "") for s in steps)
    assert "pip install longcat-tools" in runs.replace("python -m ", "")
    assert "longcat-tools download" in runs and "longcat-tools hub-manifest" in runs
    (verify,) = [s for s in steps if "longcat-tools verify" in s.get("run", "")]
    assert "--json > report.json" in verify["run"] and verify["env"]["HF_HUB_OFFLINE"] == "1"
    assert "|| true" not in verify["run"] and "continue-on-error" not in verify
    (cache,) = [s for s in steps if s.get("uses", "").startswith("actions/cache")]
    assert "huggingface" in cache["with"]["path"]
    (upload,) = [s for s in steps if s.get("uses", "").startswith("actions/upload-artifact")]
    assert upload["if"] == "always()" and "report.json" in upload["with"]["path"]
