"""``convert`` of a LongCat-Video-Avatar folder (1.0 or 1.5): hub layout <-> model_index.json
layout, dtype casts and resharding, and 1.5's INT8 DiT made from or turned into its plain DiT.

Key names stay native everywhere (no peer defines avatar keys). The model_index.json layout is
ours alone: the DiT folders renamed (``layouts.AVATAR_CONVERTED_FOLDERS``), the audio encoder,
``vocal_separator/``, ``scheduler/`` and ``lora/`` as they are, and the base model's tokenizer,
text encoder and VAE (1.0: and scheduler) brought in from ``../LongCat-Video`` so the folder
stands alone. The hub's root ``model_index.json`` is kept verbatim inside ours, so converting
back gives the hub folder bit for bit.

INT8 (``model.int8``): ``quantize`` is the original's ``QuantizedLinear.from_linear`` applied to
the output's plain DiT as stored; ``dequantize`` stores ``(float32(q) * scale)`` cast once to
the output dtype, the fp32 product being the weight the original computes with in its fp32
regions (``bf16(q * bf16(scale))`` elsewhere, which may differ from this by one bf16 step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longcat_tools.checkpoint import hub, layouts
from longcat_tools.convert import (
    DEFAULT_MAX_SHARD,
    FileJob,
    OutTensor,
    Piece,
    Plan,
    _lora_jobs,
    _out_dtype,
    _provenance,
    _same_filesystem,
    _whole_reader,
    check_tensor_set,
    component_jobs,
    parse_size,
)
from longcat_tools.errors import LongcatError, UsageError
from longcat_tools.io import jsonio
from longcat_tools.io.atomic import check_replaceable
from longcat_tools.io.safetensors import TensorInfo, plan_shards, require_float, shard_names
from longcat_tools.kernels import fp8 as fp8_ops
from longcat_tools.lora import formats as lf
from longcat_tools.model import avatar, int8, keymap
from longcat_tools.model.avatar import AudioDims, AvatarVersion
from longcat_tools.verify.components import check_transformer_config
from longcat_tools.verify.quantized import check_scales

# --int8: keep the INT8 DiT as it is; write it from the plain DiT; write the plain DiT from it;
# leave it out.
INT8_MODES = ("keep", "quantize", "dequantize", "drop")
MAX_SHARD = parse_size(DEFAULT_MAX_SHARD)  # the plain DiT folders', as for the base model
# model_index.json of the converted layout: the hub's own root model_index.json, verbatim.
HUB_INDEX_KEY = "hub_model_index"
# Classes model_index.json names per part (no peer loads the layout: a record, not a recipe).
CLASSES: dict[str, list[str]] = {
    "tokenizer": ["transformers", "AutoTokenizer"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    **{folder: ["transformers", cls] for folder, cls in avatar.ENCODER_CLASSES.items()},
    "vocal_separator": ["onnxruntime", "InferenceSession"],
}
NO_PEER = ("no peer (FastVideo, diffusers, ComfyUI) defines avatar keys; avatar checkpoints "
           "keep their native names")


@dataclass(frozen=True)
class _Folder:
    """A folder whose components are carried over (what ``convert.component_jobs`` reads)."""

    root: Path
    containment: tuple[Path, ...]


def refuse(to: str, keys: str | None, want: torch.dtype | None) -> None:
    """The options an avatar folder cannot take: one line each."""
    if to == "comfy":
        raise UsageError(f"--to comfy: {NO_PEER} (use --to converted or --to native)")
    if keys not in (None, "native"):
        raise UsageError(f"--keys {keys}: {NO_PEER} (leave --keys out)")
    if want == fp8_ops.E4M3:
        raise UsageError("--dtype fp8: the avatar DiT has no fp8 format; its quantized form is "
                         "INT8 (--int8 quantize, avatar 1.5)")


@dataclass
class _Dit:
    """One DiT folder of the source, checked: config, dimensions and its tensors."""

    folder: Path
    cfg: dict[str, Any]
    dims: keymap.DiTDims
    audio: AudioDims
    infos: dict[str, tuple[Path, TensorInfo]]

    @property
    def specs(self) -> list[tuple[str, tuple[int, ...]]]:
        return avatar.tensor_specs(self.dims, self.audio)


def _read_dit(ck: layouts.AvatarCheckpoint, name: str) -> _Dit:
    view = ck.dit(name)
    is_int8 = ck.is_int8(view)
    cfg = view.config()
    where = str(view.config_path)
    if not avatar.is_avatar_config(cfg):
        raise LongcatError(f"{where}: _class_name {cfg.get('_class_name')!r} is not the avatar "
                           f"DiT ({avatar.AVATAR_CLASS})")
    dims = keymap.dit_dims(cfg, where)
    check_transformer_config(cfg, where)  # as verify reads it
    d = _Dit(view.transformer_dir, cfg, dims, avatar.audio_dims(cfg, where),
             layouts.shard_infos(view))
    specs = d.specs
    if is_int8:
        layouts.check_int8_config(d.folder)
        qspecs = int8.quantized_specs(specs)
        check_tensor_set(d.folder, d.infos, {n: s for n, s, _ in qspecs}, "INT8 avatar",
                         "config.json (INT8 avatar DiT)")
        role_dtype = {"int8": torch.int8, "scale": torch.float32, "bias": torch.bfloat16}
        for n, _, role in qspecs:
            got = d.infos[n][1].torch_dtype
            if role in role_dtype and got != role_dtype[role]:
                raise LongcatError(f"{d.infos[n][0]}: INT8 tensor '{n}' is {got}, the format "
                                   f"stores {role_dtype[role]}")
            if role == "keep":
                require_float(*d.infos[n])
    else:
        check_tensor_set(d.folder, d.infos, dict(specs), "native avatar",
                         "config.json (avatar DiT)")
        for path, info in d.infos.values():
            require_float(path, info)
    return d


def _whole(d: _Dit, name: str) -> Piece:
    path, info = d.infos[name]
    return Piece(path, info, 0, info.shape[0] if info.shape else 1)


def _cast_tensors(d: _Dit, names: list[tuple[str, tuple[int, ...]]],
                  dtype_of: Callable[[str, torch.dtype], torch.dtype]) -> list[OutTensor]:
    return [OutTensor(n, dtype_of(n, d.infos[n][1].torch_dtype), s, [_whole(d, n)])
            for n, s in names]


def _plain_tensors(d: _Dit, want: torch.dtype | None) -> list[OutTensor]:
    """A plain DiT folder rewritten: every float tensor cast to ``want``."""
    return _cast_tensors(d, d.specs, lambda n, dt: _out_dtype(dt, want))


def _int8_tensors(d: _Dit, want: torch.dtype | None) -> list[OutTensor]:
    """An INT8 folder rewritten: int8 weights, float32 scales and bf16 biases as they are, the
    other (unquantized) tensors cast to ``want``."""
    roles = {n: r for n, _, r in int8.quantized_specs(d.specs)}
    return _cast_tensors(d, [(n, s) for n, s, _ in int8.quantized_specs(d.specs)],
                         lambda n, dt: _out_dtype(dt, want) if roles[n] == "keep" else dt)


def _check_fp16(y: torch.Tensor, where: Path, name: str) -> torch.Tensor:
    if y.dtype == torch.float16 and bool(torch.isinf(y).any()):
        raise LongcatError(f"{where}: tensor '{name}' overflows float16 (|x| > 65504); use "
                           "--dtype bf16")
    return y


def dequantized(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The stored weight of an INT8 Linear: the float32 product ``q * scale`` (exact up to one
    float32 rounding, the weight the original uses in float32), then one cast to ``dtype``."""
    return int8.dequantize(q, scale, torch.float32).to(dtype)


