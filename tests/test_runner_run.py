"""``longcat-tools run`` and the pipeline on the tiny checkpoint (CPU): every task end to end with a
playable mp4 and its sidecar, inputs validated up front, schedules, determinism."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image

from longcat_tools.cli import main
from longcat_tools.errors import LongcatError, UsageError
from longcat_tools.runner import load_pipeline, schedule
from longcat_tools.runner.video import probe

TINY = ["--height", "32", "--width", "32", "--frames", "9", "--steps", "2"]
TINY_REFINE = [a for a in TINY if a not in ("--frames", "9")]  # refine keeps its video's


def run(capsys, *args):
    rc = main(["run", "-q", *args])
    return rc, capsys.readouterr()


@pytest.fixture(scope="module")
def pipe(tiny_native):
    return load_pipeline(tiny_native, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def t2v_mp4(tiny_native, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "t2v.mp4"
    assert main(["run", "-q", "-m", str(tiny_native), "--task", "t2v", "-p", "a cat", *TINY,
                 "--out", str(out)]) == 0
    return out


def test_t2v_writes_a_playable_h264_mp4_and_sidecar(t2v_mp4, tiny_native):
    info = probe(t2v_mp4)
    assert (info["codec"], info["pix_fmt"], info["width"], info["height"], info["frames"],
            info["fps"]) == ("h264", "yuv420p", 32, 32, 9, 15.0)
    doc = json.loads(t2v_mp4.with_name("t2v.mp4.json").read_text())
    assert doc["seed"] == 42 and doc["guidance"] == 4.0 and doc["stage1"]["steps"] == 2
    assert doc["checkpoint"]["layout"] == "native (hub release)"
    assert doc["negative_prompt"].startswith("Bright tones")
    assert {"load", "text_encoder", "denoise", "vae_decode", "write"} <= set(doc["timings_s"])
    # one time per denoising step, together within the denoise stage
    assert len(doc["step_s"]) == 2 and all(t > 0 for t in doc["step_s"])
    assert sum(doc["step_s"]) <= doc["timings_s"]["denoise"] + 2e-3
    assert doc["peak_memory"]["cpu_max_rss_bytes"] > 0
    # how old this test process was when the run's clock started: after the imports (> 0 s),
    # and well under an hour for any suite (a wrong /proc field gives nonsense)
    assert 0.1 < doc["process_age_at_start_s"] < 3600


@pytest.mark.parametrize("task,extra,frames,size,fps", [
    ("i2v", ["--image", "{png}", "--distill"], 9, 32, 15),
    ("vc", ["--video", "{mp4}", "--cond-frames", "5", "--frames", "13"], 9 + 8, 32, 15),
    ("vc", ["--video", "{mp4}", "--cond-frames", "5", "--frames", "13", "--no-kv-cache",
            "--distill"], 17, 32, 15),
    ("refine", ["--video", "{mp4}", "--bsa", "720p-quality"], 18, 32, 30),
    ("long", ["--cond-frames", "5", "--segments", "1"], 13, 32, 15),
])
def test_every_task_runs_from_the_cli(capsys, tiny_native, t2v_mp4, tmp_path, task, extra,
                                      frames, size, fps):
    png = tmp_path / "first.png"
    Image.fromarray(np.full((40, 56, 3), 128, np.uint8)).save(png)
    extra = [a.format(png=png, mp4=t2v_mp4) for a in extra]
    out = tmp_path / f"{task}.mp4"
    rc, cap = run(capsys, "-m", str(tiny_native), "--task", task, "-p", "a cat",
                  *(TINY_REFINE if task == "refine" else TINY), *extra, "--out", str(out))
    assert rc == 0, cap.err
    info = probe(out)
    assert (info["codec"], info["frames"], info["width"], info["fps"]) == ("h264", frames, size,
                                                                          fps)
    doc = json.loads((tmp_path / f"{task}.mp4.json").read_text())
    assert doc["task"] == task and doc["video"]["frames"] == frames
    if task == "refine":
        assert doc["bsa"]["sparsity"] == 0.875 and doc["loras"] == ["refinement"]
        assert doc["final"]["bsa_kept_chunks"] == 0  # int(0.125 x 2 key chunks) at 32x32
        assert doc["final"]["steps"] == 2  # t_thresh 500, then the 2-step schedule below it


@pytest.mark.parametrize("args,message", [
    (["--task", "i2v"], "--task i2v needs --image"),
    (["--task", "vc"], "--task vc needs --video"),
    (["--task", "t2v", "--frames", "10"], "--frames 10: must be 4k+1"),
    (["--task", "t2v", "--height", "40", "--width", "32"], "multiples of 16"),
    (["--task", "t2v", "--height", "32"], "--height and --width go together"),
    (["--task", "t2v", "--bsa", "fastest"], "--bsa fastest: unknown"),
    (["--task", "i2v", "--image", "nope.png"], "--image nope.png: no such file"),
    (["--task", "t2v", "--image", "nope.png"], "--task t2v reads no image"),
    (["--task", "i2v", "--image", "a.png", "--video", "b.mp4"], "--task i2v reads no video"),
    (["--task", "t2v", "--out", "x.avi"], ".mp4"),
    (["--task", "dance"], "--task dance: unknown"),
    (["--task", "t2v", "--dtype", "fp64"], "--dtype fp64: unknown dtype"),
])
def test_bad_options_are_one_line_and_exit_2(capsys, tiny_native, args, message):
    rc, cap = run(capsys, "-m", str(tiny_native), *args)
    assert rc == 2
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in cap.err


def test_latents_in_and_save_latents_match_the_api(capsys, pipe, tiny_native, tmp_path):
    from safetensors.torch import load_file, save_file

    noise = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    save_file({"latents": noise}, tmp_path / "noise.safetensors")
    rc, cap = run(capsys, "-m", str(tiny_native), "--task", "t2v", "-p", "a cat", *TINY,
                  "--negative-prompt", "", "--latents-in", str(tmp_path / "noise.safetensors"),
                  "--save-latents", str(tmp_path / "final.safetensors"),
                  "--out", str(tmp_path / "x.mp4"))
    assert rc == 0, cap.err
    api = pipe.generate("t2v", prompt="a cat", negative_prompt="", height=32, width=32,
                        num_frames=9, steps=2, latents=noise)
    assert torch.equal(load_file(tmp_path / "final.safetensors")["latents"], api.latents)
    # the mode the mp4 and sidecar get (safetensors' save_file wrote 0600)
    modes = {(tmp_path / n).stat().st_mode & 0o777 for n in ("final.safetensors", "x.mp4")}
    assert len(modes) == 1, modes


def test_same_seed_same_video_and_seed_changes_it(pipe):
    kw = dict(prompt="a cat", height=32, width=32, num_frames=5, steps=1, decode=False)
    a, b = pipe.t2v(seed=1, **kw), pipe.t2v(seed=1, **kw)
    assert torch.equal(a.latents, b.latents)
    assert not torch.equal(a.latents, pipe.t2v(seed=2, **kw).latents)


def test_schedules_match_the_published_timesteps(pipe):
    """Reference numbers (shift 12): spec §4.1-4.2, Kijai's logged distill timesteps."""
    s = pipe.scheduler
    ts = schedule.set_schedule(s, 16, True, "cpu")
    torch.testing.assert_close(ts[[0, 1, 8, 13, 15]],
                               torch.tensor([1000, 994.71, 923.08, 750.0, 510.64]), atol=0.01,
                               rtol=0)
    ts = schedule.set_schedule(s, 12, True, "cpu")
    torch.testing.assert_close(ts[-3:], torch.tensor([808.2901, 724.8322, 571.4286]), atol=1e-3,
                               rtol=0)
    schedule.set_schedule(s, 50, False, "cpu")
    ts = schedule.apply_t_thresh(s, 0.5)
    torch.testing.assert_close(ts, torch.tensor([500, 443.02, 343.47, 207.77, 11.87]), atol=0.01,
                               rtol=0)
    assert s.sigmas[-1] == 0 and len(s.sigmas) == 6
    schedule.set_schedule(s, 50, False, "cpu")
    ts = schedule.apply_enhance_hf(s, "cpu")
    assert len(ts) == 56 and ts[-10:].tolist() == list(range(500, 0, -50))


