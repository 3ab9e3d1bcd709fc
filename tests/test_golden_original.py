"""Our runner against golden outputs of the ORIGINAL LongCat-Video code (tests/golden/).

The goldens (tests/golden/original/) were made by ``tests/golden/generate.py`` from the
original's own classes (``LongCatVideoTransformer3DModel``, its LoRA utils,
``LongCatVideoPipeline``) on the checkpoint ``synth(path, "tiny", seed=0)``, fp32 on CPU;
tests/golden/README.md says how, and what was patched to run the original on a CPU. Here our
runner reruns every case from the saved inputs and settings and must give the same numbers
(fp32, rtol 1e-5, atol 1e-5 of the golden's largest magnitude).

Cases: the DiT forward (plain, condition frames, KV cache, each LoRA and both, BSA with sparsity,
with a CDF threshold, with both, with asymmetric q/k chunks, with condition frames), the same
plain forward and LoRAs from the converted (FastVideo keys) layout, and the final latents of
t2v, distill, i2v, vc (KV cache, no KV cache, distilled) and refine (with and without an image).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from longcat_tools.runner import load_pipeline, load_transformer

GOLDEN = Path(__file__).parent / "golden" / "original"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
DIT_CASES = MANIFEST["dit_cases"]
PIPELINE_CASES = MANIFEST["pipeline_cases"]
LORA_FILES = MANIFEST["lora_files"]
RTOL, ATOL_REL = 1e-5, 1e-5
ERRORS: dict[str, float] = {}  # case -> max relative error (printed with pytest -s)


def assert_matches(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = float(expected.abs().max())
    err = float((actual.float() - expected).abs().max()) / max(scale, 1e-30)
    ERRORS[name] = err
    print(f"\n{name}: max relative error {err:.3g} (largest |golden| {scale:.3g})")
    torch.testing.assert_close(
        actual.float(), expected, rtol=RTOL, atol=ATOL_REL * scale,
        msg=lambda m: f"{name}: our runner differs from the original (max relative error "
                      f"{err:.3g}, golden scale {scale:.3g})\n{m}")


@pytest.fixture(scope="module")
def ckpt(tiny_native):
    """The session's tiny checkpoint, checked file by file to be the one the goldens were made
    from (synth is reproducible byte for byte)."""
    want = MANIFEST["fixture"]["sha256"]
    root = Path(tiny_native)
    have = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    drift = [f"{rel}: not in the goldens' checkpoint" for rel in sorted(have - set(want))]
    for rel, digest in want.items():
        path = root / rel
        got = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
        if got != digest:
            drift.append(f"{rel}: {got[:16]} (goldens made from {digest[:16]})")
    if drift:
        pytest.fail("SYNTH DRIFT: `synth tiny seed 0` no longer writes the checkpoint the goldens "
                    "were generated from, so these comparisons say nothing about the runner. "
                    "Regenerate tests/golden (see tests/golden/README.md). Changed files:\n  "
                    + "\n  ".join(drift), pytrace=False)
    return root


@pytest.fixture(scope="module")
def golden_dit():
    return load_file(GOLDEN / "dit.safetensors")


@pytest.fixture(scope="module")
def golden_pipe():
    return load_file(GOLDEN / "pipelines.safetensors")


@pytest.fixture(scope="module")
def dit(ckpt):
    return load_transformer(ckpt, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def converted(ckpt, tmp_path_factory):
    from longcat_tools.cli import main

    dst = tmp_path_factory.mktemp("golden-converted") / "fastvideo"
    assert main(["convert", "--src", str(ckpt), "--dst", str(dst), "-q"]) == 0
    return dst


def run_dit_case(dit, root: Path, lora_paths: dict[str, Path], name: str,
                 g: dict[str, torch.Tensor]):
    """Our DiT on the saved inputs of one case; returns (output, kv cache or None)."""
    case = DIT_CASES[name]
    dit.disable_loras()
    dit.disable_bsa()
    names = []
    for kind, mult in case.get("loras") or []:
        dit.load_lora(str(lora_paths[kind]), kind, scale=mult)
        names.append(kind)
    if names:
        dit.enable_loras(names)
    if case.get("bsa"):
        dit.enable_bsa(case["bsa"])
    inp = lambda key: g[f"input/{key}"]  # noqa: E731
    try:
        with torch.no_grad():
            if case.get("kv"):
                xc = inp("x_kv_cond")
                n_c = xc.shape[2]
                empty = torch.zeros(1, 1, case["empty_text_len"], dit.dims.caption_channels)
                _, cache = dit(xc, torch.zeros(1, n_c), empty, return_kv=True,
                               skip_crs_attn=True)
                out = dit(inp("x_kv_noise"), inp("t_kv_noise"), inp("text_small"),
                          inp("mask_small"), num_cond_latents=n_c, kv_cache=cache)
                return out, cache
            out = dit(inp(case["x"]), inp(case["t"]), inp(case["text"]), inp(case["mask"]),
                      num_cond_latents=case.get("num_cond_latents", 0))
            return out, None
    finally:
        dit.disable_loras()
        dit.disable_bsa()


def native_loras(root: Path) -> dict[str, Path]:
    return {kind: root / rel for kind, rel in LORA_FILES.items()}


@pytest.mark.parametrize("name", list(DIT_CASES))
def test_dit_matches_the_original(dit, ckpt, golden_dit, name):
    out, cache = run_dit_case(dit, ckpt, native_loras(ckpt), name, golden_dit)
    assert_matches(f"dit/{name}", out, golden_dit[f"{name}/out"])
    if cache is not None:  # the cached K (post-norm, pre-RoPE) and V of every block
        for i, (k, v) in cache.items():
            assert_matches(f"dit/{name}/k{i}", k, golden_dit[f"{name}/k{i}"])
            assert_matches(f"dit/{name}/v{i}", v, golden_dit[f"{name}/v{i}"])


@pytest.mark.parametrize("name", ["plain", "lora_both", "bsa_cond"])
def test_converted_layout_matches_the_original(converted, golden_dit, name):
    """``convert`` (FastVideo keys, LoRAs in FastVideo format) then our runner: same numbers."""
    from longcat_tools.runner.lora import lora_path

    model = load_transformer(converted, device="cpu", dtype=torch.float32)
    loras = {"cfg_step": lora_path(converted, "distilled"),
             "refinement": lora_path(converted, "refinement")}
    out, _ = run_dit_case(model, converted, loras, name, golden_dit)
    assert_matches(f"converted/{name}", out, golden_dit[f"{name}/out"])


@pytest.fixture(scope="module")
def pipe(ckpt):
    return load_pipeline(ckpt, device="cpu", dtype="fp32")


def frames(g: dict[str, torch.Tensor], key: str) -> np.ndarray:
    return g[f"input/{key}"].numpy()


@pytest.mark.parametrize("name", list(PIPELINE_CASES))
def test_pipeline_final_latents_match_the_original(pipe, golden_pipe, name):
    c = PIPELINE_CASES[name]
    common = dict(height=c["height"], width=c["width"], steps=c["steps"], seed=c["seed"],
                  decode=False)
    if c["task"] == "t2v":
        r = pipe.t2v(c["prompt"], c.get("negative_prompt"), num_frames=c["num_frames"],
                     guidance=c["guidance"], distill=c.get("distill", False), **common)
    elif c["task"] == "i2v":
        r = pipe.i2v(Image.fromarray(frames(golden_pipe, c["image"])), c["prompt"],
                     c.get("negative_prompt"), num_frames=c["num_frames"],
                     guidance=c["guidance"], distill=c.get("distill", False), **common)
    elif c["task"] == "vc":
        r = pipe.vc(frames(golden_pipe, c["video"]), c["prompt"], c.get("negative_prompt"),
                    num_frames=c["num_frames"], num_cond_frames=c["num_cond_frames"],
                    guidance=c["guidance"], distill=c.get("distill", False),
                    use_kv_cache=c["use_kv_cache"], enhance_hf=c["enhance_hf"], **common)
    else:
        image = Image.fromarray(frames(golden_pipe, c["image"])) if c.get("image") else None
        r = pipe.refine(frames(golden_pipe, c["stage1"]), c["prompt"], image=image,
                        num_cond_frames=c.get("num_cond_frames", 0), t_thresh=c["t_thresh"],
                        bsa=c["bsa"], **common)
    assert [float(t) for t in pipe.scheduler.timesteps] == pytest.approx(c["timesteps"],
                                                                         rel=1e-6)
    assert_matches(f"pipeline/{name}", r.latents, golden_pipe[f"{name}/latents"])
