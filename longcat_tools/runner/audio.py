"""Audio in: probe a file's audio track, refuse bad input before any weights load, and decode it
to float32 at the rate a consumer needs, with the ffmpeg binary ``imageio-ffmpeg`` ships.

The original reads audio with ``librosa.load``: the channels averaged, then resampled with
``soxr`` at its "HQ" recipe (librosa's default ``soxr_hq``). ffmpeg's ``aresample`` with
``resampler=soxr:precision=20`` is the same resampler at the same recipe; on a float32 signal the
two give bit-identical samples. Decoders can differ: librosa decodes WAV/FLAC/OGG/MP3 with
libsndfile and everything else with ffmpeg, here ffmpeg decodes everything (PCM is exact; a lossy
format may differ in the last bits).

Checks (each a one-line ``LongcatError``): no such file, not decodable as audio, no audio stream,
an invalid sample rate in the header, longer than ``MAX_SECONDS`` (probed from the header, before
decoding; a header that lies is caught while decoding, which stops at the same limit) and silence
(a peak below ``SILENCE_DBFS``).
"""

from __future__ import annotations

import math
import re
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from longcat_tools.errors import LongcatError, UsageError

SAMPLE_RATE = 16_000  # what both audio encoders read
MIN_RATE = 4_000  # below telephone speech (8 kHz) by half: anything lower holds no words
# The whole track is embedded in one pass (wav2vec2 attends over all of it: 32 frames a second,
# memory growing with the square), and 10 minutes is ~120 segments of video at 16 fps.
MAX_SECONDS = 600.0
# Peak level below which a track counts as silent: -60 dBFS (0.001), far under speech (-20 to
# -3 dBFS peaks) yet above 16-bit dither (about -90 dBFS). The original would embed such a track
# unnormalised (its loudness gate at -70 LUFS skips normalisation) and its separator drops it.
SILENCE_DBFS = -60.0
SILENCE_PEAK = 10 ** (SILENCE_DBFS / 20)
SOXR_HQ = "resampler=soxr:precision=20"  # librosa's default res_type, "soxr_hq"
TIMEOUT_S = 600  # an ffmpeg call that runs longer is stuck, not slow


@dataclass(frozen=True)
class AudioInfo:
    """What ffmpeg says about a file's first audio stream, read from its header."""

    path: Path
    codec: str
    sample_rate: int
    seconds: float | None  # None where the container does not say ("N/A")


def _ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def ffmpeg_file(path: str | Path) -> str:
    """``path`` as ffmpeg takes a file name, absolute: ffmpeg reads a relative ``a:b.mp4`` as
    the URL of a protocol ``a`` and fails ("Protocol not found"), after a whole run."""
    return str(Path(path).absolute())