def test_cfg_zero_star_per_sample_scale():
    cond, uncond = torch.randn(2, 3, 2, 2, 2), torch.randn(2, 3, 2, 2, 2)
    out = schedule.cfg_zero_star(cond, uncond, 4.0)
    for b in range(2):
        st = (cond[b] * uncond[b]).sum() / ((uncond[b] ** 2).sum() + 1e-8)
        torch.testing.assert_close(out[b], uncond[b] * st + 4 * (cond[b] - uncond[b] * st))


def test_run_bsa_accepts_every_preset_that_bsa_presets_lists(capsys):
    """`run --bsa NAME` and `bsa presets` read one table: every listed name passes the run's
    validation, and the params reach the kernel as the table gives them."""
    from longcat_tools.model.bsa_presets import PRESETS
    from longcat_tools.runner.attention import BSAParams, resolve_bsa
    from longcat_tools.runner.settings import RunSettings, validate

    assert main(["bsa", "presets", "--json"]) == 0
    listed = [p["name"] for p in json.loads(capsys.readouterr().out)["presets"]]
    assert listed == list(PRESETS) and "704p-balanced" in listed
    for name in listed:
        validate(RunSettings(bsa=name), inputs=False)
        got = resolve_bsa(name, model_default=None, config_params=None)
        p = PRESETS[name].params
        assert got == (None if p is None else BSAParams(
            p["sparsity"], p["cdf_threshold"], tuple(p["chunk_3d_shape_q"]),
            tuple(p["chunk_3d_shape_k"]))), name
    assert resolve_bsa("720p-adaptive", None, None) == BSAParams(0.875, 0.98, (4, 4, 4),
                                                                 (4, 4, 4))
    assert resolve_bsa("long-video", None, None).chunk_q == (8, 4, 4)


def test_task_refine_takes_its_size_from_either_pair(capsys, tiny_native, t2v_mp4, tmp_path):
    """--refine-height/--refine-width sized the memory check of --task refine but not its
    output (the 720p bucket was used instead)."""
    base = ["-m", str(tiny_native), "--task", "refine", "--video", str(t2v_mp4), "-p", "a cat",
            "--steps", "1", "--bsa", "off"]
    out = tmp_path / "r.mp4"
    rc, cap = run(capsys, *base, "--refine-height", "32", "--refine-width", "48", "--out",
                  str(out))
    assert rc == 0, cap.err
    assert (probe(out)["width"], probe(out)["height"]) == (48, 32)
    rc, cap = run(capsys, *base, "--height", "32", "--width", "32", "--refine-height", "32",
                  "--refine-width", "48", "--out", str(tmp_path / "s.mp4"))
    assert rc == 2 and "give one" in cap.err and not (tmp_path / "s.mp4").exists()


