import pytest

from longcat_tools.errors import LongcatError
from longcat_tools.model import keymap
from longcat_tools.synth import dit_config

REAL = keymap.RELEASE_DIMS


def test_real_counts_match_the_hub_release():
    assert keymap.dit_dims(dit_config("real")) == REAL
    native = keymap.native_tensor_specs(REAL)
    assert len(native) == 1022
    assert sum(_numel(s) for _, s in native) == 13_581_071_424
    assert REAL.ffn_hidden == 11008 and REAL.head_dim == 128
    fastvideo = keymap.tensor_specs(REAL, "fastvideo")
    assert len(fastvideo) == 1310  # what FastVideo's converter produces
    assert sum(_numel(s) for _, s in fastvideo) == 13_581_071_424


def test_split_and_rename_rules():
    parts = keymap.native_to_fastvideo("blocks.7.attn.qkv.weight")
    assert [p.fastvideo for p in parts] == [f"blocks.7.self_attn.to_{x}.weight" for x in "qkv"]
    assert [(p.index, p.count) for p in parts] == [(0, 3), (1, 3), (2, 3)]
    kv = keymap.native_to_fastvideo("blocks.0.cross_attn.kv_linear.bias")
    assert [p.fastvideo for p in kv] == ["blocks.0.cross_attn.to_k.bias",
                                         "blocks.0.cross_attn.to_v.bias"]
    assert keymap.native_to_fastvideo("final_layer.adaLN_modulation.1.weight")[0].fastvideo == \
        "final_layer.adaln_linear.weight"
    assert keymap.native_to_fastvideo("blocks.3.adaLN_modulation.1.bias")[0].fastvideo == \
        "blocks.3.adaln_linear_1.bias"
    assert keymap.native_to_fastvideo("blocks.3.pre_crs_attn_norm.bias")[0].fastvideo == \
        "blocks.3.norm_cross.bias"


def test_every_key_round_trips():
    for name, _ in keymap.native_tensor_specs(REAL):
        for part in keymap.native_to_fastvideo(name):
            back = keymap.fastvideo_to_native(part.fastvideo)
            assert back == part


def test_unknown_keys_are_named():
    with pytest.raises(LongcatError, match="blocks.0.attn.mystery.weight"):
        keymap.native_to_fastvideo("blocks.0.attn.mystery.weight")
    with pytest.raises(LongcatError, match="patch_embed.nope"):
        keymap.fastvideo_to_native("patch_embed.nope.weight")


def test_dims_reject_bad_config():
    cfg = dit_config("tiny")
    with pytest.raises(LongcatError, match="hidden_size"):
        keymap.dit_dims({**cfg, "hidden_size": "64"})
    with pytest.raises(LongcatError, match="num_heads"):
        keymap.dit_dims({k: v for k, v in cfg.items() if k != "num_heads"})
    fv = {k: v for k, v in cfg.items() if k != "num_heads"} | {"num_attention_heads": 2}
    assert keymap.dit_dims(fv).num_heads == 2


def test_detect_flavour():
    assert keymap.detect_flavour(["x_embedder.proj.weight"]) == "native"
    assert keymap.detect_flavour(["patch_embed.proj.weight"]) == "fastvideo"
    assert keymap.detect_flavour(["foo"]) is None


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n
