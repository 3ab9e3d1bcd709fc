"""Read, change and check the block-sparse-attention settings of a checkpoint.

``config``: the pure changes and the locked, validated, atomic writes; ``status``: what the
settings mean; ``check``: the kernel's arithmetic for one video size; ``examples``: the example
configs generated from the preset table (imported on its own: it is also a ``python -m`` entry
point). The names below are the package's API (``from longcat_tools import bsa;
bsa.status(...)``).
"""

from longcat_tools.bsa.check import check
from longcat_tools.bsa.config import (
    JsonStyle,
    Update,
    backup_path,
    config_lock,
    kept_params,
    open_checkpoint,
    open_configs,
    parse_chunk,
    parse_fraction,
    read_config,
    restore,
    restore_all,
    update,
    update_all,
    with_disabled,
    with_enabled,
    with_preset,
)
from longcat_tools.bsa.status import attention_path, describe_params, mode_of, status

__all__ = ["JsonStyle", "Update", "attention_path", "backup_path", "check", "config_lock",
           "describe_params", "kept_params", "mode_of", "open_checkpoint",
           "open_configs", "parse_chunk", "parse_fraction", "read_config", "restore",
           "restore_all", "status", "update", "update_all", "with_disabled", "with_enabled",
           "with_preset"]
