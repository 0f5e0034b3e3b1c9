"""Typed config objects: one dataclass per command drives the Python API, the CLI and YAML files.

Each field is declared with `option(default, help)`; validation lives in the dataclass's
`__post_init__` and raises `LoramError`. `Config.resolve(file, **flags)` reads an optional YAML file
and lets explicitly given flags (anything not None) override it.
"""

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from loram.shared.errors import LoramError

C = TypeVar("C", bound="Config")
REQUIRED = dataclasses.MISSING


def option(default: Any = REQUIRED, help: str = "", *, argument: bool = False, choices=None, flag=None):
    """A config field with its one-line help. `argument=True` makes it positional on the CLI;
    `choices` restricts a string; `flag` names the CLI flag when it differs from the field name (for a bool,
    `"on-name/off-name"` names both switches, e.g. `"freeze-lm-head/train-lm-head"`)."""
    meta = {"help": help, "argument": argument, "choices": choices, "flag": flag}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(tp):
    """`Optional[X]` / `X | None` -> X."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(name: str, tp, value):
    tp = _base_type(tp)
    if value is None:
        return None
    try:
        if tp is Path:
            return Path(value)
        if tp in (int, float) and not isinstance(value, bool):
            return tp(value)
        if tp is bool and isinstance(value, str):
            return value.lower() in ("1", "true", "yes", "on")
        if (tp is list or typing.get_origin(tp) is list) and isinstance(value, tuple):
            return list(value)
    except (TypeError, ValueError) as e:
        raise LoramError(f"option {name!r}: cannot read {value!r} as {tp.__name__}") from e
    return value


@dataclasses.dataclass
class Config:
    """Base for every command's config."""

    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))

    @classmethod
    def resolve(cls: type[C], config_file: str | Path | None = None, **flags) -> C:
        """Build the config from an optional YAML file, then flags that are not None."""
        values: dict[str, Any] = {}
        if config_file is not None:
            path = Path(config_file)
            if not path.is_file():
                raise LoramError(f"config file {path} not found")
            try:
                loaded = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as e:
                raise LoramError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from e
            if not isinstance(loaded, dict):
                raise LoramError(f"config file {path} must hold a mapping of option: value")
            values.update({k.replace("-", "_"): v for k, v in loaded.items()})
        values.update({k: v for k, v in flags.items() if v is not None})
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any]) -> C:
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in cls.fields()}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise LoramError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        missing = [n for n, f in known.items() if f.default is REQUIRED and f.default_factory is REQUIRED
                   and n not in values]
        if missing:
            raise LoramError(f"missing required option(s): {', '.join(missing)}")
        return cls(**{k: _coerce(k, hints[k], v) for k, v in values.items()})

    def to_dict(self) -> dict[str, Any]:
        """Plain-YAML/JSON form (paths as strings, tuples as lists)."""

        def plain(v):
            if isinstance(v, Path):
                return str(v)
            if isinstance(v, tuple | list):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v

        return {f.name: plain(getattr(self, f.name)) for f in self.fields()}

    def save(self, path: Path) -> None:
        """Write the resolved config as YAML (used next to every command's output)."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
