"""Our avatar tasks (``runner.avatar_pipeline``) against the ORIGINAL ``generate_at2v`` /
``generate_ai2v`` / ``generate_avc``: final latents, fp32 on the CPU.

The goldens (tests/golden/original_avatar/pipelines/) were made by
``tests/golden/generate_avatar_pipeline.py`` on tiny fp32 trees from ``synth --model avatar-1.0``
and ``avatar-1.5`` with fixed audio embeddings and per-case seeds: 1.0 at2v, ai2v with two
speakers (avatar_multi), avc with the KV cache and a masked reference window; 1.5 at2v, ai2v
(text guidance 1, audio 4), avc without the cache, avc with two speakers, and distillation (the
DMD LoRA, 8 steps) for at2v and avc. Each must match to 1e-5 of the golden's largest magnitude.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from longcat_tools.runner.avatar_pipeline import LongCatVideoAvatarPipeline
from longcat_tools.synth import synth

pytest.importorskip("onnx")  # synth writes the avatar's vocal separator with it

GOLDEN = Path(__file__).parent / "golden" / "original_avatar" / "pipelines"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
CASES = MANIFEST["cases"]
RTOL = 1e-5


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("avatar-pipeline-golden")
    for model, s in MANIFEST["fixture"]["synth"].items():
        synth(root / model, s["preset"], model=model, seed=s["seed"], dtype=s["dtype"])
    drift = [rel for rel, digest in MANIFEST["fixture"]["sha256"].items()
             if not (root / rel).is_file()
             or hashlib.sha256((root / rel).read_bytes()).hexdigest() != digest]
    if drift:
        pytest.fail(f"SYNTH DRIFT: {drift[0]} differs from the goldens' fixture; regenerate "
                    "tests/golden/original_avatar/pipelines", pytrace=False)
    return root


@pytest.fixture(scope="module")
def golden():
    return load_file(GOLDEN / "pipelines.safetensors")


_PIPES: dict[tuple[str, str], LongCatVideoAvatarPipeline] = {}


def pipe_for(weights: Path, model: str, folder: str) -> LongCatVideoAvatarPipeline:
    if (model, folder) not in _PIPES:
        sub = "LongCat-Video-Avatar" + ("-1.5" if model == "avatar-1.5" else "")
        _PIPES[(model, folder)] = LongCatVideoAvatarPipeline.from_pretrained(
            weights / model / sub, speakers=2 if folder == "avatar_multi" else 1, audio=False)
    return _PIPES[(model, folder)]


@pytest.mark.parametrize("name", list(CASES))
def test_avatar_task_matches_the_original(weights, golden, name):
    c = CASES[name]
    pipe = pipe_for(weights, c["model"], c["folder"])
    pipe.transformer.lora_mode = "runtime"  # the original adds the LoRA in every forward
    inp = {k.split("/input/")[1]: v for k, v in golden.items() if k.startswith(f"{name}/input/")}
    h, w = c["size"]
    kw = dict(prompt=c["prompt"], negative_prompt=c["negative_prompt"], num_frames=c["frames"],
              steps=c["steps"], guidance=c["tg"], audio_guidance=c["ag"],
              distill=c.get("distill", False), seed=c["seed"], audio_emb=inp["audio"],
              decode=False, height=h, width=w)
    if c["task"] == "at2v":
        r = pipe.at2v(**kw)
    elif c["task"] == "ai2v":
        r = pipe.ai2v(Image.fromarray(inp["image"].numpy()),
                      ref_target_masks=inp.get("masks"), **kw)
    else:
        r = pipe.avc([Image.fromarray(f) for f in inp["video"].numpy()],
                     num_cond_frames=c["cond"], use_kv_cache=c["kv"],
                     ref_latent=inp["ref_latent"], video_latent=inp["video_latent"],
                     ref_img_index=c["ref"][0], mask_frame_range=c["ref"][1],
                     ref_target_masks=inp.get("masks"), **kw)
    expected = golden[f"{name}/latents"]
    scale = float(expected.abs().max())
    err = float((r.latents.float() - expected).abs().max()) / scale
    print(f"\n{name}: max relative error {err:.3g}")
    assert tuple(r.latents.shape) == tuple(expected.shape)
    torch.testing.assert_close(r.latents.float(), expected, rtol=RTOL, atol=RTOL * scale)
