"""``LongCatTransformer3DModel`` as a diffusers model: ``from_pretrained`` on every layout equals
the runner's loader bit for bit, ``torch_dtype`` loads directly, ``save_pretrained`` round-trips
through diffusers' own loader, and a PEFT export loaded with diffusers' ``load_lora_adapter``
gives the forward of our own LoRA path. (That loader's parity with the original LongCat-Video
code is ``test_golden_original.py``.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from longcat_tools import LongCatTransformer3DModel
from longcat_tools.cli import main
from longcat_tools.errors import LongcatError
from longcat_tools.runner.compare import probe_inputs
from longcat_tools.runner.loading import load_transformer

LORA_FILES = {"distilled": "cfg_step_lora.safetensors", "refinement": "refinement_lora.safetensors"}
PEFT_FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def layouts(tiny_native, tmp_path_factory) -> dict[str, Path]:
    """The tiny checkpoint as the hub release and converted with each key flavour."""
    root = tmp_path_factory.mktemp("dfm")
    out = {"native": tiny_native}
    for keys in ("fastvideo", "native"):
        dst = root / f"converted-{keys}"
        assert main(["convert", "--src", str(tiny_native), "--dst", str(dst), "--keys", keys,
                     "-q"]) == 0
        out[f"converted-{keys}"] = dst
    return out


@pytest.fixture(scope="module")
def reference(tiny_native):
    """The runner's DiT (``runner.loading``) and its fp32 output on fixed inputs."""
    dit = load_transformer(tiny_native)
    inputs = probe_inputs(dit)
    with torch.no_grad():
        return dit, inputs, dit(**inputs)


SUBFOLDER = {"native": "dit", "converted-fastvideo": "transformer",
             "converted-native": "transformer"}


@pytest.mark.parametrize("how", ["subfolder", "root", "folder"])
@pytest.mark.parametrize("layout", list(SUBFOLDER))
def test_from_pretrained_equals_the_runner_dit(layouts, reference, layout, how):
    dit, inputs, want = reference
    root, sub = layouts[layout], SUBFOLDER[layout]
    args = {"subfolder": ((root,), {"subfolder": sub}), "root": ((root,), {}),
            "folder": ((root / sub,), {})}[how]
    model = LongCatTransformer3DModel.from_pretrained(*args[0], **args[1])
    assert type(model) is LongCatTransformer3DModel and not model.training
    got_sd, want_sd = model.state_dict(), dit.state_dict()
    assert got_sd.keys() == want_sd.keys()
    assert all(torch.equal(got_sd[k], want_sd[k]) for k in want_sd)
    assert model.config.num_heads == dit.dims.num_heads  # FastVideo's num_attention_heads too
    with torch.no_grad():
        assert torch.equal(model(**inputs), want)


