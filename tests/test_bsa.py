"""`bsa`: presets as data, safe writes on every layout, concurrency, status and check arithmetic."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from longcat_tools import bsa, schemas
from longcat_tools.checkpoint import layouts
from longcat_tools.cli import main
from longcat_tools.errors import LongcatError
from longcat_tools.model import bsa_presets, chunks
from longcat_tools.synth import dit_config

ENV = dict(os.environ)  # subprocesses use the installed package, as a user runs it

# The preset table as README.md documents it, typed out again so the module's table is checked
# against the documented values rather than against itself.
Q4 = [4, 4, 4]
TABLE = {
    "480p": (False, None),
    "720p-balanced": (True, {"sparsity": 0.9375, "cdf_threshold": None,
                             "chunk_3d_shape_q": Q4, "chunk_3d_shape_k": Q4}),
    "720p-quality": (True, {"sparsity": 0.875, "cdf_threshold": None,
                            "chunk_3d_shape_q": Q4, "chunk_3d_shape_k": Q4}),
    "720p-fast": (True, {"sparsity": 0.96875, "cdf_threshold": None,
                         "chunk_3d_shape_q": Q4, "chunk_3d_shape_k": Q4}),
    "720p-adaptive": (True, {"sparsity": 0.875, "cdf_threshold": 0.98,
                             "chunk_3d_shape_q": Q4, "chunk_3d_shape_k": Q4}),
    "long-video": (True, {"sparsity": 0.9375, "cdf_threshold": None,
                          "chunk_3d_shape_q": [8, 4, 4], "chunk_3d_shape_k": [8, 4, 4]}),
    # FastVideo's deleted manage_bsa.py
    "480p-bsa": (True, {"sparsity": 0.9375, "cdf_threshold": None,
                        "chunk_3d_shape_q": Q4, "chunk_3d_shape_k": Q4}),
    "704p-balanced": (True, {"sparsity": 0.9375, "cdf_threshold": None,
                             "chunk_3d_shape_q": Q4, "chunk_3d_shape_k": Q4}),
    "704p-quality": (True, {"sparsity": 0.875, "cdf_threshold": None,
                            "chunk_3d_shape_q": Q4, "chunk_3d_shape_k": Q4}),
    "704p-fast": (True, {"sparsity": 0.96875, "cdf_threshold": None,
                         "chunk_3d_shape_q": Q4, "chunk_3d_shape_k": Q4}),
    "768p-balanced": (True, {"sparsity": 0.9375, "cdf_threshold": None,
                             "chunk_3d_shape_q": Q4, "chunk_3d_shape_k": Q4}),
}
EXAMPLES = {"480p": "config_480p_no_bsa.json", "720p-balanced": "config_720p_balanced.json",
            "720p-quality": "config_720p_quality.json", "720p-fast": "config_720p_fast.json",
            "720p-adaptive": "config_720p_adaptive.json", "long-video": "config_long_video.json"}


def write_json(path: Path, obj, indent=2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=indent) + "\n")


def fastvideo_config() -> dict:
    """The real config as FastVideo's converter leaves it: num_heads renamed, class name last."""
    cfg = {k: v for k, v in dit_config("real").items()
           if k not in ("_class_name", "_diffusers_version", "num_heads")}
    return {**cfg, "num_attention_heads": 32, "_class_name": "LongCatTransformer3DModel",
            "_diffusers_version": "0.32.0"}


def make_layout(root: Path, layout: str) -> Path:
    """A checkpoint with only what layout detection and `bsa` read: real-model configs, no
    weights."""
    if layout == "native":
        write_json(root / "dit" / "config.json", dit_config("real"))
        write_json(root / "model_index.json", {"model_name": "LongCat-Video"})
        return root
    write_json(root / "model_index.json", {"_class_name": "LongCatPipeline"})
    t = root / "transformer"
    if layout == "converted-native":
        write_json(t / "config.json", dit_config("real"))
    else:
        write_json(t / "config.json", fastvideo_config())
    if layout == "fastvideo-single":
        (t / "model.safetensors").touch()
    else:
        write_json(t / layouts.INDEX_NAME, {"weight_map": {}})
    return root


LAYOUTS = {"native": ("native", "native"), "converted": ("converted", "fastvideo"),
           "converted-native": ("converted", "native"),
           "fastvideo-single": ("fastvideo-single", "fastvideo")}


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return make_layout(tmp_path / "ckpt", "native")


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "longcat_tools", *args], capture_output=True,
                          text=True, cwd=cwd, env=ENV)


