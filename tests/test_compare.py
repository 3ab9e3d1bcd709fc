"""``longcat-tools compare DIR`` on small videos written here (no model): the contact sheet's size
and labels, the table, the PSNR of one-setting pairs against our own computation, bad input."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from hostile import refused
from PIL import Image

from longcat_tools.cli import main
from longcat_tools.compare import BACKGROUND, LABEL_BACKGROUND, LABEL_WIDTH, PAD, compare
from longcat_tools.errors import LongcatError
from longcat_tools.runner.settings import RunSettings
from longcat_tools.runner.video import read_video, write_mp4

FRAMES = 6
BSA_PARAMS = {"sparsity": 0.9375, "cdf_threshold": None, "chunk_q": [4, 4, 4],
              "chunk_k": [4, 4, 4]}


def clip(h: int, w: int, colour: tuple[int, int, int], noise: int = 0, seed: int = 0):
    """FRAMES frames: a moving gradient tinted ``colour``, plus uniform noise of +-``noise``."""
    y, x = np.mgrid[0:h, 0:w]
    frames = []
    for t in range(FRAMES):
        g = ((x * 3 + y * 2 + t * 9) % 96).astype(np.int16)
        frames.append(np.stack([g + c for c in colour], axis=-1))
    video = np.stack(frames)
    if noise:
        rng = np.random.default_rng(seed)
        video = video + rng.integers(-noise, noise + 1, video.shape)
    return np.clip(video, 0, 255).astype(np.uint8)


def add_run(folder: Path, name: str, video: np.ndarray, total_s: float, *,
            device: str = "cpu", gpu_bytes: int | None = None, **settings) -> Path:
    """An mp4 and the sidecar ``run`` would write for it."""
    path = folder / name
    write_mp4(path, video, 15)
    s = {**asdict(RunSettings(out=str(path), **settings)), "dtype": "fp32", "device": device}
    mem = {"cpu_max_rss_bytes": 3 << 30}
    if gpu_bytes is not None:
        mem["gpu_max_allocated_bytes"] = gpu_bytes
    doc = {"output": str(path), "task": s["task"], "settings": s, "seed": s["seed"],
           "video": {"frames": video.shape[0], "height": video.shape[1],
                     "width": video.shape[2], "fps": 15, "codec": "h264", "pix_fmt": "yuv420p"},
           "bsa": None if s["bsa"] == "off" else BSA_PARAMS, "loras": [],
           "timings_s": {"denoise": total_s - 1.0, "write": 1.0}, "total_s": total_s,
           "peak_memory": mem}
    Path(f"{path}.json").write_text(json.dumps(doc))
    return path


A_PROMPT = "a cat walking through a sunny garden"
B_PROMPT = ("a very long prompt about a dog running along a beach at sunset while waves roll "
            "in and gulls circle overhead, the camera tracking slowly from left to right " * 2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """a / a_bsa: one setting apart (bsa; out, save_latents and cuda:N differ too, which do not
    count); b: prompt and seed differ; c: only the height differs from a (another size)."""
    d = tmp_path_factory.mktemp("runs")
    base = clip(48, 64, (60, 20, 120))
    add_run(d, "a.mp4", base, 12.5, device="cuda:0", gpu_bytes=5 << 30, prompt=A_PROMPT,
            seed=1, bsa="off")
    add_run(d, "a_bsa.mp4", clip(48, 64, (60, 20, 120), noise=6, seed=3), 9.25,
            device="cuda:1", gpu_bytes=4 << 30, prompt=A_PROMPT, seed=1, bsa="on",
            save_latents=str(d / "lat.safetensors"))
    add_run(d, "b.mp4", clip(48, 64, (150, 140, 10)), 11.0, device="cuda:0", prompt=B_PROMPT,
            seed=2, bsa="off")
    add_run(d, "c.mp4", clip(32, 48, (10, 150, 40)), 7.0, device="cuda:0", prompt=A_PROMPT,
            seed=1, bsa="off", height=32)
    write_mp4(d / "orphan.mp4", base, 15)  # no sidecar: skipped with a note
    return d


def decoded(path: Path) -> np.ndarray:
    return np.stack([np.asarray(f) for f in read_video(path)[0]]).astype(np.float64)


def expected_psnr(a: Path, b: Path) -> tuple[list[float], float]:
    """Per-frame PSNR and the PSNR of the mean squared error, computed here from the frames."""
    fa, fb = decoded(a), decoded(b)
    mse = [float(np.mean((fa[k] - fb[k]) ** 2)) for k in range(len(fa))]
    per = [math.inf if m == 0 else 10 * math.log10(255**2 / m) for m in mse]
    mean_mse = sum(mse) / len(mse)
    return per, (math.inf if mean_mse == 0 else 10 * math.log10(255**2 / mean_mse))


@pytest.fixture(scope="module")
def compared(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    result = compare(runs, sheet=out / "sheet.png", report=out / "compare.json")
    return result, out


def test_the_sheet_has_one_row_per_video_and_the_documented_size(compared, runs):
    result, out = compared
    assert [i.name for i in result.items] == ["a.mp4", "a_bsa.mp4", "b.mp4", "c.mp4"]
    with Image.open(out / "sheet.png") as im:
        im.verify()
    sheet = Image.open(out / "sheet.png").convert("RGB")
    th = 160
    col_w = max(round(64 * th / 48), round(48 * th / 32))  # the widest thumbnail: c's 48x32
    rows, cols = 4, 3
    assert sheet.size == (PAD + LABEL_WIDTH + PAD + cols * (col_w + PAD),
                          PAD + rows * (th + PAD))
    # row 2 (b) shows b's tint in its first frame cell; row 0 (a) shows a's
    px = np.asarray(sheet).astype(int)
    x0 = PAD + LABEL_WIDTH + PAD
    for row, tint in ((0, (60, 20, 120)), (2, (150, 140, 10))):
        y0 = PAD + row * (th + PAD)
        cell = px[y0:y0 + th, x0:x0 + round(64 * th / 48)]
        red_minus_green = cell[..., 0].mean() - cell[..., 1].mean()
        assert abs(red_minus_green - (tint[0] - tint[1])) < 12, (row, red_minus_green)


def test_labels_are_drawn(compared):
    _, out = compared
    px = np.asarray(Image.open(out / "sheet.png").convert("RGB")).astype(int)
    th = 160
    labels = []
    for row in range(4):
        y0 = PAD + row * (th + PAD)
        cell = px[y0:y0 + th, PAD:PAD + LABEL_WIDTH]
        ink = ~np.all(cell == LABEL_BACKGROUND, axis=-1) & ~np.all(cell == BACKGROUND, axis=-1)
        assert ink.sum() > 200, row  # text, not an empty cell
        assert (cell.sum(axis=-1) < 200).any(), row  # some dark (text) pixels
        labels.append(cell)
    assert not np.array_equal(labels[0], labels[2])  # different prompts, different labels


def test_the_sheet_is_the_same_for_the_same_inputs(compared, runs, tmp_path):
    _, out = compared
    again = compare(runs, sheet=tmp_path / "again.png").sheet
    assert again.read_bytes() == (out / "sheet.png").read_bytes()


def test_table(compared):
    result, out = compared
    rows = {r["file"]: r for r in result.table()}
    assert rows["a.mp4"]["prompt"] == A_PROMPT and rows["a.mp4"]["seed"] == 1
    assert rows["a.mp4"]["bsa"].startswith("off") and rows["a_bsa.mp4"]["bsa"].startswith("on")
    assert rows["a_bsa.mp4"]["total_s"] == 9.25
    assert rows["a.mp4"]["peak_memory"] == {"kind": "gpu", "bytes": 5 << 30}
    assert rows["b.mp4"]["peak_memory"] == {"kind": "cpu", "bytes": 3 << 30}
    assert "orphan.mp4" not in rows
    assert any("orphan.mp4" in n and "no sidecar" in n for n in result.notes)
    report = json.loads((out / "compare.json").read_text())
    assert [r["file"] for r in report["items"]] == ["a.mp4", "a_bsa.mp4", "b.mp4", "c.mp4"]


def test_one_setting_pairs_and_their_psnr(compared, runs):
    result, out = compared
    pairs = {(p.a, p.b): p for p in result.pairs}
    assert set(pairs) == {("a.mp4", "a_bsa.mp4"), ("a.mp4", "c.mp4")}  # a/b: prompt and seed
    bsa = pairs["a.mp4", "a_bsa.mp4"]
    assert bsa.setting == "bsa" and bsa.values == ("off", "on") and bsa.skipped is None
    per, mean = expected_psnr(runs / "a.mp4", runs / "a_bsa.mp4")
    assert len(bsa.frame_psnr_db) == FRAMES
    assert bsa.frame_psnr_db == pytest.approx(per, abs=1e-9)
    assert bsa.mean_psnr_db == pytest.approx(mean, abs=1e-9)
    assert 20 < mean < 60  # slightly noisy, not identical
    size = pairs["a.mp4", "c.mp4"]
    assert size.setting == "height" and size.mean_psnr_db is None
    assert "sizes differ" in size.skipped
    report = json.loads((out / "compare.json").read_text())
    assert report["pairs"][0]["mean_psnr_db"] == pytest.approx(mean, abs=1e-9)


def test_cli_prints_the_table_and_pairs(runs, tmp_path, capsys):
    capsys.readouterr()
    assert main(["compare", str(runs), "--out", str(tmp_path / "s.png"), "--frames", "5",
                 "--thumb-height", "48"]) == 0
    cap = capsys.readouterr()
    assert "a_bsa.mp4" in cap.out and "9.25" in cap.out and "5.00 GiB gpu" in cap.out
    _, mean = expected_psnr(runs / "a.mp4", runs / "a_bsa.mp4")
    assert f"a.mp4 vs a_bsa.mp4: bsa off -> on: mean {mean:.2f} dB" in cap.out
    assert "a.mp4 vs c.mp4: height None -> 32: skipped, sizes differ" in cap.out
    assert "orphan.mp4" in cap.err and "no sidecar" in cap.err
    col_w = round(48 * 48 / 32)
    assert Image.open(tmp_path / "s.png").size == (PAD + LABEL_WIDTH + PAD + 5 * (col_w + PAD),
                                                   PAD + 4 * (48 + PAD))
    assert "fewer than --frames" not in cap.err
    assert main(["compare", str(runs), "--out", str(tmp_path / "t.png"), "--frames",
                 str(FRAMES + 4), "--thumb-height", "48", "--json"]) == 0
    cap = capsys.readouterr()  # 10 columns of 6 frames repeated 4 of them, and said 10
    assert f"--frames {FRAMES + 4}: the longest video has {FRAMES} frames" in cap.err
    assert json.loads(cap.out)["columns"] == FRAMES
    assert Image.open(tmp_path / "t.png").size[0] == PAD + LABEL_WIDTH + PAD + FRAMES * (
        col_w + PAD)


def test_a_shorter_video_repeats_frames_to_fill_the_columns(tmp_path, capsys):
    long, short = clip(32, 32, (0, 0, 0)), clip(32, 32, (0, 0, 0))[:3]
    add_run(tmp_path, "long.mp4", long, 1.0, prompt="p", seed=1)
    add_run(tmp_path, "short.mp4", short, 1.0, prompt="p", seed=2)
    result = compare(tmp_path, frames=FRAMES)
    assert result.columns == FRAMES and result.items[1].frames == 3
    assert any("short.mp4: 3 frames, fewer than the sheet's 6: some are shown twice" in n
               for n in result.notes)
    assert not any("long.mp4" in n for n in result.notes)


def test_identical_videos_are_inf_psnr(tmp_path, capsys):
    video = clip(32, 32, (0, 0, 0))
    add_run(tmp_path, "x.mp4", video, 1.0, prompt="p", seed=1)
    add_run(tmp_path, "y.mp4", video, 1.0, prompt="p", seed=2)
    capsys.readouterr()
    assert main(["compare", str(tmp_path), "--json"]) == 0
    cap = capsys.readouterr()
    doc = json.loads(cap.out)
    (pair,) = doc["pairs"]
    assert pair["setting"] == "seed" and pair["mean_psnr_db"] == "inf"
    assert pair["frame_psnr_db"] == ["inf"] * FRAMES
    assert "mean inf dB" in cap.err  # the human text goes to stderr under --json
    assert (tmp_path / "contact_sheet.png").is_file()


def test_a_sidecar_of_another_video_is_skipped(tmp_path):
    """A run killed between publishing its sidecar and its mp4 left the old video under the
    new settings; compare labelled it with them."""
    for name, seed in (("x.mp4", 1), ("y.mp4", 2), ("z.mp4", 3)):
        path = add_run(tmp_path, name, clip(32, 32, (0, 0, 0)), 1.0, prompt="p", seed=seed)
        side = Path(f"{path}.json")
        doc = json.loads(side.read_text())
        doc["video"]["bytes"] = path.stat().st_size + (name == "y.mp4")
        side.write_text(json.dumps(doc))
    result = compare(tmp_path, frames=FRAMES)
    assert [it.video.name for it in result.items] == ["x.mp4", "z.mp4"]
    assert any("y.mp4.json: describes a video of" in n and "skipped" in n for n in result.notes)
    y = tmp_path / "y.mp4"  # truncated by a failing disk, not replaced: an error, as elsewhere
    y.write_bytes(y.read_bytes()[:500])
    with pytest.raises(LongcatError, match="y.mp4: cannot read the video"):
        compare(tmp_path, frames=FRAMES)


def test_bad_input_is_one_line(tmp_path, capsys):
    refused(capsys, "compare", tmp_path / "nope", code=2, says="no such folder")
    (tmp_path / "empty").mkdir()
    refused(capsys, "compare", tmp_path / "empty", says="no videos with a sidecar")
    lone = tmp_path / "lone"
    lone.mkdir()
    write_mp4(lone / "v.mp4", clip(16, 16, (0, 0, 0)), 15)
    refused(capsys, "compare", lone, says="1 skipped")

    bad_json = tmp_path / "badjson"
    bad_json.mkdir()
    write_mp4(bad_json / "v.mp4", clip(16, 16, (0, 0, 0)), 15)
    (bad_json / "v.mp4.json").write_text("{not json")
    refused(capsys, "compare", bad_json, says="v.mp4.json")
    (bad_json / "v.mp4.json").write_text("[1, 2]")
    refused(capsys, "compare", bad_json, says="not a run sidecar")

    bad_mp4 = tmp_path / "badmp4"
    bad_mp4.mkdir()
    add_run(bad_mp4, "v.mp4", clip(16, 16, (0, 0, 0)), 1.0, prompt="p")
    (bad_mp4 / "v.mp4").write_bytes(b"\x00\x01 not an mp4" * 100)
    refused(capsys, "compare", bad_mp4, says="cannot read the video")

    good = tmp_path / "good"
    good.mkdir()
    add_run(good, "v.mp4", clip(16, 16, (0, 0, 0)), 1.0, prompt="p")
    refused(capsys, "compare", good, "--out", tmp_path / "no" / "s.png", code=2,
            says="parent folder does not exist (create it first)")
    (tmp_path / "afile").write_text("x")  # said its parent folder does not exist
    refused(capsys, "compare", good, "--out", tmp_path / "afile" / "s.png", code=2,
            says="output's parent is not a folder")
    (tmp_path / "dir.png").mkdir()
    refused(capsys, "compare", good, "--out", tmp_path / "dir.png", code=2, says="is a folder")
    refused(capsys, "compare", good, "--out", tmp_path / "s.jpg", code=2,
            says="the contact sheet is a PNG")  # PNG bytes were written under any name
    ckpt = tmp_path / "ckpt"
    (ckpt / "transformer").mkdir(parents=True)
    (ckpt / "transformer" / "config.json").write_text("{}")
    refused(capsys, "compare", good, "--out", ckpt / "transformer" / "s.png", code=2,
            says=f"inside the checkpoint {ckpt}")
    assert [p.name for p in (ckpt / "transformer").iterdir()] == ["config.json"]
    refused(capsys, "compare", good, "--frames", "0", code=2, says="--frames")
    refused(capsys, "compare", good, "--thumb-height", "5", code=2, says="--thumb-height")
    sidecar = good / "v.mp4.json"
    doc = json.loads(sidecar.read_text())
    for keys, value in ((("settings", "prompt"), 5), (("settings", "seed"), "x"),
                        (("settings", "seed"), True), (("total_s",), "fast"),
                        # values run never writes were shown as measured, or dropped
                        (("total_s",), -5), (("settings", "seed"), 10**30),
                        (("peak_memory", "cpu_max_rss_bytes"), "big"),
                        (("peak_memory", "gpu_max_allocated_bytes"), -1),
                        # any setting of another type than run writes (shown as it was)
                        (("settings", "bsa"), {"a": 1}), (("settings", "device"), 5),
                        (("settings", "audio"), ["a.wav", 3]), (("settings", "fps"), True)):
        edited = json.loads(json.dumps(doc))
        if len(keys) == 2:
            edited.setdefault(keys[0], {})
        (edited[keys[0]] if len(keys) == 2 else edited)[keys[-1]] = value
        sidecar.write_text(json.dumps(edited))
        # a prompt of 5 wrote the sheet, then ended in an internal error
        refused(capsys, "compare", good, says=f"'{'.'.join(keys)}' is {json.dumps(value)}")
        assert not (good / "contact_sheet.png").exists()


def test_links_out_of_the_folder_are_refused_and_long_prompts_are_cut(tmp_path, capsys):
    """compare reads only the folder it is given; a prompt of millions of characters is cut
    for its label (Pillow refuses to measure it)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    add_run(outside, "o.mp4", clip(16, 16, (0, 0, 0)), 1.0, prompt="p")
    for linked in ("o.mp4", "o.mp4.json"):
        d = tmp_path / f"via_{linked}"
        d.mkdir()
        add_run(d, "o.mp4", clip(16, 16, (0, 0, 0)), 1.0, prompt="p")
        (d / linked).unlink()
        (d / linked).symlink_to(outside / linked)
        refused(capsys, "compare", d, says=f"outside {d}")
    long = tmp_path / "long"
    long.mkdir()
    add_run(long, "v.mp4", clip(16, 16, (0, 0, 0)), 1.0, prompt="x" * 2_000_000)
    assert main(["compare", str(long), "-q", "--out", str(tmp_path / "s.png")]) == 0


def test_control_characters_from_a_sidecar_never_reach_the_terminal(tmp_path, capsys):
    """A prompt holding an escape sequence (clear the screen, set the title) was printed raw."""
    folder = tmp_path / "runs"
    folder.mkdir()
    evil = "a cat\x1b[2J\x1b]0;owned\x07\nrow"
    add_run(folder, "a.mp4", clip(16, 16, (0, 0, 0)), 1.0, prompt=evil)
    add_run(folder, "b.mp4", clip(16, 16, (9, 9, 9)), 1.0, prompt=evil, seed=7)
    assert main(["compare", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "a cat\\x1b[2J\\x1b]0;owned\\x07\\x0arow" in out  # a line break cannot split a row
    (folder / "c\x1b[31m\n.mp4").write_bytes(b"x")  # a name the error line quotes
    (folder / "c\x1b[31m\n.mp4.json").write_text("[1]")
    assert main(["compare", str(folder)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "\x1b" not in line and "c\\x1b[31m\\x0a.mp4.json" in line
