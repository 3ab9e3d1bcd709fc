"""Regenerate the avatar audio goldens from the ORIGINAL code (run by hand, never in CI).

    PYTHONPATH=. venv-orig/bin/python tests/golden/generate_avatar_audio.py \\
        --original /path/to/LongCat-Video --out tests/golden/original_avatar/audio

``--original`` is a checkout of https://github.com/meituan-longcat/LongCat-Video at the pinned
commit (``ORIGINAL_COMMIT`` of ``generate.py``). Its code, and ``audio-separator``'s, are imported
at run time, never copied: only numbers (``audio.safetensors``) and JSON (``manifest.json``) are
written. README.md in this folder gives the environment used for the committed files.

Fixtures: the tiny audio encoders and separator that ``synth --model avatar-1.0/1.5`` writes
(``synth_audio.write_wav2vec2`` / ``write_whisper`` / ``write_separator``, preset ``tiny``, seed
0); their sha256 go to the manifest. Inputs are drawn here from fixed seeds and stored next to the
outputs (``input/*``), so the test feeds ours exactly what the original got.

Cases:

* ``wav2vec2`` / ``whisper``: ``get_audio_embedding_wav2vec2`` (fps 32) and
  ``get_audio_embedding_whisper`` (fps 25) of the pipeline on one float64 waveform, and the
  preprocessing steps alone (``_loudness_norm``, ``_add_noise_floor``, ``_smooth_transients``).
  The noise floor draws from numpy's global generator: ``np.random.seed(NOISE_SEED)`` right before.
* ``decode/*``: ``librosa.load(path, sr=16000)`` of 16-bit WAV files built from ``input/pcm_*``.
* ``multi/*``: the multi-speaker demo's ``audio_prepare_multi`` (compiled from the demo's source
  alone: importing the script loads its GPU-only dependencies; ``para`` and ``add``, and
  ``para`` with speaker 2 missing) on WAV files, vocals and raw being the same files.
* ``separation``: audio-separator 0.30.2's ``MDXSeparator.separate`` on the tiny ONNX with
  Kim_Vocal_2's parameters and the demo's settings, then ``librosa.load(out, sr=16000)`` as the
  demo reads it. ``Separator.load_model`` is bypassed (it identifies models by MD5 and downloads
  its tables): the separator object is built with the model data it would have looked up.
  ``onnx2torch`` (imported by that module, used only when segment size != dim_t) is a stub.

Run-time patches: ``torchvision`` (imported by ``audio_process.torch_utils``, unused by the audio
path) is a stub module; the pipeline object is created without ``__init__`` and given only its
audio encoder and feature extractor; wav2vec2 loads with ``device='cpu'`` (its default is cuda).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import types
import wave
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import ORIGINAL_COMMIT, fixture_hashes, get_original, git_head  # noqa: E402

SR = 16_000
NOISE_SEED = 1234
FIXTURE = {"preset": "tiny", "seed": 0}
KIM_VOCAL_2 = {"compensate": 1.009, "mdx_dim_f_set": 3072, "mdx_dim_t_set": 8,
               "mdx_n_fft_scale_set": 7680, "primary_stem": "Vocals"}
MDX_PARAMS = {"hop_length": 1024, "segment_size": 256, "overlap": 0.25, "batch_size": 1,
              "enable_denoise": False}


def speechlike(n: int, rate: int, seed: int) -> np.ndarray:
    """A voiced-ish test signal: a wobbling harmonic tone, syllable envelope, some noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / rate
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    env = 0.5 * (1 + np.sin(2 * np.pi * 3.1 * t + rng.uniform(0, 6)))
    return 0.25 * env * voice + 0.02 * rng.standard_normal(n)


def pcm(x: np.ndarray) -> np.ndarray:
    """[n, ch] int16."""
    x = x.reshape(len(x), -1)
    return (np.clip(x, -1, 1) * 32767).astype(np.int16)


def write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(samples.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())


def f32(x: np.ndarray, lossless: bool = False) -> torch.Tensor:
    """Stored as float32 (the tests compare at ~1e-5); ``lossless`` asserts nothing is lost."""
    y = np.asarray(x).astype(np.float32)
    assert not lossless or np.array_equal(y, x)
    return torch.from_numpy(y)