def _dequantized_tensors(d: _Dit, want: torch.dtype | None) -> list[OutTensor]:
    """The plain DiT from an INT8 folder: every float tensor in ``want`` (keep: bfloat16, what
    the original's INT8 loader computes with)."""
    out_dtype = want or torch.bfloat16
    load = _whole_reader(d.infos)
    quantized = {n.removesuffix(f".{int8.WEIGHT}") for n, _, r in int8.quantized_specs(d.specs)
                 if r == "int8"}
    out: list[OutTensor] = []
    for name, shape in d.specs:
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in quantized:
            def produce(module: str = module, name: str = name) -> torch.Tensor:
                y = dequantized(load(f"{module}.{int8.WEIGHT}"), load(f"{module}.{int8.SCALE}"),
                                out_dtype)
                return _check_fp16(y, d.folder, name)

            out.append(OutTensor(name, out_dtype, shape, produce=produce))
        else:
            out.append(OutTensor(name, _out_dtype(d.infos[name][1].torch_dtype, out_dtype),
                                 shape, [_whole(d, name)]))
    return out


def _quantized_tensors(d: _Dit, want: torch.dtype | None) -> list[OutTensor]:
    """The INT8 state dict of the plain DiT as the output stores it (each tensor cast to
    ``want`` first): the original's quantization, in the original's state_dict order."""
    load = _whole_reader(d.infos)
    held: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # one weight at a time

    def as_stored(name: str) -> torch.Tensor:
        t = load(name)
        return t.to(_out_dtype(t.dtype, want))

    def q_and_scale(weight: str) -> tuple[torch.Tensor, torch.Tensor]:
        if weight not in held:
            held.clear()
            held[weight] = int8.quantize(as_stored(weight))
        return held[weight]

    out: list[OutTensor] = []
    for name, shape, role in int8.quantized_specs(d.specs):
        weight = name.rpartition(".")[0] + ".weight"
        if role == "keep":
            out.append(OutTensor(name, _out_dtype(d.infos[name][1].torch_dtype, want), shape,
                                 [_whole(d, name)]))
        elif role == "bias":
            out.append(OutTensor(name, torch.bfloat16, shape,
                                 produce=lambda n=name: as_stored(n).to(torch.bfloat16)))
        else:
            index = 0 if role == "int8" else 1
            out.append(OutTensor(name, torch.int8 if role == "int8" else torch.float32, shape,
                                 produce=lambda w=weight, i=index: q_and_scale(w)[i]))
    return out


