"""Our avatar DiT against goldens of the ORIGINAL ``LongCatVideoAvatarTransformer3DModel``.

The goldens (tests/golden/original_avatar/dit/) were made by ``tests/golden/generate_avatar.py``
on tiny checkpoints from ``synth --model avatar-1.0`` (fp32) and ``avatar-1.5`` (bf16), fp32 on
the CPU (tests/golden/README.md). Every case reruns here from the saved inputs and must give the
same numbers (rtol 1e-5, atol 1e-5 of the golden's largest magnitude): 1.0 one speaker with a
reference latent and its masked window, 1.0 two speakers (with and without the KV cache), 1.5
one speaker, text+audio only, three speakers with an "others" mask, the KV cache (K/V compared
too), BSA with and without the reference window, and the INT8 folder.

Beyond the goldens: the model's tensors are ``model.avatar``'s table, a native state dict loads
strictly, the audio is not a no-op, and bad audio input is one clear error.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from longcat_tools.errors import LongcatError
from longcat_tools.model import avatar, keymap
from longcat_tools.runner.avatar_dit import (
    LongCatVideoAvatarTransformer3DModel,
    load_avatar_transformer,
)
from longcat_tools.runner.int8_linear import Int8Linear
from longcat_tools.synth import synth

pytest.importorskip("onnx")  # synth writes the avatar's vocal separator with it

GOLDEN = Path(__file__).parent / "golden" / "original_avatar" / "dit"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
CASES = MANIFEST["cases"]
RTOL, ATOL_REL = 1e-5, 1e-5


def assert_matches(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = float(expected.abs().max())
    err = float((actual.float() - expected).abs().max()) / max(scale, 1e-30)
    print(f"\n{name}: max relative error {err:.3g} (largest |golden| {scale:.3g})")
    torch.testing.assert_close(
        actual.float(), expected, rtol=RTOL, atol=ATOL_REL * scale,
        msg=lambda m: f"{name}: our avatar DiT differs from the original (max relative error "
                      f"{err:.3g})\n{m}")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The goldens' synth trees, checked file by file against the manifest."""
    root = tmp_path_factory.mktemp("avatar-golden")
    for model, s in MANIFEST["fixture"]["synth"].items():
        synth(root / model, s["preset"], model=model, seed=s["seed"], dtype=s["dtype"])
    drift = []
    for rel, digest in MANIFEST["fixture"]["sha256"].items():
        path = root / rel
        got = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
        if got != digest:
            drift.append(f"{rel}: {got[:16]} (goldens made from {digest[:16]})")
    if drift:
        pytest.fail("SYNTH DRIFT: synth no longer writes the avatar checkpoints the goldens were "
                    "made from; regenerate tests/golden/original_avatar (tests/golden/README.md)."
                    "\n  " + "\n  ".join(drift), pytrace=False)
    return root


@pytest.fixture(scope="module")
def golden():
    return load_file(GOLDEN / "dit.safetensors")


_MODELS: dict[str, LongCatVideoAvatarTransformer3DModel] = {}


def model_for(weights: Path, folder: str) -> LongCatVideoAvatarTransformer3DModel:
    if folder not in _MODELS:
        _MODELS[folder] = load_avatar_transformer(weights / folder)
    return _MODELS[folder]


def run_case(dit, c: dict, g: dict[str, torch.Tensor], name: str):
    """Our model on a case's saved inputs, called as the generator called the original."""
    inp = lambda k: g.get(f"{name}/input/{k}")  # noqa: E731
    ref = c.get("ref")
    kw = dict(num_ref_latents=1 if ref else None, ref_img_index=ref[0] if ref else None,
              bsa=dit.bsa if c.get("bsa") is None else _bsa(c["bsa"]))
    masks, x, t, audio = inp("masks"), inp("x"), inp("t"), inp("audio")
    if c.get("kv"):
        ncl = c["ncl"]
        cond_audio = audio if masks is not None else audio[:1]
        caption = dit.dims.caption_channels
        _, cache = dit(x[:1, :, :ncl], torch.zeros(1, ncl),
                       torch.zeros(1, 1, c["text_len"], caption), num_cond_latents=ncl,
                       return_kv=True, skip_crs_attn=True, audio_embs=cond_audio, **kw)
        out = dit(x[:, :, ncl:], t[:, ncl:], inp("text"), inp("mask"), num_cond_latents=ncl,
                  kv_cache=cache, audio_embs=audio, mask_frame_range=ref[1] if ref else None,
                  ref_target_masks=masks, **kw)
        return out, cache
    out = dit(x, t, inp("text"), inp("mask"), num_cond_latents=c["ncl"], audio_embs=audio,
              mask_frame_range=ref[1] if ref else None, ref_target_masks=masks, **kw)
    return out, None


