"""The base pipeline from Python: odd arguments are one clear error before any work, as the
command line's, never a raw error deep inside, NaN frames or a process killed for memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from longcat_tools import LongCatVideoPipeline
from longcat_tools.errors import LongcatError, UsageError
from longcat_tools.runner.attention import BSAParams

KW = {"prompt": "a cat", "num_frames": 5, "height": 32, "width": 32, "num_inference_steps": 1,
      "guidance_scale": 1.0}


@pytest.fixture(scope="module")
def pipe(tiny_native):
    return LongCatVideoPipeline.from_pretrained(tiny_native)


@pytest.fixture
def no_work(pipe, monkeypatch):
    monkeypatch.setattr(pipe, "encode_text", lambda *a: pytest.fail("work began"))


def test_a_size_beyond_memory_is_refused_as_run_refuses_it(pipe, no_work):
    """The API skipped run's memory estimate: 100000x100000 grew to 21 GB and was killed."""
    with pytest.raises(LongcatError, match="one DiT forward needs about .* of activations"):
        pipe(**{**KW, "height": 100000, "width": 100000})


@pytest.mark.parametrize("bsa, message", [
    ({"sparsty": 0.1}, "'sparsty' was unexpected"),  # ran at the default sparsity
    ({"sparsity": 1.5}, "bsa_params/sparsity"),  # failed in the kernel's reference
    ({"sparsity": float("nan")}, "bsa_params/sparsity: nan"),
    ({"sparsity": "0.5"}, "bsa_params/sparsity"),
    ({"chunk_3d_shape_q": [0, 4, 4]}, "chunk_3d_shape_q"),
    (BSAParams(sparsity=None, cdf_threshold=None), "bsa: bsa_params"),
    ("ON", "bsa=ON: unknown"),  # the value was dropped from the message
])
def test_bsa_settings_are_checked_before_work(pipe, no_work, bsa, message):
    with pytest.raises(UsageError, match=message):
        pipe(**KW, bsa=bsa)


def test_the_dit_takes_every_bsa_form_the_pipeline_takes(pipe):
    dit = pipe.transformer
    before = dit.bsa
    try:
        dit.enable_bsa("720p-quality")  # a preset name was a TypeError
        assert dit.bsa.sparsity == 0.875
        dit.enable_bsa(True)
        assert dit.bsa == BSAParams.from_config(dit.config.bsa_params)
        with pytest.raises(UsageError, match="'sparsty' was unexpected"):
            dit.enable_bsa({"sparsty": 0.2})  # was ignored
    finally:
        dit.bsa = before
    x = torch.zeros(1, 16, 2, 4, 4)
    y = torch.zeros(1, 1, 8, dit.dims.caption_channels)
    dense = dit(x, torch.zeros(1), y, bsa=None)
    assert torch.equal(dit(x, torch.zeros(1), y, bsa="off"), dense)  # was an AttributeError


@pytest.mark.parametrize("call, message", [
    (lambda p: p.generate(task="t2v", prompt="x", num_inference_steps=1),
     r"t2v\(\) takes no 'num_inference_steps'; steps= here"),
    (lambda p: p.t2v("x", foo=1), r"t2v\(\) takes no 'foo' \(its options: prompt,"),
    (lambda p: p.t2v(), r"t2v\(\): missing a required argument: 'prompt'"),
])
def test_a_task_method_names_itself_and_its_options(pipe, no_work, call, message):
    with pytest.raises(UsageError, match=message):  # was inspect's TypeError
        call(pipe)


@pytest.mark.parametrize("extra, message", [
    ({"latents": torch.full((1, 16, 2, 4, 4), float("nan"))}, "latents=: holds NaN"),
    ({"latents": [1, 2]}, "latents=: expected a torch.Tensor, not list"),
    ({"latents": np.zeros((1, 16, 2, 4, 4), np.float32)}, r"\(torch.from_numpy\)"),
    ({"num_frames": 9, "num_cond_frames": 5, "video": np.full((9, 32, 32, 3), 200.0, np.float32)},
     r"float frames must lie in \[0, 1\]"),  # clipped to a white video
])
def test_inputs_are_refused_before_work(pipe, no_work, extra, message):
    with pytest.raises(UsageError, match=message):
        pipe(**{**KW, **extra})