def test_torch_dtype_loads_straight_into_the_dtype(layouts, reference):
    dit, _, _ = reference
    model = LongCatTransformer3DModel.from_pretrained(layouts["converted-fastvideo"],
                                                      subfolder="transformer",
                                                      torch_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    want = dit.state_dict()
    assert all(torch.equal(v, want[k].to(torch.bfloat16)) for k, v in model.state_dict().items())


def test_diffusers_names_for_dtype_and_device(layouts, reference):
    """``dtype`` (diffusers' newer name for ``torch_dtype``) and a one-device ``device_map`` are
    honoured, not silently dropped."""
    dit, _, _ = reference
    model = LongCatTransformer3DModel.from_pretrained(layouts["native"], dtype=torch.bfloat16,
                                                      device_map="cpu")
    assert {(p.dtype, p.device.type) for p in model.parameters()} == {(torch.bfloat16, "cpu")}
    want = dit.state_dict()
    assert all(torch.equal(v, want[k].to(torch.bfloat16)) for k, v in model.state_dict().items())


def test_layerwise_casting_stores_fp8_and_computes_as_rounded(tiny_native, reference):
    """``enable_layerwise_casting``: the forward equals an fp32 model whose cast weights were
    rounded to fp8 by hand, with the skipped modules (norms, patch embedding) left exact."""
    import re

    _, inputs, plain = reference
    fp8 = torch.float8_e4m3fn
    model = LongCatTransformer3DModel.from_pretrained(tiny_native)
    rounded = LongCatTransformer3DModel.from_pretrained(tiny_native)
    skip = LongCatTransformer3DModel._skip_layerwise_casting_patterns
    for name, module in rounded.named_modules():
        if not any(re.search(p, name) for p in skip):
            for p in module.parameters(recurse=False):
                p.data = p.data.to(fp8).float()
    model.enable_layerwise_casting(storage_dtype=fp8, compute_dtype=torch.float32)
    assert model.blocks[0].attn.qkv.weight.dtype == fp8
    assert model.x_embedder.proj.weight.dtype == torch.float32
    with torch.no_grad():
        got, want = model(**inputs), rounded(**inputs)
    assert not torch.equal(want, plain), "fp8 rounding changed nothing"
    assert torch.equal(got, want)


def test_save_pretrained_round_trips_through_diffusers_loader(reference, tmp_path):
    dit, inputs, want = reference
    dit.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["_class_name"] == "LongCatTransformer3DModel"
    back = LongCatTransformer3DModel.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(back(**inputs), want)
    # "bf16" loaded fp32 here (diffusers warned), bf16 from a checkpoint
    assert LongCatTransformer3DModel.from_pretrained(tmp_path / "saved",
                                                     torch_dtype="bf16").dtype == torch.bfloat16


def test_from_pretrained_takes_what_diffusers_loader_passes_at_its_defaults(tiny_native):
    """diffusers' pipeline loader always passes these, empty; they were refused as unknown."""
    model = LongCatTransformer3DModel.from_pretrained(
        tiny_native, max_memory=None, offload_folder=None, offload_state_dict=False,
        disable_mmap=False, cache_dir=None, variant=None, low_cpu_mem_usage=True)
    assert model.dtype == torch.float32


def test_from_config_reads_either_flavour(layouts):
    for layout, sub in SUBFOLDER.items():
        cfg = json.loads((layouts[layout] / sub / "config.json").read_text())
        with torch.device("meta"):
            model = LongCatTransformer3DModel.from_config(cfg)
        assert model.dims.num_heads == cfg.get("num_heads", cfg.get("num_attention_heads"))
        assert len(model.blocks) == cfg["depth"]


@pytest.mark.parametrize("args, kwargs, says", [
    (("{root}/nowhere",), {}, "no such folder"),
    (("{root}",), {"subfolder": "../x"}, "leaves the checkpoint folder"),
    (("{root}",), {"subfolder": "vae"}, "describes AutoencoderKLWan, not the LongCat-Video DiT"),
    (("{root}",), {"subfolder": "lora"}, "not a LongCat-Video checkpoint"),
    (("{root}",), {"quantization_config": object()}, "'quantization_config' is not supported"),
    (("{root}",), {"variant": "fp16"}, "'variant' is not supported"),
    (("{root}",), {"parallel_config": object()}, "'parallel_config' is not supported"),
    (("{root}",), {"device_map": "balanced"}, "device_map 'balanced': only one device"),
    (("{root}",), {"device_map": {"": "cpu"}}, "only one device"),
    # a typo and a config override loaded fp32 and the config as if they were not given
    (("{root}",), {"torch_dype": torch.bfloat16}, "'torch_dype' is not a keyword it takes"),
    (("{root}",), {"depth": 1}, "'depth' is not a keyword it takes from a checkpoint"),
    (("{root}",), {"output_loading_info": True}, "output_loading_info is for save_pretrained"),
    (("{root}",), {"torch_dtype": "bf17"}, "bf17"),
])
def test_from_pretrained_refuses_bad_input_in_one_line(tiny_native, args, kwargs, says):
    args = tuple(a.format(root=tiny_native) for a in args)
    with pytest.raises(LongcatError, match=says) as e:
        LongCatTransformer3DModel.from_pretrained(*args, **kwargs)
    assert "\n" not in str(e.value)


# -- LoRA: diffusers' load_lora_adapter on our PEFT export against our own LoRA path -----------

@pytest.fixture(scope="module")
def peft_exports(tiny_native, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dfm-peft")
    out = {}
    for name in LORA_FILES:
        folder = root / name
        folder.mkdir()
        assert main(["lora", "export", name, "--format", "peft", "--keys", "native", "-m",
                     str(tiny_native), "--out", str(folder / PEFT_FILE), "-q"]) == 0
        out[name] = folder
    return out


@pytest.mark.parametrize("active", [{"distilled": 1.0}, {"refinement": 0.6},
                                    {"distilled": 0.5, "refinement": 1.0}])
def test_load_lora_adapter_equals_our_lora_path(tiny_native, peft_exports, reference, active):
    dit, inputs, plain = reference
    ours = load_transformer(tiny_native)
    for name, scale in active.items():
        ours.load_lora(str(tiny_native / "lora" / LORA_FILES[name]), name, scale=scale)
    ours.enable_loras(list(active))

    peft = LongCatTransformer3DModel.from_pretrained(tiny_native)
    for name in active:
        peft.load_lora_adapter(str(peft_exports[name]), weight_name=PEFT_FILE, adapter_name=name,
                               prefix="transformer")
    peft.set_adapters(list(active), weights=list(active.values()))
    with torch.no_grad():
        want, got = ours(**inputs), peft(**inputs)
    assert not torch.allclose(want, plain, rtol=1e-3, atol=1e-3), "the LoRA changed nothing"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_peft_adapters_on_an_fp8_model_are_refused_in_one_line(tiny_native, peft_exports):
    """PEFT would cast the adapter to the e4m3 weight's dtype; ours merges it instead."""
    model = LongCatTransformer3DModel.from_pretrained(tiny_native, torch_dtype=torch.bfloat16)
    model.to_fp8()
    with pytest.raises(LongcatError, match="through load_lora and enable_loras") as e:
        model.load_lora_adapter(str(peft_exports["distilled"]), weight_name=PEFT_FILE,
                                adapter_name="distilled", prefix="transformer")
    assert "\n" not in str(e.value) and not hasattr(model.blocks[0].attn.qkv, "base_layer")


def test_peft_adapters_and_ours_stack(tiny_native, peft_exports, reference):
    """A PEFT adapter wraps our Linear as base_layer; our adapters still attach below it."""
    _, inputs, _ = reference
    both = load_transformer(tiny_native)
    both.load_lora(str(tiny_native / "lora" / LORA_FILES["distilled"]), "distilled")
    both.load_lora(str(tiny_native / "lora" / LORA_FILES["refinement"]), "refinement")
    both.enable_loras(["distilled", "refinement"])
    mixed = LongCatTransformer3DModel.from_pretrained(tiny_native)
    mixed.load_lora_adapter(str(peft_exports["refinement"]), weight_name=PEFT_FILE,
                            adapter_name="refinement", prefix="transformer")
    mixed.load_lora(str(tiny_native / "lora" / LORA_FILES["distilled"]), "distilled")
    mixed.enable_loras(["distilled"])
    with torch.no_grad():
        torch.testing.assert_close(mixed(**inputs), both(**inputs), rtol=1e-5, atol=1e-5)


def test_save_pretrained_into_a_transformer_folder_loads_back(reference, tmp_path):
    """Our class shares FastVideo's class name but saves native keys: the folder must still be
    read as native, alone or as a checkpoint's transformer/."""
    dit, inputs, want = reference
    dit.save_pretrained(tmp_path / "out" / "transformer")
    for args, kwargs in (((tmp_path / "out" / "transformer",), {}),
                         ((tmp_path / "out",), {"subfolder": "transformer"})):
        back = LongCatTransformer3DModel.from_pretrained(*args, **kwargs)
        with torch.no_grad():
            assert torch.equal(back(**inputs), want)


def test_save_pretrained_writes_a_config_our_schema_takes_and_never_into_a_checkpoint(
        tiny_native, reference, tmp_path, capsys):
    """Its config (num_attention_heads null) failed our schema, so `run` and `verify` refused
    the saved DiT; saved into the checkpoint it came from, diffusers deleted the shards and
    left the index naming them."""
    import shutil

    from longcat_tools import schemas

    dit, _, _ = reference
    dit.save_pretrained(tmp_path / "saved")
    schemas.validate(json.loads((tmp_path / "saved" / "config.json").read_text()),
                     "transformer_config", "saved")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_native, ckpt)
    before = sorted(p.name for p in (ckpt / "dit").iterdir())
    with pytest.raises(LongcatError, match="inside the checkpoint"):
        dit.save_pretrained(ckpt / "dit")
    assert sorted(p.name for p in (ckpt / "dit").iterdir()) == before
    shutil.rmtree(ckpt / "dit")
    shutil.copytree(tmp_path / "saved", ckpt / "dit")  # a saved DiT in a checkpoint runs
    assert main(["run", "-m", str(ckpt), "-p", "x", "--height", "32", "--width", "32",
                 "--frames", "5", "--steps", "1", "--device", "cpu", "-q",
                 "-o", str(tmp_path / "v.mp4")]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("name", ["cache_dir", "token", "force_download"])
def test_hub_download_options_are_refused_not_ignored(tiny_native, name):
    with pytest.raises(LongcatError, match=f"'{name}' is not supported .*local Hugging Face"):
        LongCatTransformer3DModel.from_pretrained(tiny_native, **{name: "x"})


def test_revision_names_a_cached_snapshot(tmp_path, monkeypatch):
    """``revision=`` reaches the cache lookup as ``org/name@revision`` (nothing downloads)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LongcatError, match="meituan-longcat/LongCat-Video@abc123") as e:
        LongCatTransformer3DModel.from_pretrained("meituan-longcat/LongCat-Video",
                                                  subfolder="dit", revision="abc123")
    assert "\n" not in str(e.value)


def test_load_lora_refuses_a_scale_that_is_no_finite_number(tiny_native):
    """NaN or inf merged into every target weight without a word; an unknown name to
    enable_loras was a bare KeyError."""
    dit = LongCatTransformer3DModel.from_pretrained(tiny_native, subfolder="dit")
    lora = tiny_native / "lora" / "cfg_step_lora.safetensors"
    for scale, says in ((float("nan"), "scale nan"), (float("inf"), "scale inf"),
                        ("1", "expected a number")):
        with pytest.raises(LongcatError, match=says):
            dit.load_lora(str(lora), "a", scale=scale)
    assert dit.lora_registry == {}
    dit.load_lora(str(lora), "a", scale=0.5)
    with pytest.raises(LongcatError, match="'zzz' is not loaded .*loaded: a"):
        dit.enable_loras(["zzz"])
    with pytest.raises(LongcatError, match=r"enable_loras\('a'\): give a list of names"):
        dit.enable_loras("a")  # its letters were taken as names ("ref": r, e, f)


def test_from_pretrained_names_torch_dtype_and_device_as_given(tiny_native):
    """It said '--dtype torch.int8', the command line's flag; device="gpu" raised torch's list
    of device types."""
    with pytest.raises(LongcatError, match="^torch_dtype=torch.int8: unknown dtype"):
        LongCatTransformer3DModel.from_pretrained(tiny_native, torch_dtype=torch.int8)
    with pytest.raises(LongcatError, match="^device=gpu: not a device"):
        LongCatTransformer3DModel.from_pretrained(tiny_native, device="gpu")
