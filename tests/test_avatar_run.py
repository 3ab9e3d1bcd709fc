"""``longcat-tools run --task at2v|ai2v|avc`` on the tiny synthetic avatar trees (1.0 and 1.5):
each task writes a playable mp4 with the speech muxed in and its sidecar; bad audio and misused
options are one line and exit 1 before any weights load."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from avatar_media import RATE, speech, write_wav
from PIL import Image

from longcat_tools.cli import main
from longcat_tools.errors import LongcatError
from longcat_tools.model import avatar
from longcat_tools.runner import avatar_pipeline, video

pytest.importorskip("onnx")  # synth writes the avatar's vocal separator with it

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")  # NaN frames fail the run

TINY = ["--height", "32", "--width", "32", "--frames", "9", "--steps", "1", "-p", "a man talks"]


@pytest.fixture(scope="module")
def trees(avatar_trees):
    """The avatar folders of the session's trees, by version ("1.0", "1.5"); read only."""
    return {m.removeprefix("avatar-"): avatar_trees[m] / v.folder
            for m, v in avatar.VERSIONS.items()}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("avatar-media")
    Image.fromarray((np.random.RandomState(0).rand(48, 64, 3) * 255).astype(np.uint8)) \
        .save(d / "face.png")
    (d / "notaudio.wav").write_text("not a wave file")
    return {"a": write_wav(d / "a.wav", speech(1.2)),
            "b": write_wav(d / "b.wav", speech(1.2, 330.0)),
            "short": write_wav(d / "short.wav", speech(0.2)),
            "long": write_wav(d / "three_s.wav", speech(3.0)),
            "one_hz": write_wav(d / "one_hz.wav", np.array([0.0, 0.5, -0.5, 0.5, 0.0]), rate=1),
            "silent": write_wav(d / "silent.wav", np.zeros(RATE)),
            "notaudio": d / "notaudio.wav", "face": d / "face.png", "dir": d}


def run(capsys, *args: str) -> tuple[int, str]:
    rc = main(["run", "-q", *args])
    return rc, capsys.readouterr().err


def audio_stream(path: Path) -> str | None:
    """ffmpeg's description of the file's audio stream (None: no audio)."""
    import subprocess

    import imageio_ffmpeg

    err = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)],
                         capture_output=True, text=True).stderr
    m = re.search(r"Stream #\S+: Audio: (.*)", err)
    return m.group(1) if m else None


@pytest.mark.parametrize("version", ["1.5", "1.0"])
def test_every_avatar_task_writes_an_mp4_with_the_speech(capsys, trees, media, version):
    """at2v, then ai2v with two speakers, then avc continuing the at2v video: each a playable
    H.264 mp4 at the release's frame rate with an AAC track as long as the video."""
    root, out = trees[version], media["dir"] / version
    fps = 25 if version == "1.5" else 16
    first = out / "at2v.mp4"
    sep = [] if version == "1.5" else ["--no-vocal-separation"]  # 1.5 runs the separator
    rc, err = run(capsys, "-m", str(root), "--task", "at2v", "--audio", str(media["a"]), *TINY,
                  *sep, "-o", str(first))
    assert rc == 0, err
    rc, err = run(capsys, "-m", str(root), "--task", "ai2v", "--image", str(media["face"]),
                  "--audio", str(media["a"]), "--audio", str(media["b"]), "--audio-mode",
                  "concat", "--no-vocal-separation", *TINY, "--height", "64", "--width", "64",
                  "--frames", "33", "-o", str(out / "ai2v.mp4"))  # the second speaker is heard
    assert rc == 0, err
    rc, err = run(capsys, "-m", str(root), "--task", "avc", "--video", str(first),
                  "--cond-frames", "5", "--audio", str(media["a"]), "--no-vocal-separation",
                  *TINY, "-o", str(out / "avc.mp4"))
    assert rc == 0, err
    for task, frames in (("at2v", 9), ("ai2v", 33), ("avc", 9 + 9 - 5)):
        mp4 = out / f"{task}.mp4"
        info = video.probe(mp4)
        assert (info["codec"], info["frames"], info["fps"]) == ("h264", frames, fps)
        stream = audio_stream(mp4)
        assert stream is not None and stream.startswith("aac"), (task, stream)
        doc = json.loads(Path(f"{mp4}.json").read_text())
        assert doc["task"] == task and doc["video"]["frames"] == frames
        assert doc["avatar"]["version"] == f"avatar-{version}"
        assert doc["avatar"]["int8"] is False
        assert doc["avatar"]["files"] == [str(media["a"])] + (
            [str(media["b"])] if task == "ai2v" else [])
        assert doc["avatar"]["vocal_separation"] == (task == "at2v" and version == "1.5")
        assert doc["avatar"]["mode"] == ("concat" if task == "ai2v" else None)
        assert doc["settings"]["audio"] == doc["avatar"]["files"]
    multi = json.loads(Path(f"{out / 'ai2v.mp4'}.json").read_text())
    assert multi["final"]["speakers"] == 2
    if version == "1.0":
        assert "avatar_multi" in multi["avatar"]["dit"]


