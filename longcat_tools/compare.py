"""``longcat-tools compare DIR``: put the videos of many runs side by side.

Each ``run`` writes ``X.mp4`` and its sidecar ``X.mp4.json``. Here the sidecars of one folder
(sorted by file name) become one PNG contact sheet (a row per video: a label, then the first,
middle and last frame, or ``frames`` evenly spaced ones), a table (prompt, seed, BSA, time, peak
memory), and, for every pair of runs whose settings differ in exactly one field, the per-frame
PSNR between their videos: what that one change (BSA, steps, distill...) costs in pixels.

Sheet layout (every length in px; ``PAD`` and ``LABEL_WIDTH`` below)::

    thumbnail of a W x H video:  round(W * thumb_height / H) x thumb_height
    column width:                the widest thumbnail of any row
    sheet width:                 PAD + LABEL_WIDTH + PAD + columns * (column width + PAD)
    sheet height:                PAD + rows * (thumb_height + PAD)
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from longcat_tools.errors import LongcatError, UsageError
from longcat_tools.io import jsonio
from longcat_tools.io.atomic import (
    atomic_write_bytes,
    check_parent,
    enclosing_checkpoint,
    real_path,
)
from longcat_tools.model import bounds
from longcat_tools.runner.settings import sidecar_settings

if TYPE_CHECKING:  # numpy and Pillow load when a comparison runs, not with the command line
    import numpy as np
    from PIL import Image

SIDECAR_SUFFIX = ".mp4.json"
SHEET_NAME = "contact_sheet.png"  # the sheet's default name, inside DIR
SHOWN_FIELDS = ("prompt", "seed", "bsa")  # always on a row's label; other fields when they vary

DEFAULT_FRAMES = 3  # first, middle, last
MAX_FRAMES = 64
DEFAULT_THUMB_HEIGHT = 160
MIN_THUMB_HEIGHT, MAX_THUMB_HEIGHT = 16, 1080

PAD = 4  # around and between cells
LABEL_WIDTH = 280  # the label cell left of each row's thumbnails
TEXT_MARGIN = 4  # inside the label cell
LINE_SPACING = 2
PROMPT_LINES = 3  # a longer prompt is cut with "..."
BACKGROUND = (255, 255, 255)
LABEL_BACKGROUND = (236, 236, 236)
TEXT_COLOUR = (0, 0, 0)
PEAK = 255.0  # uint8


@dataclass
class Item:
    """One run: its video, its sidecar, and (after decoding) the video's frame count and size."""

    video: Path
    sidecar: dict[str, Any]
    frames: int = 0
    height: int = 0
    width: int = 0

    @property
    def name(self) -> str:
        return self.video.name

    @property
    def settings(self) -> dict[str, Any]:
        """The run's settings that change what it computes (output paths left out; the device
        as its type, so runs spread over cuda:0 and cuda:1 still pair; the checkpoint by its
        real path, however ``-m`` spelled it; ``--lora`` as the adapters and scales it
        applied; ``--precision`` as what it computed in)."""
        return sidecar_settings(self.sidecar)

    @property
    def bsa(self) -> str:
        """The --bsa option, and what it resolved to (dense, or the sparsity it ran with)."""
        option = str(self.sidecar["settings"].get("bsa", "?"))
        if "bsa" not in self.sidecar:
            return option
        params = self.sidecar["bsa"]
        if params is None:
            return f"{option} (dense)"
        sparsity = params.get("sparsity") if isinstance(params, dict) else None
        return f"{option} (sparsity {sparsity})" if sparsity is not None else option

    @property
    def total_s(self) -> float | None:
        t = self.sidecar.get("total_s")
        return float(t) if isinstance(t, int | float) and not isinstance(t, bool) else None

    @property
    def peak_memory(self) -> tuple[str, int] | None:
        """("gpu", bytes) when the run used a GPU, else ("cpu", max RSS bytes)."""
        mem = self.sidecar.get("peak_memory")
        if not isinstance(mem, dict):
            return None
        for kind, key in (("gpu", "gpu_max_allocated_bytes"), ("cpu", "cpu_max_rss_bytes")):
            if isinstance(mem.get(key), int):
                return kind, mem[key]
        return None

    def row(self) -> dict[str, Any]:
        """This run's line of the table."""
        s = self.sidecar["settings"]
        mem = self.peak_memory
        return {"file": self.name, "prompt": s.get("prompt"), "seed": s.get("seed"),
                "bsa": self.bsa, "total_s": self.total_s,
                "peak_memory": None if mem is None else {"kind": mem[0], "bytes": mem[1]}}


