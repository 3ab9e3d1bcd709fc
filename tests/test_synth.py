import json
import math
import subprocess
import sys
import time

import pytest
import torch

from longcat_tools.checkpoint import layouts
from longcat_tools.errors import LongcatError
from longcat_tools.io.safetensors import read_header, read_tensor
from longcat_tools.model import keymap
from longcat_tools.synth import dit_config, lora_targets, synth

# dit/config.json fields of the hub release (and of the original class's save_config)
HUB_DIT_FIELDS = {
    "_class_name", "_diffusers_version", "adaln_tembed_dim", "bsa_params", "caption_channels",
    "cp_split_hw", "depth", "enable_bsa", "enable_flashattn2", "enable_flashattn3",
    "enable_xformers", "frequency_embedding_size", "hidden_size", "in_channels", "mlp_ratio",
    "num_heads", "out_channels", "patch_size", "text_tokens_zero_pad",
}


def _dit_headers(root):
    ckpt = layouts.detect(root)
    shards = layouts.transformer_shards(ckpt)
    infos = {}
    for path in sorted(set(shards.values())):
        infos.update(read_header(path).tensors)
    return ckpt, shards, infos


def test_tiny_native_layout(tiny_native):
    names = {p.relative_to(tiny_native).as_posix() for p in tiny_native.rglob("*") if p.is_file()}
    for required in ["model_index.json", "dit/config.json",
                     "dit/diffusion_pytorch_model.safetensors.index.json",
                     "lora/cfg_step_lora.safetensors", "lora/refinement_lora.safetensors",
                     "scheduler/scheduler_config.json", "tokenizer/tokenizer.json",
                     "text_encoder/config.json", "text_encoder/model.safetensors.index.json",
                     "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]:
        assert required in names
    assert json.loads((tiny_native / "model_index.json").read_text()) == {
        "model_name": "LongCat-Video"}
    assert any(n.startswith("dit/diffusion_pytorch_model-00001-of-") for n in names)
    sched = json.loads((tiny_native / "scheduler/scheduler_config.json").read_text())
    assert sched["shift"] == 12.0 and sched["_class_name"] == "FlowMatchEulerDiscreteScheduler"


def test_tiny_dit_matches_the_architecture(tiny_native):
    ckpt, shards, infos = _dit_headers(tiny_native)
    cfg = ckpt.config()
    assert set(cfg) == HUB_DIT_FIELDS
    assert cfg["_class_name"] == "LongCatVideoTransformer3DModel"
    specs = keymap.native_tensor_specs(keymap.dit_dims(cfg))
    assert [(n, infos[n].shape) for n, _ in specs] == specs
    assert set(infos) == {n for n, _ in specs}
    assert all(t.dtype == "F32" for t in infos.values())
    index = json.loads((tiny_native / "dit" / layouts.INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in infos.values())


def test_lora_files_are_native_format(tiny_native):
    cfg = layouts.detect(tiny_native).config()
    shapes = dict(keymap.native_tensor_specs(keymap.dit_dims(cfg)))
    for kind, fname in [("cfg_step", "cfg_step_lora.safetensors"),
                        ("refinement", "refinement_lora.safetensors")]:
        h = read_header(tiny_native / "lora" / fname)
        targets = lora_targets(cfg, kind)
        with open(h.path, "rb") as f:
            for module, n in targets.items():
                base = "lora___lorahyphen___" + module.replace(".", "___lorahyphen___")
                down = h.tensors[f"{base}.lora_down.weight"]
                rank = down.shape[0] // n
                assert down.shape == (n * rank, shapes[f"{module}.weight"][1])
                ups = ([f"{base}.lora_up.weight"] if n == 1
                       else [f"{base}.lora_up.blocks.{j}.weight" for j in range(n)])
                for up in ups:
                    t = read_tensor(f, h.tensors[up])
                    assert t.shape == (shapes[f"{module}.weight"][0] // n, rank)
                    assert t.abs().sum() > 0  # non-zero ups: the adapter changes the model
                alpha = read_tensor(f, h.tensors[f"{base}.alpha_scale"])
                assert alpha.shape == () and alpha.item() == 0.5
        assert len(h.tensors) == sum(2 + n for n in targets.values())


def test_components_load_with_transformers_and_diffusers(tiny_native):
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    tok = AutoTokenizer.from_pretrained(tiny_native / "tokenizer")
    te = UMT5EncoderModel.from_pretrained(tiny_native / "text_encoder")
    ids = tok(["a cat on a bench"], padding="max_length", max_length=512, truncation=True,
              return_tensors="pt")
    assert ids.input_ids[0, 0] != tok.pad_token_id and tok.eos_token_id == 1
    with torch.no_grad():
        out = te(ids.input_ids, ids.attention_mask).last_hidden_state
    assert out.shape == (1, 512, 32) and torch.isfinite(out).all()
    vae = AutoencoderKLWan.from_pretrained(tiny_native / "vae")
    assert vae.config.z_dim == 16 and len(vae.config.latents_mean) == 16
    with torch.no_grad():
        z = vae.encode(torch.rand(1, 3, 5, 32, 32) * 2 - 1).latent_dist.mode()
    assert z.shape == (1, 16, 2, 4, 4) and torch.isfinite(z).all()


def test_seeds_make_reproducible_and_distinct_weights(tmp_path, tiny_native):
    again = tmp_path / "again"
    other = tmp_path / "other"
    synth(again, "tiny", seed=0)
    synth(other, "tiny", seed=1)
    for rel in ["dit/diffusion_pytorch_model-00001-of-00005.safetensors",
                "lora/cfg_step_lora.safetensors", "vae/diffusion_pytorch_model.safetensors"]:
        assert (again / rel).read_bytes() == (tiny_native / rel).read_bytes()
        assert (other / rel).read_bytes() != (tiny_native / rel).read_bytes()


def test_depth_and_bf16(tmp_path):
    path = tmp_path / "d1"
    synth(path, "small", depth=1, dtype="bf16")
    ckpt, _, infos = _dit_headers(path)
    assert ckpt.config()["depth"] == 1
    assert not any(n.startswith("blocks.1.") for n in infos)
    assert {t.dtype for t in infos.values()} == {"BF16"}


def test_real_sparse_is_full_scale_headers(real_sparse):
    _, shards, infos = _dit_headers(real_sparse)
    assert len(infos) == 1022
    assert sum(t.numel for t in infos.values()) == 13_581_071_424
    index = json.loads((real_sparse / "dit" / layouts.INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == 54_324_285_696
    assert len(set(shards.values())) == 6  # the hub's diffusion_pytorch_model-0000k-of-00006
    for fname, count in [("cfg_step_lora.safetensors", 1152),
                         ("refinement_lora.safetensors", 1543)]:
        h = read_header(real_sparse / "lora" / fname)
        assert len(h.tensors) == count
    te = read_header(sorted((real_sparse / "text_encoder").glob("*.safetensors"))[0])
    assert te.tensors["shared.weight"].shape == (256384, 4096)


def test_real_sparse_loras_have_real_alphas(real_sparse, capsys):
    """Their alpha_scale scalars were holes, read as 0: lora list and convert refused the
    checkpoint that verify passed."""
    from longcat_tools.cli import main

    assert main(["lora", "list", "-m", str(real_sparse), "-q"]) == 0
    assert main(["verify", str(real_sparse), "-q"]) == 0, capsys.readouterr().err


def test_real_sparse_is_fast_and_small(tmp_path):
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "longcat_tools", "synth", str(tmp_path / "r"),
                           "--preset", "real", "--sparse", "--json"],
                          capture_output=True, text=True)
    secs = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    disk = sum(p.stat().st_blocks * 512 for p in (tmp_path / "r").rglob("*") if p.is_file())
    assert disk < 50 * 2**20
    assert secs < 10, f"synth --preset real --sparse took {secs:.1f} s"
    doc = json.loads(proc.stdout)
    assert doc["dit_parameters"] == 13_581_071_424 and doc["dit_bytes"] == 54_324_285_696


def test_refuses_existing_destination_and_bad_arguments(tmp_path, tiny_native):
    with pytest.raises(LongcatError, match="already exists"):
        synth(tiny_native, "tiny")
    with pytest.raises(LongcatError, match="unknown preset"):
        synth(tmp_path / "x", "huge")
    with pytest.raises(LongcatError, match="unknown dtype"):
        synth(tmp_path / "x", "tiny", dtype="fp8")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_force_replaces_only_a_folder_of_what_synth_writes(tmp_path, tiny_native):
    """--force deleted the user's notes and renders beside the weights without a word."""
    from longcat_tools.synth import WRITTEN

    assert sorted(p.name for p in tiny_native.iterdir()) == sorted(WRITTEN)
    ck = tmp_path / "ck"
    synth(ck, "tiny")
    synth(ck, "tiny", force=True, seed=1)  # its own output: replaced
    (ck / "renders").mkdir()
    (ck / "renders" / "a.mp4").write_bytes(b"mine")
    with pytest.raises(LongcatError, match="holds renders, which this run does not write"):
        synth(ck, "tiny", force=True)
    assert (ck / "renders" / "a.mp4").read_bytes() == b"mine"


def test_param_count_formula_matches_real_config():
    dims = keymap.dit_dims(dit_config("real"))
    per_block = sum(math.prod(s) for n, s in keymap.native_tensor_specs(dims)
                    if n.startswith("blocks.0."))
    assert per_block == 282_132_992


@pytest.mark.parametrize("preset", ["tiny", "real"])
def test_text_encoder_tensor_list_is_what_transformers_builds(preset):
    from transformers import UMT5Config, UMT5EncoderModel

    from longcat_tools.synth import PRESETS
    from longcat_tools.synth_components import text_encoder_config, umt5_encoder_specs

    cfg = text_encoder_config(PRESETS[preset], vocab=300)
    with torch.device("meta"):
        model = UMT5EncoderModel(UMT5Config(**{k: v for k, v in cfg.items()
                                               if not k.startswith("_")}))
    expected = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert umt5_encoder_specs(cfg["d_model"], cfg["d_ff"], cfg["d_kv"], cfg["num_heads"],
                              cfg["num_layers"], cfg["vocab_size"]) == expected
    if preset == "real":
        assert sum(math.prod(s) for _, s in expected) == 5_680_910_336


@pytest.mark.parametrize("preset", ["tiny", "real"])
def test_vae_tensor_list_is_what_diffusers_builds(preset):
    from diffusers import AutoencoderKLWan

    from longcat_tools.synth import PRESETS
    from longcat_tools.synth_components import vae_config, wan_vae_specs

    cfg = vae_config(PRESETS[preset])
    with torch.device("meta"):
        vae = AutoencoderKLWan(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    expected = [(n, tuple(p.shape)) for n, p in vae.named_parameters()]
    assert wan_vae_specs(cfg["base_dim"], num_res_blocks=cfg["num_res_blocks"]) == expected
