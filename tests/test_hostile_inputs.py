"""Hostile corpus, unbounded work (class 2) and small contract gaps (class 4): absurd model
dimensions in a config, run inputs that cannot fit or cannot be read, and schema names that are
paths. Each is refused in one line, fast, and a run never gets as far as loading weights."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
import time
import zlib
from pathlib import Path

import pytest
import torch
from hostile import refused
from safetensors.torch import save_file

from longcat_tools.cli import main
from longcat_tools.errors import LongcatError
from longcat_tools.runner import pipeline as pipeline_module

FAST_S = 5.0  # each refusal: well under this on 2 cores, with no weights read


@pytest.fixture(scope="module")
def ckpt(tiny_native, tmp_path_factory):
    """A private copy of the tiny checkpoint whose DiT config each case rewrites."""
    dst = tmp_path_factory.mktemp("hostile") / "ckpt"
    shutil.copytree(tiny_native, dst)
    return dst


@pytest.fixture
def dit_config(ckpt):
    """Set fields of the copy's dit/config.json for one case, restored afterwards."""
    path = ckpt / "dit" / "config.json"
    original = path.read_text()

    def edit(**fields):
        path.write_text(json.dumps({**json.loads(original), **fields}))
        return path

    yield edit
    path.write_text(original)


@pytest.fixture(autouse=True)
def no_weights(monkeypatch):
    """A run that reaches the weights fails the test (not the CLI's catch-all)."""
    def load(*_a, **_k):
        pytest.fail("the run loaded weights before refusing")

    monkeypatch.setattr(pipeline_module.LongCatVideoPipeline, "from_pretrained", classmethod(load))


def fast_refusal(capsys, *args, code=1, says=None):
    t = time.perf_counter()
    line = refused(capsys, *args, code=code, says=says)
    assert time.perf_counter() - t < FAST_S, line
    return line


# --- class 2: model dimensions, one validation for every reader -----------------------------

ABSURD_CONFIGS = [
    ("depth-1e9", {"depth": 10**9}, "depth 1,000,000,000 is beyond any LongCat DiT"),
    ("hidden-1e12", {"hidden_size": 10**12}, "hidden_size"),
    ("mlp_ratio-1e9", {"mlp_ratio": 1e9}, "mlp_ratio"),
    ("mlp_ratio-string", {"mlp_ratio": "4"}, "mlp_ratio"),
    ("depth-negative", {"depth": -3}, "'depth' must be a positive integer"),
    ("depth-float", {"depth": 2.5}, "'depth' must be a positive integer"),
    ("depth-bool", {"depth": True}, "'depth' must be a positive integer"),
    ("heads-0", {"num_heads": 0}, "num_heads"),
    ("heads-1e6", {"num_heads": 10**6}, "num_heads"),
    ("in-channels-1e9", {"in_channels": 10**9}, "in_channels"),
    ("patch-1e6", {"patch_size": [1, 2, 10**6]}, "patch_size"),
    ("caption-1e12", {"caption_channels": 10**12}, "caption_channels"),
]


def _commands(ckpt: Path, tmp: Path) -> dict[str, list[str]]:
    return {
        "convert": ["convert", "--src", ckpt, "--dst", tmp / "out", "--dry-run", "-q"],
        "lora-list": ["lora", "list", "-m", ckpt, "-q"],
        "run": ["run", "-q", "-m", ckpt, "-p", "a cat", "--height", "32", "--width", "32",
                "--frames", "9", "--out", tmp / "x.mp4"],
        "bsa-check": ["bsa", "check", "-m", ckpt, "--height", "480", "--width", "832",
                      "--frames", "93", "-q"],
    }


