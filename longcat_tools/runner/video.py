"""Video and image files: H.264 mp4 out, frames in, and a probe that needs no system ffprobe.

Frames are ``uint8 [F, H, W, 3]`` arrays (or lists of PIL images for the pipeline's inputs). The
encoder is the ffmpeg binary that ``imageio-ffmpeg`` ships: libx264, yuv420p (which needs even
sizes, so odd edges are padded by repeating the last row/column), written to a temporary name and
renamed, so a failed run leaves no half-written file.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from longcat_tools.errors import LongcatError


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8 the way the original demos do (``(x * 255).astype(uint8)``)."""
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0, 1) * 255).astype(np.uint8)


def write_mp4(path: str | Path, frames: np.ndarray, fps: float, crf: int = 18) -> Path:
    """Encode ``frames`` (uint8 or [0,1] float, [F, H, W, 3]) as H.264 at ``fps``."""
    import imageio_ffmpeg

    path = Path(path)
    frames = to_uint8(np.asarray(frames))
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise LongcatError(f"{path}: expected frames [F, H, W, 3], got {list(frames.shape)}")
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial.mp4")
    h, w = frames.shape[1:3]
    writer = imageio_ffmpeg.write_frames(
        str(tmp), (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv420p", quality=None,
        macro_block_size=1, ffmpeg_log_level="error", output_params=["-crf", str(crf)])
    try:
        writer.send(None)
        for f in frames:
            writer.send(np.ascontiguousarray(f))
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_video(path: str | Path) -> tuple[list[Image.Image], float]:
    """All frames of a video file as RGB PIL images, and its frame rate."""
    import imageio_ffmpeg

    path = Path(path)
    if not path.is_file():
        raise LongcatError(f"{path}: no such video file")
    try:
        gen = imageio_ffmpeg.read_frames(str(path))
        meta = next(gen)
        w, h = meta["size"]
        frames = [Image.fromarray(np.frombuffer(b, np.uint8).reshape(h, w, 3).copy())
                  for b in gen]
    except (RuntimeError, OSError, StopIteration) as e:
        raise LongcatError(f"{path}: cannot read the video ({e})") from e
    if not frames:
        raise LongcatError(f"{path}: the video has no frames")
    return frames, float(meta.get("fps") or 0.0)


def read_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise LongcatError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as e:
        raise LongcatError(f"{path}: cannot read the image ({e})") from e


def probe(path: str | Path) -> dict:
    """Decode the whole file with the bundled ffmpeg and report its video stream: codec, pixel
    format, size, fps and the number of frames decoded (a file that does not decode fails)."""
    import imageio_ffmpeg

    exe = imageio_ffmpeg.get_ffmpeg_exe()
    r = subprocess.run([exe, "-hide_banner", "-i", str(path), "-map", "0:v:0", "-f", "null", "-"],
                       capture_output=True, text=True)
    err = r.stderr
    m = re.search(r"Stream #\S+: Video: (\w+)[^,]*, (\w+)[^,]*(?:\([^)]*\))?, (\d+)x(\d+)", err)
    frames = re.findall(r"frame=\s*(\d+)", err)
    fps = re.search(r"([\d.]+) fps", err)
    if r.returncode != 0 or not m:
        raise LongcatError(f"{path}: ffmpeg cannot decode it ({err.strip().splitlines()[-1:]})")
    return {"codec": m.group(1), "pix_fmt": m.group(2), "width": int(m.group(3)),
            "height": int(m.group(4)), "fps": float(fps.group(1)) if fps else None,
            "frames": int(frames[-1]) if frames else None}