def _shard_jobs(out: list[OutTensor], folder: str, max_shard: int, meta: dict[str, str],
                *, int8_format: bool) -> list[FileJob]:
    """Shards and index of a DiT folder: ``diffusion_pytorch_model`` names and a sorted index,
    or the INT8 folder's ``quantized_model`` names (always numbered) and the index as the
    original's ``json.dump(indent=2)`` writes it (state_dict order, no final newline)."""
    shards = plan_shards(out, max_shard)
    names = (int8.shard_names(len(shards)) if int8_format
             else shard_names(layouts.DIT_STEM, len(shards)))
    jobs = [FileJob(f"{folder}/{n}", "tensors", folder, s, dict(meta),
                    bytes_in=sum(t.bytes_in for t in s))
            for n, s in zip(names, shards, strict=True)]
    weight_map = {t.name: n for n, s in zip(names, shards, strict=True) for t in s}
    total = sum(t.nbytes for t in out)
    if int8_format:
        text = jsonio.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                            newline=False)
        index_name = int8.INDEX_NAME
    else:
        text = jsonio.dumps({"metadata": {"total_size": total},
                             "weight_map": dict(sorted(weight_map.items()))})
        index_name = layouts.INDEX_NAME
    jobs.append(FileJob(f"{folder}/{index_name}", "text", folder, text=text))
    return jobs


def _dit_folder_jobs(out: list[OutTensor], folder: str, max_shard: int, meta: dict[str, str],
                     config_src: Path, link: bool, *, int8_format: bool,
                     quant_config: Path | None = None) -> list[FileJob]:
    """A DiT folder: shards, index, its config.json (the source's, unchanged) and, for INT8,
    ``quantization_config.json`` (the source's, or the original's text when made here)."""
    jobs = _shard_jobs(out, folder, max_shard, meta, int8_format=int8_format)
    jobs.append(FileJob.unchanged(config_src, f"{folder}/config.json", folder, link))
    if int8_format:
        rel = f"{folder}/{int8.CONFIG_NAME}"
        jobs.append(FileJob.unchanged(quant_config, rel, folder, link) if quant_config is not None
                    else FileJob(rel, "text", folder, text=jsonio.dumps(
                        int8.QUANTIZATION_CONFIG, newline=False)))
    return jobs


def _model_index(version: AvatarVersion, dit_folders: list[str], parts: list[str],
                 hub_index: str | None) -> dict[str, Any]:
    doc: dict[str, Any] = {"_class_name": layouts.AVATAR_PIPELINE, "model_name": version.folder}
    for folder in dit_folders:
        doc[folder] = ["longcat_video", avatar.AVATAR_CLASS]
    for part in parts:
        doc[part] = CLASSES[part]
    if hub_index is not None:
        doc[HUB_INDEX_KEY] = hub_index
    return doc


