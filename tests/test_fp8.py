"""fp8 mode: the e4m3 arithmetic, the fp8 checkpoint format (convert --dtype fp8), verify's
checks of it, and the DiT running its block GEMMs in e4m3."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from longcat_tools import convert as conv
from longcat_tools.checkpoint import layouts
from longcat_tools.cli import main
from longcat_tools.kernels import fp8 as ops
from longcat_tools.model import keymap
from longcat_tools.verify.checkpoint import verify

E4M3 = torch.float8_e4m3fn
BLOCK_GEMMS = ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear",
               "cross_attn.proj", "ffn.w1", "ffn.w2", "ffn.w3")  # independent of model.fp8


def dit_tensors(root):
    ckpt = layouts.detect(root)
    out = {}
    for path in sorted(set(layouts.transformer_shards(ckpt).values())):
        out.update(load_file(str(path)))
    return out


def quantized_module(native_key):
    module, _, param = native_key.rpartition(".")
    parts = module.split(".", 2)
    return param, parts[0] == "blocks" and len(parts) == 3 and parts[2] in BLOCK_GEMMS


# ---- arithmetic -------------------------------------------------------------------------------

def test_weight_scales_are_row_maxima_over_448_and_rows_round_to_nearest_e4m3():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g) * torch.logspace(-3, 2, 48)[:, None]
    w[5] = 0.0
    q, scale = ops.quantize_weight(w.bfloat16())
    assert q.dtype == E4M3 and scale.dtype == torch.float32 and scale.shape == (48,)
    amax = w.bfloat16().float().abs().amax(1)
    assert torch.equal(scale[amax > 0], amax[amax > 0] / 448)
    assert scale[5] == 1 and not q[5].float().any()
    # every row's largest element lands on +-448, and no element is off by more than half an
    # e4m3 step (3 mantissa bits: relative 2**-4) or the subnormal step 2**-9 (absolute)
    assert torch.equal(q.float().abs().amax(1)[amax > 0], torch.full(((amax > 0).sum(),), 448.))
    x = w.bfloat16().float() / scale[:, None]
    err = (q.float() - x).abs()
    assert bool((err <= torch.maximum(x.abs() * 2**-4, torch.tensor(2.0**-10))).all())


def test_activation_rows_are_multiplied_by_the_reciprocal_of_a_floored_scale():
    """Per token: ``e4m3(x * (1 / scale))`` with ``scale = max(amax / 448, 2**-126)`` (1 for a
    zero or NaN row). The floor keeps the reciprocal finite: without it a row of tiny values
    would scale its zeros by inf, to NaN."""
    x = torch.tensor([[3.0, -1.5, 0.0, 0.7], [0.0] * 4, [1e-37, 0.0, -5e-38, 0.0],
                      [float("nan"), 1.0, 0.0, 2.0]]).bfloat16()
    q, scale = ops.quantize_rows(x)
    xf = x.float()
    assert scale[0, 0] == torch.tensor(3.0) / 448 and scale[1, 0] == 1 and scale[3, 0] == 1
    assert scale[2, 0] == 2.0**-126 and float(xf[2].abs().max()) / 448 < 2.0**-126
    inv = torch.tensor(1.0) / scale  # rounded to nearest: the product, not the quotient
    want = (xf * inv).clamp(-448, 448).to(E4M3)
    assert torch.equal(q.view(torch.uint8), want.view(torch.uint8))
    assert not q[:3].float().isnan().any() and q[3].float().isnan().sum() == 1
    assert q[0].float().abs().max() == 448  # the row's largest element still lands on +-448


def test_scaled_gemm_equals_the_product_of_the_dequantized_operands():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 128, generator=g)
    x = torch.randn(3, 7, 128, generator=g)
    bias = torch.randn(96, generator=g)
    q, s = ops.quantize_weight(w)
    for dtype in (torch.bfloat16, torch.float32):
        y = ops.linear(x.to(dtype), q, s, bias.to(dtype))
        assert y.dtype == dtype and y.shape == (3, 7, 96)
        # independent: per-token scale and rounding written out here, product in float64
        xd = x.to(dtype).double().reshape(-1, 128)
        sx = xd.abs().amax(1, keepdim=True) / 448
        xq = (xd / sx).float().clamp(-448, 448).to(E4M3).double() * sx
        ref = xq @ (q.double() * s.double()[:, None]).T + bias.to(dtype).double()
        rel = ((y.double().reshape(-1, 96) - ref).norm() / ref.norm()).item()
        assert rel < (4e-3 if dtype == torch.bfloat16 else 1e-6), (dtype, rel)


def test_fp8_gemm_error_against_fp32_is_that_of_e4m3_rounding():
    """Random unit-variance data: e4m3 keeps 3 mantissa bits, so the product lands a few
    percent from fp32; bf16 (8 bits) about 30x closer."""
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(256, 512, generator=g), torch.randn(64, 512, generator=g)
    ref = x.double() @ w.double().T
    q, s = ops.quantize_weight(w)
    fp8 = ops.linear(x.bfloat16(), q, s).double()
    bf16 = (x.bfloat16() @ w.bfloat16().T).double()
    e8 = ((fp8 - ref).norm() / ref.norm()).item()
    e16 = ((bf16 - ref).norm() / ref.norm()).item()
    assert 1e-2 < e8 < 6e-2 and e16 < 5e-3, (e8, e16)


# ---- checkpoints ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fp8_folder(tiny_native, tmp_path_factory):
    dst = tmp_path_factory.mktemp("fp8") / "conv"
    conv.convert(tiny_native, dst, dtype="fp8")
    return dst


def test_convert_fp8_quantizes_the_block_gemms_per_channel_and_keeps_the_rest_bf16(
        tiny_native, fp8_folder):
    src = dit_tensors(tiny_native)
    out = dit_tensors(fp8_folder)
    cfg = json.loads((fp8_folder / "transformer" / "quantization_config.json").read_text())
    assert cfg["quantization_method"] == "fp8_e4m3_per_channel"
    n_weights = 0
    for name, t in src.items():
        param, quantized = quantized_module(name)
        parts = [p.fastvideo for p in keymap.native_to_fastvideo(name)]
        got = torch.cat([out[p] for p in parts], 0)
        if quantized and param == "weight":
            n_weights += 1
            scale = torch.cat([out[p + "_scale"] for p in parts], 0)
            want_scale = t.float().abs().amax(1) / 448
            assert got.dtype == E4M3 and torch.equal(scale, want_scale), name
            back = got.float() * scale[:, None]
            assert bool(((back - t.float()).abs() <= t.float().abs() * 2**-4 + 1e-6).all())
        else:
            assert got.dtype == torch.bfloat16 and torch.equal(got, t.bfloat16()), name
    depth = keymap.dit_dims(json.loads((tiny_native / "dit" / "config.json").read_text())).depth
    assert n_weights == len(BLOCK_GEMMS) * depth
    scales = [k for k in out if k.endswith("weight_scale")]
    assert len(scales) == (len(BLOCK_GEMMS) + 3) * depth  # qkv -> q, k, v; kv -> k, v


def test_fp8_folders_convert_between_flavours_unchanged_and_dequantize_exactly(
        fp8_folder, tmp_path):
    out = dit_tensors(fp8_folder)
    conv.convert(fp8_folder, tmp_path / "nat", to="native")  # keep: stays fp8
    nat = dit_tensors(tmp_path / "nat")
    assert (tmp_path / "nat" / "dit" / "quantization_config.json").is_file()
    qkv = torch.cat([out[f"blocks.0.self_attn.to_{c}.weight"] for c in "qkv"])
    assert nat["blocks.0.attn.qkv.weight"].dtype == E4M3
    assert torch.equal(nat["blocks.0.attn.qkv.weight"].view(torch.uint8), qkv.view(torch.uint8))
    conv.convert(fp8_folder, tmp_path / "bf", to="native", dtype="bf16")
    bf = dit_tensors(tmp_path / "bf")
    assert not (tmp_path / "bf" / "dit" / "quantization_config.json").exists()
    assert not any(k.endswith("weight_scale") for k in bf)
    w1, s1 = out["blocks.1.ffn.w1.weight"], out["blocks.1.ffn.w1.weight_scale"]
    assert torch.equal(bf["blocks.1.ffn.w1.weight"], (w1.float() * s1[:, None]).bfloat16())


def test_a_resume_takes_precision_auto_and_fp8_alike_on_an_fp8_checkpoint(fp8_folder,
                                                                          tmp_path):
    """Both compute in fp8 there, yet a resume spelled the other way made every video again."""
    out = tmp_path / "out"
    args = ["run", "-q", "-m", str(fp8_folder), "-p", "a cat", "--seeds", "1,2", "--height",
            "32", "--width", "32", "--frames", "9", "--steps", "1", "--out-dir", str(out)]
    assert main(args) == 0
    status = {}
    for precision in ("fp8", "auto", "dtype"):
        assert main([*args, "--precision", precision]) == 0
        doc = json.loads((out / "manifest.json").read_text())
        status[precision] = [e["status"] for e in doc["items"]]
    assert status == {"fp8": ["skipped"] * 2, "auto": ["skipped"] * 2, "dtype": ["done"] * 2}


def test_fp8_to_comfy_dequantizes_as_to_native(fp8_folder, tmp_path):
    """--to comfy --dtype bf16 cast the e4m3 codes as weights and dropped their scales."""
    conv.convert(fp8_folder, tmp_path / "nat", to="native", dtype="bf16")
    conv.convert(fp8_folder, tmp_path / "comfy", to="comfy", dtype="bf16")
    conv.convert(tmp_path / "comfy" / "diffusion_model.safetensors", tmp_path / "back",
                 to="native")
    want, got = dit_tensors(tmp_path / "nat"), dit_tensors(tmp_path / "back")
    assert set(want) == set(got)
    assert [k for k in want if not torch.equal(want[k], got[k])] == []


def test_verify_passes_an_fp8_folder_and_names_bad_scales(fp8_folder, tmp_path, capsys):
    rep = verify(fp8_folder, deep=True)
    assert rep.ok, [c.message for c in rep.checks if c.status == "fail"]
    names = {(c.name, c.status) for c in rep.checks}
    assert ("scales", "pass") in names and ("quantization", "pass") in names
    bad = tmp_path / "bad"
    shutil.copytree(fp8_folder, bad)
    shard = bad / "transformer" / "diffusion_pytorch_model.safetensors"
    t = load_file(str(shard))
    t["blocks.0.ffn.w2.weight_scale"][3] = 0.0
    t["blocks.1.ffn.w2.weight_scale"][0] = float("nan")
    save_file(t, str(shard), metadata={"format": "pt"})
    (bad / "checksums.sha256").unlink()
    rep = verify(bad)
    fails = [c for c in rep.checks if c.status == "fail"]
    assert [c.name for c in fails] == ["scales"]
    assert "blocks.0.ffn.w2.weight_scale holds 0.0" in fails[0].message
    assert "nan" in fails[0].message
    t["blocks.0.ffn.w2.weight_scale"][3] = t["blocks.1.ffn.w2.weight_scale"][0] = 1.0
    t["blocks.0.adaln_linear_1.weight"] = t["blocks.0.adaln_linear_1.weight"].to(
        torch.float8_e5m2)  # read as if unquantized: only a warning, exit 0, before
    save_file(t, str(shard), metadata={"format": "pt"})
    (row,) = [c for c in verify(bad).checks  # also failed: the index's total_size is off
              if c.name == "dtype" and c.component == "transformer"]
    assert row.status == "fail"
    assert "blocks.0.adaln_linear_1.weight is F8_E5M2 without a scale" in row.message
    (bad / "transformer" / "quantization_config.json").unlink()
    rep = verify(bad)
    msgs = " ".join(c.message for c in rep.checks if c.status == "fail")
    assert "no quantization_config.json" in msgs


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -1.0, 1e38])
def test_convert_and_run_refuse_an_unusable_scale_before_the_weights(fp8_folder, tmp_path,
                                                                      capsys, value):
    """convert dequantized weight x scale into NaN, Inf or negated weights with exit 0, and run
    made a NaN video found after the whole run, where verify failed the same folder."""
    bad = tmp_path / "bad"
    shutil.copytree(fp8_folder, bad)
    shard = bad / "transformer" / "diffusion_pytorch_model.safetensors"
    t = load_file(str(shard))
    t["blocks.1.ffn.w2.weight_scale"][2] = value
    save_file(t, str(shard), metadata={"format": "pt"})
    says = f"blocks.1.ffn.w2.weight_scale holds {torch.tensor(value).double().item()}"
    for name, extra in (("bf16", ["--dtype", "bf16"]), ("keep", ["--dtype", "keep"]),
                        ("comfy", ["--to", "comfy", "--dtype", "bf16"])):
        assert main(["convert", "--src", str(bad), "--dst", str(tmp_path / name), *extra,
                     "-q"]) == 1
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
        assert not (tmp_path / name).exists()
    assert main(["run", "-m", str(bad), "-p", "a cat", "--height", "32", "--width", "32",
                 "--frames", "9", "--steps", "1", "--out", str(tmp_path / "x.mp4"), "-q"]) == 1
    err = capsys.readouterr().err
    assert says in err and "weight scales must be finite and positive" in err, err


def test_verify_fails_any_float8_weight_in_a_folder_without_the_fp8_config(tiny_native,
                                                                           tmp_path):
    """Only e4m3 was looked for: an e5m2 weight passed the quantization check."""
    plain = tmp_path / "plain"
    shutil.copytree(tiny_native, plain)
    (plain / "checksums.sha256").unlink(missing_ok=True)
    shard = sorted((plain / "dit").glob("*.safetensors"))[-1]
    t = load_file(str(shard))
    name = next(n for n in t if n.endswith("ffn.w3.weight"))
    t[name] = t[name].to(torch.float8_e5m2)
    save_file(t, str(shard), metadata={"format": "pt"})
    (row,) = [c for c in verify(plain).checks if c.name == "quantization"]
    assert row.status == "fail" and name in row.message and "float8 weights" in row.message


def test_unknown_quantization_method_and_fp8_to_comfy_are_one_line(fp8_folder, tmp_path,
                                                                    capsys):
    other = tmp_path / "other"
    shutil.copytree(fp8_folder, other)
    (other / "transformer" / "quantization_config.json").write_text(
        json.dumps({"quantization_method": "int4_awq"}))
    assert main(["convert", "--src", str(other), "--dst", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert "quantization_method 'int4_awq'" in err and "\n" not in err
    assert main(["convert", "--src", str(fp8_folder), "--dst", str(tmp_path / "y"),
                 "--to", "comfy", "--dtype", "fp8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "one fp8 scale per tensor" in err and "\n" not in err
    # --dtype keep wrote the e4m3 weights without their scales, exit 0; verify then failed it
    assert main(["convert", "--src", str(fp8_folder), "--dst", str(tmp_path / "y"),
                 "--to", "comfy"]) == 2
    assert "is an fp8 checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    for extra in (["--keys", "native"], ["--max-shard-size", "1"], ["--lora", "refinement"],
                  ["--copy"], ["--link"]):
        assert main(["convert", "--src", str(fp8_folder), "--dst", str(tmp_path / "z"),
                     "--to", "comfy", "--dtype", "bf16", *extra]) == 2  # did nothing, exit 0
        assert "cannot be combined with --to comfy" in capsys.readouterr().err


# ---- the DiT ----------------------------------------------------------------------------------

def test_dit_runs_its_block_gemms_in_e4m3_and_keeps_the_fp32_islands(tiny_native):
    from longcat_tools.runner.loading import load_transformer

    ref = load_transformer(tiny_native, dtype="bf16")
    model = load_transformer(tiny_native, dtype="bf16")
    model.to_fp8()
    assert model.is_fp8 and not ref.is_fp8
    sd = model.state_dict()
    for name, t in sd.items():
        param, quantized = quantized_module(name)
        if param == "weight":
            assert (t.dtype == E4M3) == quantized, name
        if param == "weight_scale":
            assert quantized and t.dtype == torch.float32
    g = torch.Generator().manual_seed(0)
    d = model.dims
    x = torch.randn(1, d.in_channels, 2, 4, 4, generator=g).bfloat16()
    t = torch.tensor([500.0])
    y = torch.randn(1, 1, 8, d.caption_channels, generator=g).bfloat16()
    mask = torch.ones(1, 8, dtype=torch.long)
    with torch.no_grad():
        a = ref(x, t, y, mask)
        b = model(x, t, y, mask)
    rel = ((a.float() - b.float()).norm() / a.float().norm()).item()
    assert 0 < rel < 0.1, rel


def test_casting_an_fp8_model_is_refused_not_silently_wrong(tiny_native):
    from longcat_tools.errors import LongcatError
    from longcat_tools.runner.loading import load_transformer

    model = load_transformer(tiny_native, dtype="bf16")
    model.to_fp8()
    torch.nn.Module.to(model, torch.bfloat16)
    x = torch.randn(2, model.dims.hidden_size).bfloat16()
    with pytest.raises(LongcatError, match="cast to another dtype"):
        model.blocks[0].ffn.w1(x)


def test_an_fp8_checkpoint_loads_as_stored_and_a_plain_one_quantizes_to_the_same_bits(
        tiny_native, fp8_folder):
    from longcat_tools.runner.loading import load_transformer

    stored = load_transformer(fp8_folder, dtype="bf16")  # auto: as the checkpoint is stored
    on_load = load_transformer(tiny_native, dtype="bf16", fp8=True)
    assert stored.is_fp8 and on_load.is_fp8
    files = dit_tensors(fp8_folder)
    a, b = stored.state_dict(), on_load.state_dict()
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name
    qkv = torch.cat([files[f"blocks.1.self_attn.to_{c}.weight"] for c in "qkv"])
    assert torch.equal(a["blocks.1.attn.qkv.weight"].view(torch.uint8), qkv.view(torch.uint8))
    scale = torch.cat([files[f"blocks.1.self_attn.to_{c}.weight_scale"] for c in "qkv"])
    assert torch.equal(a["blocks.1.attn.qkv.weight_scale"], scale)


def test_fp8_false_dequantizes_an_fp8_checkpoint(fp8_folder):
    from longcat_tools.runner.loading import load_transformer

    model = load_transformer(fp8_folder, dtype="fp32", fp8=False)
    assert not model.is_fp8
    files = dit_tensors(fp8_folder)
    w, s = files["blocks.0.ffn.w3.weight"], files["blocks.0.ffn.w3.weight_scale"]
    assert torch.equal(model.blocks[0].ffn.w3.weight, w.float() * s[:, None])
    ada = keymap.native_to_fastvideo("blocks.0.adaLN_modulation.1.weight")[0].fastvideo
    assert torch.equal(model.blocks[0].adaLN_modulation[1].weight, files[ada].float())


def test_e4m3_weights_without_the_quantization_config_are_one_line_before_loading(fp8_folder,
                                                                            tmp_path):
    from longcat_tools.errors import LongcatError
    from longcat_tools.runner.loading import load_transformer

    bad = tmp_path / "bad"
    shutil.copytree(fp8_folder, bad)
    (bad / "transformer" / "quantization_config.json").unlink()
    with pytest.raises(LongcatError, match="is e4m3 but .* no quantization_config.json"):
        load_transformer(bad, dtype="bf16")


def test_run_precision_fp8_quantizes_on_load_and_dtype_dequantizes(tiny_native, fp8_folder,
                                                                   tmp_path, capsys):
    from safetensors.torch import load_file as load

    tiny = ["--height", "32", "--width", "32", "--frames", "9", "--steps", "2", "-q",
            "-p", "a cat", "--distill", "--lora-mode", "runtime"]  # LoRA files: fp32 vs bf16
    outs = {}
    for name, model, precision, dtype in (("q", tiny_native, "fp8", "bf16"),
                                          ("s", fp8_folder, "auto", "bf16"),
                                          ("d", fp8_folder, "dtype", "bf16"),
                                          ("f", tiny_native, "auto", "fp32")):
        out, latents = tmp_path / f"{name}.mp4", tmp_path / f"{name}.safetensors"
        assert main(["run", "-m", str(model), "--precision", precision, "--dtype", dtype, *tiny,
                     "--out", str(out), "--save-latents", str(latents)]) == 0
        outs[name] = json.loads((tmp_path / f"{name}.mp4.json").read_text())
        outs[name]["latents"] = load(str(latents))["latents"]
    assert [outs[n]["precision"] for n in "qsdf"] == ["fp8", "fp8", "bf16", "fp32"]
    assert [outs[n]["fp8_attention"]["kinds"] for n in "qsdf"] == [["bsa", "dense"]] * 2 + [[]] * 2
    assert all(outs[n]["fp8_attention"]["calls"] == {} for n in "qsdf")  # no kernel on a CPU
    assert outs["s"]["checkpoint"]["layout"] == "converted (fastvideo keys, fp8)"
    # quantized on load == stored fp8 (the rest bf16 in both): the same weights, the same video
    assert torch.equal(outs["q"]["latents"], outs["s"]["latents"])
    # fp8 lands near the full-precision run, but not on it
    f, q = outs["f"]["latents"], outs["q"]["latents"]
    rel = ((q - f).norm() / f.norm()).item()
    assert 0 < rel < 0.1, rel
    assert main(["run", "-m", str(tiny_native), "--precision", "fp4", *tiny]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --precision fp4: unknown (use auto, fp8, dtype)"


def test_fp8_attention_is_asked_of_fp8_runs_only(tiny_native, fp8_folder, tmp_path, capsys,
                                                monkeypatch):
    """``--fp8-attention`` sets the model's kinds (recorded in the sidecar; on the CPU no kernel
    takes them); a dtype run, or auto on a checkpoint that is not fp8, is refused before
    loading, as is an unknown kind."""
    from longcat_tools.errors import LongcatError
    from longcat_tools.kernels import fp8_attention
    from longcat_tools.runner.loading import load_transformer

    tiny = ["--height", "32", "--width", "32", "--frames", "9", "--steps", "1", "-q",
            "-p", "a cat"]
    out = tmp_path / "a.mp4"
    assert main(["run", "-m", str(fp8_folder), "--fp8-attention", "all", *tiny, "--out",
                 str(out)]) == 0
    assert json.loads((tmp_path / "a.mp4.json").read_text())["fp8_attention"] == {
        "kinds": ["bsa", "dense"], "calls": {}}  # asked for; no kernel runs on the CPU
    capsys.readouterr()
    for args, message in (
            (["--fp8-attention", "fast"], "--fp8-attention fast: unknown (use auto, off, dense, "
                                          "bsa, all)"),
            (["--fp8-attention", "dense", "--precision", "dtype"],
             "--fp8-attention dense: quantizes an fp8 run's attention; it cannot go with "
             "--precision dtype"),
            (["-m", str(tiny_native), "--fp8-attention", "bsa"],
             f"--fp8-attention bsa: {tiny_native} is not an fp8 checkpoint; add --precision fp8 "
             "to run its GEMMs in fp8 too")):
        model = [] if "-m" in args else ["-m", str(fp8_folder)]
        assert main(["run", *model, *args, *tiny, "--out", str(tmp_path / "b.mp4")]) == 2
        assert capsys.readouterr().err.strip() == f"error: {message}"
    assert not (tmp_path / "b.mp4").exists()
    model = load_transformer(tiny_native, dtype="bf16")
    assert model.quantized_attention() == frozenset()  # not fp8: nothing to quantize
    model.to_fp8()
    assert model.quantized_attention() == {"bsa", "dense"}  # None: the measured default
    monkeypatch.setitem(fp8_attention.ENABLED, "bsa", False)
    assert model.quantized_attention() == {"dense"}
    model.fp8_attention = frozenset()
    assert model.quantized_attention() == frozenset()
    model.fp8_attention = frozenset({"Dense"})
    with pytest.raises(LongcatError, match=r"\['Dense'\]: the kinds are dense, bsa"):
        model.quantized_attention()


@pytest.mark.parametrize("source", ["plain", "fp8"])
def test_a_lora_merges_into_e4m3_weights_and_restores_bit_for_bit(tiny_native, fp8_folder,
                                                                   source):
    from longcat_tools.runner.loading import load_transformer
    from longcat_tools.runner.lora import lora_path

    model = load_transformer(tiny_native if source == "plain" else fp8_folder, dtype="bf16",
                             fp8=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_lora(lora_path(tiny_native, "distilled"), "distilled")
    runtime = load_transformer(tiny_native if source == "plain" else fp8_folder, dtype="bf16",
                               fp8=True)
    runtime.lora_mode = "runtime"
    runtime.load_lora(lora_path(tiny_native, "distilled"), "distilled")
    runtime.enable_loras(["distilled"])
    model.enable_loras(["distilled"])
    assert model.merged_loras == ["distilled"]
    layer = model.blocks[0].attn.qkv
    assert layer.weight.dtype == E4M3 and not torch.equal(
        layer.weight.view(torch.uint8), before["blocks.0.attn.qkv.weight"].view(torch.uint8))
    g = torch.Generator().manual_seed(0)
    d = model.dims
    x = torch.randn(1, d.in_channels, 2, 4, 4, generator=g).bfloat16()
    t, y = torch.tensor([500.0]), torch.randn(1, 1, 8, d.caption_channels, generator=g).bfloat16()
    mask = torch.ones(1, 8, dtype=torch.long)
    with torch.no_grad():
        merged_out, runtime_out = model(x, t, y, mask), runtime(x, t, y, mask)
    rel = ((merged_out.float() - runtime_out.float()).norm() / runtime_out.float().norm()).item()
    assert rel < 0.1, rel  # two e4m3 roundings of W + delta apart, not more
    model.disable_loras()
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k].view(torch.uint8), v.view(torch.uint8)), k


def test_block_swap_moves_the_fp8_scales_with_their_weights(tiny_native):
    """The scales are buffers: block swap must carry them with the e4m3 weights."""
    from longcat_tools.runner import offload
    from longcat_tools.runner.loading import load_transformer

    model = load_transformer(tiny_native, dtype="bf16", fp8=True)
    swap = offload.enable_block_swap(model, "cpu")
    moved = {id(t) for host in swap._host for t, _ in host}
    scales = [b for name, b in model.blocks.named_buffers() if name.endswith("weight_scale")]
    assert scales and all(id(s) in moved for s in scales)


def test_fp8_with_fp16_activations_is_refused_before_loading(tiny_native):
    from longcat_tools.errors import LongcatError
    from longcat_tools.runner.pipeline import LongCatVideoPipeline

    with pytest.raises(LongcatError, match="fp8 GEMMs run with bf16 activations"):
        LongCatVideoPipeline.from_pretrained(tiny_native, torch_dtype=torch.float16, fp8=True)


def test_refilling_one_weight_from_an_fp8_checkpoint_reads_only_its_scales(fp8_folder,
                                                                            monkeypatch):
    """A LoRA restore refills a few weights: it must not read every scale of the checkpoint."""
    from longcat_tools.runner import loading

    model = loading.load_transformer(fp8_folder, dtype="fp32", fp8=False)
    want = model.blocks[0].ffn.w3.weight.detach().clone()
    read: list[str] = []
    real = loading.read_tensor
    monkeypatch.setattr(loading, "read_tensor", lambda f, info: read.append(info.name)
                        or real(f, info))
    with torch.no_grad():
        model.blocks[0].ffn.w3.weight.zero_()
    ckpt = layouts.detect(fp8_folder)
    loading.fill_parameters(model, ckpt, names=["blocks.0.ffn.w3.weight"])
    assert torch.equal(model.blocks[0].ffn.w3.weight, want)
    assert read == ["blocks.0.ffn.w3.weight_scale"]
