"""Odd JSON and special files under every command that reads JSON: one line naming the file, exit 1.

Each payload turns one file the tools read (a config, an index, the LoRA registry, an adapter
config, a safetensors header, a schema) into something hostile: a FIFO (which must not hang the
command), a folder, a 5000-digit integer, NaN, Infinity, 1e999 (which Python parses to inf),
nesting 100000 deep, invalid UTF-8, a duplicate key, an empty file, a 1 GiB sparse file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from hf_cache import REPO, build_cache
from hostile import refused
from huggingface_hub import constants as hf_constants

from longcat_tools import schemas
from longcat_tools.checkpoint import layouts
from longcat_tools.cli import main
from longcat_tools.errors import LongcatError
from longcat_tools.io import jsonio

CONFIG = "dit/config.json"
INDEX = f"dit/{layouts.INDEX_NAME}"
MODEL_INDEX = "model_index.json"
REGISTRY = "lora/adapters.json"
SHARD = "dit/diffusion_pytorch_model-00001-of-00005.safetensors"
LORA = "cfg_step_lora.safetensors"
TIME_LIMIT_S = 20  # a FIFO that blocks a read would stop the test here instead of forever

# payload -> (JSON text, a word the error line must hold); bytes where the text is not UTF-8
TEXTS: dict[str, tuple[str | bytes, str]] = {
    "digits-5000": ('{"depth": ' + "7" * 5000 + "}", "digits"),
    "nan": ('{"depth": NaN}', "NaN"),
    "infinity": ('{"mlp_ratio": Infinity}', "Infinity"),
    "minus-infinity": ('{"mlp_ratio": -Infinity}', "-Infinity"),
    "1e999": ('{"mlp_ratio": 1e999}', "1e999"),
    "nested-100000": ("[" * 100_000 + "]" * 100_000, "nested"),
    "not-utf8": (b'{"_class_name": "\xff\xfe"}', "UTF-8"),
    "duplicate-key": ('{"depth": 2, "depth": 3}', "twice"),
    "empty": ("", "empty"),
}


def _replace(path: Path, make: Callable[[Path], None]) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    make(path)


def _sparse(path: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(2**30)  # 1 GiB of hole: beyond any JSON limit, costs no disk


FILE_KINDS: dict[str, tuple[Callable[[Path], None], str]] = {
    "fifo": (os.mkfifo, "FIFO"),
    "folder": (lambda p: p.mkdir(), "folder"),
    "huge-sparse": (_sparse, "bytes"),
}


def _write(text: str | bytes) -> Callable[[Path], None]:
    return lambda p: p.write_bytes(text if isinstance(text, bytes) else text.encode())


PAYLOADS = {**{k: (_write(t), w) for k, (t, w) in TEXTS.items()}, **FILE_KINDS}


def _header(text: str | bytes) -> Callable[[Path], None]:
    """A safetensors file whose header is ``text`` (padded to 8 bytes, no tensor data)."""
    blob = text if isinstance(text, bytes) else text.encode()
    blob += b" " * (-len(blob) % 8)
    return lambda p: p.write_bytes(struct.pack("<Q", len(blob)) + blob)


@pytest.fixture(autouse=True)
def _deadline():
    """Fail, never hang: a blocking open or read is interrupted by the alarm."""
    def boom(*_):
        raise TimeoutError(f"no answer within {TIME_LIMIT_S} s (blocked on a special file?)")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(TIME_LIMIT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv(layouts.ENV_MODEL, raising=False)


@pytest.fixture(scope="module")
def work(tiny_native, tmp_path_factory):
    """One copy of the tiny checkpoint for the whole module (each case damages one file and puts
    it back), a registry with one adapter, a LoRA file and a PEFT adapter config outside it."""
    base = tmp_path_factory.mktemp("hostile-json")
    root = base / "ckpt"
    shutil.copytree(tiny_native, root, symlinks=True)
    lora = base / LORA
    shutil.copy(root / "lora" / LORA, lora)
    assert main(["lora", "attach", "-m", str(root), str(lora), "--name", "kept", "-q"]) == 0
    peft = base / "peft"
    peft.mkdir()
    assert main(["lora", "export", "kept", "-m", str(root), "--format", "peft", "--out",
                 str(peft / "adapter_model.safetensors"), "-q"]) == 0
    return root, lora, peft


@pytest.fixture
def damage(work):
    """``damage(path, make)``: replace a file for one test; the original comes back after it."""
    saved: list[tuple[Path, bytes]] = []

    def apply(path: Path, make: Callable[[Path], None]) -> Path:
        saved.append((path, path.read_bytes()))
        _replace(path, make)
        return path

    yield apply
    for path, data in saved:
        _replace(path, lambda p, d=data: p.write_bytes(d))


def _cmd(name: str, root: Path, lora: Path, peft: Path, tmp: Path) -> list[object]:
    m = ["-m", root]
    return {
        "bsa-status": ["bsa", "status", *m],
        "bsa-enable": ["bsa", "enable", *m],
        "verify": ["verify", root, "-q"],
        "convert": ["convert", "--src", root, "--dst", tmp / "out", "-q"],
        "lora-list": ["lora", "list", *m],
        "lora-attach": ["lora", "attach", *m, lora, "--name", "new", "-q"],
        "lora-attach-peft": ["lora", "attach", *m, peft / "adapter_model.safetensors",
                             "--name", "new", "--adapter-config", peft / "adapter_config.json",
                             "-q"],
        "run": ["run", "-q", *m, "--task", "t2v", "-p", "a cat", "--height", "32", "--width",
                "32", "--frames", "9", "--steps", "1", "--device", "cpu", "--out",
                tmp / "o.mp4"],
    }[name]


# (file, commands that read it)
TARGETS = {
    CONFIG: ["bsa-status", "bsa-enable", "verify", "convert", "lora-list", "lora-attach", "run"],
    INDEX: ["verify", "convert", "run"],
    MODEL_INDEX: ["verify"],
    REGISTRY: ["lora-list", "lora-attach", "verify"],
    "peft/adapter_config.json": ["lora-attach-peft"],
}
CASES = [(f, c, p) for f, cmds in TARGETS.items() for c in cmds for p in PAYLOADS]


@pytest.mark.parametrize("rel, command, payload", CASES,
                         ids=[f"{f}-{c}-{p}" for f, c, p in CASES])
def test_a_hostile_json_file_is_one_line_naming_it(work, damage, tmp_path, capsys, rel, command,
                                                   payload):
    root, lora, peft = work
    path = peft / "adapter_config.json" if rel.startswith("peft/") else root / rel
    make, word = PAYLOADS[payload]
    damage(path, make)
    line = refused(capsys, *_cmd(command, root, lora, peft, tmp_path), says=str(path))
    assert word in line, line
    assert not (tmp_path / "out").exists() and not (tmp_path / "o.mp4").exists()


HEADER_CASES = [(c, p) for c in ("verify", "convert", "lora-attach") for p in TEXTS]


@pytest.mark.parametrize("command, payload", HEADER_CASES,
                         ids=[f"{c}-{p}" for c, p in HEADER_CASES])
def test_a_hostile_safetensors_header_is_one_line_naming_the_file(work, damage, tmp_path,
                                                                  capsys, command, payload):
    root, lora, peft = work
    path = lora if command == "lora-attach" else root / SHARD
    text, word = TEXTS[payload]
    damage(path, _header(text))
    line = refused(capsys, *_cmd(command, root, lora, peft, tmp_path), says=str(path))
    assert word in line, line


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_a_hostile_schema_file_is_one_line_naming_it(tmp_path, monkeypatch, capsys, payload):
    folder = tmp_path / "schemas"
    shutil.copytree(schemas.data_dir("schemas"), folder)
    monkeypatch.setattr(schemas, "data_dir", lambda name: tmp_path / name)
    schemas.load.cache_clear()
    path = folder / "hub_manifest.schema.json"
    make, word = PAYLOADS[payload]
    _replace(path, make)
    try:
        line = refused(capsys, "schema", "hub_manifest", says=str(path))
    finally:
        schemas.load.cache_clear()
    assert word in line, line


@pytest.fixture(scope="module")
def cache(tiny_native, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf") / "hub"
    return root, build_cache(tiny_native, root)


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_download_offline_refuses_a_hostile_cached_config(cache, damage, monkeypatch, capsys,
                                                          payload):
    """In the cache the config is a link into blobs/: the blob is what turns hostile."""
    root, snap = cache
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    link = snap / CONFIG
    make, word = PAYLOADS[payload]
    damage(link.resolve(), make)
    line = refused(capsys, "download", f"{REPO}@main", "-q", says=CONFIG)
    assert word in line, line


def test_nothing_hostile_was_written(work):
    """The tools write strict JSON: every JSON file the cases touched reads back strictly."""
    root, _, _ = work
    def no_constant(token: str):
        raise AssertionError(f"non-finite {token} written")

    for p in root.rglob("*.json"):
        assert p.is_file() and not p.is_symlink(), p
        json.loads(p.read_text(), parse_constant=no_constant)


def test_nesting_below_the_interpreter_limit_is_refused_too():
    """500 levels parse without a RecursionError, and would still overflow a recursive consumer
    later (schema validation, deepcopy): the reader refuses them itself."""
    with pytest.raises(jsonio.JsonError, match="nested too deeply"):
        jsonio.loads("[" * 500 + "]" * 500, "x.json")
    assert jsonio.loads('{"a": [[{"b": 1.5}]]}', "x.json") == {"a": [[{"b": 1.5}]]}


def test_writing_nan_is_refused_not_written():
    with pytest.raises(LongcatError, match="NaN"):
        jsonio.dumps({"sparsity": float("nan")})
    assert jsonio.dumps({"a": 1}) == '{\n  "a": 1\n}\n'