@dataclass
class Pair:
    """Two runs whose settings differ in one field, and the PSNR between their videos."""

    a: str
    b: str
    setting: str
    values: tuple[Any, Any]
    frame_psnr_db: list[float] = field(default_factory=list)
    mean_psnr_db: float | None = None
    skipped: str | None = None  # why no PSNR (sizes or frame counts differ)

    def to_json(self) -> dict[str, Any]:
        """Strict JSON: an infinite PSNR (identical frames) is the string "inf"."""
        return {"a": self.a, "b": self.b, "setting": self.setting, "values": list(self.values),
                "mean_psnr_db": _json_db(self.mean_psnr_db),
                "frame_psnr_db": [_json_db(v) for v in self.frame_psnr_db],
                "skipped": self.skipped}


@dataclass
class Comparison:
    """What ``compare`` found and wrote."""

    folder: Path
    items: list[Item]
    pairs: list[Pair]
    notes: list[str]
    sheet: Path
    columns: int

    def table(self) -> list[dict[str, Any]]:
        return [i.row() for i in self.items]

    def to_json(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "sheet": str(self.sheet), "columns": self.columns,
                "items": self.table(), "pairs": [p.to_json() for p in self.pairs],
                "notes": self.notes}


def format_db(value: float | None) -> str:
    """A PSNR for people: "inf" for identical frames, else two decimals."""
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.2f}"


def _json_db(value: float | None) -> float | str | None:
    return "inf" if value is not None and math.isinf(value) else value


# -- reading -------------------------------------------------------------------------------------

def load_items(folder: str | Path) -> tuple[list[Item], list[str]]:
    """The runs of ``folder`` (one per ``*.mp4.json`` with its mp4 beside it), sorted by file
    name, and a note for each mp4 or sidecar without its partner (skipped, not fatal: a run may
    still be writing)."""
    folder = Path(folder)
    if not folder.is_dir():
        if not folder.exists():
            raise UsageError(f"{folder}: no such folder (pass the folder of run's outputs)")
        raise UsageError(f"{folder}: not a folder")
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    sidecars = [n for n in names if n.endswith(SIDECAR_SUFFIX)]
    notes = [f"{folder / n}: no sidecar {n}.json; skipped" for n in names
             if n.endswith(".mp4") and f"{n}.json" not in names]
    items = []
    inside = real_path(folder)
    for n in sidecars:
        video = folder / n[: -len(".json")]
        if not (video.exists() or video.is_symlink()):
            notes.append(f"{folder / n}: its video {video.name} is missing; skipped")
            continue
        for f in (folder / n, video):
            if inside not in real_path(f).parents:
                raise LongcatError(f"{f}: a link to {real_path(f)}, outside {folder}; compare "
                                   "reads only the folder's own files (copy the file in)")
            if not f.is_file():
                raise LongcatError(f"{f}: not a regular file; remove it or move it aside")
        doc = _read_sidecar(folder / n)
        recorded = doc.get("video", {}).get("bytes") if isinstance(doc.get("video"), dict) else None
        if isinstance(recorded, int) and recorded != video.stat().st_size:
            read_frames(video)  # a replaced video decodes; a truncated one is an error
            notes.append(f"{folder / n}: describes a video of {recorded:,} bytes, and "
                         f"{video.name} has {video.stat().st_size:,} (a run replacing it was cut "
                         "off between the two); skipped")
            continue
        items.append(Item(video, doc))
    if not items:
        skipped = f" ({len(notes)} skipped: a video or sidecar alone)" if notes else ""
        raise LongcatError(f"{folder}: no videos with a sidecar (*{SIDECAR_SUFFIX}) to "
                           f"compare{skipped}; write them with `longcat-tools run`")
    return items, notes


# The sidecar fields the table reads, with the types and values `run` writes (None: absent or
# null): a negative time or memory, or a seed no generator takes, was shown as if measured.
def _not_negative(v: float) -> bool:
    return v >= 0


SIDECAR_TYPES = {("settings", "seed"): ((int,), lambda v: v in bounds.SEEDS),
                 ("total_s",): ((int, float), _not_negative),
                 ("peak_memory", "gpu_max_allocated_bytes"): ((int,), _not_negative),
                 ("peak_memory", "cpu_max_rss_bytes"): ((int,), _not_negative)}


