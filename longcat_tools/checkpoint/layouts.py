"""Checkpoint folder shapes: where its parts are, which files hold the DiT.

Layouts: ``native`` (the hub release: ``dit/``), ``converted`` (``model_index.json`` +
``transformer/`` sharded with an index, in either key flavour) and ``fastvideo-single`` (FastVideo's
converter output: one ``transformer/model.safetensors``); ``comfy-single`` (a ComfyUI single-file
DiT, only ever a convert source: :mod:`longcat_tools.checkpoint.comfy_single`). An avatar folder
(LongCat-Video-Avatar 1.0 or 1.5) is an :class:`AvatarCheckpoint` (:func:`detect_any`): several DiT
folders, an audio encoder, and the base model's parts in the sibling ``../LongCat-Video``;
:func:`detect` names it and refuses it, since its callers read a base DiT. Every path read
from a file is checked to stay inside the checkpoint; symlinks may not lead out of it. A snapshot
in the Hugging Face cache is the one exception: its files are symlinks into the repo's ``blobs/``,
so its containment boundary is the repo's cache folder (``hub.snapshot_roots``), never anything
wider.
"""

from __future__ import annotations

import functools
import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from longcat_tools.errors import LongcatError, UsageError, refuse_empty
from longcat_tools.io import jsonio
from longcat_tools.io.safetensors import Header, TensorInfo, read_header
from longcat_tools.model import avatar, fp8, int8, keymap

LAYOUTS = ("native", "converted", "fastvideo-single", "comfy-single")
# A ComfyUI single-file DiT (Kijai's LongCat-Video_comfy): a convert source, never a checkpoint.
COMFY_SINGLE = "comfy-single"
ENV_MODEL = "LONGCAT_TOOLS_MODEL"
DIT_STEM = "diffusion_pytorch_model"
INDEX_NAME = f"{DIT_STEM}.safetensors.index.json"
FASTVIDEO_SINGLE = "model.safetensors"
COMPONENTS = ("tokenizer", "text_encoder", "vae", "scheduler")
LORA_DISTILL, LORA_REFINE = "distilled", "refinement"  # the hub adapters' names
NATIVE_LORAS = {"cfg_step_lora.safetensors": LORA_DISTILL,
                "refinement_lora.safetensors": LORA_REFINE}
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


def index_shards(index_path: Path, allowed: Path | tuple[Path, ...] | None = None,
                 index: Any = None) -> set[Path]:
    """The shards a ``*.safetensors.index.json`` (``index``: its content, when already read)
    names: each a plain name inside the index's folder (links followed: inside ``allowed``)
    and present. A loader follows a name out of the folder, or fails on a missing one after
    minutes of loading."""
    folder = index_path.parent
    if index is None:
        index = jsonio.read(index_path, what="shard index")
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise LongcatError(f"{index_path}: 'weight_map' must map tensor names to shard names")
    named = {inside(folder, rel, "shard", allowed) for rel in set(wm.values())}
    for p in sorted(named):
        if not p.is_file():
            raise LongcatError(f"{index_path}: names shard '{p.name}', which is missing")
    return named


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
    # Set on the view of one DiT folder of an avatar checkpoint (AvatarCheckpoint.dit).
    avatar: AvatarCheckpoint | None = None

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

    @functools.cached_property  # read once: describe(), the loader and convert all ask
    def is_fp8(self) -> bool:
        """Whether the DiT folder is an fp8 checkpoint (``model.fp8``: its
        ``quantization_config.json``); another quantization method is one line."""
        if self.layout == COMFY_SINGLE or self.avatar is not None:
            return False
        return fp8_declared(self.transformer_dir, self.containment)

    @property
    def shard_index(self) -> str:
        """The DiT folder's index file name (the avatar's INT8 folder has its own)."""
        int8_view = self.avatar is not None and self.avatar.is_int8(self)
        return int8.INDEX_NAME if int8_view else INDEX_NAME

    def describe(self) -> str:
        if self.layout == COMFY_SINGLE:
            return "ComfyUI single-file DiT"
        if self.avatar is not None:
            return f"{self.avatar.describe()}, DiT {self.transformer_dir.name}/"
        fp8_note = ", fp8" if self.is_fp8 else ""
        if self.layout == "native":
            return f"native (hub release{fp8_note})"
        return f"{self.layout} ({self.flavour} keys{fp8_note})"


def detect(root: str | Path) -> Checkpoint:
    """Recognise the layout of a base checkpoint folder; anything else (an avatar folder too) is
    a LongcatError."""
    found = detect_any(root)
    if isinstance(found, AvatarCheckpoint):
        raise LongcatError(f"{found.root}: is a {found.describe()} checkpoint; this command reads "
                           "the base LongCat-Video model only (verify, bsa and lora handle "
                           "avatar checkpoints)")
    return found


