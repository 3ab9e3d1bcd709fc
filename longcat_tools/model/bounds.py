"""How large a model dimension read from a config (or an option) may be, for every command.

Tensor shapes, tensor lists and allocations follow from these numbers, so an absurd value (a depth
of 10^9, a hidden size of 10^12, an infinite mlp_ratio) must be refused before any of that work
starts, with one line naming the file and field. The limits are far above any LongCat model (the
release's values are in ``RELEASE``) and far below what would exhaust memory just listing tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from longcat_tools.errors import LongcatError, UsageError

MAX_LAYERS = 1024  # DiT blocks / encoder layers: the release has 48 / 24
MAX_WIDTH = 65_536  # hidden, caption, embedding widths: the release's largest is 4096
MAX_CHANNELS = 1024  # latent channels: the release has 16
MAX_HEADS = 1024
MAX_PATCH = 64  # per axis: the release has (1, 2, 2)
MAX_MLP_RATIO = 64.0  # the release has 4
SEEDS = range(-2**63, 2**64)  # what a torch generator takes, signed or not



@dataclass(frozen=True)
class Limit:
    """The largest value a field may take, the release's value and the model it belongs to."""

    limit: int
    release: int
    model: str = "DiT"


# field -> its limit: what every reader of a DiT (or text encoder) config checks.
LIMITS: dict[str, Limit] = {
    "depth": Limit(MAX_LAYERS, 48),
    "hidden_size": Limit(MAX_WIDTH, 4096),
    "caption_channels": Limit(MAX_WIDTH, 4096),
    "adaln_tembed_dim": Limit(MAX_WIDTH, 512),
    "frequency_embedding_size": Limit(MAX_WIDTH, 256),
    "in_channels": Limit(MAX_CHANNELS, 16),
    "out_channels": Limit(MAX_CHANNELS, 16),
    "num_heads": Limit(MAX_HEADS, 32),
    "num_attention_heads": Limit(MAX_HEADS, 32),
    "patch_size": Limit(MAX_PATCH, 2),
    "num_layers": Limit(MAX_LAYERS, 24, "text encoder"),
}


def check_int(value: object, name: str, where: str,
              error: type[Exception] = LongcatError) -> int:
    """``value`` as a positive integer within ``LIMITS[name]``, else one line naming ``where``
    (the config file, or the option) and the field. Booleans are not integers here."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise error(f"{where}: field '{name}' must be a positive integer, got {value!r}")
    lim = LIMITS[name]
    if value > lim.limit:
        raise error(f"{where}: {name} {value:,} is beyond any LongCat {lim.model} (the release "
                    f"has {lim.release}; limit {lim.limit:,})")
    return value


def check_ratio(value: object, name: str, where: str) -> float:
    """A finite positive ratio up to MAX_MLP_RATIO (NaN, Infinity and booleans refused)."""
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or value <= 0):
        raise LongcatError(f"{where}: field '{name}' must be a finite positive number, "
                           f"got {value!r}")
    if value > MAX_MLP_RATIO:
        raise LongcatError(f"{where}: {name} {value:g} is beyond any LongCat model (the release "
                           f"has 4; limit {MAX_MLP_RATIO:g})")
    return value


def plain_number(text: str, kind: type = float) -> int | float:
    """``kind(text)``, refusing '_' between digits (ValueError): Python reads '1_0' as 10, so a
    scale or a guidance typed so ran ten times too strong. Every number option reads so."""
    if "_" in str(text):
        raise ValueError(f"'{text}' is not a plain number")
    return kind(text)


def seed_state(seed: int) -> int:
    """The generator state a seed gives: torch takes a negative seed modulo 2**64, so -1 and
    2**64 - 1 make the same video (avatar 1.0 takes only 0 to 2**32 - 1)."""
    return seed % 2**64


def check_seed(seed: int, flag: str = "--seed") -> None:
    """A seed a torch generator takes: a larger one failed inside torch, or was silently
    folded onto a smaller one."""
    if isinstance(seed, bool) or not isinstance(seed, int):  # `in range` walked a numpy int
        raise UsageError(f"{flag} {seed!r}: a seed is an integer")
    if seed not in SEEDS:
        raise UsageError(f"{flag} {seed}: must fit in 64 bits")
