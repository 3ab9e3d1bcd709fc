"""``verify`` of a LongCat-Video-Avatar folder (1.0 or 1.5): every DiT folder against the avatar
DiT's tensor list, the INT8 copy against its format (``model.int8``), the DMD LoRA against the
DiT, the audio encoder, the vocal separator, and the base model's parts in ``../LongCat-Video``.

The same rows as a base checkpoint's, one per check and file; the checksum list and ``--deep``
follow as for any checkpoint (:mod:`.checkpoint`). wav2vec2's ``pytorch_model.bin`` is a pickle:
its presence and size are checked, it is never unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from longcat_tools.checkpoint import layouts
from longcat_tools.checkpoint.hub import snapshot_roots
from longcat_tools.errors import LongcatError
from longcat_tools.io import jsonio
from longcat_tools.io.safetensors import FLOAT_DTYPES
from longcat_tools.model import avatar, int8, keymap
from longcat_tools.model.avatar import AudioDims
from longcat_tools.verify import checkpoint as V
from longcat_tools.verify import components as C
from longcat_tools.verify import lora as L
from longcat_tools.verify.quantized import unusable_scales
from longcat_tools.verify.report import Recorder, count, listing
from longcat_tools.verify.weights import dtypes, expect, read_weights

CKPT = V.CKPT
WAV2VEC2 = avatar.WAV2VEC2
WAV2VEC2_WEIGHTS = avatar.WAV2VEC2_PICKLE
WHISPER_LAYERS = 32  # the whisper grouping averages layers 0-7, 8-15, 16-23, 24-31, then the norm
# Files each audio encoder folder needs (its loader reads them).
AUDIO_FILES = {WAV2VEC2: ("config.json", WAV2VEC2_WEIGHTS),
               avatar.WHISPER: ("config.json", "preprocessor_config.json",
                                    "model.safetensors")}
INT8_DTYPES = {"int8": "I8", "scale": "F32", "bias": "BF16"}
ONNX_INPUT = "input"  # the name the separator feeds its spectrogram by
SCHEDULER = next(c for c in C.COMPONENTS if c.name == "scheduler")

Dims = tuple[dict[str, Any], keymap.DiTDims, AudioDims]


def run(rec: Recorder, st: V._State, ck: layouts.AvatarCheckpoint) -> None:
    """Every check of an avatar folder, into ``rec``."""
    version = ck.version
    if ck.base != ck.root:  # the converted layout holds its base parts itself
        rec.aliases = ((ck.base, f"../{ck.base.name}"),)
    pickle = ck.audio_encoder / WAV2VEC2_WEIGHTS
    V._walk(rec, st, frozenset({pickle}) if version.audio_encoder == WAV2VEC2 else frozenset())
    st.layout, st.flavour = ck.layout, ck.flavour
    folders = ck.dit_folders
    rec.ok(CKPT, "layout", st.root, f"{ck.describe()}: DiT "
           f"{', '.join(f + '/' for f in folders) or 'none'}; audio encoder "
           f"{version.audio_encoder}/; base model from "
           + ("this folder" if ck.base == ck.root else f"../{avatar.BASE_FOLDER}"))
    _root_files(rec, st, ck)
    dims: dict[str, Dims] = {}
    for name in ck.dits:
        got = _dit(rec, st, ck.root / name)
        if got:
            dims[name] = got
    if ck.int8:
        got = _int8(rec, st, ck.root / ck.int8)
        if got:
            dims[ck.int8] = got
    missing = [f for f in version.dit_folders if f not in ck.dits]
    if missing:
        rec.fail(CKPT, "files", ck.root / missing[0], "missing DiT folder"
                 + ("" if len(missing) == 1 else f"s: {listing(missing)}"))
    if version.int8_folder and not ck.int8:
        rec.warn(CKPT, "files", ck.root / version.int8_folder, "missing: the INT8 DiT (--int8) "
                 "will not be available")
    if folders:
        st.dit_name = folders[0]
    first = next(iter(dims.values()), None)
    if first:
        st.dit_cfg, st.dims = first[0], first[1]
    _same_model(rec, ck, dims)
    _audio_encoder(rec, st, ck, first[2] if first else None)
    _separator(rec, ck.root / avatar.VOCAL_SEPARATOR)
    if version.own_scheduler:
        V._component(rec, st, SCHEDULER, ck.root / SCHEDULER.name)
    _base(rec, st, ck)
    _loras(rec, st, ck, first)


def _root_files(rec: Recorder, st: V._State, ck: layouts.AvatarCheckpoint) -> None:
    for name in ck.version.root_files:
        path = ck.root / name
        if not (path.exists() or path.is_symlink()):
            rec.warn(CKPT, "root", path, "missing (the hub release has it; the original's "
                     "loaders do not read it)")
            continue
        with rec.guard(CKPT, "root", path):
            if not isinstance(jsonio.read(path, what=name), dict):
                raise LongcatError(f"{path}: not a JSON object")
            rec.ok(CKPT, "root", path, "valid JSON")


def _config(rec: Recorder, comp: str, folder: Path, what: str) -> Dims | None:
    """The avatar DiT config of a DiT folder, checked (schema, class, dimensions, BSA)."""
    cfg_path = folder / "config.json"
    with rec.guard(comp, "config", cfg_path):
        cfg = jsonio.read(cfg_path, what="transformer config")
        C.check_transformer_config(cfg, str(cfg_path))
        if not avatar.is_avatar_config(cfg):
            raise LongcatError(f"{cfg_path}: _class_name {cfg['_class_name']} is not the avatar "
                               f"DiT ({avatar.AVATAR_CLASS}), which this folder holds")
        dims = keymap.dit_dims(cfg, str(cfg_path))
        audio = avatar.audio_dims(cfg, str(cfg_path))
        rec.ok(comp, "config", cfg_path, f"{what}: depth {dims.depth}, hidden "
               f"{dims.hidden_size}, {dims.num_heads} heads, BSA "
               f"{'on' if cfg.get('enable_bsa') else 'off'}; audio {audio.audio_block} x "
               f"{audio.audio_channel} in windows of {audio.audio_window} -> "
               f"{audio.context_tokens} tokens x {audio.output_dim}")
        return cfg, dims, audio
    return None


def _dit(rec: Recorder, st: V._State, folder: Path) -> Dims | None:
    comp = folder.name
    if not V._inside(st.allowed, folder):
        rec.fail(comp, "files", folder, "leads out of the checkpoint: not read")
        return None
    got = _config(rec, comp, folder, avatar.AVATAR_CLASS)
    ws = read_weights(rec, comp, folder, layouts.INDEX_NAME, (f"{layouts.DIT_STEM}.safetensors",))
    st.weights[comp] = ws
    if got and (ws.complete or ws.tensors):
        expect(rec, ws, dict(avatar.tensor_specs(got[1], got[2])), "config.json (avatar DiT)")
    dtypes(rec, ws)
    return got


def _int8(rec: Recorder, st: V._State, folder: Path) -> Dims | None:
    """The INT8 folder: its quantization config, the tensor set of ``int8.quantized_specs``,
    dtypes per role, and the scales' values (small: read on every run)."""
    comp = folder.name
    if not V._inside(st.allowed, folder):
        rec.fail(comp, "files", folder, "leads out of the checkpoint: not read")
        return None
    qpath = folder / int8.CONFIG_NAME
    with rec.guard(comp, "quantization", qpath):
        layouts.check_int8_config(folder)
        rec.ok(comp, "quantization", qpath, f"{int8.METHOD}: int8 weights, float32 scales per "
               f"output row, bf16 biases; {listing(list(int8.SKIP_PATTERNS))} kept")
    got = _config(rec, comp, folder, f"{avatar.AVATAR_CLASS}, INT8")
    ws = read_weights(rec, comp, folder, int8.INDEX_NAME, ())
    st.weights[comp] = ws
    if not got or not (ws.complete or ws.tensors):
        return got
    specs = int8.quantized_specs(avatar.tensor_specs(got[1], got[2]))
    expect(rec, ws, {n: s for n, s, _ in specs}, "config.json (INT8 avatar DiT)")
    roles = {n: r for n, _, r in specs}
    wrong = [f"{n} is {t.dtype}, expected {INT8_DTYPES[roles[n]]}" for n, t in ws.tensors.items()
             if roles.get(n) in INT8_DTYPES and t.dtype != INT8_DTYPES[roles[n]]]
    wrong += [f"{n} is {t.dtype}, expected a floating dtype" for n, t in ws.tensors.items()
              if roles.get(n) == "keep" and t.dtype not in FLOAT_DTYPES]
    kept = sorted({t.dtype for n, t in ws.tensors.items() if roles.get(n) == "keep"})
    if wrong:
        rec.fail(comp, "dtype", ws.label, f"INT8 folder: weight_int8 must be I8, weight_scale "
                 f"F32 and a quantized module's bias BF16: {listing(wrong, 3)}")
    elif len(kept) > 1:  # as in any other DiT folder: usually a half-finished cast
        rec.warn(comp, "dtype", ws.label, f"INT8 folder: the unquantized tensors mix {kept}")
    else:
        n_q = sum(r == "int8" for r in roles.values())
        rec.ok(comp, "dtype", ws.label, f"INT8: {count(n_q, 'I8 weight')} with F32 scales and "
               f"BF16 biases; the rest {', '.join(kept) or 'none'}")
    _scales(rec, ws, [n for n, r in roles.items() if r == "scale" and n in ws.tensors
                      and ws.tensors[n].dtype == "F32"])
    return got