def demo_function(path: Path, name: str, librosa: types.ModuleType) -> types.FunctionType:
    """One function of a demo script, compiled from its source alone (importing the script
    would load its GPU-only dependencies)."""
    import ast
    import math

    tree = ast.parse(path.read_text())
    (node,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    scope = {"np": np, "math": math, "librosa": librosa}
    exec(compile(ast.Module([node], []), str(path), "exec"), scope)
    return scope[name]


def write_fixture(root: Path) -> dict[str, Path]:
    from longcat_tools import synth_audio
    from longcat_tools.synth_presets import PRESETS

    p = PRESETS[FIXTURE["preset"]]
    root.mkdir(parents=True)
    paths = {"wav2vec2": root / "chinese-wav2vec2-base", "whisper": root / "whisper-large-v3",
             "separator": root / "vocal_separator" / "Kim_Vocal_2.onnx"}
    synth_audio.write_wav2vec2(paths["wav2vec2"], p, FIXTURE["seed"], sparse=False)
    synth_audio.write_whisper(paths["whisper"], p, FIXTURE["seed"], sparse=False)
    synth_audio.write_separator(paths["separator"], FIXTURE["seed"])
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--original", help="checkout of the original at the pinned commit")
    ap.add_argument("--out", default=str(Path(__file__).parent / "original_avatar" / "audio"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp())
    original = get_original(args.original, tmp)
    fixture = write_fixture(tmp / "fixture")
    hashes = fixture_hashes(tmp / "fixture")

    import diffusers.models.modeling_utils  # noqa: F401  (they probe for torchvision on import:
    import transformers.modeling_utils  # noqa: F401  let them see none before the stub)

    sys.modules.setdefault("torchvision", types.ModuleType("torchvision"))
    sys.modules.setdefault("onnx2torch", types.ModuleType("onnx2torch"))
    sys.path.insert(0, str(original))
    import librosa
    from longcat_video.audio_process.wav2vec2 import Wav2Vec2ModelWrapper
    from longcat_video.pipeline_longcat_video_avatar import LongCatVideoAvatarPipeline
    from transformers import Wav2Vec2FeatureExtractor, WhisperFeatureExtractor, WhisperModel


    t: dict[str, torch.Tensor] = {}
    cases: dict[str, dict] = {}

    # ---- encoders ----
    wave_in = speechlike(int(SR * 2.23), SR, seed=1)  # float64, as the demos' padded arrays are
    t["input/wave"] = torch.from_numpy(wave_in)
    pipe = object.__new__(LongCatVideoAvatarPipeline)
    w2v = Wav2Vec2ModelWrapper(str(fixture["wav2vec2"]), device="cpu")
    w2v.feature_extractor._freeze_parameters()
    pipe.__dict__.update(audio_encoder=w2v,
                         audio_feature_extractor=Wav2Vec2FeatureExtractor(str(fixture["wav2vec2"]),
                                                                          local_files_only=True))
    t["filters/loudness_norm"] = f32(pipe._loudness_norm(wave_in.copy(), SR))
    np.random.seed(NOISE_SEED)
    t["filters/noise_floor"] = f32(pipe._add_noise_floor(wave_in.copy()))
    t["filters/lowpass"] = f32(pipe._smooth_transients(wave_in.copy(), SR))
    np.random.seed(NOISE_SEED)
    t["wav2vec2/emb"] = pipe.get_audio_embedding_wav2vec2(wave_in.copy(), fps=32, device="cpu",
                                                          sample_rate=SR).float().contiguous()
    cases["wav2vec2"] = {"fps": 32, "noise_seed": NOISE_SEED,
                         "shape": list(t["wav2vec2/emb"].shape)}

    pipe.__dict__.update(
        audio_encoder=WhisperModel.from_pretrained(str(fixture["whisper"])).eval(),
        audio_feature_extractor=WhisperFeatureExtractor.from_pretrained(str(fixture["whisper"])))
    pipe.audio_encoder.requires_grad_(False)
    t["whisper/emb"] = pipe.get_audio_embedding_whisper(wave_in.copy(), fps=25, device="cpu",
                                                        sample_rate=SR).float().contiguous()
    cases["whisper"] = {"fps": 25, "shape": list(t["whisper/emb"].shape),
                        "encoder_dtype": str(pipe.audio_encoder.dtype)}

    # ---- decoding ----
    files = tmp / "files"
    files.mkdir()
    decode_cases = {"mono_22050": (22050, 1, 1.1), "stereo_44100": (44100, 2, 0.8),
                    "stereo_48000": (48000, 2, 1.6), "mono_16000": (16000, 1, 0.6)}
    for i, (name, (rate, ch, seconds)) in enumerate(decode_cases.items()):
        n = int(rate * seconds)
        x = np.stack([speechlike(n, rate, seed=10 + i + c) * (1 - 0.3 * c) for c in range(ch)], 1)
        t[f"input/pcm_{name}"] = torch.from_numpy(pcm(x))
        write_wav(files / f"{name}.wav", pcm(x), rate)
        y, _ = librosa.load(files / f"{name}.wav", sr=SR)
        t[f"decode/{name}"] = torch.from_numpy(y)
        cases[f"decode/{name}"] = {"rate": rate, "channels": ch}

    # ---- multi-speaker ----
    audio_prepare_multi = demo_function(original / "run_demo_avatar_multi_audio_to_video.py",
                                        "audio_prepare_multi", librosa)
    a, b, c = (files / f"{n}.wav" for n in ("mono_22050", "stereo_44100", "mono_16000"))
    duration = 1.5  # seconds of video: the tracks are padded to it
    for name, (left, right, mode) in {"para": (a, a, "para"), "add": (a, b, "add"),
                                      "para_one": (c, None, "para")}.items():
        left_ext, right_ext, merge = audio_prepare_multi(
            str(left), str(right) if right else None, duration, str(left),
            str(right) if right else None, sample_rate=SR, audio_type=mode)
        for part, x in (("left", left_ext), ("right", right_ext), ("merge", merge)):
            t[f"multi/{name}/{part}"] = f32(x, lossless=True)
        cases[f"multi/{name}"] = {"left": left.stem, "right": right.stem if right else None,
                                  "mode": mode, "seconds": duration}

    # ---- vocal separation ----
    from audio_separator.separator.architectures.mdx_separator import MDXSeparator

    common = {"logger": logging.getLogger("sep"), "log_level": logging.WARNING,
              "torch_device": torch.device("cpu"), "torch_device_cpu": torch.device("cpu"),
              "torch_device_mps": None, "onnx_execution_provider": ["CPUExecutionProvider"],
              "model_name": "Kim_Vocal_2", "model_path": str(fixture["separator"]),
              "model_data": KIM_VOCAL_2, "output_dir": str(tmp / "vocals"),
              "output_format": "WAV", "output_bitrate": None, "normalization_threshold": 0.9,
              "amplification_threshold": 0.0, "enable_denoise": False,
              "output_single_stem": "vocals", "invert_using_spec": False, "sample_rate": 44100,
              "use_soundfile": False}
    sep = MDXSeparator(common_config=common, arch_config=MDX_PARAMS)
    (outfile,) = sep.separate(str(files / "stereo_48000.wav"))
    vocals, _ = librosa.load(tmp / "vocals" / outfile, sr=SR)
    t["separation/vocals"] = torch.from_numpy(vocals)
    cases["separation"] = {"input": "stereo_48000", "model_data": KIM_VOCAL_2,
                           "mdx_params": MDX_PARAMS}

    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sorted(t.items())}, str(out / "audio.safetensors"))
    import importlib.metadata as md

    versions = {p: md.version(p) for p in ("torch", "transformers", "numpy", "librosa", "soxr",
                                           "scipy", "pyloudnorm", "soundfile", "onnxruntime",
                                           "audio-separator")}
    manifest = {"original": {"url": "https://github.com/meituan-longcat/LongCat-Video",
                             "commit": ORIGINAL_COMMIT, "checkout_head": git_head(original)},
                "python": platform.python_version(), "versions": versions,
                "fixture": {**FIXTURE, "sha256": hashes}, "sample_rate": SR, "cases": cases}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}/audio.safetensors, manifest.json")


if __name__ == "__main__":
    main()
