"""Repo ids as checkpoint sources: a real Hugging Face cache layout, offline, and its boundaries."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from hf_cache import COMMIT, REPO, blob_name, build_cache, model_info, source_files
from huggingface_hub import constants as hf_constants
from huggingface_hub import scan_cache_dir, try_to_load_from_cache
from huggingface_hub.utils import filter_repo_objects

from longcat_tools import schemas
from longcat_tools.checkpoint import download as hub_download
from longcat_tools.checkpoint import hub, hub_manifest, layouts
from longcat_tools.checkpoint.hub import RepoRef, parse_repo_ref
from longcat_tools.cli import main
from longcat_tools.errors import LongcatError, UsageError
from longcat_tools.io.safetensors import read_header, read_tensor
from longcat_tools.model import keymap

REPO_DIR = "models--meituan-longcat--LongCat-Video"
REAL_SNAPSHOT_DOWNLOAD = huggingface_hub.snapshot_download


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test may reach the network: offline for us and for huggingface_hub itself."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv(layouts.ENV_MODEL, raising=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_native):
    """A cache holding the tiny checkpoint as REPO at COMMIT (refs/main); read-only for tests."""
    root = tmp_path_factory.mktemp("hf") / "hub"
    return root, build_cache(tiny_native, root)


@pytest.fixture
def use_cache(monkeypatch, cache):
    monkeypatch.setenv("HF_HUB_CACHE", str(cache[0]))
    return cache


@pytest.mark.parametrize("arg,expected", [
    ("meituan-longcat/LongCat-Video", RepoRef(REPO)),
    ("meituan-longcat/LongCat-Video@main", RepoRef(REPO, "main")),
    (f"meituan-longcat/LongCat-Video@{COMMIT}", RepoRef(REPO, COMMIT)),
    ("org/name@refs/pr/1", RepoRef("org/name", "refs/pr/1")),
    ("tiny-native", None), ("./org/name", None), ("/abs/name", None), ("a/b/c", None),
    ("org--x/name", None), ("org/na..me", None), ("org/name.", None), ("~/name", None),
])
def test_repo_id_syntax(arg, expected):
    assert parse_repo_ref(arg) == expected


@pytest.mark.parametrize("arg", ["org/name@../x", "org/name@", "org/name@a//b", "org/name@-x"])
def test_malformed_revision_is_a_usage_error(arg):
    with pytest.raises(UsageError, match="invalid revision"):
        parse_repo_ref(arg)


def test_the_fake_cache_is_one_huggingface_hub_accepts(use_cache, tiny_native):
    root, snap = use_cache
    info = scan_cache_dir(root)
    assert info.warnings == []
    (repo,) = info.repos
    assert repo.repo_id == REPO and {r.commit_hash for r in repo.revisions} == {COMMIT}
    (rev,) = repo.revisions
    assert len(rev.files) == len(source_files(tiny_native)) and rev.refs == {"main"}
    assert try_to_load_from_cache(REPO, "dit/config.json", cache_dir=root) == str(
        snap / "dit" / "config.json")
    assert os.readlink(snap / "dit" / "config.json").startswith("../../../blobs/")


@pytest.mark.parametrize("suffix", ["", "@main", f"@{COMMIT}"])
def test_resolve_model_finds_the_cached_snapshot(use_cache, suffix, monkeypatch):
    root, snap = use_cache
    assert layouts.resolve_model(REPO + suffix) == snap
    monkeypatch.setenv(layouts.ENV_MODEL, REPO + suffix)
    assert layouts.resolve_model(None) == snap


def test_a_cached_checkpoint_reads_exactly_like_the_local_one(use_cache, tiny_native):
    root, snap = use_cache
    ckpt = layouts.detect(layouts.resolve_model(REPO))
    local = layouts.detect(tiny_native)
    assert ckpt.layout == "native" and ckpt.in_hf_cache and not local.in_hf_cache
    assert ckpt.allowed == ((root / REPO_DIR).resolve(),)
    assert ckpt.config() == local.config()
    shards, local_shards = layouts.transformer_shards(ckpt), layouts.transformer_shards(local)
    assert set(shards) == set(local_shards) == {
        n for n, _ in keymap.native_tensor_specs(keymap.dit_dims(local.config()))}
    assert all(p.parent == snap / "dit" and p.is_symlink() for p in shards.values())
    for name, path in shards.items():
        info = read_header(path).tensors[name]
        with open(path, "rb") as f, open(local_shards[name], "rb") as g:
            a = read_tensor(f, info)
            b = read_tensor(g, read_header(local_shards[name]).tensors[name])
        assert torch.equal(a, b), name
    summary = hub_download.check_headers(snap)
    assert summary.dit_tensors == len(shards) and summary.layout == "native"
    assert summary.safetensors_files == sum(1 for r in source_files(tiny_native)
                                            if r.endswith(".safetensors"))


def test_an_existing_local_path_wins_over_the_repo_id(use_cache, tiny_native, tmp_path,
                                                      monkeypatch):
    (tmp_path / "meituan-longcat").mkdir()
    (tmp_path / "meituan-longcat" / "LongCat-Video").symlink_to(tiny_native)
    monkeypatch.chdir(tmp_path)
    got = layouts.resolve_model(REPO)
    assert got == Path(REPO) and not layouts.detect(got).in_hf_cache


def test_a_repo_missing_from_the_cache_is_one_line(use_cache):
    root, _ = use_cache
    with pytest.raises(LongcatError) as e:
        layouts.resolve_model("org/absent")
    msg = str(e.value)
    assert "\n" not in msg and str(root) in msg and "HF_HUB_OFFLINE=1" in msg
    assert "`longcat-tools download org/absent`" in msg
    with pytest.raises(LongcatError, match=r"cached: main -> 0123456789ab"):
        layouts.resolve_model(REPO + "@v9")


def test_commands_never_download_even_online(use_cache, monkeypatch):
    """Only `download` fetches: resolution asks huggingface_hub for local files only."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    calls = []
    real = huggingface_hub.snapshot_download

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    with pytest.raises(LongcatError, match="only `longcat-tools download` fetches"):
        layouts.resolve_model("org/absent")
    assert layouts.resolve_model(REPO) == use_cache[1]
    assert calls and all(c["local_files_only"] for c in calls)


