"""Guards for two faults no other test caught: `convert --force` must keep the old DST until the
new one is complete, and `verify --deep` must fail on a file its checksum list names but that is
missing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

from longcat_tools import convert as conv
from longcat_tools.cli import main

KILLED = -signal.SIGKILL


@pytest.fixture(scope="module")
def converted(tiny_native, tmp_path_factory):
    dst = tmp_path_factory.mktemp("conv") / "fv"
    conv.convert(tiny_native, dst)
    return dst


def _convert(src, dst, *extra, env=None):
    return subprocess.run([sys.executable, "-m", "longcat_tools", "convert", "--src", str(src),
                           "--dst", str(dst), "-q", *extra], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_force_keeps_the_old_output_until_the_new_one_is_complete(tiny_native, converted,
                                                                    tmp_path):
    """Killed anywhere before its end, `convert --force` leaves the previous DST as it was."""
    dst = tmp_path / "dst"
    shutil.copytree(converted, dst)
    marker = dst / "scheduler" / "marker.txt"  # inside a part: --force refuses files of yours
    marker.write_text("the previous output")
    steps = conv.plan(tiny_native, dst, force=True, keys="native").steps
    for k in sorted({1, steps // 3, 2 * steps // 3, steps - 1}):
        p = _convert(tiny_native, dst, "--force", "--keys", "native",
                     env={conv.ENV_KILL_AT: str(k)})
        assert p.returncode == KILLED, (k, p.returncode, p.stderr[-500:])
        assert marker.read_text() == "the previous output", k
        assert main(["verify", str(dst), "-q"]) == 0, k
    p = _convert(tiny_native, dst, "--force", "--keys", "native")
    assert p.returncode == 0, p.stderr
    assert not marker.exists()


def test_verify_deep_fails_on_a_listed_file_that_is_missing(converted, tmp_path, capsys):
    """A file the checksum list names but that is gone fails `verify --deep`, by name (no other
    check knows of this file, so only the list can catch it)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(converted, ckpt)
    listed = ckpt / "checksums.sha256"
    with listed.open("a") as f:
        f.write(f"{'0' * 64}  notes/readme.txt\n")
    for deep in ([], ["--deep"]):
        capsys.readouterr()
        assert main(["verify", str(ckpt), *deep, "--json", "-q"]) == 1, deep
        out = capsys.readouterr()
        assert "notes/readme.txt" in out.out and "missing" in out.out, deep
