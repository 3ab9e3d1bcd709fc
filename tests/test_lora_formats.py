"""LoRA formats: native <-> FastVideo is exact both ways and keeps the effective update."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from longcat_tools import keymap
from longcat_tools import lora_formats as lf
from longcat_tools.errors import LongcatError
from longcat_tools.synth import dit_config

DIMS = keymap.dit_dims(dit_config("tiny"))
SHAPES = lf.linear_shapes(DIMS)


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
def test_hub_adapters_round_trip_exactly(tiny_native, tmp_path, name):
    src = tiny_native / "lora" / f"{name}.safetensors"
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
    ({"blocks.0.attn.qkv.lora_A.weight": torch.zeros(2, 64)}, "PEFT"),
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
