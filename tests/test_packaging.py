"""The product as users get it: one import name in the wheel, beside transformers and diffusers.

CI (``.ci/run``) installs the built wheel into a fresh venv and runs this suite from an empty
folder with ``--import-mode=importlib``; it sets ``LONGCAT_TOOLS_TEST_INSTALLED=1`` and
``LONGCAT_TOOLS_TEST_WHEEL``. Run from a checkout, the wheel is built here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import longcat_tools

CHECKOUT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    given = os.environ.get("LONGCAT_TOOLS_TEST_WHEEL")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("wheel")
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir",
                        str(out), str(CHECKOUT)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    (found,) = out.glob("longcat_tools-*.whl")
    return found


def test_wheel_ships_one_top_level_name(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    tops = {n.split("/", 1)[0] for n in names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"longcat_tools"}, sorted(tops)
    assert len(dist_info) == 1
    # the data the commands read ship inside the package
    assert "longcat_tools/_data/schemas/transformer_config.schema.json" in names
    assert "longcat_tools/_data/examples/bsa_configs/config_720p_balanced.json" in names
    assert "longcat_tools/runner/dit.py" in names and "longcat_tools/kernels/reference.py" in names


@pytest.mark.skipif(os.environ.get("LONGCAT_TOOLS_TEST_INSTALLED") != "1",
                    reason="only meaningful when the suite runs against the installed wheel (CI)")
def test_suite_runs_against_the_installed_package():
    here = Path(longcat_tools.__file__).resolve()
    assert not here.is_relative_to(CHECKOUT), f"longcat_tools imported from the checkout: {here}"
    assert "site-packages" in here.parts


def test_transformers_and_diffusers_import_after_ours(tmp_path):
    """Hugging Face's own ``kernels`` package (a transformers 5 dependency) must stay theirs."""
    code = (
        "import longcat_tools, longcat_tools.runner, longcat_tools.kernels\n"
        "from longcat_tools.runner import load_pipeline, load_transformer\n"
        "from transformers import UMT5EncoderModel\n"
        "import diffusers\n"
        "from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler\n"
        "import importlib.util\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "assert spec is None or 'longcat_tools' not in (spec.origin or ''), spec.origin\n"
        "print('ok')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == "ok"
