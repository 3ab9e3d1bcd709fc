"""synth --model avatar-1.0|avatar-1.5: the hub layouts, the avatar DiT's tensors, the INT8 copy.

Expected names, shapes and numbers are written out here from the original's constructor, not taken
from longcat_tools.model.avatar.
"""

import json
import math
import subprocess
import sys

import pytest
import torch

from longcat_tools.errors import LongcatError
from longcat_tools.io.safetensors import read_header, read_tensor
from longcat_tools.model import keymap
from longcat_tools.synth import synth

pytest.importorskip("onnx")

BASE_FILES = ["model_index.json", "config.json", "dit/config.json",
              "dit/diffusion_pytorch_model.safetensors.index.json",
              "lora/cfg_step_lora.safetensors", "lora/refinement_lora.safetensors",
              "scheduler/scheduler_config.json", "tokenizer/tokenizer.json",
              "tokenizer/tokenizer_config.json", "text_encoder/config.json",
              "text_encoder/model.safetensors.index.json", "vae/config.json",
              "vae/diffusion_pytorch_model.safetensors"]
DIT = ["config.json", "diffusion_pytorch_model.safetensors.index.json"]
AVATAR_FILES = {
    "avatar-1.0": ("LongCat-Video-Avatar", [
        *(f"{d}/{f}" for d in ("avatar_single", "avatar_multi") for f in DIT),
        "chinese-wav2vec2-base/config.json", "chinese-wav2vec2-base/pytorch_model.bin",
        "chinese-wav2vec2-base/preprocessor_config.json", "vocal_separator/Kim_Vocal_2.onnx"]),
    "avatar-1.5": ("LongCat-Video-Avatar-1.5", [
        "config.json", "model_index.json", *(f"base_model/{f}" for f in DIT),
        "base_model_int8/config.json", "base_model_int8/quantization_config.json",
        "base_model_int8/quantized_model.safetensors.index.json",
        "lora/dmd_lora.safetensors", "scheduler/scheduler_config.json",
        "whisper-large-v3/config.json", "whisper-large-v3/generation_config.json",
        "whisper-large-v3/model.safetensors", "whisper-large-v3/preprocessor_config.json",
        "vocal_separator/Kim_Vocal_2.onnx"]),
}

# tiny preset: hidden 64, 2 heads (head dim 32), t-embed 32, 2 blocks; audio tokens 4 x 32,
# audio_proj width 32, audio encoder width 32; window 5 (+3 for later frames)
H, HD, CT, DO, I_, M, CA = 64, 32, 32, 32, 32, 4, 32
AUDIO_BLOCKS = {"avatar-1.0": 12, "avatar-1.5": 5}


def expected_extras(model):
    s = AUDIO_BLOCKS[model]
    per_block = {
        "audio_adaLN_modulation.1.weight": (3 * H, CT), "audio_adaLN_modulation.1.bias": (3 * H,),
        "pre_video_crs_attn_norm.weight": (H,), "pre_video_crs_attn_norm.bias": (H,),
        "audio_cross_attn.q_linear.weight": (H, H), "audio_cross_attn.q_linear.bias": (H,),
        "audio_cross_attn.q_norm.weight": (HD,), "audio_cross_attn.k_norm.weight": (HD,),
        "audio_cross_attn.kv_linear.weight": (2 * H, DO),
        "audio_cross_attn.kv_linear.bias": (2 * H,),
        "audio_cross_attn.proj.weight": (H, H), "audio_cross_attn.proj.bias": (H,),
    }
    out = {f"blocks.{i}.{k}": v for i in range(2) for k, v in per_block.items()}
    out.update({
        "audio_proj.proj1.weight": (I_, 5 * s * CA), "audio_proj.proj1.bias": (I_,),
        "audio_proj.proj1_vf.weight": (I_, 8 * s * CA), "audio_proj.proj1_vf.bias": (I_,),
        "audio_proj.proj2.weight": (I_, I_), "audio_proj.proj2.bias": (I_,),
        "audio_proj.proj3.weight": (M * DO, I_), "audio_proj.proj3.bias": (M * DO,),
        "audio_proj.norm.weight": (DO,), "audio_proj.norm.bias": (DO,),
    })
    return out


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("avatar")
    return {"avatar-1.0": synth(root / "v10", "tiny", model="avatar-1.0").path,
            "avatar-1.5": synth(root / "v15", "tiny", model="avatar-1.5", dtype="bf16").path}