def _bsa(params: dict):
    from longcat_tools.runner.attention import BSAParams

    return BSAParams.from_config(params)


@pytest.mark.parametrize("name", list(CASES))
def test_avatar_dit_matches_the_original(weights, golden, name):
    c = CASES[name]
    dit = model_for(weights, c["folder"])
    with torch.no_grad():
        out, cache = run_case(dit, c, golden, name)
    assert_matches(name, out, golden[f"{name}/out"])
    if cache is not None:  # per block: K after q/k-norm, before RoPE, and V
        for i, (k, v) in cache.items():
            assert_matches(f"{name}/k{i}", k, golden[f"{name}/k{i}"])
            assert_matches(f"{name}/v{i}", v, golden[f"{name}/v{i}"])


def test_int8_folder_keeps_int8_weights(weights):
    dit = model_for(weights, CASES["v15_int8_ref"]["folder"])
    qkv = dit.blocks[0].attn.qkv
    assert isinstance(qkv, Int8Linear) and qkv.weight_int8.dtype == torch.int8
    assert isinstance(dit.audio_proj.proj1, Int8Linear)
    assert not isinstance(dit.final_layer.linear, Int8Linear)  # the format keeps it
    assert isinstance(dit.final_layer.adaLN_modulation[1], Int8Linear)


# ---- beyond the goldens -----------------------------------------------------------------------
@pytest.mark.parametrize("folder", ["v10_multi_ref", "v15_at2v"])
def test_tensors_are_the_tables_and_load_strictly(weights, folder):
    """Our state dict has exactly the tensors of ``model.avatar``'s table, with its shapes, and
    a native folder's tensors load into a fresh model with strict=True."""
    c = CASES[folder]
    cfg = json.loads((weights / c["folder"] / "config.json").read_text())
    table = dict(avatar.tensor_specs(keymap.dit_dims(cfg), avatar.audio_dims(cfg)))
    fresh = LongCatVideoAvatarTransformer3DModel.from_config(cfg)
    assert {k: tuple(v.shape) for k, v in fresh.state_dict().items()} == table
    native = {}
    for shard in (weights / c["folder"]).glob("*.safetensors"):
        native.update(load_file(shard))
    fresh.load_state_dict(native, strict=True)
    loaded = model_for(weights, c["folder"]).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in fresh.state_dict().items())


def test_prenorm_config_adds_its_norms():
    from longcat_tools.synth_avatar import avatar_dit_config

    cfg = {**avatar_dit_config("avatar-1.5", "tiny"), "audio_prenorm": True}
    model = LongCatVideoAvatarTransformer3DModel.from_config(cfg)
    keys = set(model.state_dict())
    assert {"blocks.0.pre_audio_crs_attn_norm.weight",
            "blocks.0.pre_audio_crs_attn_norm.bias"} <= keys
    assert keys == {n for n, _ in avatar.tensor_specs(keymap.dit_dims(cfg),
                                                      avatar.audio_dims(cfg))}


def _small_inputs(golden):
    g = lambda k: golden[f"v15_at2v/input/{k}"]  # noqa: E731
    return g("x"), g("t"), g("text"), g("mask"), g("audio")


def test_audio_changes_the_output(weights, golden):
    """The audio cross-attention is computed (the original's no-flash-attn path would return
    its input unchanged): silent audio gives another prediction."""
    dit = model_for(weights, CASES["v15_at2v"]["folder"])
    x, t, text, mask, audio = _small_inputs(golden)
    with torch.no_grad():
        a = dit(x, t, text, mask, audio_embs=audio)
        b = dit(x, t, text, mask, audio_embs=torch.zeros_like(audio))
    assert (a - b).abs().max() > 1e-3 * a.abs().max()