def test_bsa_that_keeps_no_chunk_warns_once_a_size(pipe, caplog):
    """At 32x32 a refine has 8x2x2 tokens: 2 key chunks of 4x4x4 (4x2x2 below). Top-k keeps
    int((1 - s) x 2): zero at 0.9 (attention is zero, as in the original: warned, once), one at
    0.5 (no warning). The count goes into the result's info either way."""
    frames = [Image.fromarray(np.full((32, 32, 3), 100, np.uint8))] * 9
    kw = dict(prompt="a cat", height=32, width=32, steps=2, decode=False)
    none = {"sparsity": 0.9, "chunk_3d_shape_q": [4, 2, 2], "chunk_3d_shape_k": [4, 2, 2]}
    one = {"sparsity": 0.5, "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 4]}
    with caplog.at_level("WARNING", logger="longcat_tools.runner.pipeline"):
        assert pipe.refine(frames, bsa=one, **kw).info["bsa_kept_chunks"] == 1
        assert not [r for r in caplog.records if "keeps no key chunk" in r.getMessage()]
        for _ in range(2):
            assert pipe.refine(frames, bsa=none, **kw).info["bsa_kept_chunks"] == 0
    warned = [r.getMessage() for r in caplog.records if "keeps no key chunk" in r.getMessage()]
    assert len(warned) == 1 and "sparsity 0.9 " in warned[0] and "8x4x4" not in warned[0]


def test_bsa_setting_resolves_to_one_value():
    """"config" keeps the model's setting (refinement: always on), "on" the config's params."""
    from longcat_tools.runner.attention import BSAParams, resolve_bsa

    cfg = {"sparsity": 0.5, "chunk_3d_shape_q": [2, 2, 2], "chunk_3d_shape_k": [2, 4, 4]}
    mine = BSAParams(0.25)
    from_cfg = BSAParams(0.5, None, (2, 2, 2), (2, 4, 4))
    assert resolve_bsa("config", None, cfg) is None and resolve_bsa(None, mine, cfg) is mine
    assert resolve_bsa("config", None, cfg, refinement=True) == from_cfg
    assert resolve_bsa("on", mine, cfg) == from_cfg == resolve_bsa(True, None, cfg)
    assert resolve_bsa("off", mine, cfg, refinement=True) is None
    assert resolve_bsa({"sparsity": 0.75}, None, cfg) == BSAParams(0.75)


@pytest.mark.parametrize("kw,message", [
    (dict(num_frames=10), "num_frames=10: must be 4k+1"),
    (dict(height=40), "height/width=40x32: both must be positive multiples of 16"),
    (dict(steps=0), "steps=0: must be 1 to 1000"),
    (dict(steps=10**12), "steps=1000000000000: must be 1 to 1000"),  # failed allocating
    (dict(bsa="fastest"), "bsa=fastest: unknown"),
])
def test_the_api_checks_options_like_the_cli(pipe, kw, message):
    """pipe.generate and the task methods run the command line's validation, before any work,
    and name each setting by its keyword (they named the command line's flags)."""
    args = dict(prompt="a cat", height=32, width=32, num_frames=9, steps=1, decode=False)
    args.update(kw)
    for call in (lambda: pipe.generate("t2v", **args), lambda: pipe.t2v(**args)):
        with pytest.raises(LongcatError, match=re.escape(message)):
            call()


def test_a_nan_weight_writes_no_video(tiny_native, tmp_path, capsys):
    """NaN weights gave a garbage mp4, exit 0, and numpy's cast warning."""
    import shutil

    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "nan"
    shutil.copytree(tiny_native, ckpt)
    shard = sorted((ckpt / "dit").glob("*.safetensors"))[-1]
    tensors = load_file(str(shard))
    name = next(n for n, t in tensors.items() if t.is_floating_point() and t.dim() == 2)
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(shard))
    out = tmp_path / "x.mp4"
    rc = main(["run", "-q", "-m", str(ckpt), "-p", "a cat", "--height", "32", "--width", "32",
               "--frames", "5", "--steps", "1", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("error: the video came out NaN or infinite"), err
    assert len(err.splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob("*.mp4*"))


def test_quiet_silences_the_library_warnings_too(capsys, caplog, tiny_native, t2v_mp4, tmp_path):
    """-q prints only errors: the BSA warning (logging) is not even made under it. Without -q it
    is a "warning:" line like the commands' own (Python's fallback printed it bare)."""
    from longcat_tools.runner import pipeline as pl

    base = ["run", "-m", str(tiny_native), "--task", "refine", "--video", str(t2v_mp4), "-p",
            "a cat", "--height", "32", "--width", "32", "--steps", "1", "--bsa", "720p-fast"]
    for quiet, n in ((["-q"], 0), ([], 1)):
        pl._WARNED_BSA.clear()
        caplog.clear()
        assert main([*base, *quiet, "--out", str(tmp_path / f"q{n}.mp4")]) == 0
        assert sum("keeps no key chunk" in r.getMessage() for r in caplog.records) == n
        lines = [ln.split("\r")[-1] for ln in capsys.readouterr().err.splitlines()]
        assert sum(ln.startswith("warning: BSA at sparsity") for ln in lines) == n, lines


def test_distill_on_a_checkpoint_with_distilled_fused_runs_it_as_fused(capsys, tiny_native,
                                                                       tmp_path, t2v_mp4):
    """--distill was refused after loading (lora/ holds no 'distilled' LoRA), and a run without
    it sampled the distilled weights as the base model without a word."""
    from safetensors.torch import load_file

    fused = tmp_path / "fused"
    assert main(["lora", "fuse", "distilled", "-m", str(tiny_native), "--dst", str(fused),
                 "-q"]) == 0
    latents = {}
    for name, model in (("runtime", tiny_native), ("fused", fused)):
        rc, cap = run(capsys, "-m", str(model), "-p", "a cat", *TINY, "--distill", "--out",
                      str(tmp_path / f"{name}.mp4"), "--save-latents",
                      str(tmp_path / f"{name}.safetensors"))
        assert rc == 0, cap.err
        latents[name] = load_file(tmp_path / f"{name}.safetensors")["latents"]
    a, b = latents["runtime"], latents["fused"]
    assert ((a - b).norm() / a.norm()).item() < 1e-4  # W + BA merged once vs added each step
    assert json.loads((tmp_path / "fused.mp4.json").read_text())["guidance"] == 1.0
    refine = ["--task", "refine", "--video", str(t2v_mp4)]
    for args, says in (([], "only make sense distilled: pass --distill"),
                       (["--distill", "--lora-scale", "0.5"], "fused into the DiT at scale 1"),
                       (["--distill", "--refine"], "the original refines without it"),
                       (refine, "the original refines without it")):
        size = TINY_REFINE if args[:2] == ["--task", "refine"] else TINY
        rc, cap = run(capsys, "-m", str(fused), "-p", "a cat", *size, *args, "--out",
                      str(tmp_path / "no.mp4"))
        assert rc == 2 and says in cap.err and cap.err.count("\n") == 1, (args, cap.err)


def test_a_checkpoint_with_refinement_fused_only_refines(capsys, tiny_native, tmp_path, t2v_mp4):
    """The refine stage applied nothing more but ignored --lora-scale; a t2v stage ran with the
    refinement weights merged in."""
    from safetensors.torch import load_file

    fused = tmp_path / "fused"
    assert main(["lora", "fuse", "refinement", "-m", str(tiny_native), "--dst", str(fused),
                 "-q"]) == 0
    latents = {}
    for name, model in (("runtime", tiny_native), ("fused", fused)):
        rc, cap = run(capsys, "-m", str(model), "--task", "refine", "--video", str(t2v_mp4),
                      "-p", "a cat", "--height", "32", "--width", "32", "--steps", "1",
                      "--out", str(tmp_path / f"{name}.mp4"), "--save-latents",
                      str(tmp_path / f"{name}.safetensors"))
        assert rc == 0, cap.err
        latents[name] = load_file(tmp_path / f"{name}.safetensors")["latents"]
    a, b = latents["runtime"], latents["fused"]
    assert ((a - b).norm() / a.norm()).item() < 1e-4
    for args, says in ((["--task", "t2v"], "only make sense for refinement: use --task refine"),
                       (["--task", "refine", "--video", str(t2v_mp4), "--lora-scale", "0.3"],
                        "the refinement LoRA is fused into the DiT at scale 1")):
        size = TINY_REFINE if args[:2] == ["--task", "refine"] else TINY
        rc, cap = run(capsys, "-m", str(fused), "-p", "a cat", *size, *args, "--out",
                      str(tmp_path / "no.mp4"))
        assert rc == 2 and says in cap.err, (args, cap.err)
    both = tmp_path / "both"  # each stage's refusal sent the user to the other
    assert main(["lora", "fuse", "distilled,refinement", "-m", str(tiny_native), "--dst",
                 str(both), "-q"]) == 0
    for args in (["--distill"], ["--task", "refine", "--video", str(t2v_mp4)]):
        size = TINY_REFINE if args[0] == "--task" else TINY
        rc, cap = run(capsys, "-m", str(both), "-p", "a cat", *size, *args, "--out",
                      str(tmp_path / "no.mp4"))
        assert rc == 2 and "are both fused into the DiT" in cap.err, (args, cap.err)


def test_the_api_keeps_the_fused_rule_too(tiny_native, tmp_path, t2v_mp4):
    """`pipe.refine()` on a checkpoint with distilled fused refined with it, and `pipe.t2v()`
    without distill sampled the distilled weights as the base model: only the CLI refused."""
    from longcat_tools.runner.video import read_video

    fused = tmp_path / "fused"
    assert main(["lora", "fuse", "distilled:0.5", "-m", str(tiny_native), "--dst", str(fused),
                 "-q"]) == 0
    pipe = load_pipeline(fused, device="cpu", dtype="fp32")
    kw = dict(prompt="a cat", height=32, width=32, num_frames=9)
    for call, says in ((lambda: pipe.t2v(**kw), "pass distill=True"),
                       (lambda: pipe.t2v(**kw, distill=True, lora_scale=1.0),
                        "fused into the DiT at scale 0.5"),
                       (lambda: pipe.refine(read_video(t2v_mp4)[0], prompt="a cat"),
                        "the original refines without it")):
        with pytest.raises(UsageError, match=says):
            call()
    out = pipe.t2v(**kw, distill=True, steps=1)  # at the fused scale, adding nothing
    assert out.frames.shape[:1] == (9,) and pipe.transformer.active_loras == []


def test_a_prompt_past_the_text_encoders_tokens_is_said_to_be_cut(pipe, caplog):
    """A 10 MB prompt line was cut to 512 tokens without a word."""
    caplog.set_level(logging.WARNING, logger="longcat_tools")  # an earlier -q raised it
    pipe.encode_prompt(["a cat"])
    assert not any("tokens" in r.getMessage() for r in caplog.records)
    long = "a cat walks " * 400
    states, mask = pipe.encode_prompt([long])
    (line,) = [r.getMessage() for r in caplog.records if "tokens" in r.getMessage()]
    assert f"{len(long):,} characters" in line and "reads the first 512" in line
    assert int(mask.sum()) == 512  # the same cut as before


@pytest.mark.parametrize("frames, refused", [(24, True), (25, False)])
def test_a_video_shorter_than_the_condition_is_refused_before_loading(
        capsys, tiny_native, tmp_path, monkeypatch, frames, refused):
    """vc reads every 2nd frame of a 30 fps input: 13 condition frames need 25. The check ran
    after loading, and did not say what to change."""
    from longcat_tools.runner import job
    from longcat_tools.runner.video import write_mp4

    def loaded(*_a, **_k):
        raise LongcatError("loading")

    monkeypatch.setattr(job, "load_pipeline", loaded)
    video = write_mp4(tmp_path / "in.mp4", np.zeros((frames, 32, 32, 3), np.float32), 30)
    rc, cap = run(capsys, "-m", str(tiny_native), "--task", "vc", "--video", str(video), "-p",
                  "a cat", "--height", "32", "--width", "32", "--frames", "17", "--out",
                  str(tmp_path / "x.mp4"))
    if refused:
        assert rc == 2 and "12 frames at 15 fps; --task vc continues from the last 13" in cap.err
        assert "a smaller --cond-frames" in cap.err
    else:
        assert rc == 1 and cap.err.strip() == "error: loading"


def test_vc_refined_starts_with_the_whole_input_as_without_refine(capsys, tiny_native,
                                                                   tmp_path):
    """vc --refine wrote only the refined clip; stage 1 and the original's vc demo write the
    whole input, then the new frames. Here a 30 fps input of 21 frames: stage 1 continues 5 of
    them (read at 15 fps) by 8; refinement doubles the 13 to 26, its first 10 conditioned on the
    input's last 10 at 30 fps: 21 + 16 frames."""
    from longcat_tools.runner.video import read_video, write_mp4

    ramp = np.linspace(0, 1, 21, dtype=np.float32)[:, None, None, None]
    video = write_mp4(tmp_path / "in.mp4", np.broadcast_to(ramp, (21, 32, 32, 3)), 30)
    out = tmp_path / "vc.mp4"
    rc, cap = run(capsys, "-m", str(tiny_native), "--task", "vc", "--video", str(video), "-p",
                  "a cat", *TINY[:4], "--frames", "13", "--steps", "2", "--cond-frames", "5",
                  "--distill", "--refine", "--refine-height", "32", "--refine-width", "32",
                  "--out", str(out))
    assert rc == 0, cap.err
    info = probe(out)
    assert (info["frames"], info["fps"]) == (21 + 26 - 10, 30.0)
    head = [np.asarray(f, np.float32).mean() / 255 for f in read_video(out)[0][:21]]
    assert np.abs(np.array(head) - ramp.ravel()).max() < 0.02  # the input's frames, in order


def test_vc_refine_needs_its_condition_frames_before_loading(capsys, tiny_native, tmp_path,
                                                            monkeypatch):
    """9 frames at 30 fps hold vc's 5 condition frames read at 15 fps, but not the 10 the
    refinement takes at 30 fps: it failed after the whole first stage."""
    from longcat_tools.runner import job
    from longcat_tools.runner.video import write_mp4

    def loaded(*_a, **_k):
        raise LongcatError("loading")

    monkeypatch.setattr(job, "load_pipeline", loaded)
    video = write_mp4(tmp_path / "in.mp4", np.zeros((9, 32, 32, 3), np.float32), 30)
    rc, cap = run(capsys, "-m", str(tiny_native), "--task", "vc", "--video", str(video), "-p",
                  "a cat", *TINY[:4], "--frames", "13", "--cond-frames", "5", "--distill",
                  "--refine", "--out", str(tmp_path / "x.mp4"))
    assert rc == 2 and "9 frames at 30 fps; --refine conditions on the last 10" in cap.err
    rc, cap = run(capsys, "-m", str(tiny_native), "--task", "vc", "--video", str(video), "-p",
                  "a cat", *TINY[:4], "--frames", "13", "--cond-frames", "5", "--distill",
                  "--refine", "--spatial-refine-only", "--out", str(tmp_path / "x.mp4"))
    assert rc == 1 and cap.err.strip() == "error: loading"  # 5 frames at 15 fps: it holds


def test_resolution_beside_an_explicit_size_is_refused(tiny_native, tmp_path, capsys):
    """--resolution 720p with --height/--width made the same video as without it, exit 0, and
    the sidecar said 720p."""
    from PIL import Image

    Image.new("RGB", (64, 48), (10, 200, 30)).save(tmp_path / "img.png")
    rc = main(["run", "-q", "-m", str(tiny_native), "--task", "i2v", "-p", "a cat", "--image",
               str(tmp_path / "img.png"), *TINY, "--resolution", "720p",
               "--out", str(tmp_path / "x.mp4")])
    assert rc == 2 and "--resolution 720p: --height/--width 32x32 set the size" in \
        capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


def test_refine_condition_frames_need_a_condition(pipe, t2v_mp4):
    """num_cond_frames without image= or video= failed in the video processor (ValueError)."""
    from longcat_tools.runner.video import read_video

    with pytest.raises(UsageError, match="num_cond_frames 5: refine takes its condition"):
        pipe.refine(read_video(t2v_mp4)[0], "a cat", num_cond_frames=5, steps=1)


def test_a_task_method_refuses_a_prompt_of_none(pipe):
    """It failed in the tokenizer (TypeError: object of type 'NoneType' has no len())."""
    with pytest.raises(UsageError, match="prompt=None: give the prompt's text"):
        pipe.t2v(None, height=32, width=32, num_frames=9, steps=1)


def test_offload_on_the_cpu_says_it_does_nothing(tiny_native, tmp_path, capsys):
    """--offload dit on --device cpu ran as if it were not given, without a word."""
    assert main(["run", "-m", str(tiny_native), "-p", "a cat", *TINY, "--device", "cpu",
                 "--offload", "dit", "--out", str(tmp_path / "x.mp4")]) == 0
    err = capsys.readouterr().err
    assert "warning: --offload dit: the run is on the CPU" in err, err


def test_an_api_warning_names_the_api_keyword(tiny_native, caplog):
    """The Python API's caller never wrote --offload; the warning named the flag."""
    from longcat_tools.runner.pipeline import LongCatVideoPipeline

    with caplog.at_level("WARNING"):
        LongCatVideoPipeline.from_pretrained(tiny_native, device="cpu", offload="dit")
    assert "offload=dit: the run is on the CPU" in caplog.text, caplog.text
    assert "--offload" not in caplog.text


@pytest.mark.parametrize("scratch", [".x.mp4.partial", ".x.mp4.json.partial",
                                     ".x.mp4.audio.wav"])
def test_a_link_at_a_scratch_name_is_refused_not_written_through(tiny_native, tmp_path, capsys,
                                                                 scratch):
    """The mp4 was encoded through a link left at its scratch name: a checkpoint shard outside
    the output folder became an mp4."""
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"keep")
    out = tmp_path / "o"
    out.mkdir()
    (out / scratch).symlink_to(victim)
    assert main(["run", "-q", "-m", str(tiny_native), "-p", "a cat", *TINY, "--device", "cpu",
                 "--out", str(out / "x.mp4")]) == 2
    err = capsys.readouterr().err
    assert f"{out / scratch}: the scratch file of --out is a symlink" in err, err
    assert victim.read_bytes() == b"keep"


def test_a_stale_scratch_file_is_replaced(tiny_native, tmp_path):
    """What a killed run left at the scratch names is its own, and is written over."""
    (tmp_path / ".x.mp4.partial").write_bytes(b"stale")
    (tmp_path / ".x.mp4.json.partial").write_text("stale")
    assert main(["run", "-q", "-m", str(tiny_native), "-p", "a cat", *TINY, "--device", "cpu",
                 "--out", str(tmp_path / "x.mp4")]) == 0
    assert probe(tmp_path / "x.mp4")["frames"] == 9
    assert json.loads((tmp_path / "x.mp4.json").read_text())["settings"]["prompt"] == "a cat"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.mp4", "x.mp4.json"]


def test_a_second_run_to_the_same_out_is_refused_at_once(tiny_native, tmp_path, capsys):
    """Two runs to one --out shared the scratch file: the mp4 published was neither's video,
    and its sidecar named one of them."""
    from longcat_tools.io.atomic import writer_lock

    out = tmp_path / "x.mp4"
    args = ["run", "-q", "-m", str(tiny_native), "-p", "a cat", *TINY, "--device", "cpu"]
    with writer_lock(out):  # the other run, still writing
        assert main([*args, "--out", str(out)]) == 1
    assert f"{out}: another process is writing it" in capsys.readouterr().err
    assert not out.exists()
    assert main([*args, "--out", str(out)]) == 0
    assert main([*args, "--out", str(tmp_path / "new" / "sub" / "y.mp4")]) == 0  # made, locked
    second = tmp_path / "m" / "001_a-cat_2_config.mp4"  # a matrix run's second video
    second.parent.mkdir()
    with writer_lock(second):
        assert main([*args, "--seeds", "1,2", "--out-dir", str(second.parent)]) == 1
    assert f"{second}: another process is writing it" in capsys.readouterr().err
    assert not second.exists() and (second.parent / "000_a-cat_1_config.mp4").is_file()


@pytest.mark.parametrize("free, says", [(0, "the disk (or quota) is full"),
                                        (1 << 40, "[Errno 32] Broken pipe")])
def test_ffmpeg_stopping_is_one_line_naming_the_output(tmp_path, monkeypatch, free, says):
    """A full disk during the encode was "internal error: OSError: [Errno 32] Broken pipe" and
    ffmpeg's whole command line, after the whole generation."""
    import errno
    import shutil
    from collections import namedtuple

    import imageio_ffmpeg

    from longcat_tools.runner import video

    def stops(*_a, **_k):
        yield
        raise OSError(errno.EPIPE, "Broken pipe\n\nFFMPEG COMMAND:\nffmpeg -y ...")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(imageio_ffmpeg, "write_frames", stops)
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(1 << 41, 1 << 41, free))
    out = tmp_path / "x.mp4"
    with pytest.raises(LongcatError) as e:
        video.encode_mp4(out, np.zeros((3, 16, 16, 3), np.uint8), 15)
    assert str(e.value).startswith(f"{out}: ffmpeg stopped writing the mp4 ({says}")
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_run_job_twice_with_one_reporter_records_each_run_alone(tiny_native, tmp_path):
    """The second sidecar listed both runs' steps and summed their stage times."""
    from longcat_tools.runner.job import run_job
    from longcat_tools.runner.pipeline import Reporter
    from longcat_tools.runner.settings import RunSettings

    reporter = Reporter(show=False)
    docs = [run_job(RunSettings(model=str(tiny_native), prompt="a cat", height=32, width=32,
                                frames=9, steps=2, device="cpu", out=str(tmp_path / f"{i}.mp4")),
                    reporter) for i in range(2)]
    assert [len(d["step_s"]) for d in docs] == [2, 2]


