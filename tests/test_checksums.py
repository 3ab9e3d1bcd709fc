"""The hashing writer: bytes and digests are exact across staging-buffer boundaries, with and
without O_DIRECT, and a file system that refuses O_DIRECT at write time falls back."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os

import pytest

from longcat_tools import checksums as cs


def _write_mixed(path, src, writers):
    """Writes and ranged copies of odd sizes that straddle the 8 KiB staging buffers."""
    out = writers.file(path)
    expect = bytearray()
    data = src.read_bytes()
    fd = os.open(src, os.O_RDONLY)
    try:
        for i, (off, n) in enumerate([(3, 5000), (0, 8192), (777, 20001), (9, 1), (100, 0),
                                      (12345, 16384), (1, 4095)]):
            if i % 2:
                out.write(data[off:off + n])
            else:
                out.copy_from(fd, off, n)
            expect += data[off:off + n]
    finally:
        os.close(fd)
    return out, bytes(expect)


@pytest.mark.parametrize("direct", [True, False])
def test_hashing_file_writes_and_hashes_exactly(tmp_path, monkeypatch, direct):
    if not direct:
        monkeypatch.setenv(cs.ENV_NO_DIRECT, "1")
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(40000))
    with cs.Writers(8192, 2) as w:
        out, expect = _write_mixed(tmp_path / "a.bin", src, w)
        digest, size = out.close()
        got = (tmp_path / "a.bin").read_bytes()
        assert got == expect and size == len(expect)
        assert digest == hashlib.sha256(expect).hexdigest()
        later = cs.copy_hashed(src, tmp_path / "b.bin", w).result()
    assert later == hashlib.sha256(src.read_bytes()).hexdigest()
    assert (tmp_path / "b.bin").read_bytes() == src.read_bytes()


def test_o_direct_refused_at_write_falls_back(tmp_path, monkeypatch):
    real = os.pwrite
    refused = []

    def pwrite(fd, data, offset):
        if os.O_DIRECT & fcntl.fcntl(fd, fcntl.F_GETFL):
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(cs.os, "pwrite", pwrite)
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(30000))
    with cs.Writers(8192, 2) as w:
        digest = cs.copy_hashed(src, tmp_path / "c.bin", w).result()
    assert (tmp_path / "c.bin").read_bytes() == src.read_bytes()
    assert digest == hashlib.sha256(src.read_bytes()).hexdigest()
    assert refused == [0]  # tried once, then written without O_DIRECT


def test_a_failed_write_is_raised_not_lost(tmp_path, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cs.os, "pwrite", full)
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(30000))
    with cs.Writers(8192, 2) as w, pytest.raises(OSError, match="No space left"):
        cs.copy_hashed(src, tmp_path / "d.bin", w)


def test_bsa_and_lora_keep_a_converted_checksum_list_true(tiny_native, tmp_path):
    """convert lists config.json, adapters.json and the converted adapters; switching BSA or
    adapters afterwards must leave `verify --deep` (and `sha256sum -c`) passing."""
    from longcat_tools import convert
    from longcat_tools.cli import main

    dst = tmp_path / "conv"
    convert.convert(tiny_native, dst)
    adapter = next((dst / "lora" / "distilled").glob("*.safetensors"))
    extra = tmp_path / "extra.safetensors"
    extra.write_bytes(adapter.read_bytes())
    listed = cs.read_manifest(dst / cs.MANIFEST)
    assert {"transformer/config.json", "lora/adapters.json"} <= set(listed)
    steps = [["bsa", "enable"], ["bsa", "preset", "720p-fast"], ["bsa", "restore"],
             ["lora", "attach", str(extra), "--name", "extra"], ["lora", "detach", "distilled"],
             ["lora", "detach", "extra"]]
    for step in steps:
        assert main([*step, "-m", str(dst), "-q"]) == 0, step
        assert cs.check_manifest(dst) == {}, step
    now = cs.read_manifest(dst / cs.MANIFEST)
    assert now["transformer/config.json"] != listed["transformer/config.json"]  # re-hashed
    assert not any(r.startswith("lora/distilled/") for r in now)  # dropped with the file
    assert not any(r.startswith("lora/extra/") for r in now)  # attached files stay unlisted


def test_refresh_without_a_list_writes_nothing(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    cs.refresh_manifest(tmp_path, [tmp_path / "a.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