def test_offline_and_uncached_on_the_command_line_is_one_line_exit_1(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")}
    p = subprocess.run([sys.executable, "-m", "longcat_tools", "download", REPO], env=env,
                       capture_output=True, text=True)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in p.stderr
    assert "not in the Hugging Face cache" in lines[0] and str(tmp_path / "empty") in lines[0]


def _own_cache(tmp_path, tiny_native, monkeypatch, **kw):
    root = tmp_path / "hub"
    snap = build_cache(tiny_native, root, **kw)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    return root, snap


def _retarget(link: Path, target: Path) -> None:
    link.unlink()
    link.symlink_to(os.path.relpath(target, link.parent))


def test_symlinks_are_followed_inside_the_repo_but_never_out(tmp_path, tiny_native,
                                                             monkeypatch):
    root, snap = _own_cache(tmp_path, tiny_native, monkeypatch)
    build_cache(tiny_native, root, repo_id="evil/other")
    shard = sorted((snap / "dit").glob("*-00002-*.safetensors"))[0]
    original = shard.resolve()
    outside = tmp_path / "outside.safetensors"
    shutil.copy(original, outside)
    other_repo_blob = root / "models--evil--other" / "blobs" / original.name
    for target in (outside, other_repo_blob):
        _retarget(shard, target)
        with pytest.raises(LongcatError, match="outside the checkpoint"):
            layouts.transformer_shards(layouts.detect(layouts.resolve_model(REPO)))
    _retarget(shard, original)
    layouts.transformer_shards(layouts.detect(snap))

    cfg, index = snap / "dit" / "config.json", snap / "dit" / layouts.INDEX_NAME
    for link in (cfg, index):
        real = link.resolve()
        shutil.copy(real, tmp_path / link.name)
        _retarget(link, tmp_path / link.name)
        ckpt = layouts.detect(snap)
        with pytest.raises(LongcatError, match="outside the checkpoint"):
            ckpt.config() if link is cfg else layouts.transformer_shards(ckpt)
        _retarget(link, real)


def test_the_shared_blob_store_of_the_same_cache_is_inside(tmp_path, tiny_native, monkeypatch):
    """huggingface_hub 2.x may keep Xet blobs in <cache>/blobs/<2 hex>/<hash>, with the repo's
    blob a symlink into it: that is still inside the cache, but only when it is a real store."""
    root, snap = _own_cache(tmp_path, tiny_native, monkeypatch)
    shard = sorted((snap / "dit").glob("*-00001-*.safetensors"))[0]
    blob = shard.resolve()
    store = root / "blobs" / "ab" / ("ab" + "0" * 62)
    store.parent.mkdir(parents=True)
    shutil.move(blob, store)
    blob.symlink_to(os.path.relpath(store, blob.parent))
    with pytest.raises(LongcatError, match="outside the checkpoint"):  # no marker: not a store
        layouts.transformer_shards(layouts.detect(snap))
    (root / "blobs" / ".huggingface-shared-blobs").write_text("1\n")
    ckpt = layouts.detect(snap)
    assert ckpt.allowed == ((root / REPO_DIR).resolve(), (root / "blobs").resolve())
    assert layouts.transformer_shards(ckpt)
    assert hub_download.check_headers(snap).dit_tensors > 0


def test_a_tampered_ref_cannot_steer_out_of_the_repo(tmp_path, tiny_native, monkeypatch):
    root, snap = _own_cache(tmp_path, tiny_native, monkeypatch)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tiny_native, elsewhere)
    (root / REPO_DIR / "refs" / "main").write_text("../../../../elsewhere")
    with pytest.raises(LongcatError, match="tampered"):
        layouts.resolve_model(REPO)


