"""Matrix runs (``run --prompts/--seeds/--bsa LIST``) on the tiny checkpoint: the weights load
once, every video equals a single ``run`` with its settings bit for bit, an interrupted run
resumes and ends with the same files, bad lists stop before anything loads."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile import refused
from safetensors.torch import save_file

from longcat_tools.cli import main
from longcat_tools.errors import LongcatError, UsageError
from longcat_tools.runner import job as runjob
from longcat_tools.runner import video as vio
from longcat_tools.runner.matrix import read_prompts
from longcat_tools.runner.pipeline import LongCatVideoPipeline
from longcat_tools.synth import synth

SIZE = ["--height", "32", "--width", "32", "--frames", "9", "--steps", "2"]
SEEDS, BSA = [3, 8], ["off", "on"]
PROMPTS = ["a cat on a sofa", "a red panda in the snow"]


@pytest.fixture()
def counted(monkeypatch):
    """Counts pipeline loads and captures the frames every video hands to the encoder."""
    seen = {"loads": 0, "frames": {}}
    load, encode = LongCatVideoPipeline.from_pretrained.__func__, vio.encode_mp4

    def counting_load(cls, *a, **k):
        seen["loads"] += 1
        return load(cls, *a, **k)

    def capture(path, frames, fps, crf=18, audio=None):
        seen["frames"][Path(path).name] = np.array(frames)
        return encode(path, frames, fps, crf, audio=audio)

    monkeypatch.setattr(LongCatVideoPipeline, "from_pretrained", classmethod(counting_load))
    monkeypatch.setattr(vio, "encode_mp4", capture)
    return seen


def matrix_args(tiny_native, prompts: Path, out: Path) -> list[str]:
    return ["run", "-q", "-m", str(tiny_native), "--prompts", str(prompts), "--seeds",
            ",".join(map(str, SEEDS)), "--bsa", ",".join(BSA), *SIZE, "--out-dir", str(out)]


@pytest.fixture()
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def names() -> list[str]:
    from longcat_tools.runner.matrix import slug

    out, i = [], 0
    for p in PROMPTS:
        for seed in SEEDS:
            for b in BSA:
                out.append(f"{i:03d}_{slug(p)}_{seed}_{b}.mp4")
                i += 1
    return out


def test_matrix_loads_once_and_every_video_equals_a_single_run(tiny_native, prompt_file,
                                                               tmp_path, counted):
    out = tmp_path / "out"
    assert main(matrix_args(tiny_native, prompt_file, out)) == 0
    assert counted["loads"] == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["file"] for e in manifest["items"]] == names()
    assert {e["status"] for e in manifest["items"]} == {"done"}
    for e in manifest["items"]:
        side = json.loads((out / e["sidecar"]).read_text())
        assert (side["settings"]["prompt"], side["seed"], side["settings"]["bsa"]) == \
            (e["prompt"], e["seed"], e["bsa"])
        assert len(side["step_s"]) == 2  # this video's steps only
    matrix_frames = dict(counted["frames"])
    for e in manifest["items"]:
        single = tmp_path / f"single-{e['index']}.mp4"
        assert main(["run", "-q", "-m", str(tiny_native), "-p", e["prompt"], "--seed",
                     str(e["seed"]), "--bsa", e["bsa"], *SIZE, "--out", str(single)]) == 0
        assert np.array_equal(counted["frames"][single.name], matrix_frames[e["file"]]), e
    assert counted["loads"] == 1 + len(manifest["items"])
    # seeds and BSA settings really differ
    a, b, c = (matrix_frames[n] for n in names()[:3])
    assert not np.array_equal(a, b) and not np.array_equal(a, c)


def test_interrupted_matrix_resumes_with_the_same_files(tiny_native, prompt_file, tmp_path,
                                                        counted, monkeypatch):
    full = tmp_path / "full"
    assert main(matrix_args(tiny_native, prompt_file, full)) == 0
    out = tmp_path / "out"
    run_video, calls = runjob.run_video, []

    def dies_at_the_fourth(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return run_video(*a, **k)

    monkeypatch.setattr(runjob, "run_video", dies_at_the_fourth)
    assert main(matrix_args(tiny_native, prompt_file, out)) == 130  # interrupted
    done = sorted(p.name for p in out.glob("*.mp4"))
    assert done == names()[:3]
    stamps = {n: (out / n).stat().st_mtime_ns for n in done}
    monkeypatch.setattr(runjob, "run_video", run_video)
    assert main(matrix_args(tiny_native, prompt_file, out)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["status"] for e in manifest["items"]] == ["skipped"] * 3 + ["done"] * 5
    for e in manifest["items"][:3]:  # what the skipped ones took when they ran
        side = json.loads((out / e["sidecar"]).read_text())
        assert (e["total_s"], e["peak_memory"]) == (side["total_s"], side["peak_memory"])
    assert {n: (out / n).stat().st_mtime_ns for n in done} == stamps
    for n in names():
        assert (out / n).read_bytes() == (full / n).read_bytes(), n


def test_a_finished_matrix_loads_nothing(tiny_native, prompt_file, tmp_path, counted):
    out = tmp_path / "out"
    assert main(matrix_args(tiny_native, prompt_file, out)) == 0
    assert main(matrix_args(tiny_native, prompt_file, out)) == 0
    assert counted["loads"] == 1


def test_a_guidance_given_at_its_default_resumes_as_left_out(tiny_native, prompt_file,
                                                             tmp_path, counted):
    """--guidance 4 (the default it stands for) made every video of a finished matrix again."""
    out = tmp_path / "out"
    assert main(matrix_args(tiny_native, prompt_file, out)) == 0
    assert main([*matrix_args(tiny_native, prompt_file, out), "--guidance", "4"]) == 0
    assert counted["loads"] == 1
    assert main([*matrix_args(tiny_native, prompt_file, out), "--guidance", "3"]) == 0
    assert counted["loads"] == 2  # another value is another video


def test_a_resumed_matrix_makes_an_emptied_or_cut_video_again(tiny_native, prompt_file,
                                                               tmp_path, counted):
    """An mp4 emptied (or cut short) after its run was "done already, skipped" and compare
    then failed on it; the sidecar now records the file's size."""
    out = tmp_path / "out"
    assert main(matrix_args(tiny_native, prompt_file, out)) == 0
    first, second = (out / n for n in names()[:2])
    good = first.read_bytes()
    first.write_bytes(b"")
    second.write_bytes(second.read_bytes()[:-10])
    assert main(matrix_args(tiny_native, prompt_file, out)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["status"] for e in manifest["items"]][:3] == ["done", "done", "skipped"]
    assert first.read_bytes() == good
    side = json.loads((out / (second.name + ".json")).read_text())
    assert side["video"]["bytes"] == second.stat().st_size