@pytest.fixture(scope="module")
def styled(tiny_native, tmp_path_factory):
    """A copy of the tiny checkpoint with a user adapter 'style' attached at default scale 0.5
    (the distilled LoRA's file under another name)."""
    import shutil

    root = tmp_path_factory.mktemp("styled") / "ckpt"
    shutil.copytree(tiny_native, root)
    assert main(["lora", "attach", str(root / "lora" / "cfg_step_lora.safetensors"), "--name",
                 "style", "--scale", "0.5", "-m", str(root), "-q"]) == 0
    return root


def _latents(capsys, tmp_path, name, *args):
    from safetensors.torch import load_file

    rc, cap = run(capsys, "-p", "a cat", *TINY, *args, "--out", str(tmp_path / f"{name}.mp4"),
                  "--save-latents", str(tmp_path / f"{name}.safetensors"))
    assert rc == 0, cap.err
    return load_file(tmp_path / f"{name}.safetensors")["latents"]


def test_run_lora_applies_a_users_adapter_as_lora_fuse_does(capsys, styled, tmp_path):
    """`run` applied only the hub adapters; an attached one reached a run only through `lora
    fuse` (a whole new checkpoint) or the Python API."""
    fused = tmp_path / "fused"
    assert main(["lora", "fuse", "style", "-m", str(styled), "--dst", str(fused), "-q"]) == 0
    m = ["-m", str(styled)]
    lat = {"none": _latents(capsys, tmp_path, "none", *m),
           "default": _latents(capsys, tmp_path, "default", *m, "--lora", "style"),
           "half": _latents(capsys, tmp_path, "half", *m, "--lora", "style:0.5"),
           "one": _latents(capsys, tmp_path, "one", *m, "--lora", "style:1"),
           "runtime": _latents(capsys, tmp_path, "runtime", *m, "--lora", "style",
                               "--lora-mode", "runtime"),
           "fused": _latents(capsys, tmp_path, "fused", "-m", str(fused))}
    assert torch.equal(lat["default"], lat["fused"])  # merged as lora fuse merges
    assert torch.equal(lat["default"], lat["half"])  # the recorded default scale, 0.5
    for other in ("none", "one"):
        assert (lat["default"] - lat[other]).abs().max() > 1e-3, other
    rel = (lat["runtime"] - lat["default"]).norm() / lat["default"].norm()
    assert rel < 1e-5, rel
    doc = json.loads((tmp_path / "default.mp4.json").read_text())
    assert doc["adapters"] == [{"name": "style", "scale": 0.5,
                                "file": "style/cfg_step_lora.safetensors"}]
    assert doc["loras"] == ["style"] and doc["settings"]["lora"] == "style"
    # with the hub adapter of a distilled run: both, as fusing style then running distilled
    both = _latents(capsys, tmp_path, "both", *m, "--lora", "style", "--distill")
    assert torch.equal(both, _latents(capsys, tmp_path, "fd", "-m", str(fused), "--distill"))
    assert json.loads((tmp_path / "both.mp4.json").read_text())["loras"] == ["style",
                                                                            "distilled"]


