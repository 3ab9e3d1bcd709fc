"""The avatar pipeline from Python, as docs/avatar.md shows it: odd arguments are one clear
``UsageError`` before any work, never a raw TypeError deep inside or NaN frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from avatar_media import speech, write_wav

from longcat_tools import LongCatVideoPipeline
from longcat_tools.errors import LongcatError, UsageError
from longcat_tools.model import avatar
from longcat_tools.runner.avatar_pipeline import DrivingAudio, LongCatVideoAvatarPipeline

pytest.importorskip("onnx")  # synth writes the avatar's vocal separator with it

SMALL = {"num_frames": 9, "steps": 1, "height": 32, "width": 32}


@pytest.fixture(scope="module")
def folder(avatar_trees):
    return avatar_trees["avatar-1.5"] / avatar.VERSIONS["avatar-1.5"].folder


@pytest.fixture(scope="module")
def pipe(folder):
    return LongCatVideoAvatarPipeline.from_pretrained(folder)


@pytest.fixture(scope="module")
def wav(tmp_path_factory):
    return write_wav(tmp_path_factory.mktemp("api") / "a.wav", speech(1.0))


@pytest.fixture(scope="module")
def audio(pipe, wav):
    return pipe.audio_from_files([wav], separate=False, seconds=1.0)


@pytest.fixture(scope="module")
def clip(audio):
    return audio.clip(0, 9)


def test_one_path_is_taken_as_a_list_of_one(pipe, wav, audio):
    one = pipe.audio_from_files(str(wav), separate=False, seconds=1.0)
    assert one.info["files"] == [str(wav)]
    assert torch.equal(one.clip(0, 9), audio.clip(0, 9))


@pytest.mark.parametrize("paths, seconds, message", [
    ([], 1.0, "give one audio file's path"),  # was an IndexError
    ([np.zeros(8)], 1.0, "give one audio file's path"),
    (["a.wav"] * 3, 1.0, "at most 2 speakers"),
    (None, float("nan"), r"seconds=nan\): the video's length"),  # was a ValueError
    (None, -1.0, r"seconds=-1.0\): the video's length"),  # was taken as 0
])
def test_audio_from_files_refuses_odd_arguments(pipe, wav, paths, seconds, message):
    with pytest.raises(UsageError, match=message):
        pipe.audio_from_files([wav] if paths is None else paths, seconds=seconds)


@pytest.mark.parametrize("start, frames, message", [
    (-3, 9, r"clip\(start_frame=-3\)"), (0, 0, r"clip\(num_frames=0\)"),
    (0, 2.5, r"clip\(num_frames=2.5\)")])
def test_a_clip_is_whole_frames_from_the_start(audio, start, frames, message):
    with pytest.raises(UsageError, match=message):
        audio.clip(start, frames)
    assert audio.clip(np.int64(0), 9).shape[:2] == (1, 9)


@pytest.mark.parametrize("change, message", [
    (lambda c: {"audio_emb": c.numpy()}, r"audio_emb=: expected a torch.Tensor \(torch.from_numpy"),
    (lambda c: {"audio_emb": DrivingAudio([c], 1, np.zeros(1))}, r"\(its clip: audio.clip\("),
    (lambda c: {"audio_emb": c * float("nan")}, "audio_emb=: holds NaN or Inf"),  # NaN frames
    (lambda c: {"audio_emb": c, "latents": np.zeros((1, 16, 3, 4, 4), np.float32)},
     "latents=: expected a torch.Tensor"),
    (lambda c: {"audio_emb": c, "latents": torch.full((1, 16, 3, 4, 4), float("inf"))},
     "latents=: holds NaN or Inf"),
])
def test_tensor_arguments_are_finite_torch_tensors(pipe, clip, change, message, monkeypatch):
    """A numpy clip failed on .dim(); NaN audio made NaN frames."""
    monkeypatch.setattr(pipe, "encode_text", lambda *a: pytest.fail("work began"))
    with pytest.raises(UsageError, match=message):
        pipe.at2v(prompt="a man talks", **change(clip), **SMALL)


def test_the_base_pipeline_names_the_avatar_class(folder):
    with pytest.raises(LongcatError, match="load it with LongCatVideoAvatarPipeline"):
        LongCatVideoPipeline.from_pretrained(folder)


@pytest.fixture(scope="module")
def pipe10(avatar_trees):
    return LongCatVideoAvatarPipeline.from_pretrained(
        avatar_trees["avatar-1.0"] / avatar.VERSIONS["avatar-1.0"].folder, audio=False)


def test_seconds_beyond_the_audio_limit_are_refused(pipe, wav):
    with pytest.raises(UsageError, match="seconds=1000000.0.*0 to 600"):  # a 119 GiB array
        pipe.audio_from_files([wav], seconds=1e6)


def clips(clip: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"clip": clip, "clip5": clip[:, :5], "three": torch.cat([clip] * 3),
            "two": torch.cat([clip] * 2)}


@pytest.mark.parametrize("which, kw, message", [
    ("clip5", {}, "audio_emb covers 5 video frames, the clip has 9"),
    ("three", {}, "audio_emb has 3 speakers; at most 2"),
    ("two", {"ref_target_masks": torch.ones(2, 32, 32)},
     r"ref_target_masks has 2 regions; 2 speaker\(s\) need 3"),
    ("clip", {"ref_target_masks": torch.ones(32, 32)},
     r"ref_target_masks: \[regions, height, width\]"),
    ("clip", {"image": "face.png"}, "image: a PIL image expected, not str"),
])
def test_ai2v_checks_its_audio_masks_and_image(pipe, clip, which, kw, message, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(pipe, "encode_text", lambda *a: pytest.fail("work began"))
    kw = {"image": Image.new("RGB", (32, 32)), **SMALL, **kw}
    with pytest.raises(UsageError, match=message):
        pipe.ai2v(audio_emb=clips(clip)[which], prompt="a man talks", **kw)


@pytest.mark.parametrize("which, kw, message", [
    ("clip5", {"use_kv_cache": True}, "audio_emb covers 5 video frames"),  # ran misaligned
    ("clip", {"ref_latent": torch.zeros(1, 16, 1, 2, 2)}, "ref_latent has shape"),
    ("clip", {"mask_frame_range": -1}, "mask_frame_range=-1: a whole number, 0 or more"),
    ("clip", {"ref_img_index": "x"}, "ref_img_index='x': a whole number"),
])
def test_avc_checks_its_audio_and_reference(pipe, clip, which, kw, message, monkeypatch):
    monkeypatch.setattr(pipe, "encode_text", lambda *a: pytest.fail("work began"))
    video = np.zeros((9, 32, 32, 3), np.uint8)
    with pytest.raises(UsageError, match=message):
        pipe.avc(video, clips(clip)[which], "a man talks", num_cond_frames=5, **SMALL, **kw)


def test_10_refuses_a_lora_scale_it_has_no_lora_for(pipe10, clip, monkeypatch):
    """1.0 ships no LoRA: lora_scale=0.1 gave latents equal to the run without it."""
    monkeypatch.setattr(pipe10, "encode_text", lambda *a: pytest.fail("work began"))
    with pytest.raises(UsageError, match="lora_scale=0.1: this run activates no LoRA"):
        pipe10.at2v(clip, "a man talks", distill=True, lora_scale=0.1, **SMALL)
