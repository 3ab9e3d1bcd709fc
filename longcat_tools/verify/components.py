"""What each component folder of a LongCat-Video checkpoint must hold, as data.

The DiT's tensor set comes from ``keymap``; the text encoder's and VAE's expected tensors are
derived here from their configs (the layers whose shapes every config field touches), so that a
config that does not describe its weights fails before a loader does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longcat_tools import schemas
from longcat_tools.bsa import config as bsa_config
from longcat_tools.checkpoint import layouts
from longcat_tools.errors import LongcatError
from longcat_tools.io import jsonio


@dataclass(frozen=True)
class Component:
    name: str
    required: tuple[tuple[str, ...], ...]  # each entry: one of these files must exist
    config: tuple[str, str] | None  # (file, schema name)
    weights: tuple[str | None, tuple[str, ...]] | None  # (index file, single-file names)


COMPONENTS: tuple[Component, ...] = (
    Component("tokenizer", (("tokenizer_config.json",), ("tokenizer.json", "spiece.model")),
              None, None),
    Component("text_encoder", (("config.json",),), ("config.json", "text_encoder_config"),
              ("model.safetensors.index.json", ("model.safetensors",))),
    Component("vae", (("config.json",),), ("config.json", "vae_config"),
              (f"{layouts.DIT_STEM}.safetensors.index.json",
               (f"{layouts.DIT_STEM}.safetensors",))),
    Component("scheduler", (("scheduler_config.json",),),
              ("scheduler_config.json", "scheduler_config"), None),
)


def check_transformer_config(cfg: Any, path: str) -> None:
    """A DiT config (base or avatar) as ``verify`` and ``run`` both need it: its schema, and BSA
    parameters the kernels take."""
    schemas.validate(cfg, "transformer_config", path)
    if cfg.get("enable_bsa") and not cfg.get("bsa_params"):
        raise LongcatError(f"{path}: enable_bsa is true but bsa_params is null (set a preset "
                           "with `longcat-tools bsa preset`)")
    errors = bsa_config.param_errors(cfg)
    if errors:
        raise LongcatError(f"{path}: {errors[0]} (`longcat-tools bsa preset` sets valid ones)")


def model_index_schema(layout: str) -> str:
    """The schema of a base checkpoint's ``model_index.json``: the hub's stub, or a pipeline's
    index."""
    return "model_index_native" if layout == "native" else "model_index_converted"


def check_model_index(ckpt: layouts.Checkpoint) -> None:
    """A base checkpoint's ``model_index.json`` (required by the converted layout, optional in
    the others) as pipelines read it: inside the checkpoint, strict JSON, its layout's schema."""
    index = ckpt.root / "model_index.json"
    if index.exists() or index.is_symlink() or ckpt.layout == "converted":
        layouts.check_contained(index, ckpt.containment)
        schemas.validate(jsonio.read(index, what="pipeline index"),
                         model_index_schema(ckpt.layout), str(index))


# The tokenizer's JSON files: each, where present, must be a JSON object holding the fields the
# tokenizers library reads without a default (transformers fails on anything else with a
# traceback of its own: a KeyError for 'added_tokens', "Model missing").
TOKENIZER_JSON = {"tokenizer_config.json": (), "tokenizer.json": ("added_tokens", "model")}


def check_tokenizer_file(path: Path) -> None:
    """One of ``TOKENIZER_JSON``, as the tokenizer's loader needs it."""
    doc = jsonio.read(path, what="tokenizer file")
    if not isinstance(doc, dict):
        raise LongcatError(f"{path}: not a JSON object")
    for key in TOKENIZER_JSON[path.name]:
        if key not in doc:
            raise LongcatError(f"{path}: no '{key}' field, which the tokenizer's loader reads: "
                               "not a whole tokenizer file (copy it again from the release)")


def expected_tensors(component: str, cfg: dict[str, Any],
                     present: set[str] | dict) -> dict[str, tuple[int, ...]]:
    """The tensors a component's config implies, with their shapes (``present``: the names
    found); empty for a component whose shapes are not checked."""
    if component == "text_encoder":
        return text_encoder_tensors(cfg, present)
    return vae_tensors(cfg) if component == "vae" else {}

# The transformer's weights per layout: (index file, single-file names).
DIT_WEIGHTS: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "native": (layouts.INDEX_NAME, (f"{layouts.DIT_STEM}.safetensors",)),
    "converted": (layouts.INDEX_NAME, (f"{layouts.DIT_STEM}.safetensors",
                                       layouts.FASTVIDEO_SINGLE)),
    "fastvideo-single": (None, (layouts.FASTVIDEO_SINGLE,)),
}

# What each hub adapter of a native checkpoint is for; a missing one disables that task only.
TASK_OF_ADAPTER = {"distilled": "--distill", "refinement": "refine"}


def text_encoder_tensors(cfg: dict[str, Any],
                         present: set[str] | dict) -> dict[str, tuple[int, ...]]:
    """Expected tensors of a UMT5 encoder from its config (``present``: the names found, to
    accept the tied embedding under either of its names)."""
    d, inner, ff = cfg["d_model"], cfg["num_heads"] * cfg["d_kv"], cfg["d_ff"]
    buckets = cfg.get("relative_attention_num_buckets", 32)
    gated = str(cfg.get("feed_forward_proj", "gated-gelu")).startswith("gated") or cfg.get(
        "is_gated_act", False)
    embeds = [n for n in ("shared.weight", "encoder.embed_tokens.weight") if n in present]
    out: dict[str, tuple[int, ...]] = {n: (cfg["vocab_size"], d)
                                       for n in embeds or ["shared.weight"]}
    out["encoder.final_layer_norm.weight"] = (d,)
    for i in range(cfg["num_layers"]):
        a, f = f"encoder.block.{i}.layer.0.", f"encoder.block.{i}.layer.1."
        out |= {f"{a}SelfAttention.{p}.weight": (inner, d) for p in "qkv"}
        out |= {f"{a}SelfAttention.o.weight": (d, inner),
                f"{a}SelfAttention.relative_attention_bias.weight": (buckets, cfg["num_heads"]),
                f"{a}layer_norm.weight": (d,), f"{f}layer_norm.weight": (d,),
                f"{f}DenseReluDense.wo.weight": (d, ff)}
        wi = ("wi_0", "wi_1") if gated else ("wi",)
        out |= {f"{f}DenseReluDense.{w}.weight": (ff, d) for w in wi}
    return out


