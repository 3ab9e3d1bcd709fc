"""The LoRA adapters of a checkpoint: registry, attach, detach, export and fuse.

:mod:`.registry` keeps ``lora/adapters.json`` and finds adapter files, :mod:`.adapters` attaches,
detaches and exports them, :mod:`.fusion` merges them into a new checkpoint, and :mod:`.formats`
reads and writes the native, FastVideo and PEFT file formats exactly. This module is the public
face of all of it; each name is imported on first use, so that reading a file's LoRA keys
(``verify``) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC: dict[str, tuple[str, ...]] = {
    "adapters": ("SOURCE_FORMATS", "AttachResult", "DetachResult", "ExportResult", "attach",
                 "detach", "export"),
    "fusion": ("FUSED_CONFIG_KEY", "FUSED_METADATA_KEY", "FusedAdapter", "FusePlan", "FuseResult",
               "execute_fuse", "fuse", "fuse_error", "parse_adapter_list", "parse_fuse_names",
               "plan_fuse"),
    "registry": ("HUB_ADAPTERS", "REGISTRY", "SCHEMA", "AdapterInfo", "AdapterRecord",
                 "Registry", "check_name", "discover", "file_targets", "list_adapters",
                 "load_registry", "make_record", "register_existing", "registry_lock",
                 "registry_path", "save_registry", "summarize", "target_patterns"),
}
_MODULE_OF = {name: module for module, names in _PUBLIC.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
