"""Video and image files: H.264 mp4 out, frames in, and a probe that needs no system ffprobe.

Frames are ``uint8 [F, H, W, 3]`` arrays (or lists of PIL images for the pipeline's inputs). The
encoder is the ffmpeg binary that ``imageio-ffmpeg`` ships: libx264, yuv420p (which needs even
sizes, so odd edges are padded by repeating the last row/column), written to a temporary name and
renamed with its sidecar (``publish``), so a failed run leaves no half-written file and never an
mp4 without its sidecar. An audio track (the avatar's speech) is muxed in as AAC, cut or padded
with silence to the video's length.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import subprocess
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from longcat_tools.errors import LongcatError, UsageError
from longcat_tools.io.atomic import fsync_dir
from longcat_tools.runner.audio import SAMPLE_RATE, ffmpeg_file

PROBE_TIMEOUT_S = 600  # a probe that runs longer is a stuck ffmpeg, not a slow file
AUDIO_RATE = SAMPLE_RATE  # the muxed speech: the 16 kHz mono the avatar's encoders read


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8 the way the original demos do (``(x * 255).astype(uint8)``)."""
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0, 1) * 255).astype(np.uint8)


def staged_name(path: Path) -> Path:
    """The temporary name an output is written under, beside it (same folder, so the final
    rename is atomic)."""
    return path.with_name(f".{path.name}.partial")


def audio_name(path: Path) -> Path:
    """The temporary WAV an mp4's speech is muxed from, beside it."""
    return path.with_name(f".{path.name}.audio.wav")


def scratch_names(path: Path) -> list[Path]:
    """Every temporary name writing the mp4 ``path`` and its sidecar uses."""
    return [staged_name(path), audio_name(path), staged_name(Path(f"{path}.json"))]


def _cleared(path: Path) -> Path:
    """A scratch name with whatever an earlier run left there removed: a stale file, or a link,
    which the write would follow out of the output folder."""
    path.unlink(missing_ok=True)
    return path


def _write_wav(path: Path, samples: np.ndarray, rate: int, seconds: float) -> None:
    """16-bit mono PCM of ``samples`` (float, [-1, 1]) cut or zero-padded to ``seconds``."""
    import wave

    n = round(seconds * rate)
    x = np.zeros(n, np.float32)
    x[:min(n, len(samples))] = np.asarray(samples, np.float32)[:n]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())


def encode_mp4(path: str | Path, frames: np.ndarray, fps: float, crf: int = 18,
               audio: np.ndarray | None = None, audio_rate: int = AUDIO_RATE) -> Path:
    """Encode ``frames`` (uint8 or [0,1] float, [F, H, W, 3]) as H.264 at ``fps`` into the
    staged name of ``path``, which is returned; ``publish`` (or ``write_mp4``) renames it.
    ``audio``: mono samples at ``audio_rate``, muxed as AAC over the video's length."""
    import imageio_ffmpeg

    path = Path(path)
    frames = to_uint8(np.asarray(frames))
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise LongcatError(f"{path}: expected frames [F, H, W, 3], got {list(frames.shape)}")
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _cleared(staged_name(path))
    h, w = frames.shape[1:3]
    wav = None
    if audio is not None:
        wav = _cleared(audio_name(path))
        _write_wav(wav, audio, audio_rate, len(frames) / fps)
    writer = imageio_ffmpeg.write_frames(
        ffmpeg_file(tmp), (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv420p", quality=None,
        macro_block_size=1, ffmpeg_log_level="error", output_params=["-f", "mp4", "-crf", str(crf)],
        audio_path=None if wav is None else ffmpeg_file(wav), audio_codec="aac")
    try:
        writer.send(None)
        for f in frames:
            writer.send(np.ascontiguousarray(f))
        writer.close()
    except OSError as e:  # ffmpeg stopped: a broken pipe, with ffmpeg's command line attached
        writer.close()
        tmp.unlink(missing_ok=True)
        raise LongcatError(f"{path}: ffmpeg stopped writing the mp4 ({_why_ffmpeg_stopped(e, tmp)})"
                           "; nothing was written") from None
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if wav is not None:
            wav.unlink(missing_ok=True)
    return tmp


def _why_ffmpeg_stopped(e: OSError, tmp: Path) -> str:
    """A full disk or quota, as far as the folder shows it, else the error's first line."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT) or shutil.disk_usage(tmp.parent).free < 1 << 20:
        return "the disk (or quota) is full; free some space"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def write_mp4(path: str | Path, frames: np.ndarray, fps: float, crf: int = 18) -> Path:
    """Encode ``frames`` as H.264 at ``fps`` and rename it into place."""
    path = Path(path)
    os.replace(encode_mp4(path, frames, fps, crf), path)
    return path


def publish(staged_mp4: Path, path: str | Path, sidecar_text: str) -> None:
    """Put an encoded mp4 and its JSON sidecar (``PATH.json``) in place: the sidecar is written
    under a temporary name with the mp4's file mode and renamed first, the mp4 last, so a failure
    at any point never leaves an mp4 without its sidecar. Staged files are removed on failure."""
    path = Path(path)
    sidecar = Path(f"{path}.json")
    tmp = _cleared(staged_name(sidecar))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with open(fd, "w") as f:
            f.write(sidecar_text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, stat.S_IMODE(os.stat(staged_mp4).st_mode))
        os.replace(tmp, sidecar)
        os.replace(staged_mp4, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        staged_mp4.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def read_video(path: str | Path) -> tuple[list[Image.Image], float]:
    """All frames of a video file as RGB PIL images, and its frame rate."""
    import imageio_ffmpeg

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such video file")
    try:
        gen = imageio_ffmpeg.read_frames(ffmpeg_file(path))
        meta = next(gen)
        w, h = meta["size"]
        frames = [Image.fromarray(np.frombuffer(b, np.uint8).reshape(h, w, 3).copy())
                  for b in gen]
    except (RuntimeError, OSError, StopIteration) as e:
        raise LongcatError(f"{path}: cannot read the video ({e})") from e
    if not frames:
        raise LongcatError(f"{path}: the video has no frames")
    fps = float(meta.get("fps") or 0.0)  # imageio reads ffmpeg's "1k fps" as none
    return frames, fps or float(probe(path, max_frames=1)["fps"] or 0.0)


def _open_image(path: Path) -> Image.Image:
    """PIL's lazy open (the header only), with its decompression-bomb limit as bad input."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise LongcatError(f"{path}: image too large to decode safely ({e}); use an image "
                               f"under {Image.MAX_IMAGE_PIXELS:,} pixels") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise LongcatError(f"{path}: cannot read the image ({e})") from None


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image checked before any weights load: its header against the
    decompression-bomb limit, then the whole image decoded (a truncated file failed after the
    weights had loaded)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such image file")
    with _open_image(path) as im:
        try:
            im.load()
        except (OSError, ValueError, SyntaxError) as e:
            raise LongcatError(f"{path}: cannot read the image ({e})") from None
        return im.size


