"""The hashing writer and the source reader: bytes and digests are exact across buffer
boundaries, with and without O_DIRECT (writes, and reads of bytes not in the page cache), and
file systems that refuse O_DIRECT fall back."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os

import pytest

from longcat_tools.errors import LongcatError
from longcat_tools.io import checksums as cs
from longcat_tools.io.sources import Sources


def _write_mixed(path, src, writers):
    """Writes and ranged copies of odd sizes that straddle the 8 KiB staging buffers."""
    out = writers.file(path)
    expect = bytearray()
    data = src.read_bytes()
    sources = Sources()
    try:
        for i, (off, n) in enumerate([(3, 5000), (0, 8192), (777, 20001), (9, 1), (100, 0),
                                      (12345, 16384), (1, 4095)]):
            if i % 2:
                out.write(data[off:off + n])
            else:
                out.copy_from(sources, src, off, n)
            expect += data[off:off + n]
    finally:
        sources.close()
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
        later = cs.copy_hashed(src, tmp_path / "b.bin", w, Sources()).result()
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
        digest = cs.copy_hashed(src, tmp_path / "c.bin", w, Sources()).result()
    assert (tmp_path / "c.bin").read_bytes() == src.read_bytes()
    assert digest == hashlib.sha256(src.read_bytes()).hexdigest()
    assert refused == [0]  # tried once, then written without O_DIRECT


def test_padded_last_block_is_cut_when_o_direct_is_refused_late(tmp_path, monkeypatch):
    """The write thread refuses O_DIRECT only after the last, padded block was queued."""
    import time

    real = os.pwrite

    def pwrite(fd, data, offset):
        if os.O_DIRECT & fcntl.fcntl(fd, fcntl.F_GETFL):
            time.sleep(0.3)  # the main thread queues every block meanwhile
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(cs.os, "pwrite", pwrite)
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(30000))
    with cs.Writers(8192, 8) as w:
        cs.copy_hashed(src, tmp_path / "e.bin", w, Sources()).result()
    assert (tmp_path / "e.bin").read_bytes() == src.read_bytes()


def test_a_failed_write_is_raised_not_lost(tmp_path, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cs.os, "pwrite", full)
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(30000))
    with cs.Writers(8192, 2) as w, pytest.raises(OSError, match="No space left"):
        cs.copy_hashed(src, tmp_path / "d.bin", w, Sources())


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


def _cold_copy(data: bytes, path) -> None:
    """A file whose bytes are on disk but not in the page cache: written with O_DIRECT, then
    any page the kernel still holds dropped (without that, 5 runs of this file in 10 found
    every probed page cached, on ext4)."""
    with cs.Writers(8192, 2) as w:
        out = w.file(path)
        out.write(data)
        out.close()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _probes_answer(monkeypatch, error: OSError) -> None:
    """Every cached-only read (``preadv`` with flags) raises ``error``; plain reads are real."""
    from longcat_tools.io import sources as src_mod

    real = os.preadv

    def preadv(fd, buffers, offset, flags=0):
        if flags:
            raise error
        return real(fd, buffers, offset)

    monkeypatch.setattr(src_mod.os, "preadv", preadv)
    monkeypatch.setattr(src_mod, "_NOWAIT", getattr(os, "RWF_NOWAIT", 8))


@pytest.mark.parametrize("probe", ["kernel", "misses", "off"])
def test_sources_read_cached_and_cold_bytes_alike(tmp_path, monkeypatch, probe):
    """``kernel``: the cached-only probe as the kernel answers it. A probe of a cold page may
    still succeed (RWF_NOWAIT starts the read and, on a fast disk, it can finish in time), so
    which path read the bytes is asserted only where every probe ``misses``. ``off``: kernels
    without RWF_NOWAIT."""
    from longcat_tools.io import sources as src_mod

    if probe == "off":
        monkeypatch.setattr(src_mod, "_NOWAIT", 0)
    elif probe == "misses":
        _probes_answer(monkeypatch, BlockingIOError(errno.EAGAIN, "Resource temporarily "
                                                    "unavailable"))
    data = os.urandom(200_003)
    cold = tmp_path / "cold.bin"
    _cold_copy(data, cold)
    s = Sources(bounce=16384)
    try:
        got = bytearray()
        for off, n in [(5, 70_001), (70_006, 4096), (74_102, 125_901)]:
            view = memoryview(bytearray(n))
            s.read_into(cold, off, view)
            got += view
        assert bytes(got) == data[5:]
        if probe == "misses":  # every byte came through O_DIRECT
            assert s.direct_bytes == len(data) - 5
        s.read_into(cold, 0, memoryview(bytearray(10)))  # now cached or not: same bytes
        with pytest.raises(LongcatError, match="unexpected end of file"):
            s.read_into(cold, len(data) - 5, memoryview(bytearray(10)))
        assert s.read(cold, len(data), memoryview(bytearray(10))) == 0
    finally:
        s.close()


def test_sources_fall_back_where_cached_only_reads_are_refused(tmp_path, monkeypatch):
    from longcat_tools.io import sources as src_mod

    _probes_answer(monkeypatch, OSError(errno.EOPNOTSUPP, "Operation not supported"))
    data = os.urandom(50_000)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    s = Sources()
    try:
        view = memoryview(bytearray(49_990))
        s.read_into(path, 10, view)
    finally:
        s.close()
    assert bytes(view) == data[10:] and src_mod._NOWAIT == 0


def test_refresh_never_hashes_outside_the_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    (root / "lora" / "x").mkdir(parents=True)
    (tmp_path / "secret").write_text("not ours")
    (root / cs.MANIFEST).write_text(f"{'0' * 64}  lora/x/../../../secret\n")
    with pytest.raises(LongcatError, match="leaves the checkpoint"):
        cs.refresh_manifest(root, [root / "lora" / "x"])