def test_a_resumed_matrix_remakes_videos_when_the_checkpoint_changed(tiny_native, tmp_path,
                                                                     counted):
    """``--bsa config`` reads the checkpoint's preset: a video made before ``bsa preset`` was
    "done already, skipped" with dense attention in its sidecar; new weights at the same path
    were skipped too."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_native, ckpt)
    out = tmp_path / "out"
    args = ["run", "-q", "-m", str(ckpt), "-p", "a cat", "--seeds", "1,2", *SIZE,
            "--out-dir", str(out)]
    assert main(args) == 0
    sidecar = out / (json.loads((out / "manifest.json").read_text())["items"][0]["file"]
                     + ".json")
    before = json.loads(sidecar.read_text())["checkpoint"]["stamp"]
    assert main(args) == 0  # unchanged: skipped, nothing loaded
    assert counted["loads"] == 1
    assert main(["bsa", "preset", "480p", "-q", "-m", str(ckpt)]) == 0
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["status"] for e in manifest["items"]] == ["done", "done"]
    assert counted["loads"] == 2
    assert json.loads(sidecar.read_text())["checkpoint"]["stamp"] != before
    synth(ckpt, "tiny", seed=5, force=True)  # other weights, same path
    assert main(args) == 0
    assert counted["loads"] == 3


@pytest.mark.parametrize("extra, says", [
    (["--bsa", "OFF"], "--bsa OFF: unknown"),  # was: --out-dir is for a matrix run
    (["--lora-scale", "2"], "--lora-scale 2: this run activates no hub LoRA"),
    (["--seeds", "1,2"], "--out-dir {afile}: is not a folder"),  # was named as --out
])
def test_the_option_at_fault_is_named_with_out_dir(tiny_native, tmp_path, capsys, extra, says):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert main(["run", "-q", "-m", str(tiny_native), "-p", "a cat", *SIZE, *extra,
                 "--out-dir", str(afile)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert says.format(afile=afile) in line, line


@pytest.mark.parametrize("option, value", [("--seeds", "1_000"), ("--lora-scale", "0.5,1_0")])
def test_underscores_in_a_number_list_are_refused(tiny_native, tmp_path, capsys, option,
                                                  value):
    """int() and float() read '1_0' as 10: a scale of 10 ran for what may be a typo of 1.0."""
    assert main(["run", "-q", "-m", str(tiny_native), "-p", "a cat", "--distill", option, value,
                 *SIZE, "--out-dir", str(tmp_path / "o")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "_" in line and "is not" in line, line


def test_bsa_values_that_resolve_alike_are_one_video_listed_twice(tiny_native, tmp_path,
                                                                  counted, capsys):
    """On a checkpoint without BSA, `--bsa config,off` made the same video twice."""
    from longcat_tools.runner.matrix import plan
    from longcat_tools.runner.settings import RunSettings

    assert main(["run", "-q", "-m", str(tiny_native), "-p", "a cat", "--bsa", "config,off",
                 *SIZE, "--out-dir", str(tmp_path / "o")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--bsa: config and off run the same attention on this checkpoint" in line
    assert counted["loads"] == 0
    base = RunSettings(model=str(tiny_native), prompt="a cat", height=32, width=32, frames=9,
                       steps=1, device="cpu")
    assert len(plan(base, tmp_path / "p", bsa=["config", "on"])) == 2
    refined = replace(base, refine=True, refine_height=64, refine_width=64)
    assert len(plan(refined, tmp_path / "r", bsa=["config", "off"])) == 2  # refinement: BSA


def test_a_folder_where_the_manifest_goes_is_refused_before_loading(tiny_native, tmp_path,
                                                                     counted, capsys):
    """An internal error (IsADirectoryError) after the first video was made."""
    out = tmp_path / "out"
    (out / "manifest.json").mkdir(parents=True)
    assert main(["run", "-q", "-m", str(tiny_native), "-p", "a cat", "--seeds", "1,2", *SIZE,
                 "--out-dir", str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "manifest.json there is a folder" in line and counted["loads"] == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    assert main(["run", "-q", "-m", str(tiny_native), "-p", "a cat", "--distill",
                 "--lora-scale", "0.5,nan", *SIZE, "--out-dir", str(tmp_path / "o2")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: video 001 (001_a-cat_42_config_loranan.mp4): --lora-scale nan")


def test_a_resumed_matrix_takes_the_checkpoint_however_its_path_is_spelled(
        tiny_native, tmp_path, counted, monkeypatch):
    """`-m ./ck/`, an absolute path or $LONGCAT_TOOLS_MODEL for the same folder made every
    video again, and compare paired runs of two spellings as differing in `model`."""
    from longcat_tools.compare import Item

    monkeypatch.chdir(tiny_native.parent)
    out = tmp_path / "out"
    args = ["run", "-q", "-p", "a cat", "--seeds", "1", *SIZE, "--out-dir", str(out)]
    assert main([*args, "-m", tiny_native.name]) == 0
    assert main([*args, "-m", f"./{tiny_native.name}/"]) == 0
    monkeypatch.chdir(tmp_path)  # the relative path the first run was given leads nowhere here
    assert main([*args, "-m", str(tiny_native)]) == 0
    monkeypatch.setenv("LONGCAT_TOOLS_MODEL", str(tiny_native))
    assert main(args) == 0
    assert counted["loads"] == 1  # the first run only
    name = json.loads((out / "manifest.json").read_text())["items"][0]["file"]
    doc = json.loads((out / (name + ".json")).read_text())
    assert doc["checkpoint"]["path"] == os.path.realpath(tiny_native)
    moved = {**doc, "settings": {**doc["settings"], "model": str(tiny_native)}}
    assert Item(out / name, doc).settings == Item(out / name, moved).settings


def test_a_resumed_matrix_takes_lora_spelled_with_its_default_scale_as_done(tiny_native,
                                                                            tmp_path, counted):
    """``--lora style`` and ``--lora style:0.5`` (0.5 its registered default) make the same
    video, yet a resume made it again and ``compare`` paired the two as differing settings."""
    import shutil

    from longcat_tools.compare import Item

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_native, ckpt)
    assert main(["lora", "attach", str(ckpt / "lora" / "cfg_step_lora.safetensors"), "--name",
                 "style", "--scale", "0.5", "-m", str(ckpt), "-q"]) == 0
    out = tmp_path / "out"
    args = ["run", "-q", "-m", str(ckpt), "-p", "a cat", "--seeds", "1", *SIZE,
            "--out-dir", str(out), "--lora"]
    assert main([*args, "style"]) == 0
    name = json.loads((out / "manifest.json").read_text())["items"][0]["file"]
    first = json.loads((out / (name + ".json")).read_text())
    assert main([*args, "style:0.5"]) == 0
    assert counted["loads"] == 1  # done already: nothing loaded
    assert main([*args, "style:1"]) == 0
    assert counted["loads"] == 2
    third = json.loads((out / (name + ".json")).read_text())
    assert Item(out / name, first).settings != Item(out / name, third).settings
    assert Item(out / name, first).settings == Item(
        out / name, {**first, "settings": {**first["settings"], "lora": "style:0.5"}}).settings


def test_a_resumed_matrix_remakes_videos_when_an_input_file_changed(tiny_native, tmp_path,
                                                                    counted):
    """The sidecar recorded the image's path only: a new image at the same path was "done
    already, skipped"; and latents asked for on a resume were never written."""
    from PIL import Image

    image, out = tmp_path / "first.png", tmp_path / "out"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    args = ["run", "-q", "-m", str(tiny_native), "-t", "i2v", "--image", str(image), "-p",
            "a cat", "--seeds", "1,2", *SIZE, "--out-dir", str(out)]
    assert main(args) == 0 and main(args) == 0
    assert counted["loads"] == 1
    first = {p.name: p.read_bytes() for p in out.glob("*.mp4")}
    Image.new("RGB", (32, 32), (20, 30, 230)).save(image)
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["status"] for e in manifest["items"]] == ["done", "done"]
    assert all((out / n).read_bytes() != b for n, b in first.items())
    side = json.loads((out / (next(iter(first)) + ".json")).read_text())
    assert side["inputs"] == {str(image): [image.stat().st_size, image.stat().st_mtime_ns]}
    prompts = tmp_path / "p.txt"
    prompts.write_text("a dog\n")
    one = ["run", "-q", "-m", str(tiny_native), "--prompts", str(prompts), *SIZE, "--out-dir",
           str(tmp_path / "one")]
    assert main(one) == 0
    latents = tmp_path / "lat.safetensors"
    assert main([*one, "--save-latents", str(latents)]) == 0 and latents.is_file()