def _hub_index(ck: layouts.AvatarCheckpoint) -> str | None:
    """The hub's root model_index.json text: the file (hub layout) or what ours keeps of it."""
    path = ck.root / "model_index.json"
    if not path.is_file():
        return None
    layouts.check_contained(path, ck.containment)
    if not ck.converted:
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise LongcatError(f"{path}: not UTF-8 text") from None
    kept = jsonio.read(path, what="pipeline index").get(HUB_INDEX_KEY)
    if kept is not None and not isinstance(kept, str):
        raise LongcatError(f"{path}: '{HUB_INDEX_KEY}' must be the hub file's text (a string)")
    return kept


def _int8_plan(ck: layouts.AvatarCheckpoint, mode: str) -> tuple[list[str], str | None]:
    """(plain source folders to rewrite, what the INT8 output is made of: 'int8' the source's
    INT8 folder, 'plain' the first plain folder, None no INT8 output), after the --int8 checks."""
    version = ck.version
    if mode != "keep" and not version.int8_folder:
        raise UsageError(f"--int8 {mode}: {ck.describe()} has no INT8 DiT (only avatar 1.5 "
                         "has base_model_int8/)")
    plain = list(ck.dits)
    if mode == "quantize":
        if version.dit_folders[0] not in plain:
            raise LongcatError(f"{ck.root}: --int8 quantize needs {version.dit_folders[0]}/, "
                               "which is missing")
        return plain, "plain"
    if mode == "dequantize":
        if ck.int8 is None:
            raise LongcatError(f"{ck.root}: --int8 dequantize needs {version.int8_folder}/, "
                               "which is missing")
        return [f for f in plain if f != version.dit_folders[0]], "int8"
    if mode == "drop":
        return plain, None
    return plain, "int8" if ck.int8 else None


def plan_avatar(ck: layouts.AvatarCheckpoint, dst: Path, *, to: str, dtype: str,
                want: torch.dtype | None, max_shard: int | None, link: bool, lora: str,
                force: bool, int8_mode: str) -> Plan:
    """The plan for an avatar folder (``to`` converted or native; options as ``plan``)."""
    version = ck.version
    hub_version = avatar.VERSIONS[version.name]
    target = layouts.converted_avatar(hub_version) if to == "converted" else hub_version
    base = ck.require_base()
    plain, int8_from = _int8_plan(ck, int8_mode)
    check_replaceable(dst, "checkpoint", source=ck.root, force=force)
    if base != ck.root:  # the sibling base model is read too: never replaced by the output
        check_replaceable(dst, "checkpoint", source=base, force=force)
    meta = _provenance(ck, "native", dtype)
    notes: list[str] = []
    if link and not _same_filesystem(ck.root, dst.parent):
        link = False
        notes.append("source and destination are on different file systems: copying unchanged "
                     "files instead of hard-linking them")
    renamed = dict(zip(version.dit_folders, target.dit_folders, strict=True))
    jobs: list[FileJob] = []
    dits = {name: _read_dit(ck, name) for name in plain}
    q = _read_dit(ck, ck.int8) if int8_from == "int8" and ck.int8 else None
    if q is not None:
        check_scales(q.infos, int8.SCALE, int8.QMAX, q.folder)
    for name in plain:
        d = dits[name]
        jobs += _dit_folder_jobs(_plain_tensors(d, want), renamed[name], max_shard or MAX_SHARD,
                                 meta, d.folder / "config.json", link, int8_format=False)
    int8_max = max_shard or int8.MAX_SHARD_BYTES
    first_plain, int8_out = version.dit_folders[0], target.int8_folder
    if q is not None:
        assert int8_out is not None
        jobs += _dit_folder_jobs(_int8_tensors(q, want), int8_out, int8_max, meta,
                                 q.folder / "config.json", link, int8_format=True,
                                 quant_config=q.folder / int8.CONFIG_NAME)
        if int8_mode == "dequantize":
            if first_plain in ck.dits:
                notes.append(f"{first_plain}/ of the source not read: --int8 dequantize writes "
                             f"{renamed[first_plain]}/ from {version.int8_folder}/")
            jobs += _dit_folder_jobs(_dequantized_tensors(q, want), renamed[first_plain],
                                     max_shard or MAX_SHARD, meta, q.folder / "config.json",
                                     link, int8_format=False)
    elif int8_from == "plain":
        assert int8_out is not None
        if ck.int8:
            notes.append(f"{ck.int8}/ of the source not read: --int8 quantize writes "
                         f"{int8_out}/ from {first_plain}/")
        d = dits[first_plain]
        jobs += _dit_folder_jobs(_quantized_tensors(d, want), int8_out, int8_max, meta,
                                 d.folder / "config.json", link, int8_format=True)
    elif ck.int8:
        notes.append(f"{ck.int8}/ left out (--int8 drop)")
    ref = next(iter(dits.values()), q)
    if ref is None:
        raise LongcatError(f"{ck.root}: no DiT folder to convert")
    # The hub's lora/ layout in both targets: files stay lora/<file>, in native keys.
    lora_jobs, loras, lora_notes, registry = _lora_jobs(ck, "native", "native", want, lora,
                                                 lf.linear_shapes(ref.dims, ref.audio), link,
                                                 meta)
    jobs += lora_jobs
    notes += lora_notes
    part_jobs = _parts_jobs(ck, base, to, want, link, meta, notes)
    jobs += part_jobs
    groups = list(dict.fromkeys(j.group for j in jobs))
    jobs += _root_jobs(ck, to, [g for g in groups if g in (*target.dit_folders,
                                                          target.int8_folder)],
                       list(dict.fromkeys(j.group for j in part_jobs)), link)
    known = {*version.dit_folders, version.int8_folder, version.audio_encoder, "lora",
             "vocal_separator", "scheduler", "checksums.sha256", *version.root_files,
             *(ck.base_parts if ck.converted else ())}
    for entry in sorted(ck.root.iterdir()):
        if entry.name not in known:
            notes.append(f"{entry.name} (top level of the source) is not carried over")
    return Plan(ck, dst, to, "native", dtype, link, force, jobs, notes, loras, registry)


