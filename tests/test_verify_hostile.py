"""The hostile-input corpus: every broken, incomplete or malicious checkpoint fails verify.

Each case damages a fresh copy of the tiny native checkpoint, then runs the real command line
in-process (``main(["verify", ...])``): exit 1, within 5 s, exactly one line on stderr that names
the damaged file and the fault, no traceback and no "unexpected"/"internal" error (every fault
has a deliberate message). A few run as a separate process as well (test_cli_subprocess).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from verify_builders import first_shard, join_file, split_file

from longcat_tools.cli import main
from longcat_tools.io.safetensors import MAX_HEADER_BYTES, read_header
from longcat_tools.verify import verify

INDEX = "dit/diffusion_pytorch_model.safetensors.index.json"
CFG = "dit/config.json"


# --- damage: each takes the checkpoint root and returns the file the report must name -------

def _shard(root: Path) -> Path:
    return first_shard(root)


def truncate(root):
    p = _shard(root)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return p


def under_8_bytes(root):
    p = _shard(root)
    p.write_bytes(b"\x10\x00\x00")
    return p


def header_past_eof(root):
    p = _shard(root)
    raw = p.read_bytes()
    p.write_bytes(struct.pack("<Q", len(raw) + 100) + raw[8:])
    return p


def header_absurd(root):
    p = _shard(root)
    p.write_bytes(struct.pack("<Q", 2**63) + p.read_bytes()[8:])
    return p


def header_not_utf8(root):
    p = _shard(root)
    _, data = split_file(p)
    join_file(p, b"\xff\xfe{not utf8}", data)
    return p


def header_not_json(root):
    p = _shard(root)
    _, data = split_file(p)
    join_file(p, b'{"a": [1, 2', data)
    return p


def header_array(root):
    p = _shard(root)
    _, data = split_file(p)
    join_file(p, b"[1, 2, 3]", data)
    return p


def duplicate_name(root):
    p = _shard(root)
    head, data = split_file(p)
    names = [k for k in head if k != "__metadata__"]
    text = json.dumps(head)
    entry = json.dumps(head[names[0]])
    dup = text.replace(f'"{names[1]}": ', f'"{names[0]}": {entry}, "{names[1]}": ', 1)
    join_file(p, dup.encode(), data)
    return p


def _edit_entry(root, fn):
    p = _shard(root)
    head, data = split_file(p)
    fn(head, [k for k in head if k != "__metadata__"])
    join_file(p, head, data)
    return p


def overlapping(root):
    def f(h, names):
        h[names[1]]["data_offsets"] = [o - 4 for o in h[names[1]]["data_offsets"]]
    return _edit_entry(root, f)


def gap(root):
    def f(h, names):
        a, b = h[names[0]]["data_offsets"]
        h[names[0]]["data_offsets"] = [a, b - 4]
        h[names[0]]["shape"] = [(b - 4 - a) // 4]
    return _edit_entry(root, f)


def offsets_outside(root):
    def f(h, names):
        last = max(names, key=lambda n: h[n]["data_offsets"][1])
        a, b = h[last]["data_offsets"]
        h[last]["data_offsets"] = [a + 10**9, b + 10**9]
    return _edit_entry(root, f)


def unknown_dtype(root):
    return _edit_entry(root, lambda h, n: h[n[0]].update(dtype="F128"))


def shape_bytes(root):
    return _edit_entry(root, lambda h, n: h[n[0]].update(shape=[h[n[0]]["shape"][0], 7]))


def negative_shape(root):
    return _edit_entry(root, lambda h, n: h[n[0]].update(shape=[-1]))


def bad_metadata(root):
    return _edit_entry(root, lambda h, n: h.update(__metadata__={"format": 1}))


def trailing_bytes(root):
    p = _shard(root)
    with open(p, "ab") as f:
        f.write(b"\0" * 16)
    return p


def _edit_json(root, rel, fn):
    p = root / rel
    doc = json.loads(p.read_text())
    fn(doc)
    p.write_text(json.dumps(doc))
    return p


def _remap(root, value):
    def f(doc):
        doc["weight_map"][next(iter(doc["weight_map"]))] = value
    return _edit_json(root, INDEX, f)


def index_dotdot(root):
    return _remap(root, "../config.json")


def index_absolute(root):
    return _remap(root, "/etc/passwd")


def index_pickle(root):
    return _remap(root, "weights.bin")


def symlink_shard_out(root):
    p = _shard(root)
    outside = root.parent / "outside.safetensors"
    shutil.copy(p, outside)
    p.unlink()
    p.symlink_to(outside)
    return p


def symlink_folder_out(root):
    outside = root.parent / "vae-elsewhere"
    shutil.move(root / "vae", outside)
    (root / "vae").symlink_to(outside, target_is_directory=True)
    return root / "vae"


def symlink_loop(root):
    (root / "dit" / "loop.safetensors").symlink_to("loop.safetensors")
    return root / "dit" / "loop.safetensors"


def dangling_link(root):
    (root / "vae" / "notes.json").symlink_to("gone.json")
    return root / "vae" / "notes.json"


def missing_shard(root):
    p = _shard(root)
    p.unlink()
    return root / INDEX


def stray_shard(root):
    p = root / "dit" / "diffusion_pytorch_model-extra.safetensors"
    shutil.copy(_shard(root), p)
    return p


def wrong_total_size(root):
    return _edit_json(root, INDEX, lambda d: d["metadata"].update(total_size=123))


def index_duplicate_key(root):
    p = root / INDEX
    text = p.read_text()
    first = next(iter(json.loads(text)["weight_map"]))
    p.write_text(text.replace(f'"{first}":', f'"{first}": "x.safetensors", "{first}":', 1))
    return p


def index_wrong_shard(root):
    def f(doc):
        wm = doc["weight_map"]
        shards = sorted(set(wm.values()))
        wm[next(iter(wm))] = shards[-1]
    return _edit_json(root, INDEX, f)


def index_omits_tensor(root):
    def f(doc):
        del doc["weight_map"][next(iter(doc["weight_map"]))]
    _edit_json(root, INDEX, f)
    return _shard(root)


def _big_index(root, n, shard):
    p = root / INDEX
    wm = ",".join(f'"{i}":"{shard}"' for i in range(n))
    p.write_text('{"metadata":{"total_size":1},"weight_map":{' + wm + "}}")
    return p


def huge_weight_map(root):
    """1e6 entries naming real shard files: refused by size before any parsing."""
    return _big_index(root, 1_000_000, first_shard(root).name)


def many_entries(root):
    """300k short entries (a 5 MB file that parses): refused by count, before any lookup."""
    return _big_index(root, 300_000, "a")


def cfg_missing_field(root):
    return _edit_json(root, CFG, lambda d: d.pop("hidden_size"))


def cfg_wrong_type(root):
    return _edit_json(root, CFG, lambda d: d.update(depth="2"))


def bsa_sparsity_range(root):
    return _edit_json(root, CFG, lambda d: d["bsa_params"].update(sparsity=1.5))


def bsa_chunk_shape(root):
    return _edit_json(root, CFG, lambda d: d["bsa_params"].update(chunk_3d_shape_q=[0, 4, 4]))


def bsa_enabled_without_params(root):
    return _edit_json(root, CFG, lambda d: d.update(enable_bsa=True, bsa_params=None))


def cfg_depth_mismatch(root):
    _edit_json(root, CFG, lambda d: d.update(depth=3))
    return root / "dit"  # config or weights: the report names the DiT folder


def cfg_hidden_mismatch(root):
    _edit_json(root, CFG, lambda d: d.update(caption_channels=48))
    return root / "dit"


def cfg_nested(root):
    p = root / CFG
    p.write_text("[" * 100_000 + "]" * 100_000)
    return p


def cfg_is_a_folder(root):
    p = root / CFG
    p.unlink()
    p.mkdir()
    return p


def fifo_shard(root):
    p = _shard(root)
    p.unlink()
    os.mkfifo(p)
    return p


def pickle_file(root):
    p = root / "dit" / "pytorch_model.bin"
    p.write_bytes(b"\x80\x04\x95")
    return p


def empty_folder(root):
    shutil.rmtree(root)
    root.mkdir()
    return root


def missing_component(root):
    shutil.rmtree(root / "vae")
    return root / "vae"


def missing_tokenizer_file(root):
    (root / "tokenizer" / "tokenizer.json").unlink()
    return root / "tokenizer"


def te_width_mismatch(root):
    _edit_json(root, "text_encoder/config.json", lambda d: d.update(d_model=48))
    return root / "text_encoder"


def vae_latents_stats(root):
    return _edit_json(root, "vae/config.json", lambda d: d["latents_mean"].pop())


def vae_bad_config(root):
    return _edit_json(root, "vae/config.json", lambda d: d.update(z_dim=0))


def te_float_width(root):  # transformers' strict config: an internal error in run
    return _edit_json(root, "text_encoder/config.json", lambda d: d.update(d_model=32.0))


def vae_float_channels(root):
    return _edit_json(root, "vae/config.json", lambda d: d.update(z_dim=16.0))


def scheduler_float_steps(root):
    return _edit_json(root, "scheduler/scheduler_config.json",
                      lambda d: d.update(num_train_timesteps=1000.0))


def lora_unknown_target(root):
    p = root / "lora" / "cfg_step_lora.safetensors"
    head, data = split_file(p)
    k = next(k for k in head if k.endswith(".lora_down.weight"))
    new = k.replace("attn___lorahyphen___qkv", "attn___lorahyphen___nope")
    head = {(new if n == k else n): v for n, v in head.items()}
    join_file(p, head, data)
    return p


def lora_wrong_shape(root):
    p = root / "lora" / "refinement_lora.safetensors"
    head, data = split_file(p)
    k = next(k for k in head if k.endswith("proj.lora_down.weight"))
    r, i = head[k]["shape"]
    head[k]["shape"] = [i, r]
    join_file(p, head, data)
    return p


def lora_not_lora(root):
    p = root / "lora" / "cfg_step_lora.safetensors"
    head, data = split_file(p)
    k = next(k for k in head if k != "__metadata__")
    head = {("model.some_weight" if n == k else n): v for n, v in head.items()}
    join_file(p, head, data)
    return p


def model_index_not_json(root):
    p = root / "model_index.json"
    p.write_text("{model_name: LongCat")
    return p


def _scribble(root, value: float):
    p = _shard(root)
    h = read_header(p)
    t = next(t for t in h.tensors.values() if t.dtype == "F32" and t.numel > 4)
    with open(p, "r+b") as f:
        f.seek(t.begin + 4)
        f.write(struct.pack("<f", value))
    return p


def nan_value(root):
    return _scribble(root, float("nan"))


def inf_value(root):
    return _scribble(root, float("-inf"))


def zero_weight(root):
    p = _shard(root)
    t = next(t for t in read_header(p).tensors.values() if len(t.shape) == 2)
    with open(p, "r+b") as f:
        f.seek(t.begin)
        f.write(b"\0" * t.nbytes)
    return p


def _with_checksums(root):
    lines = []
    import hashlib
    for p in sorted(root.rglob("*")):
        if p.is_file():
            lines.append(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  "
                         f"{p.relative_to(root).as_posix()}")
    (root / "checksums.sha256").write_text("\n".join(lines) + "\n")


def checksum_mismatch(root):
    _with_checksums(root)
    p = root / "scheduler" / "scheduler_config.json"
    p.write_text(p.read_text().replace("12.0", "12.5"))
    return p


def checksum_escape(root):
    _with_checksums(root)
    with open(root / "checksums.sha256", "a") as f:
        f.write("0" * 64 + "  ../../etc/passwd\n")
    return root / "checksums.sha256"


def manifest_missing_file(root):
    (root / "lora" / "adapters.json").write_text(json.dumps({"version": 1, "adapters": [
        {"name": "distilled", "file": "distilled/nope.safetensors", "format": "native",
         "rank": 4, "alpha": 2.0, "targets": ["blocks.*.attn.qkv"], "default_scale": 1.0}]}))
    return root / "lora" / "adapters.json"


def root_is_a_file(root):
    shutil.rmtree(root)
    root.write_text("not a folder")
    return root


def depth_absurd(root):
    return _edit_json(root, CFG, lambda d: d.update(depth=10**9))


def te_layers_absurd(root):
    return _edit_json(root, "text_encoder/config.json", lambda d: d.update(num_layers=10**9))


def header_over_limit(root):
    """A header length past the safetensors library's limit, which convert took and verify
    refused (16 MiB there, 100 MiB in convert): one limit now, every reader's."""
    p = _shard(root)
    p.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
    return p


