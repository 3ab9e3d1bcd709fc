"""LoRA formats: native <-> FastVideo <-> PEFT is exact every way and keeps the effective
update."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from longcat_tools.errors import LongcatError
from longcat_tools.io.safetensors import write_file
from longcat_tools.lora import formats as lf
from longcat_tools.model import keymap
from longcat_tools.synth import dit_config, lora_specs

CFG = dit_config("tiny")
DIMS = keymap.dit_dims(CFG)
SHAPES = lf.linear_shapes(DIMS)


@pytest.fixture(scope="module")
def hub_loras(tmp_path_factory):
    """The tiny preset's two hub adapters, exactly as synth writes them (no whole checkpoint)."""
    d = tmp_path_factory.mktemp("hub_loras")
    for kind in ("cfg_step", "refinement"):
        write_file(d / f"{kind}_lora.safetensors", lora_specs(CFG, kind, 4, 0, torch.float32),
                   {"format": "pt"})
    return d


def _same(a: dict, b: dict) -> list[str]:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    return [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape
            or not torch.equal(a[k], b[k])]


def _round_trip(src, tmp_path):
    fv = tmp_path / "fv.safetensors"
    back = tmp_path / "back.safetensors"
    lf.write_lora(fv, lf.read_lora(src, SHAPES), "fastvideo")
    parsed = lf.read_lora(fv, SHAPES)
    assert parsed.format == "fastvideo"
    lf.write_lora(back, parsed, "native")
    return fv, back


@pytest.mark.parametrize("name", ["cfg_step_lora", "refinement_lora"])
def test_hub_adapters_round_trip_exactly(hub_loras, tmp_path, name):
    src = hub_loras / f"{name}.safetensors"
    fv, back = _round_trip(src, tmp_path)
    assert _same(load_file(src), load_file(back)) == []
    d0, d1 = lf.effective_deltas(src), lf.effective_deltas(fv)
    assert set(d0) == set(d1) and all(torch.equal(d0[k], d1[k]) for k in d0)
    fvt = load_file(fv)
    # FastVideo form: split targets, lora_alpha = alpha_scale * rank as a 0-d float32
    a = fvt["blocks.0.self_attn.to_q.lora_alpha"]
    assert a.dtype == torch.float32 and a.shape == () and float(a) == 0.5 * 4
    assert fvt["blocks.0.self_attn.to_q.lora_A"].shape == (4, DIMS.hidden_size)
    if name == "refinement_lora":
        b = fvt["blocks.1.adaln_linear_1.lora_B"]
        assert b.shape == (6 * DIMS.hidden_size, 6 * 4)
        assert float(fvt["blocks.1.adaln_linear_1.lora_alpha"]) == 0.5 * 24
        assert not b[: DIMS.hidden_size, 4:].any()  # block-diagonal


def _native_file(path, modules: dict[str, tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]]):
    tensors = {}
    for module, (down, ups, alpha) in modules.items():
        base = lf.native_key_module(module)
        tensors[f"{base}.lora_down.weight"] = down
        if len(ups) == 1:
            tensors[f"{base}.lora_up.weight"] = ups[0]
        else:
            for j, u in enumerate(ups):
                tensors[f"{base}.lora_up.blocks.{j}.weight"] = u
        tensors[f"{base}.alpha_scale"] = alpha
    save_file(tensors, str(path))


def test_unusual_adapters_round_trip_exactly(tmp_path):
    """Odd ranks, an alpha_scale that float32 cannot carry through * rank / rank, a bf16
    alpha_scale, one plain up on a fused qkv and on an adaLN: metadata makes them exact."""
    g = torch.Generator().manual_seed(1)
    c, ct = DIMS.hidden_size, DIMS.adaln_tembed_dim

    def r(*s, dtype=torch.float32):
        return torch.randn(*s, generator=g).to(dtype)

    src = tmp_path / "odd.safetensors"
    _native_file(src, {
        "blocks.0.attn.qkv": (r(5, c), [r(3 * c, 5)], torch.tensor(0.3)),  # n=1 on fused
        "blocks.0.adaLN_modulation.1": (r(7, ct), [r(6 * c, 7)], torch.tensor(0.7)),  # plain
        "blocks.1.adaLN_modulation.1": (r(3 * 6, ct), [r(c, 3) for _ in range(6)],
                                        torch.tensor(0.1, dtype=torch.bfloat16)),
        "blocks.1.cross_attn.kv_linear": (r(2 * 3, c), [r(c, 3), r(c, 3)],
                                          torch.tensor(1 / 3)),
        "final_layer.linear": (r(2, c, dtype=torch.bfloat16),
                               [r(DIMS.patch_volume * 16, 2, dtype=torch.bfloat16)],
                               torch.tensor(2.0)),
    })
    fv, back = _round_trip(src, tmp_path)
    assert _same(load_file(src), load_file(back)) == []
    d0, d1 = lf.effective_deltas(src), lf.effective_deltas(fv)
    for k in d0:
        torch.testing.assert_close(d0[k], d1[k], rtol=1e-6, atol=0)
    from safetensors import safe_open

    with safe_open(str(fv), "pt") as f:
        meta = json.loads(f.metadata()[lf.EXACT_METADATA_KEY])
    assert meta["blocks.0.attn.qkv"]["n"] == 1
    assert meta["blocks.1.adaLN_modulation.1"]["alpha_scale"]["dtype"] == "BF16"
    assert "blocks.1.cross_attn.kv_linear" not in meta or "n" not in meta[
        "blocks.1.cross_attn.kv_linear"]