def _read_sidecar(path: Path) -> dict[str, Any]:
    from longcat_tools.runner.settings import setting_types, value_fits

    doc = jsonio.read(path, what="a run's sidecar")
    if not isinstance(doc, dict) or not isinstance(doc.get("settings"), dict):
        raise LongcatError(f"{path}: not a run sidecar (no 'settings' object); is it one "
                           "`longcat-tools run` wrote?")
    hints = setting_types()  # every setting is shown where runs differ
    for name, value in doc["settings"].items():
        if name in hints and not value_fits(value, hints[name]):
            raise LongcatError(f"{path}: 'settings.{name}' is {json.dumps(value)[:40]}, not "
                               f"what `longcat-tools run` writes there; fix or remove the file")
    for keys, (types, ok) in SIDECAR_TYPES.items():  # checked before any output is written
        parent = doc if len(keys) == 1 else doc.get(keys[0])
        value = parent.get(keys[-1]) if isinstance(parent, dict) else None
        if value is not None and (isinstance(value, bool) and bool not in types
                                  or not isinstance(value, types) or not ok(value)):
            raise LongcatError(f"{path}: '{'.'.join(keys)}' is {json.dumps(value)[:40]}, not "
                               f"what `longcat-tools run` writes there; fix or remove the file")
    return doc


def read_frames(path: Path) -> np.ndarray:
    """All frames of a video as uint8 [F, H, W, 3]; a file ffmpeg cannot read is one line (its
    last word on it), not ffmpeg's whole log."""
    import numpy as np

    from longcat_tools.runner import video as vio

    try:
        frames, _fps = vio.read_video(path)
    except LongcatError as e:
        if e.__cause__ is None:
            raise
        lines = [ln.strip() for ln in str(e.__cause__).splitlines() if ln.strip()]
        why = lines[-1] if lines else type(e.__cause__).__name__
        raise LongcatError(f"{path}: cannot read the video ({why})") from None
    return np.stack([np.asarray(f.convert("RGB")) for f in frames])


# -- pairs and PSNR ------------------------------------------------------------------------------

def per_frame_mse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean squared error of each frame of two uint8 videos of one shape; exact integer sums,
    one frame at a time (a whole 480p video in float64 would be ~1 GB)."""
    import numpy as np

    out = np.empty(len(a), dtype=np.float64)
    for k in range(len(a)):
        d = a[k].astype(np.int32) - b[k].astype(np.int32)
        out[k] = int((d * d).sum(dtype=np.int64)) / d.size
    return out


def psnr_db(mse: float) -> float:
    """PSNR in dB of uint8 pixels with this mean squared error; inf for identical ones."""
    return math.inf if mse == 0 else 10.0 * math.log10(PEAK**2 / mse)


def frame_psnr(mse: np.ndarray) -> list[float]:
    """Per-frame PSNR in dB from ``per_frame_mse``."""
    return [psnr_db(float(m)) for m in mse]


def mean_psnr(mse: np.ndarray) -> float:
    """One number for a whole video: the PSNR of the mean squared error over all frames (as
    ffmpeg's psnr filter averages), so frames that are identical in both (vc's condition frames)
    count as no error instead of making the mean infinite; inf only when every frame is."""
    return psnr_db(float(mse.mean()))


def one_field_pairs(items: list[Item]) -> list[tuple[int, int, str]]:
    """(i, j, field) for every pair i < j whose settings differ in exactly one field."""
    missing = object()  # a field one sidecar lacks differs from any value
    out = []
    for i, a in enumerate(items):
        sa = a.settings
        for j in range(i + 1, len(items)):
            sb = items[j].settings
            diff = [k for k in sorted(sa.keys() | sb.keys())
                    if sa.get(k, missing) != sb.get(k, missing)]
            if len(diff) == 1:
                out.append((i, j, diff[0]))
    return out


def measure_pairs(items: list[Item]) -> list[Pair]:
    """The PSNR of every one-field pair. Videos are decoded pair by pair, never all at once;
    items ``render_sheet`` has seen skip decoding a pair whose sizes already differ."""
    pairs = []
    cached: tuple[int, np.ndarray] | None = None
    for i, j, name in one_field_pairs(items):
        a, b = items[i], items[j]
        p = Pair(a.name, b.name, name, (a.settings.get(name), b.settings.get(name)))
        pairs.append(p)
        p.skipped = _mismatch((a.frames, a.height, a.width), (b.frames, b.height, b.width))
        if p.skipped:
            continue
        if cached is None or cached[0] != i:
            cached = (i, read_frames(a.video))
        fa, fb = cached[1], read_frames(b.video)
        p.skipped = _mismatch(fa.shape[:3], fb.shape[:3])
        if not p.skipped:
            mse = per_frame_mse(fa, fb)
            p.frame_psnr_db, p.mean_psnr_db = frame_psnr(mse), mean_psnr(mse)
    return pairs


def _mismatch(a: tuple[int, ...], b: tuple[int, ...]) -> str | None:
    """Why two videos of (frames, height, width) have no PSNR, or None."""
    if a[1:] != b[1:]:
        return f"sizes differ ({a[2]}x{a[1]} vs {b[2]}x{b[1]})"
    if a[0] != b[0]:
        return f"frame counts differ ({a[0]} vs {b[0]})"
    return None


# -- the sheet -----------------------------------------------------------------------------------

def frame_indices(count: int, n: int) -> list[int]:
    """``n`` evenly spaced frame indices of a ``count``-frame video, first and last included
    (one: the middle one)."""
    if n == 1:
        return [(count - 1) // 2]
    return [k * (count - 1) // (n - 1) for k in range(n)]


def thumb_width(width: int, height: int, thumb_height: int) -> int:
    """A thumbnail's width at ``thumb_height``, keeping the aspect."""
    return max(1, round(width * thumb_height / height))