def detect_any(root: str | Path) -> Checkpoint | AvatarCheckpoint:
    """A base checkpoint's :class:`Checkpoint` or an avatar folder's :class:`AvatarCheckpoint`;
    anything else is a LongcatError."""
    root = Path(root)
    if not root.exists():
        raise UsageError(f"{root}: no such folder (pass a checkpoint folder)")
    if not root.is_dir():
        raise UsageError(f"{root}: not a folder (a checkpoint is a folder with dit/ or "
                         "transformer/)")
    from longcat_tools.checkpoint.hub import snapshot_roots

    allowed = snapshot_roots(root)
    dit, transformer = root / "dit", root / "transformer"
    if dit.is_dir():
        return Checkpoint(root, "native", "native", dit, allowed)
    converted = converted_avatar_version(root)
    if converted is not None:
        return AvatarCheckpoint(root, converted, allowed, converted=True)
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
    version = avatar_version(root)
    if version is not None:
        return AvatarCheckpoint(root, version, allowed)
    try:  # a weights tree, as synth writes one: name the folders to pass
        inner = sorted(p.name for p in root.iterdir() if p.is_dir()
                       and (p.name == avatar.BASE_FOLDER or avatar_version(p) is not None))
    except OSError:
        inner = []
    hint = f"; it holds {', '.join(f'{n}/' for n in inner)}: pass one of those" if inner else ""
    from longcat_tools.checkpoint.comfy_single import FILE_NAME as COMFY_FILE

    if (root / COMFY_FILE).is_file():  # what convert --to comfy writes
        hint = f"; it holds a ComfyUI single-file DiT: pass {root / COMFY_FILE}"
    raise LongcatError(f"{root}: not a LongCat-Video checkpoint (expected dit/ for the hub layout "
                       f"or transformer/ for the model_index.json layout){hint}")


# the DiT config's record of the adapters ``lora fuse`` merged into it ('_' keys: loaders skip)
FUSED_CONFIG_KEY = "_fused_loras"


def fused_scale(cfg: dict[str, Any], field: str, value: str) -> float | None:
    """The scale of the adapter whose record's ``field`` is ``value`` in a DiT config's
    ``FUSED_CONFIG_KEY``, None when no such adapter was fused."""
    fused = cfg.get(FUSED_CONFIG_KEY)
    for f in fused if isinstance(fused, list) else []:
        if isinstance(f, dict) and f.get(field) == value:
            scale = f.get("scale", 1.0)
            return float(scale) if isinstance(scale, (int, float)) else None
    return None


def fp8_declared(folder: Path, containment: tuple[Path, ...] | None = None) -> bool:
    """Whether a DiT folder says it holds fp8 weights (``model.fp8``'s config file); a config
    naming another quantization method is one line."""
    path = folder / fp8.CONFIG_FILE
    if not path.exists():
        return False
    if containment:
        check_contained(path, containment)
    cfg = jsonio.read(path, what="quantization config")
    if not fp8.is_config(cfg):
        method = cfg.get("quantization_method") if isinstance(cfg, dict) else None
        raise LongcatError(f"{path}: quantization_method {method!r} is not one this tool reads "
                           f"({fp8.METHOD}); convert the checkpoint to bf16 with the tool that "
                           "wrote it")
    return True


def check_int8_config(folder: Path) -> None:
    """An avatar INT8 folder's config names the one method its loader reads (``model.int8``)."""
    path = folder / int8.CONFIG_NAME
    cfg = jsonio.read(path, what="quantization config")
    method = cfg.get("quantization_method") if isinstance(cfg, dict) else None
    if method != int8.METHOD:
        raise LongcatError(f"{path}: quantization_method {method!r}, expected {int8.METHOD!r} "
                           "(the avatar's INT8 loader reads no other)")


def looks_like_checkpoint(path: Path) -> bool:
    return (path / "dit").is_dir() or (path / "transformer").is_dir()


# --- avatar checkpoints ------------------------------------------------------------------------

# What the avatar reads from the sibling base folder, per release (1.5 brings its own scheduler).
BASE_PARTS = {name: ("tokenizer", "text_encoder", "vae") + (() if v.own_scheduler
                                                            else ("scheduler",))
              for name, v in avatar.VERSIONS.items()}