def config_of(root: Path) -> Path:
    return layouts.detect(root).config_path


# --------------------------------------------------------------------------- presets as data


def test_preset_table_is_spec_table():
    assert {n: (p.enable_bsa, p.params) for n, p in bsa_presets.PRESETS.items()} == TABLE
    assert bsa_presets.DEFAULT_ENABLE == "720p-balanced"
    assert {p.name: p.example for p in bsa_presets.examples()} == EXAMPLES
    assert bsa_presets.PRESETS["720p-adaptive"].keeps == "max(12.5%, CDF 0.98)"
    assert bsa_presets.PRESETS["480p"].keeps == "all (dense)"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_preset_on_every_layout_writes_exactly_the_spec_values(tmp_path, layout):
    root = make_layout(tmp_path / layout, layout)
    ck = layouts.detect(root)
    assert (ck.layout, ck.flavour) == LAYOUTS[layout]
    original = json.loads(ck.config_path.read_text())
    for name, (enabled, params) in TABLE.items():
        before = ck.config_path.read_text()
        u = bsa.update(ck, lambda c, s, n=name: bsa.with_preset(c, n, s))
        text = ck.config_path.read_text()
        cfg = json.loads(text)
        assert cfg["enable_bsa"] is enabled and cfg["bsa_params"] == params, (layout, name)
        assert schemas.errors(cfg, "transformer_config") == []
        # every other field and the key order are kept; the file keeps its style
        assert list(cfg) == list(original)
        assert {k: v for k, v in cfg.items() if k not in ("enable_bsa", "bsa_params")} == \
            {k: v for k, v in original.items() if k not in ("enable_bsa", "bsa_params")}
        assert text.endswith("}\n") and text.startswith('{\n  "')
        if u.written:
            assert bsa.backup_path(ck.config_path).read_text() == before
    assert not list(ck.transformer_dir.glob("*.lock")) and not list(ck.transformer_dir.glob(".*"))


def test_examples_equal_the_generated_configs():
    folder = schemas.data_dir("examples") / bsa_presets.EXAMPLES_FOLDER
    from longcat_tools.bsa.examples import example_files

    generated = example_files()
    assert sorted(p.name for p in folder.iterdir()) == sorted(generated)
    for name, text in generated.items():
        assert (folder / name).read_text() == text, f"{name} is stale: regenerate it"
    base = dit_config("real")
    for preset, fname in EXAMPLES.items():
        cfg = json.loads(generated[fname])
        enabled, params = TABLE[preset]
        assert (cfg["enable_bsa"], cfg["bsa_params"]) == (enabled, params)
        assert {k: v for k, v in cfg.items() if k not in ("enable_bsa", "bsa_params")} == \
            {k: v for k, v in base.items() if k not in ("enable_bsa", "bsa_params")}
        assert list(cfg) == sorted(cfg)


def test_examples_command_rewrites_the_folder(tmp_path, capsys):
    from longcat_tools.bsa import examples

    assert examples._main(["--write", str(tmp_path / "out")]) == 0
    folder = schemas.data_dir("examples") / bsa_presets.EXAMPLES_FOLDER
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted(p.name for p in folder.iterdir())
    for name in written:
        assert (tmp_path / "out" / name).read_text() == (folder / name).read_text()
    assert capsys.readouterr().out.count("\n") == len(written)


def test_preset_works_from_inside_a_checkpoint_folder(ckpt):
    p = cli("bsa", "preset", "720p-balanced", cwd=ckpt)
    assert p.returncode == 0, p.stderr
    cfg = json.loads((ckpt / "dit" / "config.json").read_text())
    assert (cfg["enable_bsa"], cfg["bsa_params"]) == TABLE["720p-balanced"]
    assert "BSA (sparsity 0.9375" in p.stdout and "config.json.bak" in p.stdout


# --------------------------------------------------------------------------- concurrency