def _folder(trees, model):
    return trees[model] / AVATAR_FILES[model][0]


def _read_all(folder, index_name):
    index = json.loads((folder / index_name).read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        h = read_header(folder / shard)
        with open(h.path, "rb") as f:
            for name, info in h.tensors.items():
                out[name] = (info, read_tensor(f, info))
    assert set(out) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(i.nbytes for i, _ in out.values())
    return out


@pytest.mark.parametrize("model", ["avatar-1.0", "avatar-1.5"])
def test_layout_is_complete(trees, model):
    root = trees[model]
    assert sorted(p.name for p in root.iterdir()) == sorted(["LongCat-Video",
                                                             AVATAR_FILES[model][0]])
    base = {p.relative_to(root / "LongCat-Video").as_posix()
            for p in (root / "LongCat-Video").rglob("*") if p.is_file()}
    assert set(BASE_FILES) <= base
    folder = _folder(trees, model)
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert set(AVATAR_FILES[model][1]) <= names
    for sub in ("avatar_single", "avatar_multi", "base_model"):
        if (folder / sub).is_dir():
            assert any(n.startswith(f"{sub}/diffusion_pytorch_model-00001-of-") for n in names)
    if model == "avatar-1.5":
        assert any(n.startswith("base_model_int8/quantized_model-00001-of-") for n in names)
    else:  # 1.0 reads the base folder's scheduler
        assert not (folder / "scheduler").exists()


@pytest.mark.parametrize("model,sub", [("avatar-1.0", "avatar_single"),
                                       ("avatar-1.0", "avatar_multi"),
                                       ("avatar-1.5", "base_model")])
def test_avatar_dit_keys_are_the_base_plus_the_audio_tensors(trees, model, sub):
    folder = _folder(trees, model) / sub
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["_class_name"] == "LongCatVideoAvatarTransformer3DModel"
    tensors = _read_all(folder, "diffusion_pytorch_model.safetensors.index.json")
    base = dict(keymap.native_tensor_specs(keymap.dit_dims(cfg)))
    expected = {**base, **expected_extras(model)}
    assert {n: i.shape for n, (i, _) in tensors.items()} == expected
    assert all(torch.isfinite(t.float()).all() for _, t in tensors.values())


def test_configs_follow_each_release(trees):
    c10 = json.loads((_folder(trees, "avatar-1.0") / "avatar_single/config.json").read_text())
    c15 = json.loads((_folder(trees, "avatar-1.5") / "base_model/config.json").read_text())
    # 1.0's class had no audio_block: its 12 layers come from the default; the tiny width differs
    assert "audio_block" not in c10 and c10["audio_channel"] == CA
    assert c15["audio_block"] == 5 and c15["audio_channel"] == CA
    for c in (c10, c15):
        assert (c["audio_window"], c["vae_scale"], c["context_tokens"], c["output_dim"],
                c["intermediate_dim"], c["audio_prenorm"]) == (5, 4, M, DO, I_, False)
        assert c["enable_flashattn2"] is True  # the audio cross-attention has no other path
    from longcat_tools.synth_avatar import avatar_dit_config

    real10 = avatar_dit_config("avatar-1.0", "real")
    assert "audio_block" not in real10 and "audio_channel" not in real10
    real15 = avatar_dit_config("avatar-1.5", "real")
    assert (real15["audio_block"], real15["audio_channel"], real15["output_dim"],
            real15["intermediate_dim"], real15["context_tokens"]) == (5, 1280, 768, 512, 32)


def test_int8_is_the_quantized_base_model(trees):
    folder = _folder(trees, "avatar-1.5")
    base = _read_all(folder / "base_model", "diffusion_pytorch_model.safetensors.index.json")
    q = _read_all(folder / "base_model_int8", "quantized_model.safetensors.index.json")
    assert json.loads((folder / "base_model_int8/quantization_config.json").read_text()) == {
        "quantization_method": "int8_per_channel_symmetric",
        "skip_patterns": ["final_layer.linear"],
        "description": "Weight-only INT8 quantization with per-channel symmetric scaling"}
    assert ((folder / "base_model_int8/config.json").read_text()
            == (folder / "base_model/config.json").read_text())
    linears = [n[:-len(".weight")] for n, (i, _) in base.items()
               if n.endswith(".weight") and len(i.shape) == 2]
    assert "final_layer.linear" in linears and "blocks.1.audio_cross_attn.kv_linear" in linears
    for m in linears:
        w_info, w = base[f"{m}.weight"]
        assert w_info.dtype == "BF16"
        if m == "final_layer.linear":
            assert f"{m}.weight_int8" not in q and torch.equal(q[f"{m}.weight"][1], w)
            continue
        assert f"{m}.weight" not in q
        qi, qt = q[f"{m}.weight_int8"]
        si, st = q[f"{m}.weight_scale"]
        assert qi.dtype == "I8" and qi.shape == w_info.shape
        assert si.dtype == "F32" and si.shape == (w_info.shape[0],) and (st > 0).all()
        wf = w.float()
        scale = wf.abs().amax(dim=1).clamp(min=1e-8) / 127
        assert torch.equal(st, scale)
        assert torch.equal(qt, torch.round(wf / scale[:, None]).clamp(-128, 127).to(torch.int8))
        deq = qt.float() * st[:, None]
        assert ((deq - wf).abs() <= st[:, None] / 2 + 1e-7).all()
        assert torch.allclose(deq, wf, rtol=0, atol=float(wf.abs().max()) / 127)
        if f"{m}.bias" in base:
            bi, bt = q[f"{m}.bias"]
            assert bi.dtype == "BF16" and torch.equal(bt, base[f"{m}.bias"][1])
    others = {n for n in base if n.rpartition(".")[0] not in linears or n.startswith(
        "final_layer.linear")}
    assert all(torch.equal(q[n][1], base[n][1]) for n in others)
    assert len(q) == len(base) + sum(m != "final_layer.linear" for m in linears)


def test_dmd_lora_targets_every_block(trees):
    h = read_header(_folder(trees, "avatar-1.5") / "lora/dmd_lora.safetensors")
    modules = {"attn.qkv": 3, "attn.proj": 1, "cross_attn.q_linear": 1,
               "cross_attn.kv_linear": 2, "ffn.w1": 1, "ffn.w2": 1, "ffn.w3": 1}
    assert len(h.tensors) == 2 * sum(2 + n for n in modules.values())
    down = h.tensors["lora___lorahyphen___blocks___lorahyphen___1___lorahyphen___attn"
                     "___lorahyphen___proj.lora_down.weight"]
    assert down.shape == (4, H)  # the tiny preset's rank
    with open(h.path, "rb") as f:
        alphas = {read_tensor(f, i).item() for n, i in h.tensors.items()
                  if n.endswith("alpha_scale")}
    assert alphas == {0.5}  # alpha 64 over rank 128


def test_audio_encoders_load_with_transformers(trees):
    from transformers import (
        AutoFeatureExtractor,
        Wav2Vec2Config,
        Wav2Vec2Model,
        WhisperModel,
    )

    w2v = _folder(trees, "avatar-1.0") / "chinese-wav2vec2-base"
    sd = torch.load(w2v / "pytorch_model.bin", weights_only=True)
    assert all(k.startswith("wav2vec2.") for k in sd)
    assert "wav2vec2.encoder.pos_conv_embed.conv.weight_g" in sd
    model = Wav2Vec2Model(Wav2Vec2Config.from_pretrained(w2v))
    model.load_state_dict({k.removeprefix("wav2vec2."): v for k, v in sd.items()}, strict=True)
    assert model.config.num_hidden_layers == 12 and model.config.hidden_size == CA

    wh = _folder(trees, "avatar-1.5") / "whisper-large-v3"
    model, info = WhisperModel.from_pretrained(wh, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.encoder_layers == 32 and model.config.max_source_positions == 1500
    fe = AutoFeatureExtractor.from_pretrained(wh)
    mel = fe(torch.zeros(16000).numpy(), sampling_rate=16000, return_tensors="pt").input_features
    assert mel.shape == (1, 128, 3000)
    with torch.no_grad():
        hs = model.encoder(mel.to(model.dtype), output_hidden_states=True).hidden_states
    assert len(hs) == 33 and hs[-1].shape == (1, 1500, CA)


@pytest.mark.parametrize("model", ["avatar-1.0", "avatar-1.5"])
def test_vocal_separator_runs_in_onnxruntime(trees, model):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(_folder(trees, model) / "vocal_separator/Kim_Vocal_2.onnx"),
                                providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert inp.name == "input" and inp.shape[1:] == [4, 3072, 256]
    spec = torch.randn(1, 4, 3072, 256).numpy()
    out = sess.run(None, {"input": spec})[0]
    assert out.shape == spec.shape and out.dtype == spec.dtype
    assert abs(out).sum() > 0 and (abs(out) <= abs(spec) + 1e-6).all()  # a soft mask


def test_real_sparse_counts():
    """15.9 B parameters: the base's 13,581,071,424 plus, per block, 3H*Ct + 3H + 2H + 2(H^2+H)
    + 2H*Do + 2H + 2hd, plus audio_proj (whisper: 5 groups x 1280)."""
    h, ct, do, hd, i_, m = 4096, 512, 768, 128, 512, 32
    per_block = 3 * h * ct + 3 * h + 2 * h + 2 * (h * h + h) + 2 * h * do + 2 * h + 2 * hd
    s_ca = 5 * 1280
    proj = i_ * 5 * s_ca + i_ + i_ * 8 * s_ca + i_ + i_ * i_ + i_ + m * do * i_ + m * do + 2 * do
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        r = synth(Path(d) / "w", "real", model="avatar-1.5", sparse=True)
        assert r.dit_parameters == 13_581_071_424 + 48 * per_block + proj
        assert r.bytes_on_disk < 20 * 2**20
        shards = sorted((r.avatar / "base_model_int8").glob("quantized_model-*"))
        assert [p.name for p in shards] == [f"quantized_model-0000{k}-of-00004.safetensors"
                                            for k in range(1, 5)]
        assert all(p.stat().st_size <= 4 * 2**30 + 2**20 for p in shards)


def test_base_model_output_is_unchanged(tmp_path, tiny_native):
    path = synth(tmp_path / "b", "tiny", model="base").path
    for rel in ["dit/diffusion_pytorch_model-00001-of-00005.safetensors", "dit/config.json",
                "lora/refinement_lora.safetensors", "model_index.json"]:
        assert (path / rel).read_bytes() == (tiny_native / rel).read_bytes()


def test_unknown_model_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "longcat_tools", "synth", "/nonexistent/x",
                           "--model", "bogus"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown model 'bogus'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_onnx_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(LongcatError, match="needs the 'onnx' package"):
        synth(tmp_path / "w", "tiny", model="avatar-1.5")
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_only_a_synthesized_tree(tmp_path, trees):
    with pytest.raises(LongcatError, match="already exists"):
        synth(trees["avatar-1.0"], "tiny", model="avatar-1.0")
    foreign = tmp_path / "foreign"
    (foreign / "my-notes").mkdir(parents=True)
    with pytest.raises(LongcatError, match="my-notes"):
        synth(foreign, "tiny", model="avatar-1.0", force=True)
    assert (foreign / "my-notes").is_dir()


def test_an_avatar_tree_is_not_written_inside_a_checkpoint(tmp_path, trees):
    base = trees["avatar-1.0"] / "LongCat-Video"
    with pytest.raises(LongcatError, match=f"inside the checkpoint {base.resolve()}"):
        synth(base / "avatars", "tiny", model="avatar-1.0")
    assert not (base / "avatars").exists()


def test_avatar_parameter_count_matches_its_tensors(trees):
    folder = _folder(trees, "avatar-1.5") / "base_model"
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    total = index["metadata"]["total_size"] // 2  # bf16
    base = sum(math.prod(s) for _, s in keymap.native_tensor_specs(keymap.dit_dims(
        json.loads((folder / "config.json").read_text()))))
    assert total == base + sum(math.prod(s) for s in expected_extras("avatar-1.5").values())