def avatar_version(root: Path) -> avatar.AvatarVersion | None:
    """The avatar release a folder is, from the folders only it has: 1.0's ``avatar_single/`` or
    ``avatar_multi/``; 1.5's ``base_model/``, ``base_model_int8/``, or a root
    ``model_index.json`` that names an avatar (its model name or pipeline class; the base
    release's stub names LongCat-Video). None for any other folder; a folder with both releases'
    DiT folders is one LongcatError."""
    def marks(v: avatar.AvatarVersion) -> list[str]:
        names = [*v.dit_folders, *([v.int8_folder] if v.int8_folder else [])]
        return [n for n in names if (root / n).is_dir()]

    found = {name: marks(v) for name, v in avatar.VERSIONS.items()}
    index = root / "model_index.json"
    if not found["avatar-1.5"] and index.is_file() and not (root / "transformer").exists():
        doc = jsonio.read(index, what="pipeline index")
        if isinstance(doc, dict) and any(isinstance(v, str) and "Avatar" in v
                                         for v in (doc.get("model_name"), doc.get("_class_name"))):
            found["avatar-1.5"] = ["model_index.json"]
    hits = [name for name, m in found.items() if m]
    if len(hits) > 1:
        a, b = (found[h][0] for h in hits[:2])
        raise LongcatError(f"{root}: holds {a} (avatar {hits[0][7:]}) and {b} (avatar "
                           f"{hits[1][7:]}); one folder is one avatar release, keep them apart")
    return avatar.VERSIONS[hits[0]] if hits else None


@dataclass(frozen=True)
class AvatarCheckpoint:
    """A LongCat-Video-Avatar folder: its DiT folders (1.0: ``avatar_single``, ``avatar_multi``;
    1.5: ``base_model`` and its INT8 copy ``base_model_int8``), its audio encoder, and where the
    base model's tokenizer, text encoder and VAE (1.0: and scheduler) live: the sibling
    ``../LongCat-Video``, the only place the original looks."""

    root: Path
    version: avatar.AvatarVersion
    allowed: tuple[Path, ...] = ()
    # The model_index.json layout (``convert --to converted``): folders named as in
    # :func:`converted_avatar`, the base model's parts inside the folder itself.
    converted: bool = False

    @property
    def layout(self) -> str:
        return self.version.name

    @property
    def flavour(self) -> str:
        return "native"

    @property
    def containment(self) -> tuple[Path, ...]:
        return self.allowed or (self.root.resolve(),)

    @property
    def dits(self) -> tuple[str, ...]:
        """The bf16/fp32 DiT folders present, in the release's order."""
        return tuple(n for n in self.version.dit_folders if (self.root / n).is_dir())

    @property
    def int8(self) -> str | None:
        """The INT8 DiT folder, when present."""
        name = self.version.int8_folder
        return name if name and (self.root / name).is_dir() else None

    @property
    def dit_folders(self) -> tuple[str, ...]:
        """Every DiT folder present: the plain ones, then the INT8 one."""
        return self.dits + ((self.int8,) if self.int8 else ())

    @property
    def audio_encoder(self) -> Path:
        return self.root / self.version.audio_encoder

    @property
    def distill_fused(self) -> float | None:
        """The scale the release's distillation LoRA was fused into the DiT at (``lora fuse``
        records each fused adapter in the config's ``FUSED_CONFIG_KEY``), None when it was not."""
        if not self.version.lora or not self.dits:
            return None
        return fused_scale(self.dit(self.dits[0]).config(), "file", Path(self.version.lora).name)

    @property
    def lora_dir(self) -> Path:
        return self.root / "lora"

    @property
    def base(self) -> Path:
        """Where the base model's parts are looked for (whether or not they are there): the
        sibling ``../LongCat-Video``, or the folder itself in the model_index.json layout."""
        return self.root if self.converted else self.root.parent / avatar.BASE_FOLDER

    @property
    def base_parts(self) -> tuple[str, ...]:
        return BASE_PARTS[self.version.name]

    def base_problem(self) -> str | None:
        """Why the sibling base folder cannot serve this avatar (None: it can)."""
        base = self.base
        if not base.is_dir():
            return (f"the base model's folder {base} is missing: the avatar reads its "
                    f"{', '.join(self.base_parts)} from ../{avatar.BASE_FOLDER} (put the "
                    f"{avatar.BASE_FOLDER} checkpoint beside {self.root.name}, e.g. "
                    f"`longcat-tools download meituan-longcat/LongCat-Video --dst {base}`)")
        missing = [p for p in self.base_parts if not (base / p).is_dir()]
        if missing:
            return (f"the base model's folder {base} lacks {', '.join(p + '/' for p in missing)},"
                    f" which the avatar reads from there (a complete {avatar.BASE_FOLDER} "
                    "checkpoint belongs beside it)")
        return None

    def require_base(self) -> Path:
        """The sibling base folder; one LongcatError when it cannot serve."""
        problem = self.base_problem()
        if problem:
            raise LongcatError(f"{self.root}: {problem}")
        return self.base

    def describe(self) -> str:
        v = self.version.name.replace("avatar-", "")
        return f"LongCat-Video-Avatar {v}" + (" (model_index.json layout)" if self.converted
                                              else "")

    def dit(self, name: str | None = None) -> Checkpoint:
        """A :class:`Checkpoint` view of one DiT folder (default: the first present), for the
        commands that act on one transformer config and ``lora/``."""
        folders = self.dit_folders
        if not folders:
            wanted = self.version.dit_folders + ((self.version.int8_folder,)
                                                 if self.version.int8_folder else ())
            raise LongcatError(f"{self.root}: a {self.describe()} folder without a DiT folder "
                               f"(expected {' or '.join(w + '/' for w in wanted)})")
        if name is None:
            name = folders[0]
        elif name not in folders:
            raise LongcatError(f"{self.root}: no DiT folder {name}/ (this checkpoint has "
                               f"{', '.join(f + '/' for f in folders)})")
        return Checkpoint(self.root, self.version.name, "native", self.root / name, self.allowed,
                          self)

    def views(self) -> list[Checkpoint]:
        """One view per DiT folder present."""
        return [self.dit(n) for n in self.dit_folders]

    def is_int8(self, view: Checkpoint) -> bool:
        return view.transformer_dir.name == self.int8