@pytest.mark.parametrize("command", ["convert", "lora-list", "run", "bsa-check"])
@pytest.mark.parametrize("case,fields,says", ABSURD_CONFIGS, ids=[c[0] for c in ABSURD_CONFIGS])
def test_absurd_dit_config_is_refused_by_every_reader(capsys, ckpt, dit_config, tmp_path,
                                                      command, case, fields, says):
    path = dit_config(**fields)
    line = fast_refusal(capsys, *_commands(ckpt, tmp_path)[command], says=says)
    assert "config.json" in line and str(path.parent.name) in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_verify_uses_the_same_bounds_and_message(capsys, ckpt, dit_config):
    dit_config(depth=10**9)
    t = time.perf_counter()
    from longcat_tools.cli import main

    assert main(["verify", str(ckpt), "-q"]) == 1
    err = capsys.readouterr()
    assert "depth 1,000,000,000 is beyond any LongCat DiT" in err.out + err.err
    assert time.perf_counter() - t < FAST_S


@pytest.mark.parametrize("seed", [2**64, -2**63 - 1])
def test_synth_refuses_a_seed_past_64_bits(capsys, tmp_path, seed):
    """It was folded onto a smaller seed without a word."""
    fast_refusal(capsys, "synth", tmp_path / "s", "--seed", seed, "-q", code=2,
                 says=f"--seed {seed}: must fit in 64 bits")
    assert not list(tmp_path.iterdir())


def test_synth_depth_1e9_is_refused_without_partial(capsys, tmp_path):
    dst = tmp_path / "big"
    fast_refusal(capsys, "synth", dst, "--depth", 10**9, "-q", code=2,
                 says="--depth: depth 1,000,000,000 is beyond any LongCat DiT")
    assert not dst.exists() and not list(tmp_path.iterdir())


# --- class 2: run inputs, checked before any weights load ------------------------------------

def png_claiming(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose IHDR claims ``width`` x ``height`` (no real pixel data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))
    return path


def _latents(path: Path, **tensors) -> Path:
    save_file(tensors, path)
    return path