def _scales(rec: Recorder, ws: Any, names: list[str]) -> None:
    """Every weight_scale finite and positive, one per row of its weight_int8."""
    bad: list[str] = []
    shaped: list[str] = []
    for name in names:
        info = ws.tensors[name]
        weight = ws.tensors.get(name[: -len(int8.SCALE)] + int8.WEIGHT)
        if weight is not None and (len(weight.shape) != 2 or tuple(info.shape) != weight.shape[:1]):
            bad.append(f"{name} is {list(info.shape)}, its weight_int8 {list(weight.shape)}")
        else:
            shaped.append(name)
    bad += unusable_scales({n: (ws.where[n], ws.tensors[n]) for n in shaped}, int8.QMAX)
    if bad:
        rec.fail(ws.component, "scales", ws.label, "weight scales must be finite and positive, "
                 f"one per output row (weight = int8 x scale): {listing(bad, 3)}")
    elif names:
        rec.ok(ws.component, "scales", ws.label,
               f"{count(len(names), 'scale tensor')}: finite and positive, one per output row")


def _same_model(rec: Recorder, ck: layouts.AvatarCheckpoint, dims: dict[str, Dims]) -> None:
    """Every DiT folder describes one architecture (1.0's two fine-tunes, 1.5's INT8 copy)."""
    if len(dims) < 2:
        return
    (first, (_, d0, a0)), *rest = dims.items()
    odd = [name for name, (_, d, a) in rest if (d, a) != (d0, a0)]
    for name in odd:
        rec.fail(CKPT, "consistency", ck.root / name / "config.json", f"describes another "
                 f"architecture than {first}/config.json (dimensions or audio fields differ)")
    if not odd:
        rec.ok(CKPT, "consistency", ck.root, f"{listing(list(dims))}: one architecture")


