"""Our Triton kernels' logic on the CPU, by Triton's interpreter (``interpreted_kernels.py``):
what the GPU tests check of the selection, the sparse forward and the fp8 statistics, between
GPU runs. Triton comes with torch's CUDA builds; the ``test`` extra installs it on Linux x86-64."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def interpreter_takes_loaded_loop_bounds() -> bool:
    """Triton's interpreter before 3.9 gives a loaded scalar as a 1-element array, which
    NumPy 2.4 no longer turns into an int: the forward's loop bound (its list length)."""
    import numpy
    import triton

    def version(v: str) -> tuple[int, int]:
        return tuple(int(x) for x in v.split(".")[:2])  # type: ignore[return-value]

    return version(triton.__version__) >= (3, 9) or version(numpy.__version__) < (2, 4)


# interpreted_kernels.CHECKS
@pytest.mark.parametrize("check", ["forward", "scales", "selection", "fused_fp8", "fp8_key_scale"])
def test_triton_kernels_under_the_interpreter(check):
    if check in ("forward", "fp8_key_scale") and not interpreter_takes_loaded_loop_bounds():
        pytest.skip("this Triton's interpreter cannot run the forward under NumPy 2.4 (CI's can)")
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("interpreted_kernels.py")),
                          check], env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