RUN_CASES = [
    ("png-bomb", ["--task", "i2v", "--image", "{bomb}"], "too large", 1),
    ("image-not-image", ["--task", "i2v", "--image", "{text}"], "cannot read the image", 1),
    ("video-text", ["--task", "vc", "--video", "{text}", "--cond-frames", "5"],
     "cannot decode it as a video", 1),
    ("latents-wrong-shape", ["--latents-in", "{lat_shape}"], "[1, 16, 3, 4, 4]", 1),
    ("latents-missing", ["--latents-in", "{lat_name}"], "no tensor named 'latents'", 1),
    ("latents-pickle", ["--latents-in", "{pickle}"], "--latents-in", 1),
    ("out-is-folder", ["--out", "{folder}"], "is a folder", 2),
    ("out-without-a-name", ["--out", "{hidden}"], "name the video (NAME.mp4)", 2),
    ("latents-without-a-name", ["--save-latents", "{hidden_latents}"],
     "name the file (NAME.safetensors)", 2),
    ("out-under-a-file", ["--out", "{under_file}"], "is not a folder", 2),
    # ffmpeg failed on the scratch file's name after the whole generation
    ("out-scratch-name-too-long", ["--out", "{long_name}"],
     "the name is too long for its scratch files", 2),
    ("fps-nan", ["--fps", "nan"], "--fps nan", 2),
    ("fps-1e-5", ["--fps", "0.00001"], "from 1 to 1000", 2),  # an mp4 without video, exit 0
    ("steps-1e12", ["--steps", str(10**12)], "must be 1 to 1000", 2),  # failed allocating
    ("out-is-the-video", ["--task", "vc", "--video", "{text_mp4}", "--cond-frames", "5",
                          "--out", "{text_mp4}"], "is also the run's input --video", 2),
    ("latents-over-their-input", ["--latents-in", "{lat_shape}", "--save-latents",
                                  "{lat_shape}"], "is also the run's input --latents-in", 2),
    ("image-is-a-folder", ["--task", "i2v", "--image", "{folder}"], "a folder; give the file", 2),
    ("image-symlink-loop", ["--task", "i2v", "--image", "{loop}"], "a symlink loop", 2),
    ("image-broken-link", ["--task", "i2v", "--image", "{dangling}"], "a broken symlink (to ", 2),
    ("image-through-a-file", ["--task", "i2v", "--image", "{under_file}"],
     "no such file (a part of the path is a file)", 2),
    # options another task reads: t2v ran, exit 0, without them
    ("t2v-resolution", ["--resolution", "720p"], "--resolution: --task t2v does not use it", 2),
    ("lora-mode-without-lora", ["--lora-mode", "runtime"], "--lora-mode runtime: this run", 2),
    # the write failed after the whole generation, as an internal error
    ("out-in-proc", ["--out", "/proc/x.mp4"], "cannot write in the folder /proc", 1),
    ("latents-in-proc", ["--save-latents", "/proc/x.safetensors"],
     "--save-latents /proc/x.safetensors: cannot write in the folder /proc", 1),
    ("refine-frames", ["--task", "refine", "--video", "{text_mp4}"],
     "--frames: --task refine does not use it", 2),  # the base's --frames 9
    ("negative-prompt-without-cfg", ["--distill", "--negative-prompt", "blur"],
     "--negative-prompt: this run samples without CFG", 2),
    ("negative-prompt-refine", ["--task", "refine", "--video", "{text_mp4}", "--frames", "93",
                                "--negative-prompt", "blur"], "--negative-prompt: this run", 2),
    # refine ran, exit 0, ignoring them (and its sidecar recorded the guidance)
    ("refine-guidance", ["--task", "refine", "--video", "{text_mp4}", "--frames", "93",
                         "--guidance", "5"], "--guidance: --task refine does not use it", 2),
    ("refine-distill", ["--task", "refine", "--video", "{text_mp4}", "--frames", "93",
                        "--distill"], "--distill/--no-distill: --task refine does not use", 2),
    ("refine-refine", ["--task", "refine", "--video", "{text_mp4}", "--frames", "93",
                       "--refine"], "--refine/--no-refine: --task refine does not use it", 2),
    # an internal error after loading
    ("refine-cond-frames-without-image", ["--task", "refine", "--video", "{text_mp4}",
                                          "--frames", "93", "--cond-frames", "5"],
     "--cond-frames 5: --task refine conditions on an --image", 2),
    # refused after loading, exit 1, or in the API's words
    ("long-video-latents", ["--task", "long", "--video", "{text_mp4}", "--frames", "17",
                            "--cond-frames", "5", "--latents-in", "{lat_shape}"],
     "a long run from --video samples no first segment", 2),
    ("fp8-fp16", ["--precision", "fp8", "--dtype", "fp16"],
     "--precision fp8 --dtype fp16: fp8 GEMMs run with bf16 activations", 2),
    # accepted, changing nothing
    ("no-kv-cache-offloaded", ["--task", "vc", "--video", "{text_mp4}", "--cond-frames", "5",
                               "--no-kv-cache", "--offload-kv-cache"],
     "--offload-kv-cache: with --no-kv-cache there is no cache to offload", 2),
    ("latents-in-seed", ["--latents-in", "{lat_shape}", "--seed", "5"],
     "--seed 5: a t2v run from --latents-in draws no noise", 2),
    ("t2v-segments", ["--segments", "7"], "--segments: --task t2v does not use it", 2),
    ("t2v-cond-frames", ["--cond-frames", "5"], "--cond-frames: --task t2v does not use", 2),
    ("t2v-no-kv-cache", ["--no-kv-cache"], "--kv-cache/--no-kv-cache: --task t2v does not", 2),
    ("t2v-t-thresh", ["--t-thresh", "0.2"], "for --task refine or --refine", 2),
    ("t2v-refine-size", ["--refine-height", "64", "--refine-width", "64"], "--refine-height:", 2),
    ("t2v-spatial-only", ["--spatial-refine-only"], "--no-spatial-refine-only: --task t2v", 2),
    ("i2v-enhance-hf", ["--task", "i2v", "--image", "{text}", "--enhance-hf"],
     "--enhance-hf/--no-enhance-hf: --task i2v does not use it (it is for --task vc or avc)", 2),
    ("fps-inf", ["--fps", "inf"], "--fps inf", 2),
    ("guidance-inf", ["--guidance", "inf"], "--guidance inf", 2),
    ("guidance-nan", ["--guidance", "nan"], "--guidance nan", 2),
    ("seed-2^70", ["--seed", str(2**70)], "--seed", 2),
    ("frames-1e9+1", ["--frames", "1000000001"], "--frames 1000000001", 2),
    ("height-100000", ["--height", "100000", "--width", "100000"], "memory", 1),
    ("height-100000-832", ["--height", "100000", "--width", "832", "--frames", "93"], "memory",
     1),
    ("long-segments-1e9", ["--task", "long", "--frames", "17", "--segments", str(10**9)],
     "memory", 1),
    ("long-frames-9", ["--task", "long", "--frames", "9"], "--frames 9: --task long", 2),
    ("long-frames-13", ["--task", "long", "--frames", "13"], "--frames 13: --task long", 2),
]