def _audio_encoder(rec: Recorder, st: V._State, ck: layouts.AvatarCheckpoint,
                   audio: AudioDims | None) -> None:
    folder = ck.audio_encoder
    comp = folder.name
    if not V._inside(st.allowed, folder):
        rec.fail(comp, "files", folder, "leads out of the checkpoint: not read")
        return
    if not folder.is_dir():
        rec.fail(comp, "files", folder, "missing folder (the audio encoder)")
        return
    missing = [f for f in AUDIO_FILES[comp] if not (folder / f).exists()]
    if missing:
        rec.fail(comp, "files", folder, f"missing {listing(missing)}")
    cfg_path = folder / "config.json"
    cfg = None
    if cfg_path.exists():
        with rec.guard(comp, "config", cfg_path):
            cfg = jsonio.read(cfg_path, what=f"{comp} config")
            if not isinstance(cfg, dict):
                raise LongcatError(f"{cfg_path}: not a JSON object")
            rec.ok(comp, "config", cfg_path, f"{cfg.get('model_type', '?')}: "
                   + _audio_summary(comp, cfg))
    if comp == WAV2VEC2:
        bin_path = folder / WAV2VEC2_WEIGHTS
        if bin_path.is_file():
            size = bin_path.stat().st_size
            if size == 0:
                rec.fail(comp, "weights", bin_path, "empty file")
            else:
                rec.ok(comp, "weights", bin_path, f"present, {size:,} bytes; a pickle, so never "
                       "unpickled here (not even with weights_only): its tensors are not checked")
    else:
        ws = read_weights(rec, comp, folder, "model.safetensors.index.json",
                          ("model.safetensors",))
        st.weights[comp] = ws
        dtypes(rec, ws)
    if cfg is not None and audio is not None:
        _audio_fit(rec, comp, cfg_path, cfg, audio)


def _audio_summary(comp: str, cfg: dict[str, Any]) -> str:
    if comp == WAV2VEC2:
        return (f"{cfg.get('num_hidden_layers')} layers x {cfg.get('hidden_size')}")
    return f"{cfg.get('encoder_layers')} encoder layers x {cfg.get('d_model')}"


