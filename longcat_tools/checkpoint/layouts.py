"""Checkpoint folder shapes: where its parts are, which files hold the DiT.

Layouts: ``native`` (the hub release: ``dit/``), ``converted`` (``model_index.json`` +
``transformer/`` sharded with an index, in either key flavour) and ``fastvideo-single`` (FastVideo's
converter output: one ``transformer/model.safetensors``); ``comfy-single`` (a ComfyUI single-file
DiT, only ever a convert source: :mod:`longcat_tools.checkpoint.comfy_single`). Every path read
from a file is checked to stay inside the checkpoint; symlinks may not lead out of it. A snapshot
in the Hugging Face cache is the one exception: its files are symlinks into the repo's ``blobs/``,
so its containment boundary is the repo's cache folder (``hub.snapshot_roots``), never anything
wider.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longcat_tools.errors import LongcatError, UsageError
from longcat_tools.io import jsonio
from longcat_tools.model import fp8, keymap

LAYOUTS = ("native", "converted", "fastvideo-single", "comfy-single")
# A ComfyUI single-file DiT (Kijai's LongCat-Video_comfy): a convert source, never a checkpoint.
COMFY_SINGLE = "comfy-single"
ENV_MODEL = "LONGCAT_TOOLS_MODEL"
DIT_STEM = "diffusion_pytorch_model"
INDEX_NAME = f"{DIT_STEM}.safetensors.index.json"
FASTVIDEO_SINGLE = "model.safetensors"
COMPONENTS = ("tokenizer", "text_encoder", "vae", "scheduler")
NATIVE_LORAS = {"cfg_step_lora.safetensors": "distilled",
                "refinement_lora.safetensors": "refinement"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def inside(root: Path, rel: str, what: str = "path",
           allowed: Path | tuple[Path, ...] | None = None) -> Path:
    """``root/rel`` after checking that ``rel`` is a plain relative name and that the resolved file
    (symlinks followed) stays inside ``allowed`` (default: ``root``)."""
    if not rel or os.path.isabs(rel) or "\\" in rel or any(p in ("..", "") for p in rel.split("/")):
        raise LongcatError(f"{root}: {what} '{rel}' leaves the checkpoint folder (only plain "
                           "relative names are allowed)")
    path = root / rel
    check_contained(path, root.resolve() if allowed is None else allowed)
    return path


def check_contained(path: Path, allowed: Path | tuple[Path, ...]) -> None:
    """Refuse a path whose real location (after symlinks) is outside ``allowed`` (one real folder,
    or several: a cache snapshot may also lead into its repo's blobs)."""
    roots = (allowed,) if isinstance(allowed, Path) else tuple(allowed)
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise LongcatError(f"{path}: cannot be resolved ({e})") from None
    if not any(real == a or a in real.parents for a in roots):
        where = " or ".join(str(a) for a in roots)
        raise LongcatError(f"{path}: resolves to {real}, outside the checkpoint {where} "
                           "(symlinks may not leave the checkpoint)")


def owned(folder: Path, path: Path, what: str,
          allowed: tuple[Path, ...] = ()) -> Path:
    """``path`` after checking that it belongs to ``folder``, the one folder a command may read,
    write or delete in (``lora/`` for adapters): ``folder`` is a real folder, not a link, and
    the real location of ``path`` (links followed) lies inside it, or inside ``allowed`` (the
    real folders a cache snapshot's links lead to). Staying inside the checkpoint is not enough:
    a link ``lora/x -> ../dit`` leads to the DiT."""
    check_plain(folder, f"the folder of {what}", folder=True)
    try:
        real, base = path.resolve(), folder.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise LongcatError(f"{path}: {what} cannot be resolved ({e})") from None
    if not any(a in real.parents for a in allowed or (base,)):
        raise LongcatError(f"{path}: {what} resolves to {real}, outside {folder}; links are "
                           "never followed out of it (remove the link or the entry naming it)")
    return path


def check_plain(path: Path, what: str, *, folder: bool = False) -> None:
    """Refuse ``path`` when it exists as a symlink or as anything but a regular file (a real
    folder with ``folder``). For a path a command creates, replaces, locks or deletes by name:
    going through a link would act on whatever it points at, and a FIFO blocks a reader."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    except OSError as e:
        raise LongcatError(f"{path}: cannot inspect {what} ({e.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        raise LongcatError(f"{path}: {what} is a symlink (to {os.readlink(path)}), which is never "
                           "followed here; remove the link")
    want, test = ("folder", stat.S_ISDIR) if folder else ("regular file", stat.S_ISREG)
    if not test(st.st_mode):
        raise LongcatError(f"{path}: {what} is not a {want} ({jsonio.kind_of(st.st_mode)}); "
                           "remove it or move it aside")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder and what its layout says about it."""

    root: Path
    layout: str  # one of LAYOUTS
    flavour: str  # key flavour of the transformer: "native" or "fastvideo"
    transformer_dir: Path  # dit/ or transformer/
    # Real folders its files may resolve into; empty means the root itself. A Hugging Face cache
    # snapshot sets its repo's cache folder (and the cache's shared blob store, if any).
    allowed: tuple[Path, ...] = ()

    @property
    def containment(self) -> tuple[Path, ...]:
        return self.allowed or (self.root.resolve(),)

    @property
    def in_hf_cache(self) -> bool:
        """A snapshot of the Hugging Face cache: read it, never write into it."""
        return bool(self.allowed)

    @property
    def config_path(self) -> Path:
        return self.transformer_dir / "config.json"

    @property
    def lora_dir(self) -> Path:
        return self.root / "lora"

    def config(self) -> dict[str, Any]:
        if self.config_path.exists():
            check_contained(self.config_path, self.containment)
        cfg = jsonio.read(self.config_path, what="transformer config")
        if not isinstance(cfg, dict):
            raise LongcatError(f"{self.config_path}: not a JSON object")
        return cfg

    @property
    def is_fp8(self) -> bool:
        """Whether the DiT folder is an fp8 checkpoint (``model.fp8``: its
        ``quantization_config.json``); another quantization method is one line."""
        path = self.transformer_dir / fp8.CONFIG_FILE
        if self.layout == COMFY_SINGLE or not path.exists():
            return False
        check_contained(path, self.containment)
        cfg = jsonio.read(path, what="quantization config")
        if not fp8.is_config(cfg):
            method = cfg.get("quantization_method") if isinstance(cfg, dict) else None
            raise LongcatError(f"{path}: quantization_method {method!r} is not one this tool "
                               f"reads ({fp8.METHOD}); convert the checkpoint to bf16 with "
                               "the tool that wrote it")
        return True

    def describe(self) -> str:
        if self.layout == COMFY_SINGLE:
            return "ComfyUI single-file DiT"
        fp8_note = ", fp8" if self.is_fp8 else ""
        if self.layout == "native":
            return f"native (hub release{fp8_note})"
        return f"{self.layout} ({self.flavour} keys{fp8_note})"


def detect(root: str | Path) -> Checkpoint:
    """Recognise the layout of a checkpoint folder; anything else is a LongcatError."""
    root = Path(root)
    if not root.exists():
        raise LongcatError(f"{root}: no such folder")
    if not root.is_dir():
        raise LongcatError(f"{root}: not a folder (a checkpoint is a folder with dit/ or "
                           "transformer/)")
    from longcat_tools.checkpoint.hub import snapshot_roots

    allowed = snapshot_roots(root)
    dit, transformer = root / "dit", root / "transformer"
    if dit.is_dir():
        return Checkpoint(root, "native", "native", dit, allowed)
    if transformer.is_dir():
        cfg_path = transformer / "config.json"
        single = transformer / FASTVIDEO_SINGLE
        cls = None
        if cfg_path.is_file():
            check_contained(cfg_path, allowed or (root.resolve(),))
            cfg = jsonio.read(cfg_path, what="transformer config")
            cls = cfg.get("_class_name") if isinstance(cfg, dict) else None
        if single.exists() and not (transformer / INDEX_NAME).exists():
            return Checkpoint(root, "fastvideo-single", "fastvideo", transformer, allowed)
        flavour = keymap.config_flavour(cfg) if cls is not None else "fastvideo"
        return Checkpoint(root, "converted", flavour, transformer, allowed)
    raise LongcatError(f"{root}: not a LongCat-Video checkpoint (expected dit/ for the hub layout "
                       "or transformer/ for the model_index.json layout)")


def looks_like_checkpoint(path: Path) -> bool:
    return (path / "dit").is_dir() or (path / "transformer").is_dir()


def resolve_model(arg: str | Path | None) -> Path:
    """The ``--model`` convention: the argument, else ``$LONGCAT_TOOLS_MODEL``, else the current
    folder when it holds a checkpoint. The argument or variable may also be a Hugging Face repo id
    (``org/name[@revision]``), found in the local cache; an existing local path always wins, and
    nothing is ever downloaded here (``hub.resolve_source``)."""
    from longcat_tools.checkpoint.hub import resolve_source

    if arg:
        return resolve_source(arg)
    env = os.environ.get(ENV_MODEL)
    if env:
        return resolve_source(env)
    cwd = Path.cwd()
    if looks_like_checkpoint(cwd):
        return cwd
    raise UsageError(f"no checkpoint given: pass --model PATH, set {ENV_MODEL}, or run inside a "
                     "checkpoint folder")


def transformer_shards(ckpt: Checkpoint) -> dict[str, Path]:
    """Tensor name -> shard file of the DiT, from the index (or the single file).

    Refuses: an index that names a missing shard or a file outside the folder, a tensor listed
    twice, a shard on disk the index omits, pickle weight files.
    """
    folder = ckpt.transformer_dir
    allowed = ckpt.containment
    shard_allowed = ckpt.allowed or None  # local checkpoints: shards stay in the DiT folder
    for p in sorted(folder.iterdir()):
        if p.name.endswith(PICKLE_SUFFIXES):
            raise LongcatError(f"{p}: pickle weight files are never loaded (convert it to "
                               "safetensors first)")
    index = folder / INDEX_NAME
    if index.exists():
        check_contained(index, allowed)
        doc = jsonio.read(index, what="shard index")
        wm = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise LongcatError(f"{index}: 'weight_map' must be a non-empty object")
        files: dict[str, Path] = {}
        out: dict[str, Path] = {}
        for name, rel in wm.items():
            if not isinstance(rel, str):
                raise LongcatError(f"{index}: tensor '{name}' maps to {rel!r}, not a file name")
            if rel not in files:
                path = inside(folder, rel, "shard", shard_allowed)
                check_contained(path, allowed)
                if not path.is_file():
                    raise LongcatError(f"{index}: names shard '{rel}', which is missing")
                files[rel] = path
            out[name] = files[rel]
        on_disk = {p.name for p in folder.glob("*.safetensors")}
        stray = sorted(on_disk - set(files))
        if stray:
            raise LongcatError(f"{folder / stray[0]}: shard on disk that {INDEX_NAME} does not "
                               "name (a stray shard would be loaded by glob-based loaders; remove "
                               "it or fix the index)")
        return out
    candidates = [folder / FASTVIDEO_SINGLE, folder / f"{DIT_STEM}.safetensors"]
    found = [p for p in candidates if p.is_file()]
    if not found:
        raise LongcatError(f"{folder}: no DiT weights (expected {INDEX_NAME} with its shards, "
                           f"{DIT_STEM}.safetensors or {FASTVIDEO_SINGLE})")
    check_contained(found[0], allowed)
    from longcat_tools.io.safetensors import read_header

    return {name: found[0] for name in read_header(found[0]).tensors}