def test_fastvideo_file_without_metadata(tmp_path):
    """FastVideo's own files carry no metadata: the adaLN up blocks are recovered from a
    block-diagonal lora_B, and a full lora_B becomes one plain up with the same update."""
    c, ct = DIMS.hidden_size, DIMS.adaln_tembed_dim
    g = torch.Generator().manual_seed(2)
    full_b = torch.randn(6 * c, 12, generator=g)
    path = tmp_path / "fv.safetensors"
    save_file({"blocks.0.adaln_linear_1.lora_A": torch.randn(12, ct, generator=g),
               "blocks.0.adaln_linear_1.lora_B": full_b,
               "blocks.0.adaln_linear_1.lora_alpha": torch.tensor(6.0)}, str(path))
    entry = lf.read_lora(path, SHAPES).modules["blocks.0.adaLN_modulation.1"]
    assert (entry.n, entry.rank) == (1, 12)
    m = entry.load()
    assert torch.equal(m.ups[0], full_b) and float(m.alpha_scale) == 0.5
    torch.testing.assert_close(m.delta(), lf.effective_deltas(path)["blocks.0.adaLN_modulation.1"])


@pytest.mark.parametrize("tensors,match", [
    ({"blocks.0.self_attn.to_q.lora_A": torch.zeros(2, 64),
      "blocks.0.self_attn.to_q.lora_B": torch.zeros(64, 2)}, "needs all of"),
    ({"blocks.0.nonsense.lora_A": torch.zeros(2, 64),
      "blocks.0.nonsense.lora_B": torch.zeros(64, 2)}, "blocks.0.nonsense"),
    ({"blocks.0.attn.qkv.lora_A.weight": torch.zeros(2, 64)}, "has no .lora_B"),
    ({"blocks.0.attn.qkv.lora_A.weight": torch.zeros(2, 64),
      "blocks.0.attn.qkv.lora_B": torch.zeros(64, 2)}, "mixes FastVideo keys"),
    ({"something.else": torch.zeros(2)}, "not a LongCat LoRA file"),
    ({lf.native_key_module("blocks.0.attn.proj") + ".lora_down.weight": torch.zeros(2, 64),
      lf.native_key_module("blocks.0.attn.proj") + ".lora_up.weight": torch.zeros(32, 2)},
     "32x64 but the DiT layer is 64x64"),
    ({lf.native_key_module("blocks.9.attn.proj") + ".lora_down.weight": torch.zeros(2, 64),
      lf.native_key_module("blocks.9.attn.proj") + ".lora_up.weight": torch.zeros(64, 2)},
     "not a Linear layer of this DiT"),
    ({lf.native_key_module("blocks.0.attn.proj") + ".lora_down.weight": torch.zeros(2, 64),
      lf.native_key_module("blocks.0.attn.proj") + ".lora_up.weight": torch.zeros(64, 2),
      lf.native_key_module("blocks.0.attn.proj") + ".lora_alpha": torch.zeros(())},
     "unknown key"),
])
def test_bad_files_name_the_problem(tmp_path, tensors, match):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(LongcatError, match=match):
        lf.read_lora(path, SHAPES)


# ---------------------------------------------------------------------------------------------
# PEFT / diffusers


