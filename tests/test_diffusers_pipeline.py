"""``LongCatVideoPipeline`` as a diffusers pipeline: ``from_pretrained(converted)(prompt=...)``
gives exactly the frames and latents of ``longcat-tools run`` with the same seed, the task follows
from the inputs, ``callback_on_step_end`` and ``output_type`` behave as in diffusers, bad
arguments are one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from longcat_tools import LongCatVideoPipeline
from longcat_tools.cli import main
from longcat_tools.errors import LongcatError
from longcat_tools.runner import video as vio

SIZE = dict(num_frames=9, height=64, width=64, num_inference_steps=2)


@pytest.fixture(scope="module")
def converted(tiny_native, tmp_path_factory):
    dst = tmp_path_factory.mktemp("dfp") / "converted"
    assert main(["convert", "--src", str(tiny_native), "--dst", str(dst), "-q"]) == 0
    return dst


@pytest.fixture(scope="module")
def pipe(converted):
    return LongCatVideoPipeline.from_pretrained(converted)


def test_pipeline_call_equals_longcat_tools_run(pipe, converted, tmp_path, monkeypatch):
    """The acceptance call, against the CLI's frames (captured before H.264) and latents."""
    from safetensors.torch import load_file

    written = {}
    encode = vio.encode_mp4

    def capture(path, frames, fps, crf=18, audio=None):
        written["frames"] = frames.copy()
        return encode(path, frames, fps, crf, audio=audio)

    monkeypatch.setattr(vio, "encode_mp4", capture)
    assert main(["run", "-q", "-m", str(converted), "-p", "a cat", "--frames", "9",
                 "--height", "64", "--width", "64", "--steps", "2", "--seed", "7",
                 "--out", str(tmp_path / "run.mp4"),
                 "--save-latents", str(tmp_path / "run.safetensors")]) == 0
    out = pipe(prompt="a cat", generator=torch.Generator().manual_seed(7), **SIZE)
    assert out.frames.shape == (1, 9, 64, 64, 3) and out.frames.dtype == np.float32
    assert written["frames"].dtype == np.float32  # t2v hands [0, 1] floats to the encoder
    assert np.array_equal(out.frames[0], written["frames"])
    latents = pipe(prompt="a cat", generator=torch.Generator().manual_seed(7),
                   output_type="latent", **SIZE).frames
    assert torch.equal(latents, load_file(tmp_path / "run.safetensors")["latents"])
    other = pipe(prompt="a cat", generator=torch.Generator().manual_seed(8),
                 output_type="latent", **SIZE).frames
    assert not torch.equal(other, latents)


def test_image_and_video_pick_the_task(pipe):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    gen = torch.Generator().manual_seed(3)
    got = pipe(prompt="a cat", image=image, generator=gen, output_type="latent", **SIZE).frames
    want = pipe.i2v(image, "a cat", height=64, width=64, num_frames=9, steps=2,
                    negative_prompt=pipe_default_negative(), seed=3, decode=False).latents
    assert torch.equal(got, want)
    frames = [image] * 9
    got = pipe(prompt="a cat", video=frames, num_cond_frames=5, distill=True, seed=4,
               output_type="latent", **SIZE).frames
    want = pipe.vc(frames, "a cat", height=64, width=64, num_frames=9, num_cond_frames=5,
                   steps=2, distill=True, seed=4, decode=False).latents
    assert torch.equal(got, want)


def pipe_default_negative() -> str:
    from longcat_tools.runner.pipeline import DEFAULT_NEGATIVE_PROMPT

    return DEFAULT_NEGATIVE_PROMPT


def test_callback_sees_every_step_and_may_replace_the_latents(pipe):
    seen = []

    def callback(p, step, t, kw):
        seen.append((step, float(t), tuple(kw["latents"].shape)))
        return {"latents": torch.zeros_like(kw["latents"])}

    out = pipe(prompt="a cat", distill=True, output_type="latent",
               callback_on_step_end=callback, **SIZE)
    assert [s[0] for s in seen] == [0, 1] and seen[0][1] > seen[1][1]
    assert seen[0][2] == (1, 16, 3, 8, 8)
    assert torch.count_nonzero(out.frames) == 0