def _run(args: list[str], path: Path | str,
         stdin: bytes | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([_ffmpeg_exe(), "-hide_banner", "-nostdin", *args], input=stdin,
                              capture_output=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise LongcatError(f"{path}: ffmpeg did not finish within {TIMEOUT_S} s") from None


def _reason(stderr: bytes) -> str:
    """ffmpeg's most telling line, without its ``[component @ 0x...]`` prefix."""
    lines = [re.sub(r"^\[[^]]*\]\s*", "", s).strip()
             for s in stderr.decode(errors="replace").splitlines()]
    lines = [s for s in lines if s]
    for s in lines:
        if re.search(r"invalid|error|could not|no such|not found|failed", s, re.I):
            return s
    return lines[-1] if lines else "no message"


def _hms(seconds: float) -> str:
    h, rest = divmod(seconds, 3600)
    return f"{int(h)}:{int(rest // 60):02d}:{rest % 60:04.1f}"


def probe(path: str | Path) -> AudioInfo:
    """Read the first audio stream's header (codec, sample rate, duration) without decoding."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such audio file")
    r = _run(["-i", ffmpeg_file(path)], path)  # no output file: ffmpeg prints the header and stops
    err = r.stderr.decode(errors="replace")
    if re.search(r"invalid sample rate", err, re.I):
        raise LongcatError(f"{path}: the header gives an invalid sample rate (0 or negative); "
                           "the file is corrupt")
    if "Input #0" not in err:
        raise LongcatError(f"{path}: not an audio or video file ffmpeg can read "
                           f"({_reason(r.stderr)})")
    m = re.search(r"Stream #\S+: Audio: (\w+)[^\n]*?(\d+) Hz", err)
    if not m:
        raise LongcatError(f"{path}: has no audio stream")
    rate = int(m.group(2))
    if rate <= 0:
        raise LongcatError(f"{path}: the header gives sample rate {rate}; the file is corrupt")
    d = re.search(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)", err)
    seconds = int(d.group(1)) * 3600 + int(d.group(2)) * 60 + float(d.group(3)) if d else None
    return AudioInfo(path, m.group(1), rate, seconds)


def check_file(path: str | Path, max_seconds: float = MAX_SECONDS) -> AudioInfo:
    """``probe`` plus the length limit: a file over ``max_seconds`` is refused from its header,
    before any of it is decoded."""
    info = probe(path)
    if info.seconds is not None and info.seconds > max_seconds:
        raise LongcatError(f"{info.path}: {_hms(info.seconds)} of audio is over the "
                           f"{max_seconds:g} s limit (the whole track is embedded at once); "
                           "trim it to what the video needs")
    return info


def _parse_wav(data: bytes, path: Path) -> tuple[np.ndarray, int]:
    """ffmpeg's float WAV on a pipe (its sizes unknown): [channels, n] float32 and the rate."""
    pos, channels, rate = 12, 0, 0
    while data[:4] == b"RIFF" and pos + 8 <= len(data):
        tag, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if tag == b"fmt ":
            channels, rate = struct.unpack("<HI", data[pos + 10:pos + 16])
        elif tag == b"data":
            if not channels:
                break
            body = data[pos + 8:]
            frames = len(body) // (4 * channels)
            x = np.frombuffer(body[:frames * 4 * channels], "<f4").reshape(frames, channels)
            return np.ascontiguousarray(x.T), rate
        pos += 8 + size + (size & 1)
    raise LongcatError(f"{path}: ffmpeg's decoded output could not be read")


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """[n] or [channels, n] float32 from ``rate_in`` to ``rate_out`` with soxr HQ (librosa's
    default); unchanged when the rates are equal, as librosa leaves it."""
    x = np.asarray(x, np.float32)
    if rate_in == rate_out:
        return x
    channels = 1 if x.ndim == 1 else x.shape[0]
    raw = np.ascontiguousarray(x.T if x.ndim == 2 else x).tobytes()
    r = _run(["-v", "error", "-f", "f32le", "-ar", str(rate_in), "-ac", str(channels),
              "-i", "pipe:0", "-af", f"aresample={rate_out}:{SOXR_HQ}", "-f", "f32le", "pipe:1"],
             "resampling", stdin=raw)
    if r.returncode != 0:
        raise LongcatError(f"resampling {rate_in} -> {rate_out} Hz failed ({_reason(r.stderr)})")
    y = np.frombuffer(r.stdout, "<f4")
    return y.copy() if x.ndim == 1 else np.ascontiguousarray(y.reshape(-1, channels).T)


def decode(path: str | Path, rate: int = SAMPLE_RATE, *, mono: bool = True,
           max_seconds: float = MAX_SECONDS) -> np.ndarray:
    """The first audio stream of ``path`` as float32 at ``rate``: [n] averaged over channels
    (``mono``), else [channels, n]. Runs ``check_file`` first; decoding stops just past
    ``max_seconds``, so a header that understates the length is refused too."""
    info = check_file(path, max_seconds)
    r = _run(["-v", "error", "-i", ffmpeg_file(info.path), "-map", "0:a:0", "-vn", "-sn", "-dn",
              "-t", f"{max_seconds + 1:g}", "-c:a", "pcm_f32le", "-f", "wav", "pipe:1"], info.path)
    if r.returncode != 0:
        raise LongcatError(f"{info.path}: ffmpeg cannot decode its audio ({_reason(r.stderr)})")
    x, native = _parse_wav(r.stdout, info.path)
    if native < MIN_RATE:  # a 1 Hz file made a video of nothing heard
        raise LongcatError(f"{info.path}: sampled at {native} Hz; speech needs at least "
                           f"{MIN_RATE} Hz")
    if x.shape[1] == 0:
        raise LongcatError(f"{info.path}: the audio stream decodes to no samples")
    if x.shape[1] > max_seconds * native:
        raise LongcatError(f"{info.path}: more than {max_seconds:g} s of audio (its header "
                           "said less); trim it to what the video needs")
    if mono:
        x = x.mean(axis=0) if x.shape[0] > 1 else x[0]
    return resample(x, native, rate)


def peak_dbfs(x: np.ndarray) -> float:
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    return 20 * math.log10(peak) if peak > 0 else -math.inf


def check_not_silent(x: np.ndarray, where: str | Path) -> None:
    """Refuse a track whose peak is below ``SILENCE_DBFS``."""
    level = peak_dbfs(x)
    if level < SILENCE_DBFS:
        shown = "-inf" if level == -math.inf else f"{level:.1f}"
        raise LongcatError(f"{where}: the audio is silent (peak {shown} dBFS, below "
                           f"{SILENCE_DBFS:g} dBFS)")


def check_separable(channels: int, path: str | Path) -> None:
    """Vocal separation's model is stereo: mono is doubled, more channels are refused."""
    if channels > 2:
        raise LongcatError(f"{path}: {channels} audio channels; vocal separation takes mono "
                           "or stereo (downmix it, or pass --no-vocal-separation)")


def load(path: str | Path, rate: int = SAMPLE_RATE, max_seconds: float = MAX_SECONDS) -> np.ndarray:
    """A mono track at ``rate``, checked: decodable, within the limit, not silent."""
    x = decode(path, rate, max_seconds=max_seconds)
    check_not_silent(x, path)
    return x