def test_jsonl_lines_set_their_own_fields(tiny_native, tmp_path, counted):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a cat", "seed": 11, "out": "cat.mp4"}\n'
                       '# a comment\n\n{"prompt": "a dog", "negative_prompt": "blur"}\n')
    out = tmp_path / "out"
    assert main(["run", "-q", "-m", str(tiny_native), "--prompts", str(prompts), "--seeds",
                 "1,2", *SIZE, "--out-dir", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    got = [(e["file"], e["seed"], e["source"].rsplit(" ", 2)[-1]) for e in manifest["items"]]
    assert got == [("cat.mp4", 11, "1"), ("001_a-dog_1_config.mp4", 1, "4"),
                   ("002_a-dog_2_config.mp4", 2, "4")]
    side = json.loads((out / "001_a-dog_1_config.mp4.json").read_text())
    assert side["negative_prompt"] == "blur"


@pytest.mark.parametrize("content, extra, says, code", [
    ("", [], "no prompts in the file", 1),
    ("a\n\n# c\n", ["--seeds", "1,x"], "--seeds 1,x: 'x' is not an integer", 2),
    ("a\n", ["--bsa", "off,nope"], "--bsa nope: unknown", 2),
    ("a\nb\nc\nd\ne\nf\n" + '{"prompt": "g", "image": "missing.png"}\n', ["--task", "i2v"],
     "line 1: --task i2v needs --image", 2),
    ('{"prompt": "g", "image": "missing.png"}\n', ["--task", "i2v"],
     "missing.png: no such file", 2),
    ("a\nb\nc\nd\ne\nf\n" + '{"prompt": "g", "image": "missing.png"}\n', ["--task", "refine"],
     "line 1: --frames: --task refine does not use it", 2),
    ('{"prompt": "g", "seed": "7"}\n', [], "line 1: 'seed' must be an integer", 1),
    ('{"prompt": "g", "colour": "red"}\n', [], "line 1: unknown field 'colour'", 1),
    ('{"prompt": "g"\n', [], "line 1: invalid JSON", 1),
    ("{cinematic} a cat\n", [], "a line starting with '{' is read as a JSON object", 1),
    ("a cat\na dog\n", ["-p", "x"], "every line of --prompts", 2),  # -p was unused
    ('{"prompt": "g", "seed": 3}\n', ["--seeds", "1,2"], "sets its own 'seed'; drop", 2),
    ('{"prompt": "g", "prompt": "h"}\n', [], "line 1: key 'prompt' appears twice", 1),
    ('{"prompt": "g", "out": "a\\u0000b.mp4"}\n', [], "line 1: 'out' contains a NUL", 1),
    ('{"prompt": "g", "out": "../escape.mp4"}\n', [], "must be a .mp4 file name (no folders)", 1),
    ('{"prompt": "g", "out": "/tmp/abs.mp4"}\n', [], "must be a .mp4 file name (no folders)", 1),
    ('{"prompt": "g", "out": "link/x.mp4"}\n', [], "must be a .mp4 file name (no folders)", 1),
    ('{"prompt": "g", "out": "x.mp4"}\n{"prompt": "h", "out": "x.mp4"}\n', [],
     "line 2: writes x.mp4 as", 1),
    ('{"prompt": "g", "out": "X.mp4"}\n{"prompt": "h", "out": "x.mp4"}\n', [],
     "line 2: writes x.mp4 as", 1),
    ("a\n", ["--out", "one.mp4"], "--out one.mp4: names one video", 2),
    ('{"seed": 3}\n', [], "line 1: no prompt", 1),
    ("a\n", ["--lora-scale", "0.5,x"], "--lora-scale 0.5,x: 'x' is not a number", 2),
    ("a\n", ["--lora-scale", "0.5,20", "--distill"],
     "--lora-scale 20: a LoRA scale must be a number from -10", 2),
    ("a\n", ["--lora-scale", "0.5,1"], "--lora-scale 0.5: this run activates no hub LoRA", 2),
    ("a\n", ["--out", "one.mp4", "--seeds", "1,,2"], "--seeds 1,,2: '' is not an integer", 2),
    ("a\n", ["--out", "one.mp4", "--bsa", "on,,off"], "--bsa list on,,off: --bsa : unknown", 2),
    ("a\n", ["--seeds", "1,2,1"], "--seeds 1,2,1: '1' is listed twice", 2),
    ("a\n", ["--seeds", f"-1,{2**64 - 1}"], f"-1 and {2**64 - 1} are one seed to torch", 2),
    (f'{{"prompt": "a", "seed": -2}}\n{{"prompt": "a", "seed": {2**64 - 2}}}\n', [],
     "line 2: the same prompt, seed and settings as", 2),
    ("a\n", ["--seeds", "1,2", "--latents-in", "LATENTS"],
     "line 1: seed 2 makes the same video as seed 1 (--prompts", 2),
    ("a\n", ["--seeds", "1,2", "--save-latents", "l.safetensors"],
     "--save-latents l.safetensors: names one file, but this run makes 2 videos", 2),
    ("a\n", ["--seeds", f"1,{2**64}"], f"--seeds {2**64}: must fit in 64 bits", 2),
    ('{"prompt": "g", "seed": 1e23}\n', [], "line 1: 'seed' must be an integer", 1),
    (f'{{"prompt": "g", "seed": {2**64}}}\n', [], f"line 1: 'seed' {2**64} must fit in 64", 1),
    ('{"prompt": "g", "out": "x.mp4"}\n', ["--seeds", "1,2", "--bsa", "off,on"],
     "line 1: 'out' names one video, but --seeds and --bsa make 4 of this line", 2),
    ("a\n", ["--bsa", "off,on,off"], "--bsa off,on,off: 'off' is listed twice", 2),
    ("a\n", ["--lora-scale", "0.5,0.50", "--distill"], "'0.5' is listed twice", 2),
    ("a\nb\na\n", [], "line 3: the same prompt, seed and settings as --prompts", 2),
    ('{"prompt": "a", "seed": 7}\n{"prompt": "a"}\n', ["--seeds", "7"],
     "line 2: the same prompt, seed and settings as", 2),
])
def test_bad_lists_stop_before_anything_loads(tiny_native, tmp_path, capsys, monkeypatch,
                                              content, extra, says, code):
    def no_load(*_a, **_k):
        pytest.fail("the matrix loaded weights before refusing")

    monkeypatch.setattr(LongCatVideoPipeline, "from_pretrained", classmethod(no_load))
    prompts = tmp_path / "p.txt"
    prompts.write_text(content)
    latents = tmp_path / "l.safetensors"  # the start latents of SIZE
    save_file({"latents": torch.zeros(1, 16, 3, 4, 4)}, latents)
    extra = [str(latents) if a == "LATENTS" else a for a in extra]
    refused(capsys, "run", "-m", str(tiny_native), "--prompts", str(prompts), *SIZE,
            "--out-dir", str(tmp_path / "out"), *extra, code=code, says=says)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("line7, says, code", [
    ('{"prompt": "g", "image": "missing.png"}', "line 7: --image", 2),
    ('{"prompt": "g", "seed": "x"}', "line 7: 'seed' must be an integer", 1),
    # a sound header: found when the job decoded it, after loading, without the line
    ('{"prompt": "g", "image": "cut.png"}', "line 7: --image", 1),
])
def test_a_bad_seventh_line_is_named(tiny_native, tmp_path, capsys, monkeypatch, line7, says,
                                     code):
    from PIL import Image

    def no_load(*_a, **_k):
        pytest.fail("the matrix loaded weights before refusing")

    monkeypatch.setattr(LongCatVideoPipeline, "from_pretrained", classmethod(no_load))
    Image.new("RGB", (32, 32), "red").save(tmp_path / "first.png")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "whole.png")
    whole = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[:len(whole) // 2])
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"prompt": "a", "image": "first.png", "seed": {i}}}\n'
                               for i in range(6)) + line7 + "\n")
    refused(capsys, "run", "-m", str(tiny_native), "--task", "i2v", "--prompts", str(prompts),
            *SIZE, "--out-dir", str(tmp_path / "out"), code=code, says=says)
    assert not (tmp_path / "out").exists()