def test_spaces_around_a_lora_name_or_scale_are_dropped():
    """'style , detail' was read as two names, 'style :0.5' as an adapter named 'style '."""
    from longcat_tools.lora.fusion import parse_adapter_list

    assert parse_adapter_list(" style :0.5 , detail: 1 ") == [("style", 0.5), ("detail", 1.0)]


@pytest.mark.parametrize("spec, says", [
    ("nope", "no adapter named 'nope' (have: distilled, refinement, style"),
    ("distilled", "'distilled' is a hub adapter, which --distill applies"),
    ("refinement:0.5", "'refinement' is a hub adapter, which --task refine or --refine"),
    ("style:", "an empty adapter name or scale"),
    ("style,style", "adapter names repeat"),
    ("style:x", "the scale after ':' in 'style:x' must be a number"),
    ("style:20", "--lora style:20: scale 20: a LoRA scale must be a number from -10 to 10"),
    ("style:10.0000001", "scale 10.0000001: a LoRA scale"),  # was shown rounded, as 10
    ("style:1_0", "the scale after ':' in 'style:1_0' must be a number"),  # ran at 10
])
def test_a_bad_lora_is_one_line_before_loading(capsys, styled, tmp_path, monkeypatch, spec,
                                               says):
    from longcat_tools.runner import job

    monkeypatch.setattr(job, "load_pipeline", lambda *a, **k: pytest.fail("loaded weights"))
    rc, cap = run(capsys, "-m", str(styled), "-p", "a cat", *TINY, "--lora", spec, "--out",
                  str(tmp_path / "x.mp4"))
    assert rc == 2 and says in cap.err and cap.err.count("\n") == 1, cap.err
    assert not (tmp_path / "x.mp4").exists()