def test_output_types(pipe):
    kw = dict(prompt="a cat", distill=True, generator=None, **SIZE)
    np_frames = pipe(output_type="np", **kw).frames
    pil = pipe(output_type="pil", **kw).frames
    pt = pipe(output_type="pt", return_dict=False, **kw)[0]
    assert len(pil) == 1 and len(pil[0]) == 9 and pil[0][0].size == (64, 64)
    assert np.array_equal(np.asarray(pil[0][4]), (np_frames[0, 4] * 255).round().astype(np.uint8))
    assert pt.shape == (1, 9, 3, 64, 64)
    assert torch.equal(pt.permute(0, 1, 3, 4, 2), torch.from_numpy(np_frames))


@pytest.mark.parametrize("kwargs, says", [
    ({"output_type": "mp4"}, "output_type 'mp4'"),
    ({"task": "dance"}, "task 'dance': unknown"),
    ({"num_cond_frames": 5}, "task t2v takes no 'num_cond_frames'"),
    ({"callback_on_step_end": lambda *a: {}, "callback_on_step_end_tensor_inputs": ["noise"]},
     "only ['latents'] are offered"),
    # the keywords' words (they named the command line's --frames, --steps, --guidance)
    ({"num_frames": 10}, "num_frames=10: must be 4k.1"),
    ({"num_inference_steps": 0}, "num_inference_steps=0: must be 1 to 1000"),
    ({"guidance_scale": 101.0}, "guidance_scale=101.0: must be a number from 0 to 100"),
    ({"task": "vc", "video": [np.zeros((64, 64, 3), np.uint8)] * 9, "num_frames": 9},
     "num_cond_frames=13: must be 4k.1 and below num_frames"),
    ({"task": "i2v"}, "task i2v needs image="),
    ({"task": "refine", "num_frames": None}, "task refine needs video="),
    # the default of the other was taken: 64x832 (the command line refuses --height alone)
    ({"width": None}, "height= and width= go together"),
    # named the method's guidance, and listed decode, which pipe() sets itself
    ({"task": "refine", "video": [Image.new("RGB", (64, 64))] * 5, "num_frames": None,
      "guidance_scale": 2.0}, "task refine takes no 'guidance_scale' (its options: video, "
     "prompt, image, condition_video, num_cond_frames, height, width, num_inference_steps, t_"),
    ({"prompt": None}, "task t2v needs prompt="),
    # each reached torch, PIL or ftfy, or (a numpy seed) hung the range check
    ({"seed": "7"}, "seed='7': expected int, not str"),
    ({"guidance_scale": "4"}, "guidance_scale='4': expected a number"),
    ({"num_frames": 9.0}, "num_frames=9.0: expected int, not float"),
    ({"prompt": 5}, "prompt=5: expected str, not int"),
    ({"distill": "no"}, "distill='no': expected bool"),
    ({"seed": 1, "generator": torch.Generator().manual_seed(42)}, "seed= and generator="),
    # torch's own TypeError from randn
    ({"generator": [torch.Generator()] * 2}, "generator: expected a torch.Generator .*, not a "
     "list of 2"),
    ({"generator": 5}, "generator: expected a torch.Generator"),
    ({"task": "long", "video": [np.zeros((64, 64, 3), np.uint8)] * 9, "num_segments": 1,
      "num_cond_frames": 5, "latents": torch.zeros(1, 16, 3, 8, 8)},
     "latents=: a long run from video= samples no first segment"),
    ({"image": Image.new("RGB", (0, 0))}, "image: an empty image"),
    ({"callback_on_step_end": 5}, "callback_on_step_end: a function expected"),
    ({"callback_on_step_end": lambda *a: {"latents": torch.zeros(2)}},
     "callback_on_step_end returned latents [2] at step 0"),
    ({"task": "refine", "video": [Image.new("RGB", (64, 64))] * 5, "num_frames": None,
      "image": Image.new("RGB", (64, 64)), "num_cond_frames": 9},
     "num_cond_frames 9: an image condition is one frame"),
])
def test_bad_arguments_are_one_line(pipe, kwargs, says):
    with pytest.raises(LongcatError, match=says.replace("[", r"\[").replace("(", r"\(")) as e:
        pipe(**{"prompt": "a cat", **SIZE, **kwargs})
    assert "\n" not in str(e.value)