def test_the_matrix_is_a_generator_over_a_loaded_pipeline(tiny_native, tmp_path):
    from longcat_tools.runner import RunSettings
    from longcat_tools.runner.matrix import plan, run_matrix
    from longcat_tools.runner.pipeline import Reporter

    pipe = LongCatVideoPipeline.from_pretrained(tiny_native)
    base = RunSettings(model=str(tiny_native), prompt="a cat", height=32, width=32, frames=9,
                       steps=1, device="cpu")
    items = plan(base, tmp_path / "o", seeds=[1, 2], bsa=["off"])
    pipe.transformer.lora_mode = "runtime"
    docs = list(run_matrix(items, Reporter(), pipe=pipe))
    assert [d["seed"] for d in docs] == [1, 2]
    assert all(Path(d["output"]).is_file() for d in docs)
    assert pipe.transformer.lora_mode == "runtime"  # the items' mode was left behind
    # a pipeline other than the items ask for: its videos were recorded as theirs
    with pytest.raises(UsageError, match="its DiT is in torch.float32, the items' settings "
                                         "ask for torch.bfloat16"):
        list(run_matrix(plan(replace(base, dtype="bf16"), tmp_path / "b", seeds=[1],
                             bsa=["off"]), Reporter(), pipe=pipe))
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_data_parallel_matrix_gives_the_same_files(tiny_native, prompt_file, tmp_path,
                                                   monkeypatch, capfd):
    """``--gpus 2`` over a list (here on the CPU): two processes, every other video each, the
    same files as one process, and the launcher's manifest; with ``--json``, stdout holds the
    manifest alone (the workers' lines go to stderr). Every process computes with one
    thread: on some CPUs the BLAS sums a product in another order with another thread count
    (a 6 x 256 by 256 x 32 fp32 product 5e-7 apart), and the launcher gives each worker its
    share of the cores."""
    import torch

    one, two = tmp_path / "one", tmp_path / "two"
    base = ["-m", str(tiny_native), "--prompts", str(prompt_file), "--seeds", "3,8", *SIZE,
            "--device", "cpu", "-q"]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the workers'
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["run", *base, "--out-dir", str(one)]) == 0
    finally:
        torch.set_num_threads(threads)
    capfd.readouterr()
    loud = [a for a in base if a != "-q"]  # the workers' progress lines too
    assert main(["run", *loud, "--out-dir", str(two), "--gpus", "2", "--json"]) == 0
    manifest = json.loads((two / "manifest.json").read_text())
    assert json.loads(capfd.readouterr().out) == manifest
    assert [e["status"] for e in manifest["items"]] == ["done"] * 4
    for e in manifest["items"]:
        assert (two / e["file"]).read_bytes() == (one / e["file"]).read_bytes(), e["file"]
        side = json.loads((two / e["sidecar"]).read_text())
        assert side["total_s"] == e["total_s"]