def test_missing_or_misshapen_audio_is_one_clear_error(weights, golden):
    dit = model_for(weights, CASES["v15_at2v"]["folder"])
    x, t, text, mask, audio = _small_inputs(golden)
    with torch.no_grad():
        with pytest.raises(LongcatError, match="needs audio_embs"):
            dit(x, t, text, mask)
        with pytest.raises(LongcatError, match=r"audio_embs \[2, 9, 5, 4, 32\]"):
            dit(x, t, text, mask, audio_embs=audio[:, :, :, :4])
        with pytest.raises(LongcatError, match="cover 2 latent frames"):
            dit(x, t, text, mask, audio_embs=audio[:, :5])
        with pytest.raises(LongcatError, match="batch 1"):
            dit(x, t, text, mask, audio_embs=audio[:1])
        with pytest.raises(LongcatError, match="reference latent"):
            dit(x, t, text, mask, audio_embs=audio, num_cond_latents=2)
        # a KV pre-pass skips cross-attention, so the audio may be left out
        dit(x[:1, :, :2], torch.zeros(1, 2), text[:1], num_cond_latents=2, num_ref_latents=1,
            ref_img_index=3, return_kv=True, skip_crs_attn=True)


def test_a_lora_on_int8_weights_runs_beside_them(tmp_path):
    """The DMD LoRA on base_model_int8: at run time around each INT8 layer (as the original's
    LoRA network wraps its QuantizedLinear), the same numbers as on float weights equal to
    q * s."""
    from longcat_tools.model import int8
    from longcat_tools.runner.avatar_dit import load_avatar_transformer
    from longcat_tools.synth import synth

    synth(tmp_path / "w", "tiny", model="avatar-1.5")
    root = tmp_path / "w" / "LongCat-Video-Avatar-1.5"
    lora = str(root / "lora" / "dmd_lora.safetensors")
    q8 = load_avatar_transformer(root / "base_model_int8", dtype="fp32")
    flt = load_avatar_transformer(root / "base_model", dtype="fp32")
    sd = q8.state_dict()
    with torch.no_grad():
        for name, p in flt.named_parameters():
            module, _, param = name.rpartition(".")
            if f"{module}.weight_int8" in sd and param == "weight":
                p.copy_(int8.dequantize(sd[f"{module}.weight_int8"],
                                        sd[f"{module}.weight_scale"], torch.float32))
            elif f"{module}.weight_int8" in sd:  # the format keeps these biases in bf16
                p.copy_(sd[name])
    flt.lora_mode = "runtime"
    outs = []
    for model in (q8, flt):
        model.load_lora(lora, "dmd")
        model.enable_loras(["dmd"])
        assert model.active_loras == ["dmd"] and model.merged_loras == []
        g = torch.Generator().manual_seed(0)
        d, a = model.dims, model.audio
        x = torch.randn(1, d.in_channels, 3, 4, 4, generator=g)
        y = torch.randn(1, 1, 6, d.caption_channels, generator=g)
        audio = torch.randn(1, 9, a.audio_window, a.audio_block, a.audio_channel, generator=g)
        with torch.no_grad():
            outs.append(model(x, torch.tensor([500.0]), y, torch.ones(1, 6, dtype=torch.long),
                              audio_embs=audio))
    assert q8.blocks[0].attn.qkv.loras  # the adapter sits on the INT8 layer
    rel = ((outs[0] - outs[1]).norm() / outs[1].norm()).item()
    assert rel < 1e-6, rel

def test_to_int8_on_loaded_weights_equals_the_int8_folder(tmp_path):
    from longcat_tools.runner.avatar_dit import load_avatar_transformer
    from longcat_tools.synth import synth

    synth(tmp_path / "w", "tiny", model="avatar-1.5")
    root = tmp_path / "w" / "LongCat-Video-Avatar-1.5"
    model = load_avatar_transformer(root / "base_model", dtype="fp32")
    model.to_int8()
    stored = load_avatar_transformer(root / "base_model_int8", dtype="fp32")
    a, b = model.state_dict(), stored.state_dict()
    assert set(a) == set(b)
    for name in a:
        if name.endswith(("weight_int8", "weight_scale")):
            assert torch.equal(a[name], b[name]), name