def test_a_partial_download_still_resolves(tmp_path, tiny_native, monkeypatch):
    """`download --include dit` leaves a snapshot huggingface_hub calls incomplete (its tree
    listing names every file): commands that need only the DiT still work from it."""
    root, snap = _own_cache(tmp_path, tiny_native, monkeypatch, tree=True,
                            only=["dit/", "model_index.json", "config.json"])
    assert layouts.resolve_model(REPO) == snap
    summary = hub_download.check_headers(snap, hub.include_patterns("dit"))
    assert summary.dit_tensors > 0 and summary.safetensors_files == summary.dit_shards


def test_a_cache_snapshot_is_never_written_into(use_cache, tiny_native, capsys):
    _, snap = use_cache
    with pytest.raises(LongcatError, match="--dst"):
        hub.check_writable(snap)
    hub.check_writable(tiny_native)
    for argv in (["bsa", "enable"], ["bsa", "restore"], ["bsa", "disable"],
                 ["bsa", "restore", "--dry-run"], ["bsa", "enable", "--dry-run"],
                 ["lora", "detach", "distilled"]):  # restore said "no backup to restore"
        assert main([*argv, "-m", str(snap)]) == 1, argv
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert "is a snapshot in the Hugging Face cache" in line, (argv, line)


def test_include_names_components():
    assert hub.include_patterns("dit,lora") == ["dit/*", "transformer/*", "lora/*",
                                                "model_index.json", "config.json"]
    assert hub.include_patterns(None) is None and hub.include_patterns("all") is None
    with pytest.raises(UsageError, match="unknown component 'bogus'"):
        hub.include_patterns("dit,bogus")
    for empty in ("", "dit,", " "):  # '' meant everything, 'dit,' as if 'dit'
        with pytest.raises(UsageError, match="an empty component name"):
            hub.include_patterns(empty)


