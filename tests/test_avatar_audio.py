"""The avatar's audio front-end: parity with the original's numbers (goldens made by
tests/golden/generate_avatar_audio.py) and refusals of hostile audio files."""

from __future__ import annotations

import json
import math
import struct
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from longcat_tools.errors import LongcatError
from longcat_tools.runner import audio, audio_encoders, audio_filters, audio_tracks

GOLDEN = Path(__file__).parent / "golden" / "original_avatar" / "audio"
RTOL = 1e-5  # fp32 on the CPU


def rel_err(ours: torch.Tensor | np.ndarray, ref: torch.Tensor) -> float:
    ours = (ours if isinstance(ours, torch.Tensor) else torch.from_numpy(np.array(ours))).double()
    ref = ref.double()
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    samples = samples.reshape(len(samples), -1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(samples.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())
    return path


def wav_header(rate: int, data_bytes: int, channels: int = 1) -> bytes:
    """A 16-bit PCM WAV header written by hand (``wave`` refuses a rate of 0)."""
    block = 2 * channels
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * block, block, 16)
            + b"data" + struct.pack("<I", data_bytes))


def tone(seconds: float, rate: int = 16000, peak: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return np.round(peak * 32767 * np.sin(2 * np.pi * 220 * t)).astype(np.int16)


# ---- parity with the original ----------------------------------------------------------------
@pytest.fixture(scope="module")
def golden():
    from safetensors.torch import load_file

    manifest = json.loads((GOLDEN / "manifest.json").read_text())
    return load_file(GOLDEN / "audio.safetensors"), manifest


@pytest.fixture(scope="module")
def fixture_dir(golden, tmp_path_factory):
    """The tiny encoders and separator the goldens were made with, written by our synth."""
    from longcat_tools import synth_audio
    from longcat_tools.io.checksums import sha256_file
    from longcat_tools.synth_presets import PRESETS

    _, manifest = golden
    fx = manifest["fixture"]
    root = tmp_path_factory.mktemp("audio_fixture")
    p = PRESETS[fx["preset"]]
    synth_audio.write_wav2vec2(root / "chinese-wav2vec2-base", p, fx["seed"], sparse=False)
    synth_audio.write_whisper(root / "whisper-large-v3", p, fx["seed"], sparse=False)
    synth_audio.write_separator(root / "vocal_separator" / "Kim_Vocal_2.onnx", fx["seed"])
    for rel, digest in fx["sha256"].items():
        if rel.endswith("pytorch_model.bin"):
            continue  # the pickle is what the original read; ours reads model.safetensors
        assert sha256_file(root / rel) == digest, f"SYNTH DRIFT in {rel}: regenerate the goldens"
    return root


@pytest.fixture(scope="module")
def golden_files(golden, tmp_path_factory):
    """The WAV files the original decoded, rebuilt from the stored samples."""
    t, manifest = golden
    root = tmp_path_factory.mktemp("audio_files")
    return {k.removeprefix("decode/"): write_wav(root / f"{k.removeprefix('decode/')}.wav",
                                                 t[f"input/pcm_{k.removeprefix('decode/')}"]
                                                 .numpy(), case["rate"])
            for k, case in manifest["cases"].items() if k.startswith("decode/")}


def test_preprocessing_matches_the_original(golden):
    t, manifest = golden
    x = t["input/wave"].numpy()
    seed = manifest["cases"]["wav2vec2"]["noise_seed"]
    assert rel_err(audio_filters.loudness_normalize(x, 16000), t["filters/loudness_norm"]) < 1e-7
    assert rel_err(audio_filters.add_noise_floor(x, seed), t["filters/noise_floor"]) < 1e-7
    assert rel_err(audio_filters.smooth_transients(x, 16000), t["filters/lowpass"]) < 1e-7
    # another seed draws other noise: the seed is what makes it reproducible
    assert rel_err(audio_filters.add_noise_floor(x, seed + 1), t["filters/noise_floor"]) > 1e-4


def test_wav2vec2_embedding_matches_the_original(golden, fixture_dir):
    t, manifest = golden
    case = manifest["cases"]["wav2vec2"]
    enc = audio_encoders.load_encoder(fixture_dir / "chinese-wav2vec2-base")
    assert enc.kind == "wav2vec2" and enc.timing.fps == case["fps"]
    emb = enc.embed(t["input/wave"].numpy(), noise_seed=case["noise_seed"])
    assert list(emb.shape) == case["shape"] and emb.dtype == torch.float32
    assert rel_err(emb, t["wav2vec2/emb"]) < RTOL


def test_whisper_embedding_matches_the_original(golden, fixture_dir):
    t, manifest = golden
    enc = audio_encoders.load_encoder(fixture_dir / "whisper-large-v3")
    assert enc.kind == "whisper" and enc.timing.fps == manifest["cases"]["whisper"]["fps"]
    emb = enc.embed(t["input/wave"].numpy(), noise_seed=0)
    assert list(emb.shape) == manifest["cases"]["whisper"]["shape"]
    assert rel_err(emb, t["whisper/emb"]) < RTOL


def test_decoding_matches_librosa(golden, golden_files):
    t, _ = golden
    for name, path in golden_files.items():
        x = audio.decode(path)
        assert x.dtype == np.float32
        assert rel_err(x, t[f"decode/{name}"]) < 1e-6, name


@pytest.mark.parametrize("case", ["para", "add", "para_one"])
def test_speakers_match_the_original(golden, golden_files, case):
    t, manifest = golden
    c = manifest["cases"][f"multi/{case}"]
    mode = {"para": "mix", "add": "concat"}[c["mode"]]
    tracks = [audio.decode(golden_files[c["left"]]),
              audio.decode(golden_files[c["right"]]) if c["right"] else None]
    arranged = audio_tracks.arrange(tracks, mode)
    for part, track in zip(("left", "right"), arranged, strict=True):
        padded = audio_tracks.pad_to(track, c["seconds"])
        assert padded.dtype == np.float64
        assert rel_err(padded, t[f"multi/{case}/{part}"]) < 1e-6
    # the golden's vocals and raw audio are the same files: the muxed track is their merge
    assert rel_err(audio_tracks.merged(arranged), t[f"multi/{case}/merge"]) < 1e-6


def test_vocal_separation_matches_audio_separator(golden, golden_files, fixture_dir):
    from longcat_tools.runner import vocal_separation

    pytest.importorskip("onnxruntime")
    t, manifest = golden
    session = vocal_separation.load_model(fixture_dir / "vocal_separator" / "Kim_Vocal_2.onnx")
    vocals = vocal_separation.separate_file(session, golden_files[manifest["cases"]["separation"]
                                                                  ["input"]])
    assert rel_err(vocals, t["separation/vocals"]) < 1e-4  # 16-bit rounding of the stem


# ---- timing and windows -----------------------------------------------------------------------
def test_video_seconds_and_padding():
    assert audio_tracks.video_seconds(93, 16) == 93 / 16
    assert math.isclose(audio_tracks.video_seconds(93, 25, num_segments=3), (93 + 2 * 80) / 25)
    short = np.ones(16000, np.float32)
    padded = audio_tracks.pad_to(short, 1.5)
    assert padded.shape == (24000,) and padded[:16000].sum() == 16000 and not padded[16000:].any()
    assert audio_tracks.pad_to(np.ones(30000), 1.5).shape == (30000,)  # never cut
    with pytest.raises(LongcatError, match="lasts 1.00 s, the video needs 5.81 s"):
        audio_tracks.require_seconds(short, 93 / 16, "a.wav")
    audio_tracks.require_seconds(np.ones(93_000), 93 / 16, "a.wav")


def test_clip_windows_center_each_frame_and_clamp():
    full = torch.arange(10.0)[:, None, None].expand(10, 1, 1)  # value = audio frame index
    w = audio_encoders.clip_windows([full], start=0, num_frames=4, stride=2)
    assert w.shape == (1, 4, 5, 1, 1)
    assert w[0, :, :, 0, 0].tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [2, 3, 4, 5, 6],
                                         [4, 5, 6, 7, 8]]
    start = audio_encoders.clip_start(1, num_frames=4, num_cond_frames=1, stride=2)
    assert start == 6
    last = audio_encoders.clip_windows([full, full + 100], start, 4, 2)
    assert last[0, -1, :, 0, 0].tolist() == [9, 9, 9, 9, 9]  # clamped to the last frame
    assert last[1, 0, :, 0, 0].tolist() == [104, 105, 106, 107, 108]