def sheet_size(rows: int, columns: int, column_width: int, thumb_height: int) -> tuple[int, int]:
    """(width, height) of a sheet; the formula in the module docstring."""
    return (PAD + LABEL_WIDTH + PAD + columns * (column_width + PAD),
            PAD + rows * (thumb_height + PAD))


def varying_fields(items: list[Item]) -> list[str]:
    """Settings (other than the ones every label shows) whose value differs between runs."""
    keys = sorted(set().union(*(i.settings.keys() for i in items)) - set(SHOWN_FIELDS))
    return [k for k in keys if len({repr(i.settings.get(k)) for i in items}) > 1]


LABEL_CHARS = 4096  # of a sidecar's text that a label may show


class _Font:
    """Pillow's default font, with the label's text measured and fitted to the cell."""

    def __init__(self) -> None:
        from PIL import ImageFont

        self.font = ImageFont.load_default()
        self.line_height = self.font.getbbox("Ag")[3] + LINE_SPACING
        self.width = LABEL_WIDTH - 2 * TEXT_MARGIN

    def printable(self, text: str) -> str:
        """``text`` in one line that the font can draw (a bitmap font only has Latin-1), cut to
        far more than a label holds (Pillow refuses to measure over a million characters)."""
        text = " ".join(str(text)[:LABEL_CHARS].split())
        try:
            self.font.getlength(text)
        except UnicodeEncodeError:
            text = text.encode("latin-1", "replace").decode("latin-1")
        return text

    def fits(self, text: str) -> bool:
        return self.font.getlength(text) <= self.width

    def cut(self, text: str) -> str:
        """``text`` ending in "..." if needed to fit the width."""
        if self.fits(text):
            return text
        while text and not self.fits(text + "..."):
            text = text[:-1]
        return text.rstrip() + "..."

    def wrap(self, text: str, max_lines: int) -> list[str]:
        """``text`` over at most ``max_lines`` lines of the cell's width, the last cut."""
        lines: list[str] = []
        for word in text.split():
            if lines and self.fits(f"{lines[-1]} {word}"):
                lines[-1] = f"{lines[-1]} {word}"
            else:
                lines.append(word)
        if len(lines) > max_lines:
            # greedy lines: the next line's first word never fits, so the cut adds "..."
            lines = lines[:max_lines - 1] + [f"{lines[max_lines - 1]} {lines[max_lines]}"]
        return [self.cut(ln) for ln in lines]


def label_lines(item: Item, varying: Iterable[str], indices: list[int], font: _Font,
                max_lines: int) -> list[str]:
    """The label of a row: file, prompt, seed and BSA, the varying settings, time and frames."""
    s = item.sidecar["settings"]
    total = item.total_s
    tail = [f"seed {s.get('seed')} | bsa {item.bsa}"]
    tail += [f"{k}={item.settings.get(k)}" for k in varying]
    tail.append(("total ?" if total is None else f"total {total:.1f} s")
                + f" | frames {', '.join(map(str, indices))} of {item.frames}")
    tail = [font.cut(font.printable(t)) for t in tail]
    head = [font.cut(font.printable(item.name))]
    room = max(1, min(PROMPT_LINES, max_lines - len(head) - len(tail)))
    lines = head + font.wrap(font.printable(f'"{s.get("prompt", "")}"'), room) + tail
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = font.cut(lines[-1] + " ...")
    return lines