@pytest.mark.parametrize("error, says", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "x/blob"), "free some space"),
    (OSError(errno.EACCES, os.strerror(errno.EACCES), "x/blob"), "folder you can write"),
    (OSError(errno.EEXIST, os.strerror(errno.EEXIST), "x/blob"), "remove that entry"),
    (ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET)), "check the network"),
    (TimeoutError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT)), "check the network"),
    (OSError(errno.EIO, os.strerror(errno.EIO), "x/blob"), "download failed"),
])
def test_a_download_failure_names_its_cause(tmp_path, error, says):
    """Every OSError asked for disk space: a permission, a left-over entry or a dropped
    connection sent users looking in the wrong place."""
    text = str(hub.hub_error(parse_repo_ref(REPO), error, tmp_path))
    assert "\n" not in text and says in text
    advice = ("free some space", "folder you can write", "remove that entry", "check the network")
    assert [a for a in advice if a in text] == ([says] if says in advice else [])


# ---------------------------------------------------------------------------------------------
# `download`, with huggingface_hub's network side replaced by the tiny checkpoint


class FakeHub:
    """snapshot_download and model_info as the hub would answer them for ``src``."""

    def __init__(self, src: Path, corrupt: str | None = None, truncate: str | None = None):
        self.src, self.calls = src, []
        self.corrupt, self.truncate = corrupt, truncate

    def snapshot_download(self, repo_id, **kw):
        if kw.get("local_files_only"):  # a cache look-up: huggingface_hub's own code does it
            return REAL_SNAPSHOT_DOWNLOAD(repo_id, **kw)
        self.calls.append(kw)
        files = list(filter_repo_objects(list(source_files(self.src)),
                                         allow_patterns=kw["allow_patterns"]))
        if kw.get("local_dir"):
            dst = Path(kw["local_dir"])
            for rel in files:
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(self.src / rel, dst / rel)
            out = dst
        else:
            out = build_cache(self.src, Path(kw["cache_dir"]), repo_id=repo_id,
                              ref=kw["revision"] or "main", only=files)
        for rel, fn in ((self.corrupt, _flip_last_byte), (self.truncate, _truncate)):
            if rel:
                fn(out / rel)
        return str(out)

    def model_info(self, repo_id, **kw):
        assert kw["files_metadata"]
        return model_info(self.src, repo_id)


def _flip_last_byte(p: Path) -> None:
    real = p.resolve()
    data = bytearray(real.read_bytes())
    data[-1] ^= 0xFF
    real.write_bytes(bytes(data))


def _truncate(p: Path) -> None:
    real = p.resolve()
    real.write_bytes(real.read_bytes()[:-4])


@pytest.fixture
def fake_hub(monkeypatch, tiny_native, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))

    def install(**kw):
        fake = FakeHub(tiny_native, **kw)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
        monkeypatch.setattr(huggingface_hub.HfApi, "model_info", fake.model_info)
        return fake

    return install


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def test_download_into_the_cache_with_components(fake_hub, tmp_path, capsys, tiny_native,
                                                monkeypatch):
    fake = fake_hub()
    rc = main(["download", REPO, "--include", "dit,lora", "--check-hashes", "--json"])
    doc = _json(capsys)
    assert rc == 0 and doc["ok"], doc
    (call,) = fake.calls
    assert call["allow_patterns"] == ["dit/*", "transformer/*", "lora/*", "model_index.json",
                                      "config.json"]
    assert call["revision"] is None and "local_dir" not in call  # refs/main gets written
    snap = tmp_path / "hub" / REPO_DIR / "snapshots" / COMMIT
    assert doc["path"] == str(snap) and doc["commit"] == COMMIT
    n = len(keymap.native_tensor_specs(keymap.dit_dims(layouts.detect(tiny_native).config())))
    assert doc["headers"]["dit_tensors"] == n and doc["headers"]["layout"] == "native"
    counts = doc["hashes"]["counts"]
    fetched = [r for r in source_files(tiny_native) if r.startswith(("dit/", "lora/"))
               or r in ("model_index.json", "config.json")]
    assert counts == {"ok": len(fetched), "not-downloaded": len(source_files(tiny_native))
                      - len(fetched)}
    saved = Path(doc["manifest"])
    assert saved == tmp_path / "hub" / REPO_DIR / "longcat-tools" / f"{COMMIT}.hub_manifest.json"
    assert schemas.errors(json.loads(saved.read_text()), "hub_manifest") == []
    # the download is now what every other command resolves, offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert layouts.resolve_model(REPO) == snap
    report = hub_manifest.against_hub_report(snap)
    assert report.ok and report.source.startswith("manifest ")