def release_loras(ckpt: Checkpoint | AvatarCheckpoint) -> dict[str, str]:
    """The release's adapter files, which its layout keeps at the top of ``lora/``, and the
    names they go by."""
    if isinstance(ckpt, AvatarCheckpoint):
        file = Path(ckpt.version.lora) if ckpt.version.lora else None
        return {file.name: file.stem} if file else {}
    return dict(NATIVE_LORAS)


# The model_index.json layout of an avatar folder: hub DiT folder -> its folder there. The audio
# encoder, vocal_separator/, scheduler/ and lora/ keep their names; tokenizer/, text_encoder/, vae/
# (and 1.0's scheduler/) come in from the base folder.
AVATAR_PIPELINE = "LongCatVideoAvatarPipeline"
AVATAR_CONVERTED_FOLDERS = {"avatar_single": "transformer", "avatar_multi": "transformer_multi",
                            "base_model": "transformer", "base_model_int8": "transformer_int8"}


@functools.cache
def part_names() -> frozenset[str]:
    """The names at the top of a LongCat checkpoint folder of any layout or model (and of
    synth's avatar tree): what ``--force`` may replace beside what a writer writes, so a new
    layout replaces an old one, where your renders or notes there are refused."""
    from longcat_tools.checkpoint.comfy_single import FILE_NAME as COMFY_FILE
    from longcat_tools.checkpoint.hub_manifest import LOCAL_NAME as HUB_MANIFEST
    from longcat_tools.io.checksums import MANIFEST

    names = {"dit", "transformer", "lora", "vocal_separator", "model_index.json", "config.json",
             MANIFEST, COMFY_FILE, FASTVIDEO_SINGLE, *COMPONENTS, avatar.BASE_FOLDER,
             *AVATAR_CONVERTED_FOLDERS.values(),
             # what a download (`download --dst`, `huggingface-cli download --local-dir`) puts
             # beside the weights, and a file manager's litter: lora fuse copies them along
             HUB_MANIFEST, ".cache", ".gitattributes", "README.md", "LICENSE", "assets",
             ".DS_Store"}
    for v in avatar.VERSIONS.values():
        names |= {v.folder, v.audio_encoder, *v.dit_folders, *v.root_files,
                  *([v.int8_folder] if v.int8_folder else [])}
    return frozenset(names)


def converted_avatar(version: avatar.AvatarVersion) -> avatar.AvatarVersion:
    """The release as its model_index.json layout names its parts (same ``name``)."""
    int8_folder = version.int8_folder
    return replace(version,
                   dit_folders=tuple(AVATAR_CONVERTED_FOLDERS[f] for f in version.dit_folders),
                   int8_folder=AVATAR_CONVERTED_FOLDERS[int8_folder] if int8_folder else None,
                   own_scheduler=True,
                   root_files=("model_index.json",
                               *(f for f in version.root_files if f != "model_index.json")))