def vae_tensors(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The Wan VAE layers whose shapes follow from base_dim, dim_mult, z_dim and the channels."""
    base, z = cfg["base_dim"], cfg["z_dim"]
    top = base * cfg["dim_mult"][-1]
    dec = cfg.get("decoder_base_dim") or base
    k3 = (3, 3, 3)
    return {
        "encoder.conv_in.weight": (base, cfg.get("in_channels", 3), *k3),
        "encoder.conv_out.weight": (2 * z, top, *k3),
        "quant_conv.weight": (2 * z, 2 * z, 1, 1, 1),
        "post_quant_conv.weight": (z, z, 1, 1, 1),
        "decoder.conv_in.weight": (dec * cfg["dim_mult"][-1], z, *k3),
        "decoder.conv_out.weight": (cfg.get("out_channels", 3), dec, *k3),
    }


# What check_components passed, as (real path, size, mtime) of every file it read: `run` checks
# before loading and the pipeline's from_pretrained again, and parsing the tokenizer's JSON
# alone takes about a second.
_PASSED: set[tuple] = set()


def _stamp(paths: list[Path]) -> tuple:
    out = []
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            out.append((str(p), None))
            continue
        out.append((str(p.resolve()), st.st_size, st.st_mtime_ns))
    return tuple(out)


def check_components(ckpt: layouts.Checkpoint, present_only: bool = False) -> None:
    """What a run reads besides the DiT's weights (its config, the pipeline index, the other
    components' files), checked as ``verify`` checks it: inside the checkpoint (links
    followed), present, strict JSON, each config against its schema. Given a bad file, a loader
    (transformers, diffusers) fails with its own traceback, tries to reach the Hub, or follows a
    link out of the folder. Files unchanged since they passed are not read again.
    ``present_only`` (``convert``, which carries what there is): a component folder that is
    absent is passed over; one that is there must be whole."""
    from longcat_tools.io.safetensors import read_header

    root, allowed = ckpt.root, ckpt.containment
    folders = [root / comp.name for comp in COMPONENTS]
    dit = ckpt.layout != layouts.COMFY_SINGLE  # a single file: read whole by its own reader
    stamp = (present_only, *_stamp([ckpt.config_path, root / "model_index.json", *folders,
                                    *(p for f in [*folders, *([ckpt.transformer_dir] if dit
                                                              else [])]
                                      if f.is_dir() for p in sorted(f.iterdir()))]))
    if stamp in _PASSED:
        return
    check_transformer_config(ckpt.config(), str(ckpt.config_path))
    check_model_index(ckpt)
    if dit:  # a truncated shard, found before the text encoder's minutes of loading
        layouts.shard_headers(ckpt)
    for comp in COMPONENTS:
        folder = root / comp.name
        if present_only and not (folder.exists() or folder.is_symlink()):
            continue
        layouts.check_contained(folder, allowed)
        for path in sorted(folder.iterdir()) if folder.is_dir() else ():
            layouts.check_contained(path, allowed)
        for alternatives in comp.required:
            if not any((folder / f).is_file() for f in alternatives):
                raise LongcatError(f"{folder / alternatives[0]}: missing; the {comp.name} cannot "
                                   "load (run `longcat-tools verify` on the checkpoint)")
        cfg = None
        if comp.config is not None:
            name, schema = comp.config
            cfg = jsonio.read(folder / name, what=f"{comp.name} config")
            schemas.validate(cfg, schema, str(folder / name))
        for name in TOKENIZER_JSON if comp.name == "tokenizer" else ():
            if (folder / name).exists():
                check_tokenizer_file(folder / name)
        if comp.weights is None:
            continue
        index_name, singles = comp.weights
        tensors = {}
        for path in sorted(folder.glob("*.safetensors")):
            tensors |= read_header(path).tensors
        for name, shape in (expected_tensors(comp.name, cfg, tensors) if cfg else {}).items():
            if name in tensors and tuple(tensors[name].shape) != shape:  # the loader's traceback
                raise LongcatError(f"{folder}: tensor '{name}' is {list(tensors[name].shape)}, "
                                   f"its {comp.config[0]} implies {list(shape)}: the config and "
                                   "the weights are of different models (run `longcat-tools "
                                   "verify` on the checkpoint)")
        index = folder / index_name if index_name else None
        if index is not None and index.exists():
            doc = jsonio.read(index, what="shard index")
            schemas.validate(doc, "safetensors_index", str(index))
            layouts.index_shards(index, allowed, doc)
        elif not any((folder / f).is_file() for f in singles):
            raise LongcatError(f"{folder}: no {' or '.join(singles)}"
                               + (f" (or {index_name} and its shards)" if index_name else "")
                               + f"; the {comp.name}'s weights cannot load (run `longcat-tools "
                               "verify` on the checkpoint)")
    _PASSED.add(stamp)