def test_lora_scale_list_switches_the_scale_without_reloading(tiny_native, tmp_path, counted):
    out = tmp_path / "out"
    assert main(["run", "-q", "-m", str(tiny_native), "-p", "a cat", "--distill", "--seeds", "4",
                 "--lora-scale", "0.5,1", *SIZE, "--out-dir", str(out)]) == 0
    assert counted["loads"] == 1
    half, full = (counted["frames"][f"00{i}_a-cat_4_config_lora{s}.mp4"]
                  for i, s in ((0, "0.5"), (1, "1")))
    assert not np.array_equal(half, full)
    for scale, want in (("0.5", half), ("1", full)):
        single = tmp_path / f"single-{scale}.mp4"
        assert main(["run", "-q", "-m", str(tiny_native), "-p", "a cat", "--distill", "--seed",
                     "4", "--lora-scale", scale, *SIZE, "--out", str(single)]) == 0
        assert np.array_equal(counted["frames"][single.name], want), scale


def test_a_scale_sweep_leaves_the_callers_lora_scale_alone(tiny_native):
    """``lora_scale`` is set on the loaded adapter for one call and put back after it: a LoRA
    the caller loaded at 0.7 runs at 0.7 again when no scale is asked for."""
    from longcat_tools.runner.lora import lora_path

    kw = dict(prompt="a cat", height=32, width=32, num_frames=9, steps=1, distill=True, seed=5)
    fresh = LongCatVideoPipeline.from_pretrained(tiny_native)
    at_07 = fresh.t2v(**kw, lora_scale=0.7).frames
    pipe = LongCatVideoPipeline.from_pretrained(tiny_native)
    pipe.transformer.load_lora(lora_path(tiny_native, "distilled"), "distilled", scale=0.7)
    pipe.t2v(**kw, lora_scale=0.3)
    assert {d.multiplier for d in pipe.transformer.lora_registry["distilled"].values()} == {0.7}
    assert pipe.transformer.active_loras == []
    assert np.array_equal(pipe.t2v(**kw).frames, at_07)


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_bytes("\ufeffhello\nworld\n".encode())
    assert [pl.fields["prompt"] for pl in read_prompts(prompts)] == ["hello", "world"]