def test_download_into_a_folder_pins_the_listed_commit(fake_hub, tmp_path, capsys,
                                                       monkeypatch):
    fake = fake_hub()
    dst = tmp_path / "weights" / "LongCat-Video"
    assert main(["download", REPO, "--dst", str(dst), "--json", "-q"]) == 0
    doc = _json(capsys)
    (call,) = fake.calls
    assert call["local_dir"] == str(dst) and call["revision"] == COMMIT
    assert call["allow_patterns"] is None
    assert doc["path"] == str(dst) and Path(doc["manifest"]) == dst / "hub_manifest.json"
    assert doc["hashes"] is None and doc["headers"]["dit_tensors"] > 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_manifest.against_hub_report(dst).ok


def test_offline_a_dst_folder_counts_as_the_repo_its_record_names(fake_hub, tiny_native,
                                                                   tmp_path, monkeypatch,
                                                                   capsys):
    """huggingface_hub, offline with local_dir, returns any existing folder for any repo id:
    `download` must not call a folder holding another repo (or nothing it recorded) ready."""
    fake_hub()
    dst = tmp_path / "weights"
    assert main(["download", REPO, "--dst", str(dst), "-q"]) == 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    capsys.readouterr()
    assert main(["download", REPO, "--dst", str(dst), "--json"]) == 0
    doc = _json(capsys)
    assert doc["offline"] and doc["commit"] == COMMIT  # the record's (the summary said "?")
    for argv, says in (([f"{REPO}@{COMMIT[:10]}"], None), ([f"{REPO}@main"], None),
                       ([REPO.lower()], None),  # the hub's ids ignore case
                       (["other/repo"], f"holds {REPO} at {COMMIT[:12]}, not other/repo"),
                       ([f"{REPO}@v9"], "not revision v9")):
        assert main(["download", *argv, "--dst", str(dst)]) == (1 if says else 0), argv
        err = capsys.readouterr().err.strip().splitlines()
        if says:
            assert len(err) == 1 and says in err[0], err
    inside = tiny_native / "copy"
    assert main(["download", REPO, "--dst", str(inside)]) == 2 and not inside.exists()
    assert "inside the checkpoint" in capsys.readouterr().err
    record = dst / "hub_manifest.json"
    outside = tmp_path / "elsewhere.json"
    record.rename(outside)
    record.symlink_to(outside)  # a record from outside the folder is not its record
    assert main(["download", REPO, "--dst", str(dst)]) == 1
    assert "is a symlink" in capsys.readouterr().err
    record.unlink()
    assert main(["download", REPO, "--dst", str(dst)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no record that it holds" in err[0] and "verify" in err[0]
    missing = tmp_path / "not-there"  # it blamed the cache, which --dst does not use
    assert main(["download", REPO, "--dst", str(missing)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{missing}: no such folder" in err[0], err
    assert "cache" not in err[0] and not missing.exists()


def test_offline_a_file_the_record_lists_must_be_there(fake_hub, tmp_path, monkeypatch,
                                                      capsys):
    """An emptied tokenizer/ (the folder still there) passed as "ready", exit 0."""
    fake_hub()
    dst = tmp_path / "weights"
    assert main(["download", REPO, "--dst", str(dst), "-q"]) == 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    gone = sorted((dst / "tokenizer").iterdir())
    for f in gone:
        f.unlink()
    for include in ([], ["--include", "tokenizer"]):
        assert main(["download", REPO, "--dst", str(dst), "-q", *include]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{gone[0]}: missing, though" in err[0], err
    assert main(["download", REPO, "--dst", str(dst), "-q", "--include", "vae"]) == 0


def test_quiet_silences_huggingface_hubs_own_warnings(monkeypatch, tmp_path):
    """-q left huggingface_hub's "Returning existing local_dir ..." warning on stderr."""
    from huggingface_hub.utils import logging as hf_logging

    levels = []

    def fake(repo_id, **kw):
        levels.append(hf_logging.get_logger().getEffectiveLevel())
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    before = hf_logging.get_logger().level
    for quiet in (True, False):
        hub.download(parse_repo_ref(REPO), dst=tmp_path, quiet=quiet, local_only=True)
    assert levels[0] >= logging.ERROR and levels[1] <= logging.WARNING
    assert hf_logging.get_logger().level == before


def test_a_corrupt_download_fails_and_names_the_file(fake_hub, capsys):
    bad = "dit/diffusion_pytorch_model-00003-of-00005.safetensors"
    fake_hub(corrupt=bad)
    assert main(["download", REPO, "--include", "dit", "--check-hashes", "--json"]) == 1
    captured = capsys.readouterr()
    doc = json.loads(captured.out)  # one document: the result, no error document after it
    assert not doc["ok"]
    failures = [c for c in doc["hashes"]["checks"] if c["status"] in hub_manifest.FAIL]
    assert [(c["file"], c["status"]) for c in failures] == [(bad, "sha256")]
    assert bad in failures[0]["message"]
    last = captured.err.strip().splitlines()[-1]  # the line a failure ends with, -q or not
    assert last.startswith("error: ") and "1 file(s) do not match the hub" in last and bad in last


def test_a_truncated_download_fails_at_the_header_check(fake_hub, capsys):
    bad = "lora/refinement_lora.safetensors"
    fake_hub(truncate=bad)
    assert main(["download", REPO, "--include", "lora"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and bad in err[0] and "truncated" in err[0]


def test_download_offline_checks_the_cached_copy(use_cache, capsys):
    """HF_HUB_OFFLINE=1: huggingface_hub's own snapshot_download finds the cached copy."""
    _, snap = use_cache
    assert main(["download", f"{REPO}@main", "--check-hashes", "--json"]) == 0
    doc = _json(capsys)
    assert doc["offline"] and doc["path"] == str(snap) and doc["commit"] == COMMIT
    assert doc["manifest"] is None and doc["hashes"]["source"] == "cache"
    assert doc["hashes"]["ok"] and set(doc["hashes"]["counts"]) == {"ok"}


def test_download_usage_errors_exit_2(capsys, tmp_path):
    (tmp_path / "afile").write_text("x")  # was "afile/hub_manifest.json: cannot inspect", exit 1
    assert main(["download", REPO, "--dst", str(tmp_path / "afile")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert main(["download", REPO, "--include", "bogus"]) == 2
    assert main(["download", "not-a-repo"]) == 2
    assert main(["download", f"{REPO}@main", "--revision", "v2"]) == 2
    err = capsys.readouterr().err
    assert "unknown component 'bogus'" in err and "two revisions" in err
    for bad in ("../..", "", "a//b"):  # @REV was checked, --revision REV was not
        assert main(["download", REPO, "--revision", bad]) == 2
        assert f"--revision: invalid revision '{bad}'" in capsys.readouterr().err


def test_force_download_that_cannot_download_says_so(use_cache, monkeypatch, capsys):
    """Offline it found the cached copy and fetched nothing, without a word."""
    assert main(["download", REPO, "--force-download"]) == 1
    assert "downloads are off (HF_HUB_OFFLINE=1)" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the hub unreachable (see the test below)
    assert main(["download", REPO, "--force-download"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: --force-download: ") and "nothing was fetched again" in line


def test_without_network_and_without_a_copy_download_is_one_line(tmp_path, monkeypatch, capsys):
    """Downloads allowed but the hub unreachable (huggingface_hub's own offline guard stands in
    for a dead network): one line, exit 1."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    assert main(["download", REPO]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "cannot read the file list from the hub" in err[0]
    assert f"no copy on this machine ({tmp_path / 'empty'})" in err[0]


def test_without_network_download_checks_the_cached_copy(use_cache, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert main(["download", REPO, "--json"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["offline"] and doc["path"] == str(use_cache[1]) and doc["manifest"] is None
    assert "warning: " in captured.err
    assert "checked the copy already on this machine" in captured.err


def test_an_unknown_repo_is_the_hub_saying_no(monkeypatch, capsys):
    import importlib.util

    from huggingface_hub.errors import RepositoryNotFoundError

    # huggingface_hub's HTTP client: httpx2 from 2.x on, httpx before
    http = importlib.import_module("httpx2" if importlib.util.find_spec("httpx2") else "httpx")

    def refuse(self, repo_id, **kw):
        url = f"https://huggingface.co/api/models/{repo_id}"
        raise RepositoryNotFoundError("404 Repository Not Found", response=http.Response(
            404, request=http.Request("GET", url)))

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", refuse)
    assert main(["download", "org/nope"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "org/nope: no such repo on the hub" in err[0]


def test_the_real_snapshot_download_end_to_end_against_a_local_hub(tiny_native, tmp_path,
                                                                     monkeypatch):
    """huggingface_hub's own network code, against a stand-in hub on 127.0.0.1 (no internet):
    `download` fetches only the chosen components, records the hub's hashes, and every command
    then resolves the repo id offline from what the real client wrote."""
    from hub_server import HubServer

    cache = tmp_path / "hub"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env |= {"HF_HUB_CACHE": str(cache),
            "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    with HubServer(tiny_native, REPO, COMMIT) as server:
        env["HF_ENDPOINT"] = server.url
        p = subprocess.run([sys.executable, "-m", "longcat_tools", "download", REPO, "--include",
                            "dit,lora", "--check-hashes", "--json"], env=env, capture_output=True,
                           text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["ok"] and doc["hashes"]["source"] == "hub" and doc["commit"] == COMMIT
    chosen = {r for r in source_files(tiny_native)
              if r.startswith(("dit/", "lora/")) or r in hub.TOP_LEVEL_FILES}
    content = {r: blob_name(r, (tiny_native / r).read_bytes()) for r in chosen}
    fetched = server.fetched()  # identical files share one blob: fetched once
    assert fetched <= chosen and {content[r] for r in fetched} == set(content.values())
    assert (cache / REPO_DIR / "refs" / "main").read_text() == COMMIT
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    snap = layouts.resolve_model(REPO)  # HF_HUB_OFFLINE=1 from the autouse fixture
    assert snap == Path(doc["path"]) and layouts.detect(snap).in_hf_cache
    assert layouts.transformer_shards(layouts.detect(snap))
    report = hub_manifest.against_hub_report(snap)
    assert report.ok and report.source.startswith("manifest ")
    assert {c.status for c in report.checks} == {"ok", "not-downloaded"}


def test_the_header_check_at_full_scale_and_against_the_config(real_sparse, tiny_native,
                                                                tmp_path):
    s = hub_download.check_headers(real_sparse, hub.include_patterns("dit"))
    assert (s.dit_tensors, s.dit_parameters, s.dit_shards) == (1022, 13_581_071_424, 6)
    bad = tmp_path / "bad"
    shutil.copytree(tiny_native / "dit", bad / "dit")
    cfg = json.loads((bad / "dit" / "config.json").read_text())
    (bad / "dit" / "config.json").write_text(json.dumps({**cfg, "depth": cfg["depth"] + 1}))
    with pytest.raises(LongcatError, match=r"tensor 'blocks\.\d+\..*' is missing .*incomplete"):
        hub_download.check_headers(bad, hub.include_patterns("dit"))
    (bad / "dit" / "config.json").write_text(json.dumps({**cfg, "caption_channels": 48}))
    with pytest.raises(LongcatError, match=r"y_proj.0.weight. has shape \[64, 32\], the config "
                                           r"implies \[64, 48\]"):
        hub_download.check_headers(bad, hub.include_patterns("dit"))


def test_bsa_refuses_to_edit_a_cache_snapshot(use_cache):
    from longcat_tools import bsa

    _, snap = use_cache
    before = (snap / "dit" / "config.json").read_bytes()
    ckpt = bsa.open_checkpoint(REPO)
    with pytest.raises(LongcatError, match="Hugging Face cache"):
        bsa.update(ckpt, lambda cfg, style: bsa.with_preset(cfg, "720p-fast", style))
    with pytest.raises(LongcatError, match="Hugging Face cache"):
        bsa.restore(ckpt)
    assert (snap / "dit" / "config.json").read_bytes() == before


def test_convert_verify_and_run_take_a_cached_repo_id(use_cache, tmp_path, capsys):
    """The acceptance of repo ids: every checkpoint command resolves one from the offline cache."""
    from longcat_tools.cli import main
    from longcat_tools.convert import convert

    dst = tmp_path / "converted"
    convert(REPO, dst)
    assert layouts.detect(dst).layout == "converted"
    assert main(["convert", "--src", REPO, "--dst", str(tmp_path / "c2"), "-q"]) == 0
    assert main(["verify", REPO, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] in ("pass", "warn")
    out = tmp_path / "t2v.mp4"
    assert main(["run", "-q", "-m", f"{REPO}@main", "--task", "t2v", "-p", "a cat", "--height",
                 "32", "--width", "32", "--frames", "5", "--steps", "1", "--out", str(out)]) == 0
    assert out.stat().st_size > 0


def test_commands_name_the_missing_repo_in_one_line(use_cache, capsys):
    from longcat_tools.cli import main

    for args in (["verify", "other-org/missing"], ["convert", "--src", "other-org/missing",
                                                   "--dst", "/tmp/never-written"],
                 ["run", "-m", "other-org/missing", "--task", "t2v", "-p", "x"]):
        assert main(args) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "other-org/missing" in err[0] and "Traceback" not in err[0]



@pytest.mark.parametrize("damage, include, says", [
    ("no vae", None, "no vae/ in this copy: it is incomplete"),
    ("no vae", "vae", "no vae/ in this copy"),  # passed as "0 files ok", exit 0
    ("vae to /etc", None, "vae: resolves to /etc, outside the checkpoint"),
    ("blob gone", None, "vae/config.json: a broken symlink (to ../../../blobs/"),  # internal error
])
def test_an_offline_copy_with_a_part_missing_is_not_ready(tmp_path, monkeypatch, tiny_native,
                                                          capsys, damage, include, says):
    from hostile import refused

    root = tmp_path / "hub"
    snap = build_cache(tiny_native, root)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    vae = snap / "vae"
    if damage == "blob gone":
        (vae / "config.json").resolve().unlink()
    else:
        shutil.rmtree(vae)
        if damage == "vae to /etc":
            vae.symlink_to("/etc")
    refused(capsys, "download", REPO, "-q", *(["--include", include] if include else []),
            says=says)
    # outside the selection: a broken link is named (it was an internal error), one out is not
    assert main(["download", REPO, "--include", "dit"]) == (1 if damage == "vae to /etc" else 0)
    err = capsys.readouterr().err
    assert ("are broken links (e.g." in err) == (damage == "blob gone"), err
