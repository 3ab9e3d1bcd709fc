"""Our Triton kernels' logic on the CPU, by Triton's interpreter (``interpreted_kernels.py``):
what the GPU tests check of the selection and of the fp8 statistics, between GPU runs. Triton
comes with torch's CUDA builds; the ``test`` extra installs it on Linux x86-64."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


@pytest.mark.parametrize("check", ["scales", "selection"])  # interpreted_kernels.CHECKS
def test_triton_kernels_under_the_interpreter(check):
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("interpreted_kernels.py")),
                          check], env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
