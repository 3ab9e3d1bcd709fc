"""Vocal separation: the avatar's speech track from a mixed recording, through the MDX-Net ONNX
model the release ships (``vocal_separator/Kim_Vocal_2.onnx``) on onnxruntime.

This is the MDX path of ``audio-separator`` 0.30.2 at the settings the original demos use, redone
from its description (that package looks models up by their MD5 and downloads its model tables,
so it cannot run offline or on another ONNX file):

1. the input at 44.1 kHz, mono duplicated to stereo, scaled down to a 0.9 peak if louder;
2. ``TRIM`` (n_fft/2) zeros in front and zeros behind up to a whole number of ``GEN`` samples;
3. windows of ``CHUNK`` samples every ``STEP`` (75 % of a window), each: STFT (n_fft 7680, hop
   1024, periodic Hann, centred) of both channels as 4 real planes [L.re, L.im, R.re, R.im], cut
   to the model's 3072 bins with the 3 lowest zeroed, through the model, inverse STFT (the cut
   bins zero); each result weighted by a Hann window (``np.hanning``) and overlap-added, then
   divided by the summed windows;
4. the padding cut off, times 1.009 (the model's ``compensate``), scaled to a 0.9 peak (twice,
   as the separator and then its writer do: the second pass catches rounding);
5. the 16-bit WAV the separator would write and the original reads back: ``int16(x * 32767)``
   (truncated) over 32768, which ``vocals_16k`` reproduces without the file, then the channels
   averaged and resampled to 16 kHz as ``librosa.load`` does.

A result whose peak is under 1e-6 is "no vocals": the separator writes nothing then and the
original stops; here it is a ``LongcatError``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longcat_tools.errors import LongcatError
from longcat_tools.runner import audio

RATE = 44_100
N_FFT = 7680
HOP = 1024
DIM_F = 3072  # frequency bins the model sees
DIM_T = 256  # STFT frames per window (segment size)
LOW_BINS = 3  # lowest bins zeroed before the model
TRIM = N_FFT // 2
CHUNK = HOP * (DIM_T - 1)
GEN = CHUNK - 2 * TRIM
OVERLAP = 0.25
STEP = int((1 - OVERLAP) * CHUNK)
COMPENSATE = 1.009  # Kim_Vocal_2's level correction
PEAK = 0.9
SILENT = 1e-6
INPUT_NAME = "input"
INPUT_SHAPE = (4, DIM_F, DIM_T)


def load_model(path: str | Path) -> Any:
    """An onnxruntime CPU session for the separator, its input checked."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise LongcatError("vocal separation needs the 'onnxruntime' package (pip install "
                           "'longcat-tools[avatar]'), or pass --no-vocal-separation") from None
    path = Path(path)
    if not path.is_file():
        raise LongcatError(f"{path}: no such vocal separator model")
    if hasattr(ort, "disable_telemetry_events"):  # else it writes a queue under ~/.cache
        ort.disable_telemetry_events()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=opts,
                                       providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise LongcatError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0]})"
                           ) from None
    inputs = session.get_inputs()
    shape = tuple(inputs[0].shape[1:]) if inputs else ()
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME or shape != INPUT_SHAPE:
        got = [(i.name, i.shape) for i in inputs]
        raise LongcatError(f"{path}: expected one input '{INPUT_NAME}' of shape "
                           f"[batch, {', '.join(map(str, INPUT_SHAPE))}], got {got}")
    return session


def normalize_peak(x: np.ndarray, peak: float = PEAK) -> np.ndarray:
    """Scale down to ``peak`` if louder; never up."""
    top = np.abs(x).max()
    return x * (peak / top) if top > peak else x


@functools.lru_cache(maxsize=1)
def _hann() -> torch.Tensor:
    return torch.hann_window(N_FFT, periodic=True)