def test_a_path_with_a_nul_is_named_invalid_not_missing():
    """Only the Python API can pass one (argv cannot); os.stat raised ValueError."""
    from longcat_tools.errors import why_not_a_file

    assert why_not_a_file("a\0b.png") == "not a valid path"


@pytest.mark.parametrize("case,args,says,code", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_run_refuses_bad_input_before_loading(capsys, tiny_native, tmp_path, case, args, says,
                                              code):
    """Exit 2 for an option's value, 1 for what a file holds."""
    files = {
        "bomb": png_claiming(tmp_path / "bomb.png", 100_000, 100_000),
        "text": tmp_path / "notes.txt",
        "lat_shape": _latents(tmp_path / "a.safetensors", latents=torch.zeros(1, 16, 3, 4, 5)),
        "lat_name": _latents(tmp_path / "b.safetensors", noise=torch.zeros(1, 16, 3, 4, 4)),
        "pickle": tmp_path / "c.safetensors",
        "folder": tmp_path / "dir.mp4",
        "under_file": tmp_path / "notes.txt" / "x.mp4",
        "text_mp4": tmp_path / "in.mp4",
        "loop": tmp_path / "loop.png",
        "hidden": tmp_path / ".mp4",
        "hidden_latents": tmp_path / ".safetensors",
        "dangling": tmp_path / "gone.png",
        "long_name": tmp_path / ("b" * 246 + ".mp4"),
    }
    files["text"].write_text("not a picture, not a video\n")
    files["text_mp4"].write_text("the video a run must not overwrite\n")
    files["pickle"].write_bytes(pickle.dumps({"latents": [0.0] * 10}))
    files["folder"].mkdir()
    files["loop"].symlink_to(files["loop"])
    files["dangling"].symlink_to(tmp_path / "moved.png")
    args = [a.format(**files) for a in args]
    base = ["run", "-q", "-m", tiny_native, "-p", "a cat", "--height", "32", "--width", "32",
            "--frames", "9", "--out", tmp_path / "x.mp4"]
    fast_refusal(capsys, *base, *args, code=code, says=says)
    assert not (tmp_path / "x.mp4").exists() and not (tmp_path / "x.mp4.json").exists()


def test_a_path_the_system_cannot_take_is_a_usage_error(capsys, tiny_native, tmp_path):
    """A name over the file system's limit failed deep in a command as an internal error."""
    long = tmp_path / ("z" * 300 + ".mp4")
    line = fast_refusal(capsys, "run", "-q", "-m", tiny_native, "-p", "a cat", "--height", "32",
                        "--width", "32", "--frames", "9", "--out", long, code=2,
                        says="too long for the file system")
    assert "internal error" not in line


COMPONENT_FILES = ["text_encoder/config.json", "text_encoder/model.safetensors.index.json",
                   "tokenizer/tokenizer_config.json", "vae/config.json",
                   "scheduler/scheduler_config.json"]


@pytest.mark.parametrize("payload", ["[1]", "missing"])
@pytest.mark.parametrize("rel", COMPONENT_FILES)
def test_run_checks_the_other_components_before_loading(capsys, ckpt, tmp_path, rel, payload):
    """transformers' and diffusers' loaders given a bad config fail with their own traceback
    (or try to reach the Hub): run checks those files first, as verify does."""
    path = ckpt / rel
    original = path.read_bytes()
    try:
        if payload == "missing":
            path.unlink()
        else:
            path.write_text(payload)
        line = fast_refusal(capsys, "run", "-q", "-m", ckpt, "-p", "a cat", "--height", "32",
                            "--width", "32", "--frames", "9", "--out", tmp_path / "x.mp4")
        assert rel.split("/")[-1] in line
    finally:
        path.write_bytes(original)


@pytest.mark.parametrize("rel, edit, says", [
    ("tokenizer/tokenizer.json", lambda d: {}, "no 'added_tokens' field"),
    ("tokenizer/tokenizer.json", lambda d: {k: v for k, v in d.items() if k != "model"},
     "no 'model' field"),
    ("vae/config.json", lambda d: {**d, "z_dim": 7}, "encoder.conv_out.weight"),
    ("text_encoder/config.json", lambda d: {**d, "d_model": d["d_model"] * 2}, "config.json "
     "implies"),
])
def test_a_component_that_cannot_load_fails_verify_and_run_before_loading(
        capsys, ckpt, tmp_path, rel, edit, says):
    """verify passed a tokenizer.json of {} and run failed on it after loading started
    (KeyError: 'added_tokens'); a VAE config unlike its weights failed in diffusers' loader."""
    path = ckpt / rel
    original = path.read_text()
    try:
        path.write_text(json.dumps(edit(json.loads(original))))
        line = fast_refusal(capsys, "run", "-q", "-m", ckpt, "-p", "a cat", "--height", "32",
                            "--width", "32", "--frames", "9", "--out", tmp_path / "x.mp4")
        assert says in line, line
        assert main(["verify", str(ckpt), "-q"]) == 1
    finally:
        path.write_text(original)


@pytest.mark.parametrize("folder", ["dit", "text_encoder", "vae"])
def test_run_refuses_a_truncated_shard_before_loading(capsys, ckpt, tmp_path, monkeypatch,
                                                      folder):
    """The DiT's shards were read after the text encoder had started loading (minutes on the
    real one), the other components' by their own loaders."""
    from longcat_tools.runner.pipeline import LongCatVideoPipeline

    def no_load(*_a, **_k):
        pytest.fail("weights loaded before the truncated shard was refused")

    monkeypatch.setattr(LongCatVideoPipeline, "from_pretrained", classmethod(no_load))
    path = sorted((ckpt / folder).glob("*.safetensors"))[-1]
    original = path.read_bytes()
    try:
        path.write_bytes(original[:-100])
        line = fast_refusal(capsys, "run", "-q", "-m", ckpt, "-p", "a cat", "--height", "32",
                            "--width", "32", "--frames", "9", "--out", tmp_path / "x.mp4")
        assert str(path) in line and "truncated" in line
    finally:
        path.write_bytes(original)


@pytest.mark.parametrize("payload,says", [("{", "invalid JSON"), ("[1]", "not a JSON object")])
@pytest.mark.parametrize("rel", ["tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"])
def test_run_and_verify_read_the_tokenizer_files_as_transformers_does(capsys, ckpt, tmp_path,
                                                                      rel, payload, says):
    """transformers parses both files: anything but a JSON object fails inside it, after the
    DiT has loaded."""
    path = ckpt / rel
    original = path.read_bytes()
    try:
        path.write_text(payload)
        line = fast_refusal(capsys, "run", "-q", "-m", ckpt, "-p", "a cat", "--height", "32",
                            "--width", "32", "--frames", "9", "--out", tmp_path / "x.mp4",
                            says=says)
        assert rel in line
        from longcat_tools.cli import main

        assert main(["verify", str(ckpt), "-q"]) == 1
        out = capsys.readouterr()
        assert rel in out.out + out.err and says in out.out + out.err
    finally:
        path.write_bytes(original)


@pytest.mark.parametrize("rel", ["vae/config.json", "tokenizer/tokenizer.json",
                                 "text_encoder/config.json"])
def test_run_reads_no_component_file_linked_out_of_the_checkpoint(capsys, ckpt, tmp_path, rel):
    """The loaders follow links; run checks every file of the component folders first."""
    path = ckpt / rel
    outside = tmp_path / "outside" / path.name
    outside.parent.mkdir()
    shutil.copy(path, outside)
    original = path.read_bytes()
    path.unlink()
    path.symlink_to(outside)
    try:
        fast_refusal(capsys, "run", "-q", "-m", ckpt, "-p", "a cat", "--height", "32",
                     "--width", "32", "--frames", "9", "--out", tmp_path / "x.mp4",
                     says="outside the checkpoint")
    finally:
        path.unlink()
        path.write_bytes(original)


@pytest.mark.parametrize("option, rel, name", [
    ("--distill", "lora/cfg_step_lora.safetensors", "distilled"),
    ("--refine", "lora/refinement_lora.safetensors", "refinement")])
def test_run_reads_no_hub_lora_linked_out_of_the_checkpoint_or_missing(capsys, ckpt, tmp_path,
                                                                      no_weights, option, rel,
                                                                      name):
    """--distill read a cfg_step_lora.safetensors linked out of the checkpoint (verify refuses
    it), and a missing one was found only after loading."""
    path = ckpt / rel
    outside = tmp_path / path.name
    path.rename(outside)
    run = ("run", "-q", "-m", ckpt, "-p", "a cat", option, "--height", "32", "--width", "32",
           "--frames", "9", "--out", tmp_path / "x.mp4")
    try:
        fast_refusal(capsys, *run, says=f"no '{name}' LoRA")
        path.symlink_to(outside)
        fast_refusal(capsys, *run, says=f"{path}: resolves to {outside}, outside the checkpoint")
    finally:
        path.unlink(missing_ok=True)
        outside.rename(path)


def test_run_reads_the_hub_lora_header_before_loading(capsys, ckpt, tmp_path, no_weights):
    """A truncated refinement LoRA was found after the whole first stage."""
    path = ckpt / "lora" / "refinement_lora.safetensors"
    original = path.read_bytes()
    path.write_bytes(original[:100])
    try:
        fast_refusal(capsys, "run", "-q", "-m", ckpt, "-p", "a cat", "--refine", "--height", "32",
                     "--width", "32", "--frames", "9", "--refine-height", "64", "--refine-width",
                     "64", "--out", tmp_path / "x.mp4", says="runs past the end of the file")
    finally:
        path.write_bytes(original)


BAD_BSA_CONFIGS = [
    ("sparsity-2", {"enable_bsa": True, "bsa_params": {
        "sparsity": 2, "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 4]}},
     "bsa_params/sparsity"),
    ("chunk-0", {"enable_bsa": True, "bsa_params": {
        "sparsity": 0.9, "chunk_3d_shape_q": [0, 4, 4], "chunk_3d_shape_k": [4, 4, 4]}},
     "bsa_params/chunk_3d_shape_q"),
    ("chunk-huge", {"enable_bsa": True, "bsa_params": {
        "sparsity": 0.9, "chunk_3d_shape_q": [10**30, 4, 4], "chunk_3d_shape_k": [4, 4, 4]}},
     "at most 128"),
    ("chunk-256-off", {"enable_bsa": False, "bsa_params": {
        "sparsity": 0.9, "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 8, 8]}},
     "at most 128"),
    ("params-list-off", {"enable_bsa": False, "bsa_params": [1]}, "bsa_params"),
    ("enable-1", {"enable_bsa": 1}, "enable_bsa"),
    ("enabled-null", {"enable_bsa": True, "bsa_params": None}, "bsa_params is null"),
]


@pytest.mark.parametrize("case,fields,says", BAD_BSA_CONFIGS, ids=[c[0] for c in BAD_BSA_CONFIGS])
def test_run_and_verify_refuse_bsa_params_the_kernels_cannot_take(capsys, ckpt, dit_config,
                                                                  tmp_path, case, fields, says):
    """A run read these only when its first attention call started (an internal error after
    the weights loaded); now both readers refuse them with one line naming the file."""
    dit_config(**fields)
    line = fast_refusal(capsys, "run", "-q", "-m", ckpt, "-p", "a cat", "--height", "32",
                        "--width", "32", "--frames", "9", "--out", tmp_path / "x.mp4", says=says)
    assert "dit/config.json" in line
    from longcat_tools.cli import main

    assert main(["verify", str(ckpt), "-q"]) == 1
    out = capsys.readouterr()
    assert says in out.out + out.err


@pytest.mark.parametrize("option,rel", [("--out", "dit/x.mp4"), ("--out", "x.mp4"),
                                        ("--save-latents", "dit/x.safetensors")])
def test_run_writes_nothing_into_the_checkpoint(capsys, ckpt, tmp_path, option, rel):
    """A stray shard in dit/ breaks every later run on the checkpoint."""
    out = ["--out", tmp_path / "ok.mp4"] if option != "--out" else []
    fast_refusal(capsys, "run", "-q", "-m", ckpt, "-p", "a cat", "--height", "32", "--width",
                 "32", "--frames", "9", *out, option, ckpt / rel, code=2,
                 says="inside the checkpoint")
    assert not (ckpt / rel).exists()


def test_run_writes_nothing_into_another_checkpoint(capsys, ckpt, tmp_path):
    other = tmp_path / "other"
    (other / "dit").mkdir(parents=True)
    (other / "dit" / "config.json").write_text("{}")
    fast_refusal(capsys, "run", "-q", "-m", ckpt, "-p", "a cat", "--height", "32", "--width",
                 "32", "--frames", "9", "--out", other / "dit" / "x.mp4", code=2,
                 says=f"inside the checkpoint {other}")
    assert [p.name for p in (other / "dit").iterdir()] == ["config.json"]
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    fast_refusal(capsys, "run", "-q", "-m", ckpt, "-p", "a cat", "--height", "32", "--width",
                 "32", "--frames", "9", "--out", loop / "x.mp4", says="cannot be resolved")


def test_run_writes_latents_only_as_safetensors(capsys, ckpt, tmp_path):
    video = tmp_path / "earlier.mp4"
    video.write_bytes(b"not really a video")
    fast_refusal(capsys, "run", "-q", "-m", ckpt, "-p", "a cat", "--height", "32", "--width",
                 "32", "--frames", "9", "--out", tmp_path / "x.mp4", "--save-latents", video,
                 code=2, says="written as a .safetensors file")
    assert video.read_bytes() == b"not really a video"


def test_a_matrix_run_writes_nothing_into_the_checkpoint(capsys, ckpt):
    fast_refusal(capsys, "run", "-q", "-m", ckpt, "-p", "a cat", "--height", "32", "--width",
                 "32", "--frames", "9", "--out-dir", ckpt, "--seeds", "1,2", code=2,
                 says="inside the checkpoint")
    assert not (ckpt / "manifest.json").exists()


def test_a_failed_publish_leaves_no_mp4_without_sidecar(tmp_path, monkeypatch):
    """The sidecar is renamed into place before the mp4, with the mp4's mode."""
    import os

    import numpy as np

    from longcat_tools.runner import video as vio

    out = tmp_path / "v.mp4"
    frames = np.zeros((1, 16, 16, 3), np.uint8)
    staged = vio.encode_mp4(out, frames, 15)
    os.chmod(staged, 0o640)
    vio.publish(staged, out, "{}\n")
    assert out.is_file() and (tmp_path / "v.mp4.json").read_text() == "{}\n"
    assert (out.stat().st_mode & 0o777) == ((tmp_path / "v.mp4.json").stat().st_mode & 0o777)
    assert (out.stat().st_mode & 0o777) == 0o640

    out2 = tmp_path / "w.mp4"
    staged = vio.encode_mp4(out2, frames, 15)
    real_replace = os.replace

    def failing(src, dst):
        if str(dst).endswith(".json"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(vio.os, "replace", failing)
    with pytest.raises(OSError):
        vio.publish(staged, out2, "{}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4", "v.mp4.json"]


# --- class 4: schema names are names, not paths ----------------------------------------------

@pytest.mark.parametrize("name", ["../../x", "../schemas/transformer_config", "/etc/passwd",
                                  "transformer_config/../vae_config", "sub/vae_config", "nope",
                                  "../../pyproject", "hub_manifest.schema", ""])
def test_schema_reads_nothing_outside_its_folder(capsys, name):
    fast_refusal(capsys, "schema", name, code=2, says="unknown schema")


def test_components_are_read_once_while_unchanged(ckpt, monkeypatch):
    """run checks them before loading and from_pretrained again: the tokenizer's JSON (16 MB
    in the release) is parsed once, and again only after a file changed."""
    from longcat_tools.checkpoint import layouts
    from longcat_tools.io import jsonio
    from longcat_tools.verify import components

    monkeypatch.setattr(components, "_PASSED", set())
    reads: list[str] = []
    real = jsonio.read
    monkeypatch.setattr(jsonio, "read", lambda path, **kw: reads.append(str(path)) or
                        real(path, **kw))
    view = layouts.detect(ckpt)
    tokenizer = str(ckpt / "tokenizer" / "tokenizer.json")
    components.check_components(view)
    components.check_components(view)
    assert reads.count(tokenizer) == 1
    path = ckpt / "vae" / "config.json"
    original = path.read_text()
    try:
        path.write_text(original + " ")
        components.check_components(view)
        assert reads.count(tokenizer) == 2
        path.write_text("[1]")
        with pytest.raises(LongcatError, match="vae/config.json"):
            components.check_components(view)
    finally:
        path.write_text(original)


@pytest.mark.parametrize("name", ["../../outside.safetensors", "gone.safetensors"])
def test_a_component_index_naming_a_shard_outside_or_missing_is_refused(capsys, ckpt, tmp_path,
                                                                       no_weights, name):
    """convert carried such a text encoder index as it was (rc 0), and run failed on it after
    loading the DiT: "internal error: ValueError: The checkpoint index ... points outside"."""
    index = ckpt / "text_encoder" / "model.safetensors.index.json"
    original = index.read_text()
    doc = json.loads(original)
    first = next(iter(doc["weight_map"]))
    doc["weight_map"][first] = name
    index.write_text(json.dumps(doc))
    says = "leaves the checkpoint folder" if ".." in name else f"names shard '{name}', which"
    try:
        fast_refusal(capsys, "run", "-q", "-m", ckpt, "-p", "a cat", "--height", "32", "--width",
                     "32", "--frames", "9", "--out", tmp_path / "x.mp4", says=says)
        fast_refusal(capsys, "convert", "--src", ckpt, "--dst", tmp_path / "c", "-q", says=says)
        assert not (tmp_path / "c").exists()
    finally:
        index.write_text(original)