def test_int8_and_distill_run_on_15(capsys, trees, media):
    out = media["dir"] / "int8.mp4"
    rc, err = run(capsys, "-m", str(trees["1.5"]), "--task", "at2v", "--audio",
                  str(media["a"]), "--int8", "--no-vocal-separation", *TINY, "-o", str(out))
    assert rc == 0, err
    doc = json.loads(Path(f"{out}.json").read_text())
    assert doc["avatar"]["int8"] is True and "base_model_int8" in doc["avatar"]["dit"]
    out = media["dir"] / "dmd.mp4"
    tiny = [a for a in TINY if a not in ("--steps", "1")]
    rc, err = run(capsys, "-m", str(trees["1.5"]), "--task", "at2v", "--audio",
                  str(media["a"]), "--distill", "--int8", "--no-vocal-separation", *tiny, "-o",
                  str(out))
    assert rc == 0, err
    doc = json.loads(Path(f"{out}.json").read_text())
    assert doc["final"]["steps"] == 8 and doc["guidance"] == 1.0 and doc["avatar"]["int8"]
    assert doc["final"]["loras"] and doc["final"]["merged_loras"] == []  # beside int8 layers
    assert doc["loras"] == ["dmd"] and doc["negative_prompt"] is None


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to load the avatar pipeline fails the test."""
    def refuse(*a, **k):
        raise AssertionError("weights were loaded")
    monkeypatch.setattr(avatar_pipeline.LongCatVideoAvatarPipeline, "from_pretrained",
                        classmethod(refuse))


@pytest.mark.parametrize("audio, message, code", [
    ("three_channels", "3 audio channels; vocal separation takes mono", 1),  # after loading
    ("notaudio", "not an audio or video file", 1),
    ("silent", "the audio is silent", 1),
    ("one_hz", "sampled at 1 Hz", 1),  # made a video of nothing heard, exit 0
    ("missing", "no such audio file", 2),
])
def test_bad_audio_is_one_line_before_any_weights(capsys, trees, media, no_weights, audio,
                                                  message, code):
    if audio == "three_channels":
        import wave

        frames = (np.repeat(speech(0.5)[:, None], 3, axis=1) * 32767).astype("<i2")
        with wave.open(str(media["dir"] / "three.wav"), "wb") as w:
            w.setnchannels(3)
            w.setsampwidth(2)
            w.setframerate(16000)
            w.writeframes(frames.tobytes())
    path = (media["dir"] / "three.wav" if audio == "three_channels"
            else media[audio] if audio in media else media["dir"] / "missing.wav")
    rc, err = run(capsys, "-m", str(trees["1.5"]), "--task", "at2v", "--audio", str(path),
                  *TINY, "-o", str(media["dir"] / "bad.mp4"))
    assert rc == code
    assert err.count("\n") == 1 and err.startswith("error: --audio ") and message in err, err


def test_zero_sample_rate_and_overlong_audio_are_refused(capsys, trees, media, no_weights):
    zero = media["dir"] / "zero_rate.wav"
    data = bytearray(write_wav(media["dir"] / "z.wav", speech(0.5)).read_bytes())
    data[24:28] = (0).to_bytes(4, "little")  # the fmt chunk's sample rate
    zero.write_bytes(bytes(data))
    rc, err = run(capsys, "-m", str(trees["1.5"]), "--task", "at2v", "--audio", str(zero),
                  *TINY)
    assert rc == 1 and "sample rate" in err and err.count("\n") == 1, err
    long = write_wav(media["dir"] / "long.wav", np.full(1000 * 620, 0.1), rate=1000)
    rc, err = run(capsys, "-m", str(trees["1.5"]), "--task", "at2v", "--audio", str(long),
                  *TINY)
    assert rc == 1 and "limit" in err and err.count("\n") == 1, err


def test_short_audio_is_padded_with_silence_as_the_original(capsys, trees, media):
    """0.2 s of speech for a 9-frame video (0.56 s at 16 fps): padded, recorded, still muxed."""
    out = media["dir"] / "short.mp4"
    rc, err = run(capsys, "-m", str(trees["1.0"]), "--task", "at2v", "--audio",
                  str(media["short"]), "--no-vocal-separation", *TINY, "-o", str(out))
    assert rc == 0, err
    doc = json.loads(Path(f"{out}.json").read_text())
    assert doc["avatar"]["padded_s"] == pytest.approx(9 / 16 - 0.2, abs=1e-3)
    assert audio_stream(out) is not None


@pytest.mark.parametrize("args, message", [
    (["--task", "t2v", "--audio", "A"], "--audio: only for the avatar tasks"),
    (["--task", "i2v", "--int8"], "--int8: only for the avatar tasks"),
    (["--task", "t2v", "--no-vocal-separation"], "--no-vocal-separation: only for the avatar"),
    (["--task", "at2v", "--audio", "A", "--audio", "A"], "--task at2v takes one speaker"),
    (["--task", "ai2v", "--audio", "A", "--audio", "A", "--audio", "A"], "at most 2"),
    (["--task", "at2v", "--audio", "A", "--refine"], "--refine: not available"),
    (["--task", "at2v", "--audio", "A", "--audio-mode", "both"], "--audio-mode both"),
    (["--task", "at2v", "--audio", "A", "--audio-guidance", "-1"], "--audio-guidance -1"),
    # the mp4 played at 50 fps, its audio cut to match, out of step with the lips; exit 0
    (["--task", "at2v", "--audio", "A", "--fps", "50"], "embeds the speech at 25 fps"),
    (["--task", "at2v", "--audio", "A", "--audio-mode", "concat"], "this run has one"),
    (["--task", "ai2v", "--image", "FACE", "--audio", "A", "--audio", "B", "--audio-mode",
      "concat"], "the second speaker starts after the first's 1.20 s, and the video ends at"),
    # found by the loudness normaliser after loading
    (["--task", "at2v", "--audio", "SHORT", "--frames", "5"], "measured over 0.4 s"),
    # two speakers: both found after loading, with exit 1
    (["--task", "ai2v", "--image", "FACE", "--audio", "A", "--audio", "LONG"],
     "--audio-mode mix: mixed speakers need audio of equal length (A 1.20 s, LONG 3.00 s)"),
    (["--task", "ai2v", "--image", "FACE", "--audio", "A", "--audio", "B"],
     "speaker region 2 covers no token of a 32x32 video"),
])
def test_option_misuse_is_one_line(capsys, trees, media, no_weights, args, message):
    names = {"A": media["a"], "B": media["b"], "SHORT": media["short"], "LONG": media["long"],
             "FACE": media["face"]}
    args = [str(names.get(a, a)) for a in args]
    message = message.replace("A 1", f"{media['a']} 1").replace("LONG 3", f"{media['long']} 3")
    rc, err = run(capsys, "-m", str(trees["1.5"]), *TINY, *args)
    assert rc == 2 and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("version, args, message", [
    ("1.0", ["--int8"], "has no INT8 DiT"),
    # numpy's RandomState failed on it after the weights had loaded
    ("1.0", ["--seed", "-1"], "--seed -1: LongCat-Video-Avatar 1.0 seeds its audio noise floor"),
    ("1.0", ["--seed", str(2**32)], "which takes 0 to 2**32 - 1"),
    ("1.0", ["--distill"], "has no distillation LoRA"),
    ("1.5", ["--distill", "--steps", "4"], "8 fixed steps"),
    ("1.5", [], "--task ai2v needs --image"),
])
def test_release_specific_misuse(capsys, trees, media, no_weights, version, args, message):
    task = "ai2v" if not args else "at2v"
    tiny = [a for a in TINY if a not in ("--steps", "1")] if "--steps" in args else TINY
    rc, err = run(capsys, "-m", str(trees[version]), "--task", task, "--audio",
                  str(media["a"]), *args, *tiny)
    assert rc == 2 and message in err and err.count("\n") == 1, err


def test_tasks_and_checkpoints_must_match(capsys, trees, media, no_weights):
    rc, err = run(capsys, "-m", str(trees["1.5"]), "--task", "t2v", *TINY)
    assert rc == 2 and "runs --task at2v, ai2v, avc" in err
    base = trees["1.5"].parent / "LongCat-Video"
    rc, err = run(capsys, "-m", str(base), "--task", "at2v", "--audio", str(media["a"]), *TINY)
    assert rc == 2 and "needs a LongCat-Video-Avatar checkpoint" in err


def test_a_truncated_shard_is_refused_before_any_weights(capsys, avatar_copy, media, no_weights):
    """Found only once loading had started (the base's by its own loader)."""
    av = avatar_copy("avatar-1.5")
    for shard in (sorted((av / "base_model").glob("*.safetensors"))[0],
                  sorted((av.parent / "LongCat-Video" / "vae").glob("*.safetensors"))[0]):
        data = shard.read_bytes()
        shard.write_bytes(data[:-100])
        rc, err = run(capsys, "-m", str(av), "--task", "at2v", "--audio", str(media["a"]),
                      "--no-vocal-separation", *TINY, "-o", str(media["dir"] / "t.mp4"))
        assert rc == 1 and str(shard) in err and "truncated" in err, err
        shard.write_bytes(data)


def test_a_link_out_of_the_folder_is_refused_before_any_weights(capsys, avatar_copy, media,
                                                                  tmp_path):
    """The avatar run followed links that verify refuses: its DiT config, the audio encoder's
    weights and the base model's VAE were read from outside their folders."""
    av = avatar_copy("avatar-1.5")
    base = av.parent / "LongCat-Video"
    for path in (av / "base_model" / "config.json",
                 next((av / avatar.VERSIONS["avatar-1.5"].audio_encoder).glob("*.safetensors")),
                 next((base / "vae").glob("*.safetensors")), av / "lora" / "dmd_lora.safetensors"):
        outside = tmp_path / path.name
        path.rename(outside)
        path.symlink_to(outside)
        rc, err = run(capsys, "-m", str(av), "--task", "at2v", "--audio", str(media["a"]),
                      "--no-vocal-separation", *TINY, "-o", str(tmp_path / "t.mp4"))
        assert rc == 1 and f"{path}: resolves to {outside}, outside the checkpoint" in err, err
        with pytest.raises(LongcatError, match="outside the checkpoint"):
            avatar_pipeline.LongCatVideoAvatarPipeline.from_pretrained(av)
        path.unlink()
        outside.rename(path)


@pytest.mark.parametrize("speakers", [0, -1, 3, "2", True, 1.5])
def test_a_speaker_count_that_is_not_one_or_two_is_refused(speakers):
    """speakers=0 and 3 loaded the two-speaker DiT without a word; '2' failed with a
    TypeError."""
    from longcat_tools.errors import UsageError
    from longcat_tools.model import avatar

    with pytest.raises(UsageError, match="the number of speakers, 1 or 2"):
        avatar_pipeline.dit_folder(avatar.VERSIONS["avatar-1.0"], speakers)
    assert avatar_pipeline.dit_folder(avatar.VERSIONS["avatar-1.0"], np.int64(2)) == "avatar_multi"