def test_run_lora_refuses_an_adapter_fused_in_and_lora_mode_needs_a_lora(capsys, styled,
                                                                        tmp_path):
    fused = tmp_path / "fused"
    assert main(["lora", "fuse", "style", "-m", str(styled), "--dst", str(fused), "-q"]) == 0
    rc, cap = run(capsys, "-m", str(fused), "-p", "a cat", *TINY, "--lora", "style", "--out",
                  str(tmp_path / "x.mp4"))
    assert rc == 2 and "applying it again would count it twice" in cap.err, cap.err
    rc, cap = run(capsys, "-m", str(styled), "-p", "a cat", *TINY, "--lora-mode", "runtime",
                  "--out", str(tmp_path / "x.mp4"))
    assert rc == 2 and "activates no LoRA (--distill, refining and --lora do)" in cap.err


def test_an_output_and_input_named_with_a_colon_are_files(capsys, tiny_native, t2v_mp4,
                                                          tmp_path, monkeypatch):
    """ffmpeg took `a:b.mp4` for a URL of protocol `a`: the run failed with an internal error
    after the whole generation."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copy(t2v_mp4, "in:put.mp4")
    rc, cap = run(capsys, "-m", str(tiny_native), "--task", "vc", "-p", "a cat", *TINY,
                  "--frames", "13", "--cond-frames", "5", "--video", "in:put.mp4", "--out",
                  "out:1.mp4")
    assert rc == 0, cap.err
    assert probe("out:1.mp4")["frames"] == 17


def test_run_lora_is_refused_for_the_avatar_tasks(capsys, avatar_trees, tmp_path):
    rc, cap = run(capsys, "-m", str(avatar_trees["avatar-1.0"]), "--task", "at2v", "-p", "a cat",
                  "--lora", "style", "--out", str(tmp_path / "x.mp4"))
    assert rc == 2 and cap.err.count("\n") == 1, cap.err
    assert "--lora: not available for --task at2v" in cap.err and "lora fuse" in cap.err


def test_avatar_negative_prompt_without_cfg_is_refused(capsys, avatar_trees, tmp_path):
    """Distilled (text and audio guidance 1), an avatar run read no negative prompt: it was
    accepted and dropped. With one guidance above 1 it is read, and the run goes on past
    the check (to the next error, about this tree). The pipeline's methods still take one
    there, as the original's do (tests/test_golden_avatar_pipeline.py passes it)."""
    tree = str(avatar_trees["avatar-1.0"])
    rc, cap = run(capsys, "-m", tree, "--task", "at2v", "-p", "a cat", "--distill",
                  "--negative-prompt", "blur", "--out", str(tmp_path / "x.mp4"))
    assert rc == 2 and cap.err.count("\n") == 1, cap.err
    assert "--negative-prompt: this run samples without CFG" in cap.err
    rc, cap = run(capsys, "-m", tree, "--task", "at2v", "-p", "a cat", "--distill",
                  "--audio-guidance", "2", "--negative-prompt", "blur", "--out",
                  str(tmp_path / "x.mp4"))
    assert rc != 0 and "--negative-prompt" not in cap.err, cap.err


