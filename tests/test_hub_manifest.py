"""`verify --against-hub`, library part: the hub's sizes and hashes, online, saved and cached."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import huggingface_hub
import pytest
from hf_cache import COMMIT, REPO, build_cache, model_info, source_files
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils.sha import git_hash

from longcat_tools.checkpoint import hub_manifest as hm
from longcat_tools.cli import main
from longcat_tools.errors import LongcatError, UsageError
from longcat_tools.io.checksums import sha256_file

SHARD1 = "dit/diffusion_pytorch_model-00001-of-00005.safetensors"
SHARD2 = "dit/diffusion_pytorch_model-00002-of-00005.safetensors"
LORA = "lora/cfg_step_lora.safetensors"
SCHED = "scheduler/scheduler_config.json"


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HOME", raising=False)


@pytest.fixture
def online(monkeypatch, tiny_native):
    """The hub API answers for the tiny checkpoint (and nothing else is reachable)."""
    asked = []

    def fake(repo_id, **kw):
        asked.append((repo_id, kw))
        return model_info(tiny_native, repo_id)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, r, **kw: fake(r, **kw))
    return asked


def _copy(tiny_native, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_native, tmp_path / "copy"))


def _damage(root: Path) -> dict[str, str]:
    """One of each kind of damage; returns file -> the status it must get."""
    data = bytearray((root / SHARD1).read_bytes())
    data[-1] ^= 0x01
    (root / SHARD1).write_bytes(bytes(data))
    (root / SHARD2).write_bytes((root / SHARD2).read_bytes()[:-8])
    (root / LORA).unlink()
    text = (root / SCHED).read_text()
    (root / SCHED).write_text(text.replace("12.0", "13.0"))  # same size, other content
    (root / "dit" / "stray.txt").write_text("x")
    return {SHARD1: "sha256", SHARD2: "size", LORA: "missing", SCHED: "git-sha1",
            "dit/stray.txt": "extra"}


def test_git_blob_sha1_is_git_own(tmp_path):
    p = tmp_path / "f.json"
    p.write_bytes(b'{"model_name": "LongCat-Video"}\n')
    assert hm.file_git_sha1(p) == git_hash(p.read_bytes())
    if shutil.which("git"):
        got = subprocess.run(["git", "hash-object", str(p)], capture_output=True, text=True)
        assert got.stdout.strip() == hm.file_git_sha1(p)
    assert sha256_file(p) == hashlib.sha256(p.read_bytes()).hexdigest()


def test_every_file_is_checked_against_the_hub_online(online, tiny_native, tmp_path):
    root = _copy(tiny_native, tmp_path)
    (root / ".cache" / "huggingface").mkdir(parents=True)
    (root / ".cache" / "huggingface" / "x.metadata").write_text("hf's own")
    checks = hm.compare_with_hub(root, REPO)
    assert online == [(REPO, {"revision": None, "files_metadata": True})]
    assert {c.status for c in checks} == {"ok"} and len(checks) == len(source_files(tiny_native))
    want = _damage(root)
    report = hm.against_hub_report(root, REPO)
    assert report.source == "hub" and report.commit == COMMIT and not report.ok
    got = {c.file: c.status for c in report.checks if c.status != "ok"}
    assert got == want
    for c in report.checks:
        assert c.message.startswith(c.file + ":")
    assert [c.file for c in report.failures] == sorted(set(want) - {"dit/stray.txt"})
    doc = report.as_dict()
    assert doc["ok"] is False and doc["counts"]["extra"] == 1
    json.dumps(doc)
    assert {c.status for c in hm.compare_with_hub(root, REPO, hashes=False)} >= {"size", "ok"}


def test_a_manifest_saves_and_loads_with_its_schema(online, tmp_path):
    m = hm.fetch_manifest(REPO, "main")
    path = hm.save_manifest(m, tmp_path / "m.json")
    back = hm.load_manifest(path)
    assert back.files == m.files and back.commit == COMMIT and back.revision == "main"
    assert m.files[SHARD1].sha256 and not m.files[SHARD1].git_sha1
    assert m.files[SCHED].git_sha1 and not m.files[SCHED].sha256
    doc = json.loads(path.read_text())
    doc["files"][SHARD1]["sha256"] = "not-a-hash"
    path.write_text(json.dumps(doc))
    with pytest.raises(LongcatError, match=r"m\.json: files/dit/.*sha256.*\[schema hub_manifest\]"):
        hm.load_manifest(path)
    doc["files"] = {"../escape": {"size": 1}}
    path.write_text(json.dumps(doc))
    with pytest.raises(LongcatError, match="schema hub_manifest"):
        hm.load_manifest(path)


def test_offline_a_saved_manifest_is_the_record(online, tiny_native, tmp_path, monkeypatch):
    root = _copy(tiny_native, tmp_path)
    hm.save_manifest(hm.fetch_manifest(REPO), root / hm.LOCAL_NAME)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(online)
    report = hm.against_hub_report(root)  # the repo id comes from the saved manifest
    assert report.ok and report.source == f"manifest {root / hm.LOCAL_NAME}" and len(online) == n
    assert all(c.file != hm.LOCAL_NAME for c in report.checks)
    want = _damage(root)
    got = {c.file: c.status for c in hm.compare_with_hub(root) if c.status != "ok"}
    assert got == want
    with pytest.raises(UsageError, match="a manifest for meituan-longcat/LongCat-Video, not x/y"):
        hm.compare_with_hub(root, "x/y", manifest=root / hm.LOCAL_NAME)


def test_an_unreachable_hub_falls_back_to_the_saved_manifest(online, tiny_native, tmp_path,
                                                             monkeypatch):
    root = _copy(tiny_native, tmp_path)
    hm.save_manifest(hm.fetch_manifest(REPO), root / hm.LOCAL_NAME)

    def down(self, *a, **k):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", down)
    report = hm.against_hub_report(root)
    assert report.ok and "the hub was unreachable" in report.source


def test_offline_the_cache_checks_itself(tiny_native, tmp_path):
    """No manifest, no network: blob names (sha256 / git sha1) catch a corrupted cache."""
    snap = build_cache(tiny_native, tmp_path / "hub", tree=True, only=["dit/", "lora/"])
    report = hm.against_hub_report(REPO)  # a repo id works as well as the snapshot folder
    assert report.source == "cache" and report.complete and report.repo_id == REPO
    missing = {c.file for c in report.checks if c.status == "missing"}
    assert missing == {r for r in source_files(tiny_native)
                       if not r.startswith(("dit/", "lora/"))}
    blob = (snap / SHARD1).resolve()
    data = bytearray(blob.read_bytes())
    data[100] ^= 0x10
    blob.write_bytes(bytes(data))
    bad = [c for c in hm.compare_with_hub(snap) if c.status == "sha256"]
    assert [c.file for c in bad] == [SHARD1]


def test_without_a_tree_listing_the_cache_checks_what_it_holds(tiny_native, tmp_path):
    snap = build_cache(tiny_native, tmp_path / "hub", only=["dit/"])
    report = hm.against_hub_report(snap)
    assert report.ok and not report.complete
    assert {c.status for c in report.checks} == {"ok"}
    assert len(report.checks) == sum(1 for r in source_files(tiny_native) if r.startswith("dit/"))


def test_offline_with_no_record_is_one_line(tiny_native):
    with pytest.raises(LongcatError) as e:
        hm.compare_with_hub(tiny_native, REPO)
    msg = str(e.value)
    assert "\n" not in msg and "hub-manifest meituan-longcat/LongCat-Video" in msg
    assert "HF_HUB_OFFLINE=1" in msg
    with pytest.raises(UsageError, match="which hub repo"):
        hm.compare_with_hub(tiny_native)


def test_links_out_of_the_snapshot_are_reported_not_hashed(tiny_native, tmp_path):
    snap = build_cache(tiny_native, tmp_path / "hub")
    outside = tmp_path / "outside.safetensors"
    shutil.copy(snap / SHARD1, outside)
    (snap / SHARD1).unlink()
    (snap / SHARD1).symlink_to(outside)
    bad = [c for c in hm.compare_with_hub(snap) if c.status in hm.FAIL]
    assert [(c.file, c.status) for c in bad] == [(SHARD1, "unsafe-link")]


def test_hub_manifest_command(online, tmp_path, capsys, monkeypatch):
    out = tmp_path / "m.json"
    assert main(["hub-manifest", f"{REPO}@main", "--out", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["commit"] == COMMIT and doc["lfs_files"] > 0
    assert hm.load_manifest(out).revision == "main"
    assert main(["hub-manifest", REPO, "--out", str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["hub-manifest", REPO, "--out", str(out), "--force"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HF_HUB_OFFLINE=1" in err[0]
    # a bad --out is refused before the network (it failed after the fetch, as internal errors)
    for bad, says in ((tmp_path, "is a folder"), ("", "an empty path"),
                      (tmp_path / "no" / "m.json", "parent folder does not exist")):
        assert main(["hub-manifest", REPO, "--out", str(bad), "--force"]) == 2
        assert says in capsys.readouterr().err
