"""The block-sparse-attention presets as one table.

``longcat-tools bsa``, ``run --bsa``, the example configs in ``examples/bsa_configs/`` and the
tests all read this table, so a value changes in one place. ``python -m longcat_tools.bsa.examples
--write DIR`` regenerates the examples from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_ENABLE = "720p-balanced"  # what `bsa enable` writes when the config has no params to keep
EXAMPLES_FOLDER = "bsa_configs"  # under the top-level examples/ folder
ORIGINAL = "LongCat-Video's release and demos"
FASTVIDEO = "FastVideo's deleted manage_bsa.py"


def bsa_params(sparsity: float | None, cdf_threshold: float | None = None,
               chunk: tuple[int, int, int] = (4, 4, 4)) -> dict[str, Any]:
    """The ``bsa_params`` object the original kernel takes as keyword arguments (q and k chunks
    equal, as in every preset)."""
    return {"sparsity": sparsity, "cdf_threshold": cdf_threshold,
            "chunk_3d_shape_q": list(chunk), "chunk_3d_shape_k": list(chunk)}


@dataclass(frozen=True)
class Preset:
    name: str
    enable_bsa: bool
    params: dict[str, Any] | None  # None writes "bsa_params": null
    intent: str
    origin: str = ORIGINAL
    example: str | None = None  # file name under examples/bsa_configs/

    @property
    def keeps(self) -> str:
        """What share of key chunks each query chunk attends to, in words."""
        if self.params is None:
            return "all (dense)"
        s, cdf = self.params["sparsity"], self.params["cdf_threshold"]
        topk = f"{(1 - s) * 100:g}%" if s is not None else None
        if cdf is None:
            return topk or "all"
        return f"max({topk}, CDF {cdf:g})" if topk else f"CDF {cdf:g}"


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("480p", False, None, "dense attention, best quality at 480p",
           example="config_480p_no_bsa.json"),
    Preset("720p-balanced", True, bsa_params(0.9375),
           "keeps 6.25% of key chunks (the hub's params; enable's default)",
           example="config_720p_balanced.json"),
    Preset("720p-quality", True, bsa_params(0.875), "keeps 12.5% of key chunks",
           example="config_720p_quality.json"),
    Preset("720p-fast", True, bsa_params(0.96875), "keeps 3.125% of key chunks",
           example="config_720p_fast.json"),
    Preset("720p-adaptive", True, bsa_params(0.875, 0.98),
           "max(CDF 0.98, top 12.5%) chunks per query: adapts to content",
           example="config_720p_adaptive.json"),
    Preset("long-video", True, bsa_params(0.9375, chunk=(8, 4, 4)),
           "8 latent frames per chunk for videos over 93 frames", example="config_long_video.json"),
    # Resolution-named variants from FastVideo's manage_bsa.py (deleted upstream), kept as extras.
    Preset("480p-bsa", True, bsa_params(0.9375),
           "BSA at 448x832 (token grid 28x52 divides by 4)", FASTVIDEO),
    Preset("704p-balanced", True, bsa_params(0.9375),
           "704x1280 (token grid 44x80), the original refinement setting", FASTVIDEO),
    Preset("704p-quality", True, bsa_params(0.875), "704x1280, keeps 12.5%", FASTVIDEO),
    Preset("704p-fast", True, bsa_params(0.96875), "704x1280, keeps 3.125%", FASTVIDEO),
    Preset("768p-balanced", True, bsa_params(0.9375),
           "768x1216 (token grid 48x76, a 720p bucket)", FASTVIDEO),
]}


def get(name: str) -> Preset:
    from longcat_tools.errors import UsageError

    if name not in PRESETS:
        raise UsageError(f"unknown preset '{name}' (known: {', '.join(PRESETS)}; "
                         "`longcat-tools bsa presets` describes them)")
    return PRESETS[name]


def examples() -> list[Preset]:
    """The presets that have an example config, in table order."""
    return [p for p in PRESETS.values() if p.example]