def converted_avatar_version(root: Path) -> avatar.AvatarVersion | None:
    """The avatar release of a model_index.json-layout folder (``transformer/`` and a
    ``model_index.json`` naming :data:`AVATAR_PIPELINE` and the release's folder name), else
    None; an unreadable model_index.json is left to the base layouts' checks."""
    index = root / "model_index.json"
    if not ((root / "transformer").is_dir() and index.is_file()):
        return None
    try:
        doc = jsonio.read(index, what="pipeline index")
    except LongcatError:
        return None
    if not isinstance(doc, dict) or doc.get("_class_name") != AVATAR_PIPELINE:
        return None
    for v in avatar.VERSIONS.values():
        if doc.get("model_name") == v.folder:
            return converted_avatar(v)
    names = ", ".join(v.folder for v in avatar.VERSIONS.values())
    raise LongcatError(f"{index}: names {AVATAR_PIPELINE} but model_name "
                       f"{doc.get('model_name')!r} is no avatar release (one of {names})")


def resolve_model(arg: str | Path | None) -> Path:
    """The ``--model`` convention: the argument, else ``$LONGCAT_TOOLS_MODEL``, else the current
    folder when it holds a checkpoint. The argument or variable may also be a Hugging Face repo id
    (``org/name[@revision]``), found in the local cache; an existing local path always wins, and
    nothing is ever downloaded here (``hub.resolve_source``)."""
    from longcat_tools.checkpoint.hub import resolve_source

    refuse_empty(arg, "--model")  # not "no argument": that took $LONGCAT_TOOLS_MODEL
    if arg:
        return resolve_source(arg)
    env = os.environ.get(ENV_MODEL)
    refuse_empty(env, ENV_MODEL)  # set but empty (an unset $MODEL in a script) is no choice
    if env:
        return resolve_source(env)
    cwd = Path.cwd()
    if looks_like_checkpoint(cwd) or avatar_version(cwd) is not None:
        return cwd
    raise UsageError(f"no checkpoint given: pass --model PATH, set {ENV_MODEL}, or run inside a "
                     "checkpoint folder")


def content_stamp(root: Path) -> str:
    """A digest of what a run reads from a checkpoint folder, from metadata alone: every file's
    path, size and mtime (links followed; a link's target named too: a hub snapshot's links
    name their blobs' hashes), and for a hub-layout avatar the base parts it reads from
    ``../LongCat-Video``. Hidden entries and scratch folders are left out. A matrix run
    resuming compares it, so a video made before ``bsa preset``, ``lora fuse --force`` or new
    weights at the same path is made again."""
    import hashlib

    h = hashlib.sha256()
    folders = [(root, root)]
    ckpt = detect_any(root)
    if isinstance(ckpt, AvatarCheckpoint) and not ckpt.converted:
        folders += [(ckpt.base / p, root) for p in ckpt.base_parts]
    for top, rel_to in folders:
        for folder, dirs, files in os.walk(top):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                             and not d.endswith(".partial"))
            for name in sorted(f for f in files if not f.startswith(".")):
                path = Path(folder, name)
                try:
                    st = path.stat()
                    entry = (st.st_size, st.st_mtime_ns,
                             os.readlink(path) if path.is_symlink() else "")
                except OSError as e:
                    entry = ("unreadable", e.errno)
                h.update(repr((os.path.relpath(path, rel_to), entry)).encode(
                    "utf-8", "surrogateescape"))
    return h.hexdigest()


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
    index = folder / ckpt.shard_index
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
            raise LongcatError(f"{folder / stray[0]}: shard on disk that {index.name} does not "
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


def shard_headers(ckpt: Checkpoint) -> tuple[dict[str, Path], dict[Path, Header]]:
    """A DiT folder's tensor -> shard map and its shards' headers, checked to agree (readers
    of the shards and writers that copy the index both rely on it)."""
    shard_of = transformer_shards(ckpt)
    headers = {p: read_header(p) for p in sorted(set(shard_of.values()))}
    for name, path in shard_of.items():
        if name not in headers[path].tensors:
            raise LongcatError(f"{path}: the index maps '{name}' to this shard but it is not in "
                               "the file")
    for path, header in headers.items():
        for name in header.tensors:
            if shard_of.get(name) != path:
                raise LongcatError(f"{path}: holds tensor '{name}' that the index does not map "
                                   "to this shard")
    return shard_of, headers


def shard_infos(ckpt: Checkpoint) -> dict[str, tuple[Path, TensorInfo]]:
    """Tensor name -> (shard, header entry) of a DiT folder, its index and shards agreeing."""
    shard_of, headers = shard_headers(ckpt)
    return {name: (path, headers[path].tensors[name]) for name, path in shard_of.items()}