def test_numpy_and_torch_scalars_are_taken_as_the_numbers_they_hold(pipe):
    """A numpy seed hung the seed check, and torch's generator refuses one."""
    kw = dict(prompt="a cat", distill=True, **SIZE)
    frames = pipe(seed=3, **kw).frames
    same = pipe(seed=np.int64(3), **{**kw, "height": np.int64(64), "lora_scale": np.float32(1)})
    assert np.array_equal(same.frames, frames)
    # 0-d arrays and tensors too (refused as "expected int, not Tensor")
    same = pipe(seed=torch.tensor(3), **{**kw, "height": np.array(64),
                                        "lora_scale": torch.tensor(1.0), "distill": np.array(True)})
    assert np.array_equal(same.frames, frames)
    pipe(prompt="a cat", guidance_scale=np.float32(2.0), use_kv_cache=np.bool_(False),
         task="vc", video=frames, num_cond_frames=5, **SIZE)
    pipe(seed=None, generator=torch.Generator().manual_seed(0), **kw)  # seed=None: not given
    one = pipe(generator=[torch.Generator().manual_seed(3)], **kw)  # diffusers' list form
    assert np.array_equal(one.frames, frames)


def test_from_pretrained_names_torch_dtype_as_given(tiny_native):
    with pytest.raises(LongcatError, match="^torch_dtype=fp64: unknown dtype"):
        LongCatVideoPipeline.from_pretrained(tiny_native, torch_dtype="fp64")
    with pytest.raises(LongcatError, match="^text_encoder_dtype int8: unknown dtype"):
        LongCatVideoPipeline.from_pretrained(tiny_native, text_encoder_dtype="int8")  # torch_dtype


def test_a_device_that_is_not_there_is_one_line(tiny_native):
    """torch's assert (no CUDA) or its list of every device type came through."""
    with pytest.raises(LongcatError, match="device=gpu: not a device"):
        LongCatVideoPipeline.from_pretrained(tiny_native, device="gpu")
    if not torch.cuda.is_available():
        for device in ("cuda", 0, torch.device("cuda:0")):  # an index was a raw RuntimeError
            with pytest.raises(LongcatError, match="no CUDA GPU is available here"):
                LongCatVideoPipeline.from_pretrained(tiny_native, device=device)
    with pytest.raises(LongcatError, match="not a device"):
        LongCatVideoPipeline.from_pretrained(tiny_native, device=1.5)


def test_inputs_in_the_forms_the_pipeline_hands_out_are_taken(pipe):
    """An RGBA or gray image reached the VAE with 4 or 1 channels; the "np" output as vc's
    video failed in PIL."""
    kw = dict(prompt="a cat", distill=True, **SIZE)
    rgb = Image.new("RGB", (64, 64), (200, 120, 40))
    first = pipe(image=rgb, **kw).frames
    assert np.array_equal(pipe(image=rgb.convert("RGBA"), **kw).frames, first)
    frames = pipe(**kw).frames  # [1, F, H, W, 3] floats in [0, 1]
    as_uint8 = [Image.fromarray(f) for f in (frames[0] * 255).round().astype(np.uint8)]
    vc = dict(task="vc", num_cond_frames=5, **kw)
    assert np.array_equal(pipe(video=frames, **vc).frames, pipe(video=as_uint8, **vc).frames)


@pytest.mark.parametrize("method", ["enable_model_cpu_offload", "enable_sequential_cpu_offload",
                                    "enable_group_offload"])