def test_speaker_arrangement_rules():
    a, b = np.ones(3, np.float32), np.full(2, 2, np.float32)
    left, right = audio_tracks.arrange([a, b], "concat")
    assert left.tolist() == [1, 1, 1, 0, 0] and right.tolist() == [0, 0, 0, 2, 2]
    assert audio_tracks.merged([left, right]).tolist() == [1, 1, 1, 2, 2]
    one, none = audio_tracks.arrange([a, None], "mix")
    assert one.tolist() == [1, 1, 1] and none.tolist() == [0, 0, 0]
    with pytest.raises(LongcatError, match="equal length"):
        audio_tracks.arrange([a, b], "mix", names=["x.wav", "y.wav"])
    with pytest.raises(LongcatError, match="mode must be one of"):
        audio_tracks.arrange([a], "para")
    with pytest.raises(LongcatError, match="at least one speaker"):
        audio_tracks.arrange([None, None], "mix")


# ---- hostile input ----------------------------------------------------------------------------
def refused(fn, *args, says: str, **kw) -> str:
    with pytest.raises(LongcatError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg and says in msg, msg
    return msg


def test_text_file_named_wav(tmp_path):
    p = tmp_path / "speech.wav"
    p.write_text("this is not audio\n" * 50)
    refused(audio.load, p, says="not an audio or video file ffmpeg can read")


def test_zero_sample_rate_header(tmp_path):
    p = tmp_path / "zero.wav"
    p.write_bytes(wav_header(0, 3200) + bytes(3200))
    refused(audio.load, p, says="invalid sample rate")


def test_truncated_header_and_missing_file(tmp_path):
    p = tmp_path / "cut.wav"
    p.write_bytes(wav_header(16000, 32000)[:30])
    refused(audio.load, p, says="ffmpeg can read")
    refused(audio.load, tmp_path / "absent.wav", says="no such audio file")


def test_ten_hour_file_is_refused_from_its_header(tmp_path, monkeypatch):
    p = tmp_path / "long.wav"
    data = 16000 * 2 * 36000  # 10 h of 16-bit mono: a sparse file, nothing written
    with open(p, "wb") as f:
        f.write(wav_header(16000, data))
        f.truncate(44 + data)
    decoded = []
    monkeypatch.setattr(audio, "_parse_wav", lambda *a: decoded.append(a))
    refused(audio.load, p, says="10:00:00.0 of audio is over the 600 s limit")
    assert not decoded  # refused before any decoding


def test_silence_threshold(tmp_path):
    refused(audio.load, write_wav(tmp_path / "zeros.wav", np.zeros(16000, np.int16), 16000),
            says="silent (peak -inf dBFS")
    quiet = 10 ** (-61 / 20)
    refused(audio.load, write_wav(tmp_path / "quiet.wav", tone(1, peak=quiet), 16000),
            says="below -60 dBFS")
    audible = audio.load(write_wav(tmp_path / "audible.wav", tone(1, peak=10 ** (-59 / 20)),
                                   16000))
    assert audible.shape == (16000,)


def test_video_without_audio(tmp_path):
    from longcat_tools.runner.video import write_mp4

    p = write_mp4(tmp_path / "clip.mp4", np.zeros((3, 16, 16, 3), np.uint8), fps=8)
    refused(audio.load, p, says="has no audio stream")


def test_stereo_48k_decodes_to_16k_mono(tmp_path):
    left, right = tone(0.5, 48000), tone(0.5, 48000, peak=0.25)
    x = audio.decode(write_wav(tmp_path / "st.wav", np.stack([left, right], 1), 48000))
    assert x.shape == (8000,) and x.dtype == np.float32
    expected = 0.375 * np.sin(2 * np.pi * 220 * np.arange(8000) / 16000)
    assert np.abs(x[200:-200] - expected[200:-200]).max() < 2e-3


def test_wav2vec2_pickle_is_never_loaded(tmp_path, monkeypatch):
    folder = tmp_path / "chinese-wav2vec2-base"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "wav2vec2"}))
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("unpickled"))
    refused(audio_encoders.load_encoder, folder,
            says="has only pytorch_model.bin, a pickle, which longcat-tools never loads")


def test_whisper_needs_its_32_layers(tmp_path):
    folder = tmp_path / "whisper-large-v3"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "whisper", "encoder_layers": 4,
                                                    "max_source_positions": 1500}))
    refused(audio_encoders.load_encoder, folder, says="32 encoder layers")


def test_separator_refusals(tmp_path, fixture_dir):
    from longcat_tools.runner import vocal_separation

    pytest.importorskip("onnxruntime")
    refused(vocal_separation.vocals_16k, np.zeros((2, 4410), np.float32), "a.wav",
            says="no vocals detected")
    session = vocal_separation.load_model(fixture_dir / "vocal_separator" / "Kim_Vocal_2.onnx")
    three = write_wav(tmp_path / "three.wav", np.stack([tone(0.3)] * 3, 1), 16000)
    refused(vocal_separation.separate_file, session, three, says="3 audio channels")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"junk")
    refused(vocal_separation.load_model, bad, says="onnxruntime cannot load it")
