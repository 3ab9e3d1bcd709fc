"""Audio tracks against the video: how many seconds a video needs, the original's silence padding,
and several speakers' tracks arranged side by side.

The original pads a short track with zeros up to the video's length (``np.append``, so the
result is float64) and never cuts a long one: the whole track is embedded. ``require_seconds`` is
the stricter check a caller can run instead of padding (the muxed video would otherwise end with
the audio).

Speakers (the multi-speaker demo's ``audio_type``):

* ``mix`` (the original's ``para``): every track plays over the whole video, so all must have the
  same length; the muxed audio is their plain sum (no normalisation: each track's loudness is
  normalised on its own when it is embedded).
* ``concat`` (``add``): speaker k talks after speakers 0..k-1; each embedded track is silence,
  its own audio, silence; the muxed audio is the tracks one after another.

A missing speaker (``None``) gets silence of the first present speaker's length, as the original
gives zeros to an absent person.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from longcat_tools.errors import LongcatError
from longcat_tools.model import avatar
from longcat_tools.runner.audio import SAMPLE_RATE

MODES = avatar.AUDIO_MODES


def video_seconds(num_frames: int, fps: float, num_segments: int = 1,
                  num_cond_frames: int = 13) -> float:
    """Length of the video: the first clip, then ``num_frames - num_cond_frames`` new frames per
    later segment."""
    return num_frames / fps + (num_segments - 1) * (num_frames - num_cond_frames) / fps


def missing_samples(track: np.ndarray, seconds: float, rate: int = SAMPLE_RATE) -> int:
    """Samples of silence the original appends to reach ``seconds`` (0 when long enough)."""
    return max(0, math.ceil((seconds - len(track) / rate) * rate))


def pad_to(track: np.ndarray, seconds: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    """The original's padding: zeros appended up to ``seconds``, float64; never cut."""
    return np.concatenate([np.asarray(track, np.float64), np.zeros(missing_samples(track, seconds,
                                                                                   rate))])


def require_seconds(track: np.ndarray, seconds: float, where: str,
                    rate: int = SAMPLE_RATE) -> None:
    """Refuse a track shorter than the video (instead of padding it with silence)."""
    if missing_samples(track, seconds, rate):
        raise LongcatError(f"{where}: the audio lasts {len(track) / rate:.2f} s, the video needs "
                           f"{seconds:.2f} s; give longer audio or fewer frames/segments")


def mix_problem(lengths: Sequence[int], names: Sequence[str]) -> str | None:
    """Why speakers' tracks of these lengths (samples) cannot be mixed; None: they can."""
    if len(set(lengths)) <= 1:
        return None
    shown = ", ".join(f"{n} {k / SAMPLE_RATE:.2f} s" for n, k in zip(names, lengths, strict=True))
    return f"mixed speakers need audio of equal length ({shown}); trim them or use concat"


def arrange(tracks: Sequence[np.ndarray | None], mode: str,
            names: Sequence[str] | None = None) -> list[np.ndarray]:
    """Each speaker's track on the shared timeline (see the module doc); float32."""
    if mode not in MODES:
        raise LongcatError(f"speaker audio mode must be one of {', '.join(MODES)}, got {mode!r}")
    present = [t for t in tracks if t is not None]
    if not present:
        raise LongcatError("at least one speaker needs an audio track")
    names = list(names) if names else [f"speaker {i + 1}" for i in range(len(tracks))]
    filled = [np.asarray(t if t is not None else np.zeros_like(present[0]), np.float32)
              for t in tracks]
    if mode == "mix":
        problem = mix_problem([len(t) for t in filled], names)
        if problem:
            raise LongcatError(problem)
        return filled
    out, before, total = [], 0, sum(len(t) for t in filled)
    for t in filled:
        track = np.zeros(total, np.float32)
        track[before:before + len(t)] = t
        out.append(track)
        before += len(t)
    return out


def merged(arranged: Sequence[np.ndarray]) -> np.ndarray:
    """The audio to mux: the arranged tracks summed."""
    return np.sum(np.stack(arranged), axis=0, dtype=np.float32)