def _audio_fit(rec: Recorder, comp: str, path: Path, cfg: dict[str, Any],
               audio: AudioDims) -> None:
    """The DiT's audio_block x audio_channel is what this encoder gives per frame."""
    if comp == WAV2VEC2:
        want = [("num_hidden_layers", audio.audio_block, "audio_block"),
                ("hidden_size", audio.audio_channel, "audio_channel")]
    else:
        want = [("d_model", audio.audio_channel, "audio_channel"),
                ("encoder_layers", WHISPER_LAYERS, "the 5 layer groups")]
        if audio.audio_block != avatar.VERSIONS["avatar-1.5"].audio_block:
            rec.fail(CKPT, "consistency", path, f"whisper gives "
                     f"{avatar.VERSIONS['avatar-1.5'].audio_block} layer groups but the DiT's "
                     f"audio_block is {audio.audio_block}")
    bad = [f"{key} {cfg.get(key)!r} but {why} needs {value}" for key, value, why in want
           if cfg.get(key) != value]
    if bad:
        rec.fail(CKPT, "consistency", path, "; ".join(bad))
    else:
        rec.ok(CKPT, "consistency", path, f"gives what the DiT's audio_proj takes "
               f"({audio.audio_block} x {audio.audio_channel} per frame)")


def _separator(rec: Recorder, path: Path) -> None:
    comp = "vocal_separator"
    if not path.is_file():
        rec.fail(comp, "files", path, "missing (the vocal separator, run on every input audio)"
                 if not path.exists() else "not a regular file")
        return
    size = path.stat().st_size
    try:
        import onnx
    except ImportError:
        rec.ok(comp, "files", path, f"present, {size:,} bytes; not parsed (install the onnx "
               "package to check it)")
        return
    with rec.guard(comp, "onnx", path):
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # noqa: BLE001 - protobuf and onnx raise many kinds
            raise LongcatError(f"{path}: not a readable ONNX model ({type(e).__name__}: "
                               f"{str(e)[:200]})") from None
        inputs = [i.name for i in model.graph.input]
        if ONNX_INPUT not in inputs:
            raise LongcatError(f"{path}: has no input named '{ONNX_INPUT}' (inputs: "
                               f"{listing(inputs) or 'none'}), which the separator feeds")
        rec.ok(comp, "onnx", path, f"ONNX model, {size:,} bytes, {len(model.graph.node)} nodes, "
               f"input '{ONNX_INPUT}' (parsed, not run)")


def _base(rec: Recorder, st: V._State, ck: layouts.AvatarCheckpoint) -> None:
    """The base model's parts, where the original reads them: ``../LongCat-Video``."""
    brec = rec if ck.base == ck.root else rec.beside(
        ck.base, snapshot_roots(ck.base) if ck.base.is_dir() else ())
    problem = ck.base_problem()
    if problem:
        rec.fail(CKPT, "base", ck.base, problem)
    else:
        brec.ok(CKPT, "base", ck.base, f"holds {', '.join(p + '/' for p in ck.base_parts)}, "
                "which the avatar reads from there")
    if not ck.base.is_dir():
        return
    for comp in C.COMPONENTS:
        if comp.name in ck.base_parts and (ck.base / comp.name).is_dir():
            V._component(brec, st, comp, ck.base / comp.name)
    V._consistency(brec, st, ck.base)


def _loras(rec: Recorder, st: V._State, ck: layouts.AvatarCheckpoint,
           first: Dims | None) -> None:
    """Adapters in ``lora/`` (1.5: the DMD LoRA) against the avatar DiT."""
    lora_dir = ck.lora_dir
    if not V._inside(st.allowed, lora_dir):
        rec.fail("lora", "files", lora_dir, "leads out of the checkpoint: not read")
        return
    if ck.version.lora and not (ck.root / ck.version.lora).exists():
        if ck.distill_fused is not None:
            rec.ok("lora", "files", ck.root / ck.dits[0] / "config.json", "the distillation "
                   "LoRA is fused into the DiT (lora fuse): distilled runs need no file")
        else:
            rec.warn("lora", "files", ck.root / ck.version.lora, "missing: the distilled 8-step "
                     "mode (DMD) will not be available")
    shapes = None
    if first is not None:
        _, dims, audio = first
        shapes = {"native": dict(avatar.tensor_specs(dims, audio)),
                  "fastvideo": dict(keymap.tensor_specs(dims, "fastvideo"))}
    for p in L.lora_files(ck.root):
        try:
            layouts.check_contained(p, st.allowed)
        except LongcatError:
            continue  # already a failed "paths" check
        lf = L.check_file(rec, p, "native", shapes, ck.layout)
        if lf is not None:
            st.loras[p] = lf
            if lf.header is not None:
                st.lora_headers[p] = lf.header
    L.check_manifest(rec, ck.root, st.loras)