@pytest.mark.parametrize("keys", ["native", "fastvideo"])
@pytest.mark.parametrize("name", ["cfg_step_lora", "refinement_lora"])
def test_peft_round_trip_exactly(hub_loras, tmp_path, name, keys):
    """native -> PEFT (either naming) -> native gives the same tensors bit for bit, and the
    PEFT file's own update (B @ A * lora_alpha / r from its config) is the native one."""
    src = hub_loras / f"{name}.safetensors"
    peft, back = tmp_path / "peft.safetensors", tmp_path / "back.safetensors"
    lf.write_lora(peft, lf.read_lora(src, SHAPES), "peft", keys=keys)
    parsed = lf.read_lora(peft, SHAPES)
    assert parsed.format == "peft" and parsed.notes == []
    lf.write_lora(back, parsed, "native")
    assert _same(load_file(src), load_file(back)) == []
    d0, d1 = lf.effective_deltas(src), lf.effective_deltas(peft)
    assert set(d0) == set(d1) and all(torch.equal(d0[k], d1[k]) for k in d0)
    t = load_file(peft)
    c = DIMS.hidden_size
    if keys == "native":  # one target per native module: qkv's B is block-diagonal, rank 3r
        assert t["transformer.blocks.0.attn.qkv.lora_A.weight"].shape == (12, c)
        b = t["transformer.blocks.0.attn.qkv.lora_B.weight"]
        assert b.shape == (3 * c, 12) and not b[:c, 4:].any()
    else:
        assert t["transformer.blocks.0.self_attn.to_k.lora_A.weight"].shape == (4, c)
    cfg = json.loads(_metadata(peft)[lf.PEFT_METADATA_KEY])
    assert cfg["transformer.r"] == 4 and cfg["transformer.lora_alpha"] == 2.0


def _metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_peft_unusual_adapters_round_trip_exactly(tmp_path):
    """bf16 alpha_scale, odd ranks, plain ups on fused targets: exact through PEFT too."""
    g = torch.Generator().manual_seed(3)
    c, ct = DIMS.hidden_size, DIMS.adaln_tembed_dim
    src = tmp_path / "odd.safetensors"
    _native_file(src, {
        "blocks.0.attn.qkv": (torch.randn(5, c, generator=g), [torch.randn(3 * c, 5, generator=g)],
                              torch.tensor(0.3)),
        "blocks.1.adaLN_modulation.1": (torch.randn(18, ct, generator=g),
                                        [torch.randn(c, 3, generator=g) for _ in range(6)],
                                        torch.tensor(0.1, dtype=torch.bfloat16)),
        "blocks.1.cross_attn.kv_linear": (torch.randn(6, c, generator=g),
                                          [torch.randn(c, 3, generator=g) for _ in range(2)],
                                          torch.tensor(1 / 3)),
    })
    for keys in ("native", "fastvideo"):
        peft, back = tmp_path / f"{keys}.safetensors", tmp_path / f"{keys}.back.safetensors"
        lf.write_lora(peft, lf.read_lora(src, SHAPES), "peft", keys=keys)
        lf.write_lora(back, lf.read_lora(peft, SHAPES), "native")
        assert _same(load_file(src), load_file(back)) == []
        d0, d1 = lf.effective_deltas(src), lf.effective_deltas(peft)
        for k in d0:
            torch.testing.assert_close(d0[k], d1[k], rtol=1e-6, atol=0)