def test_a_utf16_prompt_file_is_refused_not_read_as_nul_letters(tmp_path):
    """Saved as UTF-16 with its BOM stripped, every letter came with a NUL: the prompts were
    'h\\x00e\\x00l...' and the run went ahead."""
    prompts = tmp_path / "p.txt"
    prompts.write_bytes("hello\nworld\n".encode("utf-16-le"))
    with pytest.raises(LongcatError, match="holds NUL characters .* save it as UTF-8"):
        read_prompts(prompts)


def test_options_a_run_of_the_other_kind_would_ignore_are_refused(tiny_native, tmp_path,
                                                                   capsys):
    """--seed beside --seeds, and --out-dir on a single video, did nothing, exit 0."""
    base = ["run", "-m", str(tiny_native), "-p", "a cat", "--height", "32", "--width", "32",
            "--frames", "9", "--steps", "1"]
    for extra, says in ((["--seeds", "1,2", "--seed", "99", "--out-dir", str(tmp_path / "m")],
                         "--seed 99 with --seeds"),
                        (["--out-dir", str(tmp_path / "m"), "-o", str(tmp_path / "one.mp4")],
                         "is for a matrix run")):
        assert main([*base, *extra]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert says in line, line
    assert sorted(tmp_path.iterdir()) == []
