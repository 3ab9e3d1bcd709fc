"""What a checkpoint's BSA settings are, which attention the runner takes with them, and what
looks wrong."""

from __future__ import annotations

from typing import Any

from longcat_tools import schemas
from longcat_tools.bsa.config import (
    PARAM_KEYS,
    SCHEMA,
    backup_path,
    kept_params,
    param_errors,
    read_config,
)
from longcat_tools.checkpoint import layouts
from longcat_tools.model import bsa_presets

IGNORED_FLAGS = ("enable_flashattn3", "enable_flashattn2", "enable_xformers")


def mode_of(params: dict[str, Any]) -> str:
    """How key chunks are selected: ``top-k`` (sparsity), ``cdf`` (cdf_threshold) or ``max``."""
    s, cdf = params.get("sparsity"), params.get("cdf_threshold")
    if s is not None and cdf is not None:
        return "max"
    return "cdf" if cdf is not None else "top-k"


def describe_params(params: dict[str, Any]) -> str:
    """``bsa_params`` in one line of words."""
    s, cdf = params.get("sparsity"), params.get("cdf_threshold")
    q, k = params.get("chunk_3d_shape_q"), params.get("chunk_3d_shape_k")
    parts = []
    if s is not None:
        # as written (":g" showed 0.99999999 as 1), the kept share to three digits
        parts.append(f"sparsity {s} (keeps {(1 - s) * 100:.3g}% of key chunks)")
    if cdf is not None:
        parts.append(f"cdf_threshold {cdf}")
    parts.append(f"chunks q {q} / k {k}")
    parts.append(f"mode {mode_of(params)}")
    return ", ".join(parts)


def attention_path(cfg: dict[str, Any]) -> str:
    """In words: the attention the runner takes for this config."""
    params = kept_params(cfg)
    if cfg.get("enable_bsa") is True:
        if params is None:
            return ("none: enable_bsa is true but bsa_params is "
                    f"{'null' if cfg.get('bsa_params') is None else 'invalid'} (see the warning)")
        return (f"BSA ({describe_params(params)}) for videos with more than one latent frame; "
                "dense attention otherwise")
    return "dense attention"


def matching_presets(cfg: dict[str, Any]) -> list[str]:
    """Presets whose ``bsa_params`` equal the config's (whatever ``enable_bsa`` says); none for
    params that fail the schema (4.0 equals 4, but is no chunk size)."""
    if isinstance(cfg.get("bsa_params"), dict) and param_errors(cfg):
        return []

    def norm(p: dict[str, Any] | None) -> Any:
        if not isinstance(p, dict):
            return None
        return tuple(tuple(v) if isinstance(v, list) else v for v in (p.get(k) for k in PARAM_KEYS))

    mine = norm(cfg.get("bsa_params"))
    return [p.name for p in bsa_presets.PRESETS.values() if norm(p.params) == mine
            and (p.params is not None or cfg.get("enable_bsa") is not True)]


def status(ckpt: layouts.Checkpoint) -> dict[str, Any]:
    """The BSA state of a checkpoint, the attention path it gives and what looks wrong."""
    cfg = read_config(ckpt)
    path = ckpt.config_path
    enabled = cfg.get("enable_bsa", False)
    params = cfg.get("bsa_params")
    warnings: list[str] = []
    notes: list[str] = []
    if "enable_bsa" not in cfg:
        notes.append("enable_bsa is absent: the model's default (false) applies")
    elif not isinstance(enabled, bool):
        warnings.append(f"enable_bsa is {enabled!r}, not true/false")
    perrs = param_errors(cfg)
    if enabled is True and params is None:
        warnings.append("enable_bsa is true but bsa_params is null: the original model stops with "
                        "an assertion; set params with `bsa enable` or `bsa preset NAME`")
    if perrs:
        warnings.append(f"bsa_params is invalid: {perrs[0]}"
                        + (f" (and {len(perrs) - 1} more)" if len(perrs) > 1 else "")
                        + "; `bsa preset NAME` or `bsa enable` writes valid params")
    other = [e for e in schemas.errors(cfg, SCHEMA) if not e.startswith("bsa_params")]
    if other:
        warnings.append(f"config does not match the schema: {other[0]}")
    for flag in IGNORED_FLAGS:
        if cfg.get(flag) is True:
            notes.append(f"{flag} is true: our runner ignores it (dense attention takes "
                         "FlashAttention-3 where installed, else PyTorch SDPA)")
    if isinstance(params, dict) and not perrs:
        if params.get("sparsity") is None and params.get("cdf_threshold") is not None:
            notes.append("cdf-only mode (sparsity null): chunks kept vary per query chunk, until "
                         f"their softmax mass reaches {params['cdf_threshold']}; a query chunk "
                         "may keep none")
        if enabled is not True:
            notes.append("BSA is off; its params are kept and `bsa enable` turns them back on")
    same = matching_presets(cfg)
    preset = next((n for n in same if bsa_presets.PRESETS[n].enable_bsa == (enabled is True)),
                  None)
    bak = backup_path(path)
    return {
        "checkpoint": str(ckpt.root), "layout": ckpt.layout, "flavour": ckpt.flavour,
        "layout_description": ckpt.describe(), "config": str(path),
        "enable_bsa": enabled, "bsa_params": params,
        "mode": mode_of(params) if isinstance(params, dict) and not perrs else None,
        "preset": preset, "params_match": same,
        "attention": attention_path(cfg),
        "backup": str(bak) if bak.is_file() and not bak.is_symlink() else None,
        "warnings": warnings, "notes": notes,
    }