def test_peft_reader_tolerates_the_common_conventions(tmp_path):
    """PEFT's base_model.model. prefix and .default adapter name, FastVideo and native names in
    one file, alphas from a sibling adapter_config.json (alpha_pattern by regex), kohya .alpha
    tensors overriding it, rsLoRA scaling: the deltas are the PEFT library's arithmetic."""
    c = DIMS.hidden_size
    g = torch.Generator().manual_seed(4)
    a = {t: torch.randn(2, c, generator=g) for t in ("q", "k", "v", "proj", "w1")}
    b = {t: torch.randn(c if t != "w1" else DIMS.ffn_hidden, 2, generator=g) for t in a}
    tensors = {}
    for t, mod in (("q", "blocks.0.self_attn.to_q"), ("k", "blocks.0.self_attn.to_k"),
                   ("v", "blocks.0.self_attn.to_v"), ("proj", "blocks.1.attn.proj"),
                   ("w1", "blocks.1.ffn.w1")):
        tensors[f"base_model.model.{mod}.lora_A.default.weight"] = a[t]
        tensors[f"base_model.model.{mod}.lora_B.default.weight"] = b[t]
    tensors["base_model.model.blocks.1.ffn.w1.alpha"] = torch.tensor(3.0)
    path = tmp_path / "adapter_model.safetensors"
    save_file(tensors, str(path))
    (tmp_path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "alpha_pattern": {r"attn\.proj": 1},
        "target_modules": ["to_q", "to_k", "to_v", "proj", "w1"]}))
    lora = lf.read_lora(path, SHAPES)
    assert lora.format == "peft" and set(lora.modules) == {
        "blocks.0.attn.qkv", "blocks.1.attn.proj", "blocks.1.ffn.w1"}
    d = lf.effective_deltas(path)
    torch.testing.assert_close(d["blocks.0.attn.qkv"], torch.cat(
        [2.0 * (b[t].double() @ a[t].double()) for t in "qkv"]), rtol=1e-12, atol=0)
    torch.testing.assert_close(d["blocks.1.attn.proj"],
                               0.5 * (b["proj"].double() @ a["proj"].double()))
    torch.testing.assert_close(d["blocks.1.ffn.w1"], 1.5 * (b["w1"].double() @ a["w1"].double()))
    m = lora.modules["blocks.0.attn.qkv"].load()
    torch.testing.assert_close(m.delta(), d["blocks.0.attn.qkv"], rtol=1e-12, atol=0)
    rs = lf.read_lora(path, SHAPES, adapter_config={"lora_alpha": 4, "use_rslora": True})
    assert float(rs.modules["blocks.1.attn.proj"].alpha_scale) == pytest.approx(4 / 2 ** 0.5)
    assert float(rs.modules["blocks.1.ffn.w1"].alpha_scale) == pytest.approx(3 / 2 ** 0.5)


@pytest.mark.parametrize("tensors,config,match", [
    ({"transformer.blocks.0.attn.proj.lora_A.weight": torch.zeros(2, 64),
      "transformer.blocks.0.attn.proj.lora_B.weight": torch.zeros(64, 2)},
     {"lora_alpha": 2, "target_modules": ["to_q"]}, "target_modules does not include"),
    ({"transformer.blocks.0.attn.proj.lora_A.weight": torch.zeros(2, 64),
      "transformer.blocks.0.attn.proj.lora_B.weight": torch.zeros(64, 2),
      "transformer.blocks.0.attn.proj.lora_magnitude_vector": torch.zeros(64)}, None, "DoRA"),
    ({"transformer.blocks.0.attn.proj.lora_A.weight": torch.zeros(2, 64),
      "transformer.blocks.0.attn.proj.lora_B.weight": torch.zeros(64, 2),
      "transformer.blocks.0.self_attn.to_out.lora_A.weight": torch.zeros(2, 64),
      "transformer.blocks.0.self_attn.to_out.lora_B.weight": torch.zeros(64, 2)}, None,
     "both its native and its FastVideo names"),
    ({"transformer.blocks.0.attn.proj.lora_A.weight": torch.zeros(2, 64),
      "base_model.model.blocks.0.attn.proj.lora_A.weight": torch.zeros(2, 64)}, None,
     "same tensor"),
    ({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, 64),
      "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(64, 2)}, None,
     "not a module of the LongCat DiT"),
    ({"transformer.blocks.0.attn.proj.lora_A.weight": torch.zeros(2, 64),
      "transformer.blocks.0.attn.proj.lora_B.weight": torch.zeros(64, 2)},
     {"lora_alpha": "two"}, "must be a finite number"),
])
def test_bad_peft_files_name_the_problem(tmp_path, tensors, config, match):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(LongcatError, match=match):
        lf.read_lora(path, SHAPES, adapter_config=config)


def test_peft_without_any_alpha_assumes_rank_and_says_so(tmp_path):
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({"transformer.blocks.0.attn.proj.lora_A.weight": torch.ones(2, 64),
               "transformer.blocks.0.attn.proj.lora_B.weight": torch.ones(64, 2)}, str(path))
    lora = lf.read_lora(path, SHAPES)
    assert float(lora.modules["blocks.0.attn.proj"].alpha_scale) == 1.0
    assert len(lora.notes) == 1 and "alpha = rank" in lora.notes[0]


def test_delta_rows_are_slices_of_the_whole(hub_loras):
    m = lf.read_lora(hub_loras / "refinement_lora.safetensors", SHAPES).modules[
        "blocks.0.adaLN_modulation.1"].load()
    whole = m.delta(0.7)
    for lo, hi in ((0, 64), (50, 200), (320, 384)):
        assert torch.equal(m.delta(0.7, rows=(lo, hi)), whole[lo:hi])