def test_20_concurrent_writers_leave_one_requested_state(ckpt):
    path = ckpt / "dit" / "config.json"
    original = path.read_text()
    names = ["720p-quality", "long-video", "480p", "720p-adaptive", "720p-fast"]
    jobs, states = [], []
    for i in range(20):
        if i % 2:
            name = names[i // 2 % len(names)]
            jobs.append(["bsa", "preset", name])
            states.append(TABLE[name])
        else:
            s, c = (0.5 + i / 100, 0.9 + i / 1000)
            chunk = [1 + i % 3, 2, 4]
            jobs.append(["bsa", "enable", "--sparsity", str(s), "--cdf-threshold", str(c),
                         "--chunk-q", ",".join(map(str, chunk))])
            states.append((True, {"sparsity": s, "cdf_threshold": c, "chunk_3d_shape_q": chunk,
                                  "chunk_3d_shape_k": chunk}))
    procs = [subprocess.Popen([sys.executable, "-m", "longcat_tools", *a, "-m", str(ckpt), "-q"],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for a in jobs]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    orig = json.loads(original)
    states_sorted = [(e, dict(sorted(p.items())) if p else p) for e, p in states]
    for f in (path, bsa.backup_path(path)):
        cfg = json.loads(f.read_text())
        assert schemas.errors(cfg, "transformer_config") == []
        assert list(cfg) == list(orig)
        assert {k: v for k, v in cfg.items() if k not in ("enable_bsa", "bsa_params")} == \
            {k: v for k, v in orig.items() if k not in ("enable_bsa", "bsa_params")}
        state = (cfg["enable_bsa"], cfg["bsa_params"])
        assert state in states_sorted or f.read_text() == original
    assert (json.loads(path.read_text())["enable_bsa"],
            json.loads(path.read_text())["bsa_params"]) in states_sorted
    assert sorted(p.name for p in path.parent.iterdir() if "config" in p.name) == \
        ["config.json", "config.json.bak"]


def test_lock_excludes_a_second_writer(ckpt):
    path = ckpt / "dit" / "config.json"
    with bsa.config_lock(path):
        assert path.with_name("config.json.lock").exists()
        with pytest.raises(LongcatError, match="held the lock"):
            with bsa.config_lock(path, timeout=0.1):
                pass
        done = []
        t = threading.Thread(target=lambda: done.append(
            bsa.update(layouts.detect(ckpt), lambda c, s: bsa.with_preset(c, "720p-fast", s))))
        t.start()
        t.join(0.3)
        assert t.is_alive() and not done  # the writer waits for the lock
    t.join(10)
    assert done and json.loads(path.read_text())["bsa_params"]["sparsity"] == 0.96875
    assert not path.with_name("config.json.lock").exists()
    stale = path.with_name(".config.json.k1ll3d.tmp")  # left by a writer killed mid-write
    stale.write_text("{")
    bsa.update(layouts.detect(ckpt), bsa.with_disabled)
    assert not stale.exists()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("args, message, code", [
    (["enable", "--sparsity", "1.5"], "--sparsity 1.5: out of range", 2),
    (["enable", "--sparsity", "0"], "--sparsity 0: out of range", 2),
    (["enable", "--cdf-threshold", "1.2"], "--cdf-threshold 1.2: out of range (0 < x <= 1); e.g. "
                                           "0.9 keeps key chunks", 2),
    (["enable", "--sparsity", "abc"], "not a number", 2),
    (["enable", "--chunk-q", "0,4,4"], "--chunk-q 0,4,4: expected three positive integers", 2),
    (["enable", "--chunk-k", "4,4"], "--chunk-k 4,4: expected three positive integers", 2),
    (["enable", "--sparsity", "none", "--cdf-threshold", "none"], "cannot both be none", 2),
    (["preset", "720p-turbo"], "unknown preset '720p-turbo'", 2),
    (["restore"], "no backup to restore", 1),
])
def test_bad_values_are_one_line_and_leave_the_file_alone(ckpt, capsys, args, message, code):
    """An option's value is exit 2, as in every command (it was 1 here); a missing backup 1."""
    path = ckpt / "dit" / "config.json"
    before, mtime = path.read_bytes(), path.stat().st_mtime_ns
    assert main(["bsa", *args, "-m", str(ckpt)]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.json"]


def test_read_only_config_is_refused(ckpt, capsys):
    path = ckpt / "dit" / "config.json"
    before = path.read_bytes()
    path.chmod(0o444)
    try:
        for args in (["preset", "720p-fast"], ["enable"], ["disable"]):
            assert main(["bsa", *args, "-m", str(ckpt)]) == 1
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "read-only (mode 0444)" in err[0] and str(path) in err[0]
        assert path.read_bytes() == before
        assert sorted(p.name for p in path.parent.iterdir()) == ["config.json"]
        assert main(["bsa", "preset", "720p-fast", "--dry-run", "-m", str(ckpt)]) == 0
    finally:
        path.chmod(0o644)


def test_missing_and_broken_config(ckpt, capsys):
    path = ckpt / "dit" / "config.json"
    path.unlink()
    assert main(["bsa", "preset", "720p-fast", "-m", str(ckpt)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path}: missing" in err[0]
    assert not path.exists() and list(path.parent.iterdir()) == []
    path.write_text('{"enable_bsa": true, "enable_bsa": false}')
    assert main(["bsa", "status", "-m", str(ckpt)]) == 1
    assert "appears twice" in capsys.readouterr().err
    assert main(["bsa", "status", "-m", str(ckpt / "nope")]) == 2  # names nothing: usage
    assert "no such folder (pass a checkpoint folder)" in capsys.readouterr().err


def test_a_change_that_breaks_the_schema_is_not_written(ckpt, capsys):
    path = ckpt / "dit" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["depth"] = 0  # hand-broken elsewhere: bsa must not write a config that fails the schema
    write_json(path, cfg)
    before = path.read_bytes()
    assert main(["bsa", "preset", "720p-fast", "-m", str(ckpt)]) == 1
    err = capsys.readouterr().err
    assert "depth" in err and "[schema transformer_config]" in err
    assert path.read_bytes() == before


# --------------------------------------------------------------------------- semantics


def test_disable_keeps_params_and_enable_brings_them_back(ckpt):
    ck = layouts.detect(ckpt)
    state = lambda: (lambda c: (c["enable_bsa"], c["bsa_params"]))(bsa.read_config(ck))  # noqa: E731
    assert main(["bsa", "preset", "long-video", "-m", str(ckpt), "-q"]) == 0
    long_video = state()
    assert main(["bsa", "disable", "-m", str(ckpt), "-q"]) == 0
    assert state() == (False, long_video[1])
    assert main(["bsa", "enable", "-m", str(ckpt), "-q"]) == 0
    assert state() == long_video
    # options replace only what they name; --chunk-k follows --chunk-q
    assert main(["bsa", "enable", "--sparsity", "0.875", "-m", str(ckpt), "-q"]) == 0
    assert state()[1]["chunk_3d_shape_q"] == [8, 4, 4] and state()[1]["sparsity"] == 0.875
    assert main(["bsa", "enable", "--chunk-q", "4x4x8", "-m", str(ckpt), "-q"]) == 0
    assert state()[1]["chunk_3d_shape_k"] == [4, 4, 8]
    assert main(["bsa", "enable", "--sparsity", "none", "--cdf-threshold", "0.9", "-m",
                 str(ckpt), "-q"]) == 0
    assert state()[1]["sparsity"] is None and state()[1]["cdf_threshold"] == 0.9
    # 480p drops the params: a bare enable then writes 720p-balanced
    assert main(["bsa", "preset", "480p", "-m", str(ckpt), "-q"]) == 0
    assert state() == (False, None)
    assert main(["bsa", "enable", "-m", str(ckpt), "-q"]) == 0
    assert state() == TABLE["720p-balanced"]


def test_enable_says_when_it_replaces_invalid_params(ckpt, capsys):
    path = ckpt / "dit" / "config.json"
    cfg = json.loads(path.read_text())
    write_json(path, {**cfg, "bsa_params": {**TABLE["720p-fast"][1], "sparsity": 7}})
    assert main(["bsa", "enable", "-m", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "bsa_params was invalid (bsa_params/sparsity" in out
    assert "replaced by 720p-balanced's" in out
    assert json.loads(path.read_text())["bsa_params"] == TABLE["720p-balanced"][1]
    write_json(path, {**cfg, "bsa_params": "x"})  # the schema's word was "not of type 'null'"
    assert main(["bsa", "enable", "-m", str(ckpt)]) == 0
    assert "bsa_params was invalid (not an object)" in capsys.readouterr().out


def test_invalid_params_match_no_preset_and_disable_still_turns_bsa_off(ckpt, capsys):
    """status named 720p-balanced for a chunk of 4.0 it called invalid; disable failed the
    schema on the params it kept, with no way out named."""
    path = ckpt / "dit" / "config.json"
    cfg = json.loads(path.read_text())
    params = {**TABLE["720p-balanced"][1], "chunk_3d_shape_q": [4.0, 4, 4]}
    write_json(path, {**cfg, "enable_bsa": True, "bsa_params": params})
    assert main(["bsa", "status", "-m", str(ckpt), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["preset"] is None
    assert main(["bsa", "disable", "-m", str(ckpt)]) == 0
    assert "bsa_params was invalid" in capsys.readouterr().out
    new = json.loads(path.read_text())
    assert new["enable_bsa"] is False and new["bsa_params"] is None
    assert json.loads((path.parent / "config.json.bak").read_text())["bsa_params"] == params


def test_enable_on_the_hub_config_only_flips_the_switch(ckpt):
    path = ckpt / "dit" / "config.json"
    before = path.read_text()
    u = bsa.update(layouts.detect(ckpt), bsa.with_enabled)
    assert u.diff().count("\n-") == 1 and '-  "enable_bsa": false' in u.diff()
    assert path.read_text() == before.replace('"enable_bsa": false', '"enable_bsa": true')


def test_dry_run_prints_the_diff_and_writes_nothing(ckpt, capsys):
    path = ckpt / "dit" / "config.json"
    before = path.read_bytes()
    assert main(["bsa", "preset", "720p-adaptive", "--dry-run", "-m", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert '+    "cdf_threshold": 0.98,' in out and '-  "enable_bsa": false,' in out
    assert "nothing written" in out
    assert path.read_bytes() == before and sorted(os.listdir(path.parent)) == ["config.json"]


def test_backup_restore_swap_and_no_backup(ckpt, capsys):
    path = ckpt / "dit" / "config.json"
    bak = bsa.backup_path(path)
    original = path.read_text()
    assert main(["bsa", "preset", "720p-fast", "--no-backup", "-m", str(ckpt), "-q"]) == 0
    assert not bak.exists()
    fast = path.read_text()
    assert main(["bsa", "preset", "720p-quality", "-m", str(ckpt), "-q"]) == 0
    quality = path.read_text()
    assert bak.read_text() == fast
    # an unchanged config is not rewritten and keeps its backup
    assert main(["bsa", "preset", "720p-quality", "-m", str(ckpt), "-q"]) == 0
    assert bak.read_text() == fast
    assert main(["bsa", "restore", "--json", "-m", str(ckpt)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["written"] and path.read_text() == fast and bak.read_text() == quality
    assert main(["bsa", "restore", "-m", str(ckpt), "-q"]) == 0
    assert path.read_text() == quality and bak.read_text() == fast
    path.unlink()  # restore also rescues a deleted config
    assert main(["bsa", "restore", "-m", str(ckpt), "-q"]) == 0
    assert path.read_text() == fast and oct(path.stat().st_mode & 0o777) == oct(
        bak.stat().st_mode & 0o777)
    assert original != fast
    # a backup sized for other weights: restored with exit 0, and verify failed the checkpoint
    other = json.loads(fast)
    other["hidden_size"] *= 2
    bak.write_text(json.dumps(other))
    assert main(["bsa", "restore", "-m", str(ckpt)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "its hidden_size is" in line and "not restored" in line and path.read_text() == fast
    bak.write_text("{not json")  # it told the user to run bsa restore, the failing command
    assert main(["bsa", "restore", "-m", str(ckpt)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "the backup is damaged; fix or delete it" in line and "bsa restore`" not in line
    bak.unlink()
    bak.mkdir()  # enable failed renaming onto it, as an internal error
    assert main(["bsa", "enable", "-m", str(ckpt), "--sparsity", "0.5"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "the backup is not a regular file (a folder)" in line and path.read_text() == fast


@pytest.mark.parametrize("indent, newline", [(None, "\n"), (4, "\n"), ("\t", "\n"),
                                             (2, "\r\n")])
def test_the_file_keeps_its_style(tmp_path, indent, newline):
    root = make_layout(tmp_path / "c", "converted")
    path = root / "transformer" / "config.json"
    # FastVideo's dev config: unsorted keys, params in the order sparsity, q, k
    cfg = dict(fastvideo_config(), bsa_params={"sparsity": 0.9375, "chunk_3d_shape_q": Q4,
                                               "chunk_3d_shape_k": Q4})
    text = json.dumps(cfg, indent=indent)  # no trailing newline this time
    path.write_bytes(text.replace("\n", newline).encode())  # CRLF: a Windows editor's
    u = bsa.update(layouts.detect(root), lambda c, s: bsa.with_preset(c, "720p-adaptive", s))
    assert "\r" not in u.diff() and '"enable_bsa": true' in u.diff()
    new = path.read_bytes().decode()
    params = {"sparsity": 0.875, "chunk_3d_shape_q": Q4, "chunk_3d_shape_k": Q4,
              "cdf_threshold": 0.98}  # the file's order kept, the new key appended
    assert new == json.dumps(dict(cfg, enable_bsa=True, bsa_params=params),
                             indent=indent).replace("\n", newline)


def test_symlinked_config_is_replaced_not_followed(ckpt):
    """A config linked to a file of the checkpoint (as a cache links it to a blob) is read, then
    replaced: the file it led to stays as it was."""
    blob = ckpt / "blob.json"
    path = ckpt / "dit" / "config.json"
    shutil.move(path, blob)
    path.symlink_to(blob)
    before = blob.read_text()
    assert main(["bsa", "preset", "720p-fast", "-m", str(ckpt), "-q"]) == 0
    assert blob.read_text() == before and not path.is_symlink()
    assert json.loads(path.read_text())["bsa_params"]["sparsity"] == 0.96875


@pytest.mark.parametrize("args", [["status"], ["preset", "720p-fast"], ["enable"],
                                  ["enable", "--dry-run"]])
def test_a_config_linked_out_of_the_checkpoint_is_not_read(ckpt, tmp_path, capsys, args):
    outside = tmp_path / "outside.json"
    path = ckpt / "dit" / "config.json"
    shutil.move(path, outside)
    path.symlink_to(outside)
    before = outside.read_text()
    assert main(["bsa", *args, "-m", str(ckpt)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "outside the checkpoint" in err[0]
    assert outside.read_text() == before and path.is_symlink()


@pytest.mark.parametrize("chunk", ["4,4,16", "99999999999999999999999,4,4"])
def test_a_chunk_larger_than_the_kernels_take_is_refused(ckpt, capsys, chunk):
    path = ckpt / "dit" / "config.json"
    before = path.read_text()
    assert main(["bsa", "enable", "-m", str(ckpt), "--chunk-q", chunk]) == 2
    assert "at most 128" in capsys.readouterr().err
    assert path.read_text() == before


# --------------------------------------------------------------------------- status


def test_status_reports_path_and_warnings(ckpt, capsys):
    path = ckpt / "dit" / "config.json"
    assert main(["bsa", "status", "--json", "-m", str(ckpt)]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["layout"] == "native" and st["enable_bsa"] is False and st["attention"] == \
        "dense attention"
    assert st["preset"] is None and "720p-balanced" in st["params_match"]
    assert any("enable_flashattn2" in n for n in st["notes"]) and st["warnings"] == []

    cfg = json.loads(path.read_text())
    for params, enabled, warn in [
        (None, True, "bsa_params is null"),
        ({**TABLE["720p-fast"][1], "sparsity": 1.5}, True, "bsa_params is invalid"),
        ({**TABLE["720p-fast"][1], "extra": 1}, False, "bsa_params is invalid"),
    ]:
        write_json(path, {**cfg, "enable_bsa": enabled, "bsa_params": params})
        st = bsa.status(layouts.detect(ckpt))
        assert any(warn in w for w in st["warnings"]), st["warnings"]
        assert main(["bsa", "status", "-m", str(ckpt)]) == 0
        err = capsys.readouterr().err
        assert err.startswith("warning: ") and warn in err
    write_json(path, {**cfg, "enable_bsa": True, "bsa_params": TABLE["720p-quality"][1]})
    st = bsa.status(layouts.detect(ckpt))
    assert st["preset"] == "720p-quality" and st["mode"] == "top-k" and st["warnings"] == []
    assert st["attention"].startswith("BSA (sparsity 0.875 (keeps 12.5% of key chunks)")
    assert st["attention"].endswith("more than one latent frame; dense attention otherwise")
    write_json(path, {**cfg, "enable_bsa": True,  # ":g" showed it as 1
                      "bsa_params": {**TABLE["720p-quality"][1], "sparsity": 0.99999999}})
    assert "BSA (sparsity 0.99999999 (keeps 1e-06% " in bsa.status(layouts.detect(ckpt))[
        "attention"]
    cdf_only = {**TABLE["720p-quality"][1], "sparsity": None, "cdf_threshold": 0.9}
    write_json(path, {**cfg, "enable_bsa": True, "bsa_params": cdf_only})
    st = bsa.status(layouts.detect(ckpt))
    assert st["mode"] == "cdf" and any("cdf-only mode" in n for n in st["notes"])
    write_json(path, {**cfg, "enable_bsa": False, "bsa_params": None})
    st = bsa.status(layouts.detect(ckpt))
    assert st["preset"] == "480p" and st["attention"] == "dense attention"


def test_presets_command_lists_every_preset(capsys):
    assert main(["bsa", "presets", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in doc["presets"]] == list(TABLE)
    by = {p["name"]: p for p in doc["presets"]}
    assert by["720p-balanced"]["default_for_enable"] and by["720p-fast"]["keeps"] == "3.125%"
    assert Path(by["long-video"]["example"]).name == "config_long_video.json"
    assert by["704p-fast"]["example"] is None and "FastVideo" in by["704p-fast"]["origin"]


def test_demo_step_applies_a_preset_shows_status_and_restores(tiny_native, tmp_path):
    from longcat_tools.demo import DemoContext, step_bsa

    root = tmp_path / "tiny"
    shutil.copytree(tiny_native, root)
    before = (root / "dit" / "config.json").read_bytes()
    said: list[str] = []
    ctx = DemoContext(tmp_path, said.append, {"native": root})
    assert "720p-balanced" in step_bsa(ctx)
    assert any("BSA (sparsity 0.9375" in s for s in said)
    assert (root / "dit" / "config.json").read_bytes() == before
    assert sorted(os.listdir(root / "dit"))[0] == "config.json" and not list(
        (root / "dit").glob("config.json.*"))


# --------------------------------------------------------------------------- check


BALANCED = TABLE["720p-balanced"][1]


def test_check_arithmetic_480p_and_720p():
    r = bsa.check(480, 832, 93, BALANCED)
    assert r["latent"] == [24, 60, 104] and r["token_grid"] == [24, 30, 52]
    assert r["tokens"] == 37_440 and r["q"]["counts"] == [6, 8, 13]
    assert r["q"]["divides"] == [True, False, True] and r["q"]["edge"] == [0, 2, 0]
    assert not r["original_kernel_ok"] and any("edge chunks" in n for n in r["notes"])
    assert r["kept_per_query"] == int(0.0625 * 624) == 39

    r = bsa.check(704, 1280, 93, BALANCED)
    assert r["token_grid"] == [24, 44, 80] and r["tokens"] == 84_480
    assert r["q"]["chunks"] == r["k"]["chunks"] == 1_320 and r["original_kernel_ok"]
    assert r["kept_per_query"] == 82
    assert r["flops"]["dense_per_block"] == 4 * 84_480**2 * 128 * 32
    assert r["flops"]["kept_per_block"] == round(4 * 84_480**2 * 128 * 32 * 82 / 1320)
    assert r["flops"]["gating_per_block"] == 2 * 1320 * 1320 * 128 * 32

    # the refinement stage of a 93-frame video: 186 frames -> 48 latent frames (padded from 47)
    r = bsa.check(704, 1280, 186, BALANCED, refine=True)
    assert r["token_grid"] == [48, 44, 80] and r["tokens"] == 168_960
    assert r["k"]["chunks"] == 2_640 and r["kept_per_query"] == 165


def test_refinement_pads_latent_frames_to_whole_bsa_chunks():
    # 93 frames refined to 186: ceil(186 / 4) = 47 latent frames, padded to 48
    assert [chunks.refine_latent_frames(n) for n in (1, 4, 5, 47, 48)] == [4, 4, 8, 48, 48]
    assert chunks.latent_frames(186, refine=True)[:2] == (186, 48)
    assert chunks.latent_frames(93) == (93, 24, None)


def test_check_context_parallel_modes_and_limits():
    assert [chunks.optimal_split(n) for n in (1, 2, 4, 8, 6)] == [(1, 1), (1, 2), (2, 2),
                                                                  (2, 4), (2, 3)]
    r = bsa.check(704, 1280, 93, BALANCED, cp=4)
    assert r["rank_grid"] == [24, 22, 40] and r["kernel_grid"] == [96, 22, 40]
    assert r["q"]["divides"] == [True, False, True]
    r = bsa.check(768, 1280, 93, TABLE["long-video"][1], cp=2)
    assert r["kernel_grid"] == [48, 48, 40] and r["original_kernel_ok"]
    r = bsa.check(704, 1280, 93, TABLE["720p-adaptive"][1])
    assert r["mode"] == "max" and r["kept_per_query"] == 165
    r = bsa.check(704, 1280, 93, {**BALANCED, "sparsity": None, "cdf_threshold": 0.9})
    assert r["mode"] == "cdf" and r["kept_per_query"] is None
    assert r["flops"]["kept_per_block"] is None
    r = bsa.check(480, 832, 1, BALANCED)  # dense: its FLOPs said BSA's 6% were computed
    assert not r["bsa_applies"] and r["token_grid"][0] == 1
    assert r["kept_per_query"] == r["k"]["chunks"] and r["kept_fraction"] == 1
    assert r["flops"]["kept_per_block"] == r["flops"]["dense_per_block"]
    assert r["flops"]["gating_per_block"] == 0 and not r["warnings"]
    assert not any("edge chunks" in n for n in r["notes"]) and r["original_kernel_ok"] is None
    r = bsa.check(480, 832, 1, {**BALANCED, "sparsity": 0.9999})  # zero kept, but dense
    assert not r["warnings"] and r["kept_per_query"] == r["k"]["chunks"]
    with pytest.raises(LongcatError, match="--frames 96: must be 4k[+]1"):  # as run says
        bsa.check(704, 1280, 96, BALANCED)
    r = bsa.check(704, 1280, 186, BALANCED, refine=True)  # 2 x 93: a refine output
    assert r["frames_used"] == 186 and r["latent"][0] == 48
    r = bsa.check(256, 256, 9, {**BALANCED, "sparsity": 0.999})
    assert r["kept_per_query"] == 0 and r["warnings"]
    for kwargs, msg in [({"height": 500}, "multiple of 16"), ({"cp": 3}, "heads do not split"),
                        ({"cp": 4, "height": 720}, "does not split over cp_split_hw"),
                        ({"frames": 10**9 + 1}, "must be 1 to 4097"),
                        ({"height": 16 * 10**18}, "at most 16384 px")]:
        args = {"height": 704, "width": 1280, "frames": 93, **kwargs}
        with pytest.raises(LongcatError, match=msg):
            bsa.check(args["height"], args["width"], args["frames"], BALANCED,
                      cp=kwargs.get("cp", 1))
    assert main(["bsa", "check", "--height", "500", "--width", "1280", "--frames", "93"]) == 2


def test_check_command_uses_the_checkpoint_or_the_real_model(tiny_native, tmp_path, capsys,
                                                       monkeypatch):
    assert main(["bsa", "check", "--height", "704", "--width", "1280", "--frames", "93",
                 "--json", "-m", str(tmp_path / "none")]) == 2
    capsys.readouterr()
    monkeypatch.delenv(layouts.ENV_MODEL, raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["bsa", "check", "--height", "704", "--width", "1280", "--frames", "93",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["heads"], r["head_dim"], r["depth"]) == (32, 128, 48)
    assert r["params"] == BALANCED and r["kept_per_query"] == 82
    assert main(["bsa", "check", "--height", "704", "--width", "1280", "--frames", "93",
                 "--preset", "720p-fast", "--chunk-q", "4,4,8", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["params"]["sparsity"] == 0.96875 and r["k"]["chunk"] == [4, 4, 8]
    assert r["kept_per_query"] == int(0.03125 * 660)
    assert main(["bsa", "check", "--height", "480", "--width", "832", "--frames", "93",
                 "-m", str(tiny_native)]) == 0
    out = capsys.readouterr().out
    assert "24x30x52 = 37,440 tokens" in out and "no: edge chunk of 2" in out
    assert "(2 heads x 32)" in out


def test_restore_swaps_in_one_step(ckpt, monkeypatch):
    """Restore wrote the backup, then the config: killed between the two, both held the
    current text and the backup's content was gone for good."""
    from longcat_tools.bsa import config as bsa_config

    path = ckpt / "dit" / "config.json"
    bak = bsa.backup_path(path)
    assert main(["bsa", "preset", "720p-fast", "-m", str(ckpt), "-q"]) == 0
    assert main(["bsa", "preset", "720p-quality", "-m", str(ckpt), "-q"]) == 0
    fast, quality = bak.read_text(), path.read_text()
    writes = []
    real = bsa_config.atomic_write_text

    def killed_on_the_second(p, text):
        writes.append(p)
        if len(writes) == 2:
            raise KeyboardInterrupt
        real(p, text)

    monkeypatch.setattr(bsa_config, "atomic_write_text", killed_on_the_second)
    assert main(["bsa", "restore", "-m", str(ckpt), "-q"]) == 0
    assert path.read_text() == fast and bak.read_text() == quality


def test_an_avatar_dit_folder_linked_under_two_names_is_changed_once(avatar_copy):
    """avatar_multi -> avatar_single: restore swapped the one config twice, so it reported
    success and changed nothing."""
    av = avatar_copy("avatar-1.0")
    shutil.rmtree(av / "avatar_multi")
    (av / "avatar_multi").symlink_to("avatar_single")
    config = av / "avatar_single" / "config.json"
    before = json.loads(config.read_text())["enable_bsa"]
    assert main(["bsa", "preset", "720p-fast", "-m", str(av), "-q"]) == 0
    assert json.loads(config.read_text())["enable_bsa"] is True
    assert main(["bsa", "restore", "-m", str(av), "-q"]) == 0
    assert json.loads(config.read_text())["enable_bsa"] == before