@pytest.mark.parametrize("returned, message", [
    (lambda d: d["latents"], "give back a dict with 'latents'"),  # a tensor's truth value
    (lambda d: {"latents": d["latents"] * float("nan")}, "with NaN or Inf at step 0"),
])
def test_a_step_callback_returning_something_else_is_one_line(pipe, returned, message):
    with pytest.raises(UsageError, match=message):
        pipe(**KW, callback_on_step_end=lambda p, i, t, d: returned(d))


def test_tensor_inputs_given_as_one_name_are_not_split_into_letters(pipe):
    seen = []
    pipe(**KW, callback_on_step_end=lambda p, i, t, d: seen.append(i),
         callback_on_step_end_tensor_inputs="latents")
    assert seen == [0]


@pytest.mark.parametrize("path, kw, message", [
    (None, {}, "checkpoint: a folder or a repo id expected, not NoneType"),  # pathlib's error
    ("CKPT", {"vae_tiling": "no"}, "vae_tiling='no': True or False"),  # turned tiling on
    ("CKPT", {"fast": "yes"}, "fast='yes': True or False"),
])
def test_from_pretrained_refuses_odd_arguments(tiny_native, path, kw, message):
    with pytest.raises(UsageError, match=message):
        LongCatVideoPipeline.from_pretrained(tiny_native if path == "CKPT" else path, **kw)


def test_adapters_have_names_and_are_enabled_once(pipe, tiny_native):
    dit = pipe.transformer
    lora = next((tiny_native / "lora").rglob("*.safetensors"))
    for name in (None, "", " "):  # accepted; enable_loras' refusal then failed on the None
        with pytest.raises(UsageError, match="give the adapter a name"):
            dit.load_lora(str(lora), name)
    dit.load_lora(str(lora), "style")
    try:
        with pytest.raises(UsageError, match="an adapter is listed twice"):  # applied twice
            dit.enable_loras(["style", "style"])
    finally:
        dit.lora_registry.pop("style")


@pytest.mark.parametrize("t, y, message", [
    (torch.tensor(500.0), None, r"timestep \[\]: expected a tensor of 1 or 2 dimensions"),
    (500.0, None, "timestep float: expected a tensor"),
    (torch.zeros(2), None, "must match hidden_states"),
    (None, torch.zeros(2, 1, 8, 0), "must match hidden_states"),
])
def test_the_dits_forward_checks_its_inputs(pipe, t, y, message):
    """A 0-d timestep failed in a matmul ('mat1 and mat2 shapes cannot be multiplied')."""
    dit = pipe.transformer
    x = torch.zeros(1, dit.dims.in_channels, 2, 4, 4)
    y = torch.zeros(1, 1, 8, dit.dims.caption_channels) if y is None else \
        torch.zeros(2, 1, 8, dit.dims.caption_channels)
    with pytest.raises(UsageError, match=message):
        dit(x, torch.zeros(1) if t is None else t, y)


def test_a_wrong_type_is_named_as_the_caller_spelled_it(pipe, no_work):
    """pipe(num_inference_steps=2.0) was refused as 'steps=2.0'."""
    with pytest.raises(UsageError, match=r"^num_inference_steps=2.0: expected int"):
        pipe(**{**KW, "num_inference_steps": 2.0})
    with pytest.raises(UsageError, match=r"^steps=2.0: expected int"):
        pipe.t2v("a cat", steps=2.0)


def test_dtype_is_torch_dtype_and_both_must_agree(tiny_native):
    """The pipeline's dtype= was a TypeError; the model took dtype= over torch_dtype=."""
    from longcat_tools.runner.dit import LongCatTransformer3DModel

    pipe = LongCatVideoPipeline.from_pretrained(tiny_native, dtype=torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16
    with pytest.raises(UsageError, match="give one of them"):
        LongCatTransformer3DModel.from_pretrained(tiny_native, subfolder="dit",
                                                  dtype=torch.bfloat16, torch_dtype=torch.float16)