def test_pipeline_wide_offload_is_refused_in_one_line(pipe, method):
    """Those hooks would move modules while the tasks create tensors on the load device."""
    kwargs = {"onload_device": torch.device("cuda")} if method == "enable_group_offload" \
        else {"device": "cuda"}
    with pytest.raises(LongcatError, match="offload='text-encoder'") as e:
        getattr(pipe, method)(**kwargs)
    assert "\n" not in str(e.value)
    assert pipe.device == torch.device("cpu")


def test_diffusers_generic_loader_cannot_build_it(converted):
    """Why ``DiffusionPipeline.from_pretrained`` is not offered (docs say so): FastVideo's
    model_index.json, which must stay byte-equal, names "LongCatPipeline" and a tokenizer entry
    "AutoTokenizer" that diffusers cannot load as a component. If diffusers ever loads it, this
    fails and the docs should change."""
    from diffusers import DiffusionPipeline

    with pytest.raises((AttributeError, ValueError)):
        DiffusionPipeline.from_pretrained(converted)


@pytest.mark.parametrize("remove, says", [("vae/config.json", "vae/config.json: missing"),
                                          ("tokenizer", "tokenizer_config.json: missing")])
def test_from_pretrained_checks_components_before_loading(converted, tmp_path, remove, says):
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(converted, copy)
    target = copy / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(LongcatError, match=says) as e:
        LongCatVideoPipeline.from_pretrained(copy)
    assert "\n" not in str(e.value)



def test_a_pipeline_built_from_parts_needs_its_loras_loaded(pipe, converted):
    from longcat_tools import LongCatTransformer3DModel

    dit = LongCatTransformer3DModel.from_pretrained(converted)
    parts = LongCatVideoPipeline(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.scheduler, dit)
    with pytest.raises(LongcatError, match="no 'distilled' LoRA loaded"):
        parts(prompt="a cat", distill=True, **SIZE)
    frames = parts(prompt="a cat", generator=torch.Generator().manual_seed(7), **SIZE).frames
    want = pipe(prompt="a cat", generator=torch.Generator().manual_seed(7), **SIZE).frames
    assert np.array_equal(frames, want)


def test_save_pretrained_checks_before_writing_and_writes_a_new_folder_whole(
        pipe, converted, tmp_path, monkeypatch):
    """Into the checkpoint it came from, save_pretrained rewrote the text encoder (its shards
    deleted, the index left naming them) before the DiT refused; with a LoRA merged it left a
    half-written folder."""
    from longcat_tools.io.atomic import partial_path

    te = converted / "text_encoder"
    before = sorted(p.name for p in te.iterdir())
    with pytest.raises(LongcatError, match="inside the checkpoint"):
        pipe.save_pretrained(converted)
    assert sorted(p.name for p in te.iterdir()) == before
    assert main(["verify", str(converted), "-q"]) == 0
    with pipe.adapters("distilled"):
        with pytest.raises(LongcatError, match="is merged into the weights"):
            pipe.save_pretrained(tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    monkeypatch.setattr(type(pipe.vae), "save_pretrained",
                        lambda *_a, **_k: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OSError):
        pipe.save_pretrained(tmp_path / "full")
    assert not (tmp_path / "full").exists() and not partial_path(tmp_path / "full").exists()
    monkeypatch.undo()
    pipe.save_pretrained(tmp_path / "new" / "saved")  # missing parents are made, as diffusers
    again = LongCatVideoPipeline.from_pretrained(tmp_path / "new" / "saved")
    assert torch.equal(again.transformer.blocks[0].attn.qkv.weight,
                       pipe.transformer.blocks[0].attn.qkv.weight)


def test_loading_leaves_the_callers_library_logging_as_it_was(converted):
    """from_pretrained set transformers and diffusers to errors only, bars off, for the rest of
    the caller's process."""
    import diffusers
    import transformers

    logs = (transformers.utils.logging, diffusers.utils.logging)
    for lib in logs:
        lib.set_verbosity_info()
        lib.enable_progress_bar()
    try:
        LongCatVideoPipeline.from_pretrained(converted)
        assert [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in logs] == [
            (transformers.logging.INFO, True), (diffusers.utils.logging.INFO, True)]
    finally:
        for lib in logs:
            lib.set_verbosity_warning()