def empty_weights_file(root):
    te = root / "text_encoder"
    for f in te.glob("model*"):
        f.unlink()
    join_file(te / "model.safetensors", b"{}", b"")
    return te / "model.safetensors"


def checksums_huge(root):
    p = root / "checksums.sha256"
    p.write_text("".join(f"{i:064x}  f{i}\n" for i in range(100_000)))
    return p


# (id, damage, message keyword, extra verify args)
CASES = [
    ("truncated", truncate, "truncated", []),
    ("shorter-than-8-bytes", under_8_bytes, "no header", []),
    ("header-length-past-eof", header_past_eof, "runs past the end", []),
    ("header-length-2^63", header_absurd, "exceeds", []),
    ("header-invalid-utf8", header_not_utf8, "not valid UTF-8 JSON", []),
    ("header-invalid-json", header_not_json, "not valid UTF-8 JSON", []),
    ("header-not-object", header_array, "not a JSON object", []),
    ("header-duplicate-name", duplicate_name, "twice", []),
    ("offsets-overlap", overlapping, "overlaps", []),
    ("offsets-gap", gap, "gap", []),
    ("offsets-outside-file", offsets_outside, "past the end of the file", []),
    ("unknown-dtype", unknown_dtype, "unknown dtype 'F128'", []),
    ("shape-bytes-mismatch", shape_bytes, "needs", []),
    ("negative-shape", negative_shape, "invalid shape", []),
    ("metadata-not-strings", bad_metadata, "__metadata__", []),
    ("trailing-bytes", trailing_bytes, "trailing bytes", []),
    ("index-dotdot", index_dotdot, "leaves the checkpoint", []),
    ("index-absolute", index_absolute, "leaves the checkpoint", []),
    ("index-pickle-shard", index_pickle, "not a .safetensors", []),
    ("symlink-shard-escapes", symlink_shard_out, "outside the checkpoint", []),
    ("symlink-folder-escapes", symlink_folder_out, "outside the checkpoint", []),
    ("symlink-loop", symlink_loop, "cannot be resolved", []),
    ("symlink-to-nothing", dangling_link, "a link to nothing", []),
    ("missing-shard", missing_shard, "missing", []),
    ("unlisted-shard", stray_shard, "does not name", []),
    ("wrong-total-size", wrong_total_size, "total_size", []),
    ("index-duplicate-tensor", index_duplicate_key, "appears twice", []),
    ("index-wrong-shard", index_wrong_shard, "not in the shard the index names", []),
    ("index-omits-tensor", index_omits_tensor, "does not list", []),
    ("huge-weight-map", huge_weight_map, "-byte limit for shard index", []),
    ("weight-map-300k-entries", many_entries, "300,000 tensors", []),
    ("config-missing-field", cfg_missing_field, "hidden_size", []),
    ("config-wrong-type", cfg_wrong_type, "depth", []),
    ("bsa-sparsity-out-of-range", bsa_sparsity_range, "sparsity", []),
    ("bsa-chunk-shape", bsa_chunk_shape, "chunk_3d_shape_q", []),
    ("bsa-enabled-without-params", bsa_enabled_without_params, "bsa_params is null", []),
    ("config-depth-vs-weights", cfg_depth_mismatch, "missing", []),
    ("config-shape-vs-weights", cfg_hidden_mismatch, "wrong shape", []),
    ("config-nested-json", cfg_nested, "nested too deeply", []),
    ("unreadable-config-is-folder", cfg_is_a_folder, "not a regular file", []),
    ("fifo-shard", fifo_shard, "not a regular file", []),
    ("pickle-bin-file", pickle_file, "pickle", []),
    ("empty-folder", empty_folder, "not a LongCat-Video checkpoint", []),
    ("missing-component", missing_component, "missing folder", []),
    ("missing-tokenizer-file", missing_tokenizer_file, "tokenizer.json", []),
    ("text-encoder-width", te_width_mismatch, "wrong shape", []),
    ("vae-latents-stats", vae_latents_stats, "latents_mean has 15 entries", []),
    ("vae-config-range", vae_bad_config, "z_dim", []),
    ("te-config-float-int", te_float_width, "d_model: 32.0 is not of type 'integer'", []),
    ("vae-config-float-int", vae_float_channels, "z_dim: 16.0 is not of type 'integer'", []),
    ("scheduler-config-float-int", scheduler_float_steps,
     "num_train_timesteps: 1000.0 is not of type 'integer'", []),
    ("lora-unknown-target", lora_unknown_target, "do not exist in the transformer", []),
    ("lora-wrong-shape", lora_wrong_shape, "do not fit", []),
    ("lora-not-a-lora", lora_not_lora, "fit no LoRA format", []),
    ("model-index-invalid-json", model_index_not_json, "invalid JSON", []),
    ("deep-nan", nan_value, "NaN", ["--deep"]),
    ("deep-inf", inf_value, "1 Inf", ["--deep"]),
    ("deep-all-zero-weight", zero_weight, "all-zero weights", ["--deep"]),
    ("deep-checksum-mismatch", checksum_mismatch, "does not match", ["--deep"]),
    ("checksums-path-escapes", checksum_escape, "leaves the checkpoint", []),
    ("manifest-missing-adapter", manifest_missing_file, "missing", []),
    ("path-is-a-file", root_is_a_file, "not a folder", []),
    ("depth-10^9", depth_absurd, "beyond any LongCat DiT", []),
    ("text-encoder-layers-10^9", te_layers_absurd, "beyond any LongCat text encoder", []),
    ("header-over-limit", header_over_limit, "exceeds the 100000000-byte limit", []),
    ("empty-weights-file", empty_weights_file, "hold no tensors", []),
    ("checksums-100k-lines", checksums_huge, "100,000 lines", []),
]