def _parts_jobs(ck: layouts.AvatarCheckpoint, base: Path, to: str, want: torch.dtype | None,
                link: bool, meta: dict[str, str], notes: list[str]) -> list[FileJob]:
    """The audio encoder, vocal separator and scheduler; the base model's parts when the
    target is the model_index.json layout."""
    src = _Folder(ck.root, ck.containment)
    base_folder = src if ck.converted else _Folder(
        base, hub.snapshot_roots(base) or (base.resolve(),))
    parts: list[tuple[_Folder, str]] = [(src, ck.version.audio_encoder),
                                        (src, "vocal_separator")]
    if avatar.VERSIONS[ck.version.name].own_scheduler:  # the hub release's, not the layout's
        parts.append((src, "scheduler"))
    if to == "converted":  # the base's parts (and its scheduler where the avatar has none)
        parts += [(base_folder, p) for p in ck.base_parts]
    elif ck.converted:
        notes.append(f"{', '.join(p + '/' for p in ck.base_parts)} not written: the hub layout "
                     f"reads them from ../{avatar.BASE_FOLDER} beside DST")
    jobs: list[FileJob] = []
    keep = avatar.WAV2VEC2_PICKLE if ck.version.audio_encoder == avatar.WAV2VEC2 else None
    for folder, part in parts:
        jobs += component_jobs(folder, part, want, link, meta, notes,
                               keep if part == ck.version.audio_encoder else None)
    return jobs


def _root_jobs(ck: layouts.AvatarCheckpoint, to: str, dit_folders: list[str],
               parts: list[str], link: bool) -> list[FileJob]:
    """The root files: the hub's (restored from ours when converting back), or our
    model_index.json (the hub's kept inside) plus the hub's other root files."""
    hub_index = _hub_index(ck)
    jobs: list[FileJob] = []
    for name in avatar.VERSIONS[ck.version.name].root_files:
        path = ck.root / name
        if name == "model_index.json":
            if to == "native" and hub_index is not None:
                jobs.append(FileJob(name, "text", "root", text=hub_index))
        elif path.is_file():
            layouts.check_contained(path, ck.containment)
            jobs.append(FileJob.unchanged(path, name, "root", link))
    if to == "converted":
        doc = _model_index(ck.version, dit_folders, parts, hub_index)
        jobs.append(FileJob("model_index.json", "text", "root", text=jsonio.dumps(doc)))
    return jobs