def _spectrogram(x: np.ndarray) -> np.ndarray:
    """[2, CHUNK] -> [1, 4, DIM_F, DIM_T] float32."""
    spec = torch.stft(torch.from_numpy(x), n_fft=N_FFT, hop_length=HOP, window=_hann(),
                      center=True, return_complex=True)  # [2, bins, frames]
    planes = torch.view_as_real(spec).permute(0, 3, 1, 2).reshape(1, 4, -1, spec.shape[-1])
    planes = planes[:, :, :DIM_F].clone()
    planes[:, :, :LOW_BINS] = 0
    return planes.numpy()


def _waveform(planes: np.ndarray) -> np.ndarray:
    """[1, 4, DIM_F, DIM_T] -> [2, CHUNK] float32."""
    p = torch.from_numpy(np.ascontiguousarray(planes, np.float32))
    p = torch.cat([p, p.new_zeros(1, 4, N_FFT // 2 + 1 - DIM_F, p.shape[-1])], dim=2)
    p = p.reshape(2, 2, N_FFT // 2 + 1, -1).permute(0, 2, 3, 1)
    spec = torch.complex(p[..., 0].contiguous(), p[..., 1].contiguous())
    return torch.istft(spec, n_fft=N_FFT, hop_length=HOP, window=_hann(), center=True).numpy()


def separate(session: Any, mix: np.ndarray, denoise: bool = False) -> np.ndarray:
    """Vocals of a [2, n] float32 mix at 44.1 kHz, [2, n] float32 (steps 1-4 above).
    ``denoise`` runs the model on the negated spectrogram too and averages (off in the
    original's settings)."""
    mix = normalize_peak(np.asarray(mix, np.float32))
    n = mix.shape[-1]
    pad = GEN + TRIM - n % GEN
    mixture = np.concatenate([np.zeros((2, TRIM), np.float32), mix,
                              np.zeros((2, pad), np.float32)], axis=1)
    total = mixture.shape[-1]
    result = np.zeros((2, total), np.float32)
    divider = np.zeros((2, total), np.float32)

    def model(spec: np.ndarray) -> np.ndarray:
        return session.run(None, {INPUT_NAME: spec})[0]

    for start in range(0, total, STEP):
        end = min(start + CHUNK, total)
        part = np.zeros((2, CHUNK), np.float32)
        part[:, :end - start] = mixture[:, start:end]
        spec = _spectrogram(part)
        pred = (model(-spec) * -0.5 + model(spec) * 0.5) if denoise else model(spec)
        wave = _waveform(pred)
        window = np.hanning(end - start)
        wave[:, :end - start] *= window
        divider[:, start:end] += window
        result[:, start:end] += wave[:, :end - start]
    with np.errstate(invalid="ignore", divide="ignore"):
        vocals = (result / divider)[:, TRIM:-TRIM][:, :n]
    vocals = vocals * np.float32(COMPENSATE)
    return normalize_peak(normalize_peak(vocals))


def vocals_16k(vocals: np.ndarray, where: str | Path) -> np.ndarray:
    """The separated stereo track as the original reads it back: 16-bit, mono, 16 kHz
    (step 5); a near-silent result is refused."""
    if np.abs(vocals).max() < SILENT:
        raise LongcatError(f"{where}: no vocals detected (the separated track is silent); pass "
                           "--no-vocal-separation to use the audio as it is")
    pcm = (vocals * 32767).astype(np.int16).astype(np.float32) / 32768
    return audio.resample(pcm.mean(axis=0), RATE, audio.SAMPLE_RATE)


def separate_file(session: Any, path: str | Path, max_seconds: float = audio.MAX_SECONDS,
                  denoise: bool = False) -> np.ndarray:
    """The vocals of an audio file, mono float32 at 16 kHz, as the original's embeddings read
    them. Refuses what ``audio.decode`` refuses, silence, and more than two channels (the
    separator is stereo)."""
    x = audio.decode(path, RATE, mono=False, max_seconds=max_seconds)
    audio.check_not_silent(x, path)
    audio.check_separable(x.shape[0], path)
    if x.shape[0] == 1:
        x = np.concatenate([x, x])
    return vocals_16k(separate(session, x, denoise), path)
