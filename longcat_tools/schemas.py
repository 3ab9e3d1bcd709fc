"""The JSON Schemas in ``schemas/``: found at run time, validated with draft 2020-12.

They ship inside the wheel (``longcat_tools/_data/schemas``) and are read from the source tree in a
checkout, so other CI systems can use the very files we validate with (``longcat-tools schema``).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from longcat_tools.errors import LongcatError, UsageError
from longcat_tools.io import jsonio

SUFFIX = ".schema.json"


def data_dir(name: str) -> Path:
    """``schemas`` or ``examples``: the packaged copy, else the checkout's top-level folder."""
    packaged = Path(__file__).parent / "_data" / name
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / name


def names() -> list[str]:
    """Schema names (file names without ``.schema.json``)."""
    return sorted(p.name[: -len(SUFFIX)] for p in data_dir("schemas").glob(f"*{SUFFIX}"))


@cache
def load(name: str) -> dict[str, Any]:
    if name not in names():  # a name, never a path: `schema ../../x` reads nothing
        raise UsageError(f"unknown schema '{name}' (known: {', '.join(names())})")
    return jsonio.read(data_dir("schemas") / f"{name}{SUFFIX}", what=f"schema {name}")


def _is_json_integer(_checker: Any, instance: Any) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


@cache
def _validator(name: str):
    """Draft 2020-12, except that "integer" means an integer literal: the standard also takes
    ``32.0``, which the loaders refuse (transformers' and diffusers' configs fail on a float
    ``d_model``, ``z_dim`` or ``num_train_timesteps`` with an internal error)."""
    from jsonschema import Draft202012Validator, validators
    from referencing import Registry, Resource

    resources = [(s["$id"], Resource.from_contents(s)) for s in map(load, names())]
    schema = load(name)
    Draft202012Validator.check_schema(schema)
    strict = validators.extend(Draft202012Validator, type_checker=Draft202012Validator
                               .TYPE_CHECKER.redefine("integer", _is_json_integer))
    return strict(schema, registry=Registry().with_resources(resources))


def errors(instance: Any, name: str) -> list[str]:
    """Every violation as ``path: message``, most specific first, empty when valid."""
    out = []
    for err in sorted(_validator(name).iter_errors(instance), key=lambda e: list(e.path)):
        path = "/".join(str(p) for p in err.absolute_path) or "(root)"
        best = err
        if err.context:  # oneOf/anyOf: report the branch that got furthest, not "not null"
            best = max(err.context, key=lambda e: (len(e.absolute_path), e.validator != "type"))
            path = "/".join(str(p) for p in best.absolute_path) or path
        out.append(f"{path}: {best.message}")
    return out


def validate(instance: Any, name: str, where: str) -> None:
    """Raise a one-line LongcatError naming the file and the first violation."""
    errs = errors(instance, name)
    if errs:
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        raise LongcatError(f"{where}: {errs[0]}{more} [schema {name}]")