def render_sheet(items: list[Item], frames: int = DEFAULT_FRAMES,
                 thumb_height: int = DEFAULT_THUMB_HEIGHT) -> tuple[Image.Image, int]:
    """The contact sheet and its columns: ``frames``, or as many as the longest video has;
    decodes each video once (one at a time) and records its frame count and size on its
    item."""
    from PIL import Image, ImageDraw

    thumbs: list[list[Image.Image]] = []
    indices: list[list[int]] = []
    for it in items:
        video = read_frames(it.video)
        it.frames, it.height, it.width = (int(v) for v in video.shape[:3])
        idx = frame_indices(it.frames, min(frames, it.frames))
        size = (thumb_width(it.width, it.height, thumb_height), thumb_height)
        thumbs.append([Image.fromarray(video[k]).resize(size, Image.LANCZOS) for k in idx])
        indices.append(idx)
        del video
    columns = max(len(t) for t in thumbs)
    for r, t in enumerate(thumbs):  # a shorter video fills the columns by repeating frames
        pick = frame_indices(len(t), columns)
        thumbs[r], indices[r] = [t[j] for j in pick], [indices[r][j] for j in pick]
    col_w = max(t[0].width for t in thumbs)
    sheet = Image.new("RGB", sheet_size(len(items), columns, col_w, thumb_height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = _Font()
    max_lines = max(1, (thumb_height - 2 * TEXT_MARGIN + LINE_SPACING) // font.line_height)
    varying = varying_fields(items)
    for r, it in enumerate(items):
        y = PAD + r * (thumb_height + PAD)
        draw.rectangle((PAD, y, PAD + LABEL_WIDTH - 1, y + thumb_height - 1),
                       fill=LABEL_BACKGROUND)
        for n, line in enumerate(label_lines(it, varying, indices[r], font, max_lines)):
            draw.text((PAD + TEXT_MARGIN, y + TEXT_MARGIN + n * font.line_height), line,
                      fill=TEXT_COLOUR, font=font.font)
        for c, thumb in enumerate(thumbs[r]):
            sheet.paste(thumb, (PAD + LABEL_WIDTH + PAD + c * (col_w + PAD), y))
    return sheet, columns


# -- writing -------------------------------------------------------------------------------------

def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (``io.atomic``), one line on failure."""
    path = Path(path)
    check_target(path)
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        raise LongcatError(f"{path}: cannot write ({e.strerror or e})") from None


def check_target(path: Path) -> None:
    """Refuse an output path that cannot be written, before any video is decoded."""
    if path.is_dir():
        raise UsageError(f"{path}: is a folder; name a file to write")
    check_parent(path)
    if (ckpt := enclosing_checkpoint(path)) is not None:
        raise UsageError(f"{path}: inside the checkpoint {ckpt}; write it outside the "
                         "model's folder")


def png_bytes(image: Image.Image) -> bytes:
    """The PNG of ``image``, with no metadata: the same inputs give the same bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def check_options(frames: int, thumb_height: int) -> None:
    """Refuse a sheet too small to see or too large to open, before any video is decoded."""
    if not 1 <= frames <= MAX_FRAMES:
        raise UsageError(f"--frames {frames}: give 1 to {MAX_FRAMES} frames per video")
    if not MIN_THUMB_HEIGHT <= thumb_height <= MAX_THUMB_HEIGHT:
        raise UsageError(f"--thumb-height {thumb_height}: give {MIN_THUMB_HEIGHT} to "
                         f"{MAX_THUMB_HEIGHT} px")


def compare(folder: str | Path, *, sheet: str | Path | None = None,
            frames: int = DEFAULT_FRAMES, thumb_height: int = DEFAULT_THUMB_HEIGHT,
            report: str | Path | None = None) -> Comparison:
    """Compare the runs of ``folder``: write the contact sheet (default ``DIR/contact_sheet.png``)
    and, with ``report``, the table and pairs as JSON; both atomically."""
    check_options(frames, thumb_height)
    folder = Path(folder)
    sheet = Path(sheet) if sheet is not None else folder / SHEET_NAME
    if sheet.suffix.lower() != ".png":  # PNG bytes were written under any name
        raise UsageError(f"{sheet}: the contact sheet is a PNG; name a .png file")
    items, notes = load_items(folder)
    for target in (sheet, report):
        if target is not None:
            check_target(Path(target))
    image, columns = render_sheet(items, frames, thumb_height)
    if columns < frames:
        notes.append(f"--frames {frames}: the longest video has {columns} frames; the sheet "
                     f"shows {columns}")
    notes += [f"{it.video}: {it.frames} frames, fewer than the sheet's {columns}: some are shown "
              "twice" for it in items if it.frames < columns]
    pairs = measure_pairs(items)
    write_atomic(sheet, png_bytes(image))
    result = Comparison(folder, items, pairs, notes, sheet, columns)
    if report is not None:
        write_atomic(Path(report), jsonio.dumps(result.to_json()).encode())
    return result