def test_run_lora_with_a_hub_adapter_merges_once(capsys, styled, tmp_path, monkeypatch):
    """Enabled at once, the user's set was merged, then restored from the shards and merged
    again with the distilled adapter at the first step: twice the work, and a read of every
    targeted weight."""
    from longcat_tools.runner import lora_merge

    calls = []
    for name in ("merge", "restore"):
        real = getattr(lora_merge, name)
        monkeypatch.setattr(lora_merge, name, lambda *a, _r=real, _n=name, **k: (
            calls.append(_n), _r(*a, **k))[1])
    _latents(capsys, tmp_path, "both", "-m", str(styled), "--lora", "style", "--distill")
    assert calls == ["merge"], calls


def test_run_matrix_with_a_lora_gives_the_callers_adapters_back(styled, tmp_path):
    """A matrix with ``lora`` on a caller's pipe left its adapters enabled in place of the
    caller's own, so a later run without ``lora`` still applied them, unrecorded."""
    from longcat_tools.runner import RunSettings
    from longcat_tools.runner.matrix import plan, run_matrix
    from longcat_tools.runner.pipeline import Reporter

    p = load_pipeline(styled, device="cpu", dtype="fp32")
    dit = p.transformer
    dit.load_lora(str(styled / "lora" / "refinement_lora.safetensors"), "mine")
    dit.enable_loras(["mine"])
    base = RunSettings(model=str(styled), prompt="a cat", height=32, width=32, frames=9, steps=1,
                       device="cpu", lora="style")
    docs = list(run_matrix(plan(base, tmp_path / "m", seeds=[1, 2]), Reporter(), pipe=p))
    assert [d["loras"] for d in docs] == [["style"], ["style"]]
    assert dit.active_loras == ["mine"]


def test_a_sidecar_from_before_lora_compares_equal_to_one_without_it():
    """Every video of a matrix made before --lora existed was made again on resuming."""
    from longcat_tools.runner.settings import comparable_settings

    old = {"task": "t2v", "distill": False, "guidance": None, "seed": 1, "out": "a.mp4"}
    assert comparable_settings(old) == comparable_settings({**old, "lora": None})
    assert comparable_settings(old) != comparable_settings({**old, "lora": "style"})
    styled = {**old, "lora": "style"}
    half = [{"name": "style", "scale": 0.5, "file": "s.safetensors"}]
    assert (comparable_settings(styled, half)
            == comparable_settings({**old, "lora": "style:0.5"}, half))
    assert comparable_settings(styled, half) != comparable_settings(
        styled, [{"name": "style", "scale": 1}])
    for odd in ("x", [{"name": "style"}], [{"name": "style", "scale": True}]):  # hand-edited
        assert comparable_settings(styled, odd)["lora"] == "style"


def test_a_dangling_link_in_lora_is_named_as_one(capsys, styled, tmp_path):
    import shutil

    root = tmp_path / "ckpt"
    shutil.copytree(styled, root)
    (root / "lora" / "dang.safetensors").symlink_to("missing.safetensors")
    rc, cap = run(capsys, "-m", str(root), "-p", "a cat", *TINY, "--lora", "dang", "--out",
                  str(tmp_path / "x.mp4"))
    assert rc == 1 and "adapter 'dang' is a link to a file that is missing" in cap.err, cap.err


def test_a_users_adapter_holding_nan_is_refused_before_the_weights_load(capsys, styled, tmp_path,
                                                                        monkeypatch):
    import shutil

    from safetensors.torch import load_file, save_file

    from longcat_tools.lora import formats as lora_formats
    from longcat_tools.runner import job
    from longcat_tools.runner.lora import run_adapters

    root = tmp_path / "ckpt"
    shutil.copytree(styled, root)
    doc = load_file(root / "lora" / "cfg_step_lora.safetensors")
    key = next(k for k in doc if "lora_up" in k)
    doc[key][0, 0] = float("nan")
    save_file(doc, root / "lora" / "bad.safetensors")
    # a sound file is read once a process, however many videos check it
    checked = []
    real = lora_formats.check_finite
    monkeypatch.setattr(lora_formats, "check_finite",
                        lambda *a: (checked.append(a[1]), real(*a))[1])
    run_adapters(root, "style")
    first = len(checked)
    run_adapters(root, "style")
    assert first > 0 and len(checked) == first
    monkeypatch.setattr(job, "load_pipeline", lambda *a, **k: pytest.fail("loaded weights"))
    rc, cap = run(capsys, "-m", str(root), "-p", "a cat", *TINY, "--lora", "style,bad", "--out",
                  str(tmp_path / "x.mp4"))
    assert rc == 1 and f"tensor '{key}'" in cap.err and "holds NaN or Inf" in cap.err, cap.err
    assert cap.err.count("\n") == 1