def read_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such image file")
    with _open_image(path) as im:
        try:
            return to_rgb(im, path)
        except (OSError, ValueError, SyntaxError) as e:
            raise LongcatError(f"{path}: cannot read the image ({e})") from None


def to_rgb(im: Image.Image, where: str | Path) -> Image.Image:
    """RGB, 8 bits a channel. PIL's own conversion clips a 16-bit gray image (a PNG's "I;16",
    or "I" holding 16-bit values) to 255, a white frame: those are scaled to 8 bits here."""
    if im.mode.startswith("I;16") or im.mode == "I":
        x = np.asarray(im).astype(np.int64)
        if x.min() < 0 or x.max() > 65535:
            raise LongcatError(f"{where}: a {im.mode} image with values outside 0..65535; save "
                               "it with 8 or 16 bits a channel")
        return Image.fromarray((x >> 8).astype(np.uint8)).convert("RGB")
    if im.mode == "F":
        raise LongcatError(f"{where}: a floating-point image (mode F) has no fixed range; save "
                           "it with 8 or 16 bits a channel")
    return im.convert("RGB")


def probe(path: str | Path, max_frames: int | None = None) -> dict:
    """Decode the whole file (or its first ``max_frames``) with the bundled ffmpeg and report its
    video stream: codec, pixel format, size, fps and the number of frames decoded (a file that
    does not decode fails with ffmpeg's last line, on one line)."""
    import imageio_ffmpeg

    exe = imageio_ffmpeg.get_ffmpeg_exe()
    limit = ["-frames:v", str(max_frames)] if max_frames else []
    try:
        r = subprocess.run([exe, "-hide_banner", "-nostdin", "-i", ffmpeg_file(path), "-map",
                            "0:v:0", *limit, "-f", "null", "-"], capture_output=True, text=True,
                           errors="replace", timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise LongcatError(f"{path}: ffmpeg did not finish decoding it within "
                           f"{PROBE_TIMEOUT_S} s") from None
    err = r.stderr
    m = re.search(r"Stream #\S+: Video: (\w+)[^,]*, (\w+)[^,]*(?:\([^)]*\))?, (\d+)x(\d+)", err)
    frames = re.findall(r"frame=\s*(\d+)", err)
    fps = re.search(r"([\d.]+)(k?) fps", err)  # 1000 fps and above: "1k fps"
    if r.returncode != 0 or not m:
        last = err.strip().splitlines()[-1:] or [f"exit status {r.returncode}"]
        raise LongcatError(f"{path}: ffmpeg cannot decode it as a video ({last[0].strip()})")
    return {"codec": m.group(1), "pix_fmt": m.group(2), "width": int(m.group(3)),
            "height": int(m.group(4)),
            "fps": float(fps.group(1)) * (1000 if fps.group(2) else 1) if fps else None,
            "frames": int(frames[-1]) if frames else None}