@pytest.fixture
def victim(tiny_native, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_native, root, symlinks=True)
    return root


@pytest.mark.parametrize("damage, keyword, extra", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_hostile_case_fails_with_one_line(victim, damage, keyword, extra, capsys):
    named = damage(victim)
    rel = named.relative_to(victim).as_posix() if named != victim else ""
    t0 = time.perf_counter()
    rc = main(["verify", str(victim), "-q", *extra])
    elapsed = time.perf_counter() - t0
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 1, err
    assert elapsed < 5, f"took {elapsed:.1f} s"
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert out == ""
    assert "Traceback" not in err and "unexpected error" not in err and "internal" not in err
    assert f"{victim}/{rel}" in lines[0] if rel else str(victim) in lines[0], lines[0]
    assert keyword in lines[0], lines[0]


def test_an_escaping_checksum_path_is_quoted_as_listed(victim, monkeypatch):
    """A listed ``../ckpt/x`` passes through the folder's own name: the report quotes it whole
    (it once dropped the ``ckpt/`` as if it were the checkpoint's prefix)."""
    _with_checksums(victim)
    with open(victim / "checksums.sha256", "a") as f:
        f.write("0" * 64 + f"  ../{victim.name}/model_index.json\n")
    monkeypatch.chdir(victim.parent)
    report = verify(victim.name)
    msgs = [c.message for c in report.checks if c.status == "fail"]
    assert any(f"'../{victim.name}/model_index.json' leaves" in m for m in msgs), msgs


@pytest.mark.parametrize("name", ["Long\\Cat", "Long\\1"])
def test_a_sibling_folder_named_with_a_backslash_is_written_as_is(tmp_path, name):
    """An avatar's base folder is named ``../<name>/`` in the rows; a backslash in the name was
    read as a regular-expression escape (an internal error)."""
    from longcat_tools.verify.report import Recorder, Report

    rec = Recorder(tmp_path / "ckpt", Report(str(tmp_path / "ckpt"))).beside(tmp_path / name)
    assert rec.tidy(f"{tmp_path / name}/config.json: bad") == f"../{name}/config.json: bad"


def test_corpus_has_at_least_30_cases():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


def test_every_fault_is_reported_not_only_the_first(victim):
    """Independent checks: three faults in three files give three failed checks."""
    truncate(victim)
    bsa_sparsity_range(victim)
    missing_component(victim)
    report = verify(victim)
    failed = {c.file for c in report.checks if c.status == "fail"}
    assert {first_shard(victim).relative_to(victim).as_posix(), CFG, "vae"} <= failed


def test_cli_subprocess(victim):
    """Through a real process: exit code, one line on stderr, and the table on stdout."""
    header_absurd(victim)
    p = subprocess.run([sys.executable, "-m", "longcat_tools", "verify", str(victim)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "exceeds" in lines[0] and first_shard(victim).name in lines[0]
    assert "fail" in p.stdout and "FAIL" in p.stdout
    fifo_shard(victim)
    p = subprocess.run([sys.executable, "-m", "longcat_tools", "verify", str(victim), "--json",
                        "-q"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and json.loads(p.stdout)["status"] == "fail"
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "FIFO" in lines[0], p.stderr


def test_a_checkpoint_path_that_is_a_symlink_loop_is_named_so(tmp_path, capsys, monkeypatch):
    """It was an internal error (RuntimeError: Symlink loop), also through the variable."""
    from hostile import refused

    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    refused(capsys, "verify", tmp_path / "a", code=2, says="a: a symlink loop")
    monkeypatch.setenv("LONGCAT_TOOLS_MODEL", str(tmp_path / "a"))
    refused(capsys, "verify", code=2, says="a symlink loop")
