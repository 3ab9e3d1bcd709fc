"""A SimpleTuner-default LongCat LoRA (PEFT target_modules ``qkv, proj, q_linear, kv_linear``)
also adapts the patch embedding ``x_embedder.proj``, a Conv3d: PEFT stores a 5-D ``lora_A`` and
a 1x1x1 ``lora_B`` there. ``lora attach`` keeps it exactly; it runs unfused, fuses, exports to
PEFT bit for bit; the formats that cannot hold it refuse with the way out. Every expected value
comes from the real PEFT library."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hostile import refused
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import load_file, save_file

from longcat_tools.checkpoint import layouts
from longcat_tools.cli import main
from longcat_tools.lora import formats as lf
from longcat_tools.runner import load_transformer

TARGETS = ["qkv", "proj", "q_linear", "kv_linear"]
CONV = "x_embedder.proj"


@pytest.fixture(scope="module")
def simpletuner(tiny_native, tmp_path_factory):
    """(checkpoint copy, the LoRA file, PEFT's own float64 delta of x_embedder.proj)."""
    root = tmp_path_factory.mktemp("conv")
    ck = root / "ck"
    shutil.copytree(tiny_native, ck)
    model = load_transformer(ck).double()
    cfg = LoraConfig(target_modules=TARGETS, r=4, lora_alpha=8)
    inject_adapter_in_model(cfg, model)
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if ".lora_" in name:
            p.data = (torch.randn(p.shape, generator=gen) * 0.05).to(p.dtype)  # fp32 values
    layer = model.x_embedder.proj
    assert type(layer.lora_A["default"]).__name__ == "Conv3d"
    want = layer.get_delta_weight("default").detach().clone()
    sd = {f"transformer.{k}": v.float().contiguous()
          for k, v in get_peft_model_state_dict(model).items()}
    assert sd[f"transformer.{CONV}.lora_A.weight"].dim() == 5
    src = root / "st" / "pytorch_lora_weights.safetensors"
    src.parent.mkdir()
    meta = {"transformer.r": 4, "transformer.lora_alpha": 8,
            "transformer.target_modules": TARGETS, "transformer.peft_type": "LORA"}
    save_file(sd, str(src), {"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    return ck, src, want


def _lora(capsys, *args):
    capsys.readouterr()
    rc = main(["lora", *map(str, args)])
    return rc, capsys.readouterr().err


def test_reader_delta_is_peft_delta(simpletuner):
    _, src, want = simpletuner
    got = lf.effective_deltas(src)[CONV]
    torch.testing.assert_close(got.view(want.shape), want, rtol=1e-12, atol=1e-15)
    entry = lf.read_lora(src).modules[CONV]
    assert entry.kernel == (1, 2, 2) and entry.in_features == want[0].numel()
    torch.testing.assert_close(entry.load().delta().view(want.shape), want.float().double(),
                               rtol=1e-6, atol=1e-9)


def test_attach_runtime_fuse_export(simpletuner, tmp_path, capsys):
    ck, src, want = simpletuner
    rc, err = _lora(capsys, "attach", src, "--name", "st", "-m", ck, "-q")
    assert rc == 0, err
    capsys.readouterr()
    assert main(["verify", str(ck), "--json"]) == 0, capsys.readouterr()

    # run time (unfused) == the fused checkpoint, fp32
    fused = tmp_path / "fused"
    rc, err = _lora(capsys, "fuse", "st", "--dst", fused, "-m", ck, "-q")
    assert rc == 0, err
    dims = load_transformer(ck).dims
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, dims.in_channels, 2, 4, 4, generator=gen)
    y = torch.randn(1, 1, 6, dims.caption_channels, generator=gen)
    t = torch.tensor([400.0])
    base = load_transformer(ck)
    base.load_lora(str(src), "st")
    with torch.no_grad():
        plain = base(x, t, y)
        base.enable_loras(["st"])
        unfused = base(x, t, y)
        merged = load_transformer(fused)(x, t, y)
    assert (unfused - plain).abs().max() > 1e-3  # the adapter does change the output
    torch.testing.assert_close(unfused, merged, rtol=1e-5, atol=1e-5 * plain.abs().max().item())
    base.disable_loras()
    with torch.no_grad():
        assert torch.equal(base(x, t, y), plain)

    # fuse changed the patch embedding by PEFT's delta
    def weight(root):
        shards = layouts.transformer_shards(layouts.detect(root))
        return load_file(str(shards[f"{CONV}.weight"]))[f"{CONV}.weight"]
    w0, w1 = weight(ck), weight(fused)
    torch.testing.assert_close((w1.double() - w0.double()), want, rtol=0,
                               atol=1e-6 * w0.abs().max().item())

    # PEFT export: the SimpleTuner file back, bit for bit
    out = tmp_path / "peft" / "out.safetensors"
    out.parent.mkdir()
    rc, err = _lora(capsys, "export", "st", "--format", "peft", "--out", out, "-m", ck, "-q")
    assert rc == 0, err
    a, b = load_file(str(src)), load_file(str(out))
    assert set(a) == set(b)
    assert [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])] == []
    cfg = json.loads((out.parent / "adapter_config.json").read_text())
    assert CONV in cfg["target_modules"] and cfg["r"] == 4 and cfg["lora_alpha"] == 8

    for fmt in ("native", "fastvideo"):
        line = refused(capsys, "lora", "export", "st", "--format", fmt,
                       "--out", tmp_path / f"{fmt}.safetensors", "-m", ck, "-q")
        assert "--format peft" in line and "fuse" in line and CONV in line
        assert not (tmp_path / f"{fmt}.safetensors").exists()


def test_conv_adapter_in_a_linear_only_format_is_refused(simpletuner, tmp_path, capsys):
    """A 2-D adapter on the Conv3d (no format that is 2-D only can mean PEFT's conv form)."""
    ck, _, _ = simpletuner
    bad = tmp_path / "bad.safetensors"
    save_file({f"transformer.{CONV}.lora_A.weight": torch.ones(4, 64),
               f"transformer.{CONV}.lora_B.weight": torch.ones(8, 4)}, str(bad))
    refused(capsys, "lora", "attach", bad, "--name", "bad", "-m", ck, "-q", says="Conv3d")