@pytest.mark.parametrize("args, says", [
    # ran with one condition frame, silently
    (["--task", "refine", "--image", "IMG", "--cond-frames", "0", "--height", "64", "--width",
      "64"], "--cond-frames 0: --task refine conditions on its --image"),
    # wrote the --video back out, with -p, --steps and --frames unused
    (["--task", "long", "--segments", "0", "--cond-frames", "5", *TINY],
     "--segments 0: a long run continues at least once"),
])
def test_a_setting_that_would_do_nothing_is_refused(capsys, tiny_native, t2v_mp4, tmp_path,
                                                    monkeypatch, args, says):
    from longcat_tools.runner import job

    monkeypatch.setattr(job, "load_pipeline", lambda *a, **k: pytest.fail("loaded weights"))
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "img.png")
    names = {"IMG": str(tmp_path / "img.png")}
    rc, cap = run(capsys, "-m", str(tiny_native), "-p", "a cat", "--video", str(t2v_mp4),
                  *[names.get(a, a) for a in args], "--out", str(tmp_path / "x.mp4"))
    assert rc == 2 and says in cap.err and cap.err.count("\n") == 1, cap.err


def test_a_long_sidecar_says_what_each_stage_ran(capsys, tiny_native, tmp_path):
    """The long sidecar held only segment and frame counts: no steps, guidance or size, and
    `loras` [] on a distilled run. Now each stage's entry, and `step_s` splits by them."""
    out = tmp_path / "long.mp4"
    rc, cap = run(capsys, "-m", str(tiny_native), "--task", "long", "-p", "a cat", *TINY,
                  "--cond-frames", "5", "--segments", "1", "--distill", "--refine",
                  "--refine-height", "32", "--refine-width", "32", "--out", str(out))
    assert rc == 0, cap.err
    doc = json.loads(out.with_name("long.mp4.json").read_text())
    first, cont, final = doc["final"]["first"], doc["final"]["continuation"], doc["final"]
    assert (first["steps"], first["guidance"], first["height"]) == (2, 1.0, 32)
    assert first["loras"] == cont["loras"] == ["distilled"] and cont["num_cond_frames"] == 5
    assert doc["loras"] == ["refinement"] and final["refine"]["loras"] == ["refinement"]
    assert doc["bsa"] is not None  # refinement runs BSA
    assert len(doc["step_s"]) == first["steps"] + final["segments"] * cont["steps"] \
        + final["windows"] * final["refine"]["steps"]


def test_a_16_bit_gray_image_is_scaled_not_clipped(tmp_path):
    """PIL's convert('RGB') clipped a 16-bit PNG to 255: i2v conditioned on a white frame."""
    from longcat_tools.runner.video import read_image

    ramp = np.linspace(0, 65535, 64 * 256).astype(np.uint16).reshape(64, 256)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    rgb = np.asarray(read_image(tmp_path / "g16.png"))
    assert rgb.shape == (64, 256, 3) and np.array_equal(rgb[..., 0], (ramp >> 8).astype(np.uint8))


def test_bsa_on_one_latent_frame_is_recorded_as_dense_and_a_duplicate(capsys, tiny_native,
                                                                     tmp_path):
    """One latent frame attends densely: the sidecar said BSA, and '--bsa off,on' made the
    same video twice."""
    out = tmp_path / "one.mp4"
    rc, cap = run(capsys, "-m", str(tiny_native), "-p", "x", "--frames", "1", "--steps", "1",
                  "--height", "32", "--width", "32", "--bsa", "on", "--out", str(out))
    assert rc == 0, cap.err
    doc = json.loads(out.with_name("one.mp4.json").read_text())
    assert doc["bsa"] is None and doc["final"]["bsa"] is None
    rc, cap = run(capsys, "-m", str(tiny_native), "-p", "x", "--frames", "1", "--steps", "1",
                  "--height", "32", "--width", "32", "--bsa", "off,on", "--out-dir",
                  str(tmp_path / "m"))
    assert rc == 2 and "--bsa: off and on run the same attention" in cap.err


def test_a_nan_latents_in_is_refused_before_loading(capsys, tiny_native, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from longcat_tools.runner import job

    monkeypatch.setattr(job, "load_pipeline", lambda *a, **k: pytest.fail("weights loaded"))
    save_file({"latents": torch.full((1, 16, 2, 4, 4), float("nan"))}, tmp_path / "nan.st")
    rc, cap = run(capsys, "-m", str(tiny_native), "-p", "x", "--frames", "5", "--steps", "1",
                  "--height", "32", "--width", "32", "--latents-in", str(tmp_path / "nan.st"),
                  "--out", str(tmp_path / "x.mp4"))
    assert rc == 1 and "'latents' holds NaN or Inf values" in cap.err


def test_fp8_attention_on_the_cpu_says_it_does_nothing(tiny_native, tmp_path, caplog):
    """It was accepted and recorded without a word, the video equal to the run without it."""
    from longcat_tools.runner import settings

    settings._warn_once.cache_clear()  # once a process: an earlier test may have said it
    caplog.set_level(logging.WARNING)
    rc = main(["run", "-m", str(tiny_native), "-p", "x", "--frames", "5", "--steps", "1",
               "--height", "32", "--width", "32", "--precision", "fp8", "--fp8-attention",
               "dense", "--out", str(tmp_path / "x.mp4")])
    assert rc == 0
    said = [r.getMessage() for r in caplog.records if "--fp8-attention dense" in r.getMessage()]
    assert len(said) == 1 and "no quantized attention kernel runs" in said[0]


def test_a_video_of_1000_fps_is_read_at_its_rate(tmp_path):
    """ffmpeg prints '1k fps': probe read 5 fps and read_video 0, so vc took every frame."""
    from longcat_tools.runner.video import probe, read_video, write_mp4

    path = write_mp4(tmp_path / "fast.mp4", np.zeros((8, 32, 32, 3), np.float32), 1000)
    assert probe(path)["fps"] == read_video(path)[1] == 1000.0
