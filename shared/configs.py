"""Typed config objects: one dataclass per command drives the Python API, the CLI and YAML files.

Each field is declared with `option(default, help)`. `Config.__post_init__` reads every field as its
type hint says (and checks its `choices`), so the Python API, YAML files and the CLI accept and refuse
the same values, with one `LoramError` naming the flag, the value and what is accepted; it then calls
the subclass's `check()` hook for cross-field rules. `Config.resolve(file, **flags)` reads an optional
YAML file and lets explicitly given flags (anything not None) override it.
"""

import dataclasses
import functools
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from loram.shared.errors import LoramError

C = TypeVar("C", bound="Config")
REQUIRED = dataclasses.MISSING
TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


class _YamlLoader(yaml.SafeLoader):
    """`yaml.safe_load`, except that text with a colon is never a number: YAML 1.1 reads `layers: 1:3` as the
    base-60 integer 63 and `nm: 2:4` as 124; YAML 1.2, and every user, read them as the text they are."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, re.compile(r"^(?!.*:)" + regex.pattern.removeprefix("^"), regex.flags)
             if tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float") else regex) for tag, regex in resolvers]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def option(default: Any = REQUIRED, help: str = "", *, argument: bool = False, choices=None, flag=None,
           counts: bool = False):
    """A config field with its one-line help. `argument=True` makes it positional on the CLI;
    `choices` restricts a string (or each item of a list); `flag` names the CLI flag when it differs from
    the field name (for a bool, `"on-name/off-name"` names both switches, e.g. `"freeze-lm-head/train-lm-head"`);
    `counts=True` lets a string field (or each item of a list) of whole numbers be written unquoted in a YAML
    file (`devices: 8`): a whole number is taken as its digits, where any other string field refuses it."""
    meta = {"help": help, "argument": argument, "choices": choices, "flag": flag, "counts": counts}
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


def _optional(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def check_seed(seed: int) -> None:
    """Every command's `--seed` seeds Python's, numpy's and torch's generators: numpy takes [0, 2^32)."""
    if not 0 <= seed < 2**32:
        raise LoramError(f"--seed must lie in [0, 2^32), got {seed}")


def flag_name(field: dataclasses.Field) -> str:
    """How the CLI names `field`: `--fill`, `--freeze-lm-head` or, for a positional argument, `ADAPTER`."""
    meta = field.metadata
    if meta.get("argument"):
        return field.name.upper()
    return "--" + (meta.get("flag") or field.name).replace("_", "-").partition("/")[0]


class _Refused(Exception):
    """`value` is not `what`; `hint` says how to write it; `item`: the value is one item of a list."""

    def __init__(self, what: str, value: Any, hint: str = "", item: bool = False):
        super().__init__(what)
        self.what, self.value, self.hint, self.item = what, value, hint, item


def _one_of(choices) -> str:
    return "one of " + ", ".join(map(str, choices))


def _plural(tp) -> str:
    return {str: "strings", int: "whole numbers", float: "numbers", Path: "paths", bool: "booleans"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _number(tp: type, value):
    """`value` as an int or a float: numbers (an int only from a whole float) and numeric strings; never a bool."""
    if not isinstance(value, bool):
        if isinstance(value, int) or (isinstance(value, float) and (tp is float or value.is_integer())):
            return tp(value)
        if isinstance(value, str):
            try:
                return tp(value.strip())
            except ValueError:
                pass
    raise _Refused("a whole number" if tp is int else "a number", value)


def _read(tp, value, choices=None, counts=False):
    """`value` as a `tp` (already stripped of Optional), or `_Refused`; `counts`: see `option`."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
            return value.strip().lower() in TRUE_WORDS
        raise _Refused("true or false (or yes/no, on/off, 1/0)", value)
    if tp in (int, float):
        return _number(tp, value)
    if tp is str:
        if isinstance(value, os.PathLike):  # a folder given as a Path in the Python API
            value = os.fspath(value)
        if counts and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            hint = ""
            if isinstance(value, bool):
                hint = "; quote it in a YAML file"
            elif isinstance(value, int | float):
                hint = f'; quote it in a YAML file: "{value}"'
            elif isinstance(value, list | tuple):  # `layers: [0, 2]` for `layers: 0:2`
                hint = "; write one string, as on the command line, not a list"
            raise _Refused(_one_of(choices) if choices else "a string", value, hint)
        if choices and value not in choices:
            raise _Refused(_one_of(choices), value)
        return value
    if tp is Path:
        if isinstance(value, str | os.PathLike):
            return Path(value).expanduser()  # a quoted '~/x' (or one in a YAML file) means what the shell's does
        raise _Refused("a path", value)
    if tp is list or typing.get_origin(tp) is list:
        item_tp = _base_type((typing.get_args(tp) or (Any,))[0])
        what = (f"a list of items each {_one_of(choices)}" if choices else
                "a list of whole numbers" if counts else f"a list of {_plural(item_tp)}")
        if isinstance(value, str) or (counts and isinstance(value, int) and not isinstance(value, bool)):
            value = [value]  # one item; a comma inside it is the command's to split
        elif not isinstance(value, list | tuple):
            raise _Refused(what, value)
        if item_tp is Any:
            return list(value)
        items = []
        for item in value:
            try:
                items.append(_read(item_tp, item, choices, counts))
            except _Refused as e:
                raise _Refused(what, item, e.hint, item=True) from None
        return items
    return value  # a type no config declares (dict, ...): taken as given


def _coerce(field: dataclasses.Field, tp, value):
    """`value` read as `field`'s type hint and choices; a `LoramError` naming the flag when it cannot be."""
    if value is None and _optional(tp):
        return None
    try:
        return _read(_base_type(tp), value, field.metadata.get("choices"), field.metadata.get("counts", False))
    except _Refused as e:
        got = f"the item {e.value!r}" if e.item else repr(e.value)
        raise LoramError(f"{flag_name(field)} must be {e.what}; got {got}{e.hint}") from None


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@dataclasses.dataclass
class Config:
    """Base for every command's config. Subclasses put cross-field rules in `check()`, never in
    `__post_init__`: the base's reads and checks every field first."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__post_init__" in cls.__dict__:
            raise TypeError(f"{cls.__name__}: define check() instead of __post_init__ "
                            "(Config.__post_init__ validates every field, then calls check())")

    def __new__(cls, *args, **kwargs):
        """Refuse a config built without a required option (`TrainConfig(model="m")`) in one LoramError naming it,
        before the dataclass's own `__init__` would raise a TypeError."""
        if not args and not kwargs:  # copy and pickle make the object first, then fill it
            return super().__new__(cls)
        fields = [f for f in dataclasses.fields(cls) if f.init]
        given = {f.name for f in fields[:len(args)]} | set(kwargs)
        missing = [f for f in fields if f.default is REQUIRED and f.default_factory is REQUIRED and f.name not in given]
        if missing:
            kinds = {"argument" if f.metadata.get("argument") else "option" for f in missing}
            what = "argument(s) and option(s)" if len(kinds) == 2 else f"{kinds.pop()}(s)"
            raise LoramError(f"missing required {what}: {', '.join(flag_name(f) for f in missing)} (on the command "
                             "line, as keys of a --config file, or as keyword arguments)")
        return super().__new__(cls)

    def __post_init__(self):
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f, hints[f.name], getattr(self, f.name)))
        self.check()

    def check(self) -> None:
        """Cross-field rules of a subclass (raise `LoramError`); every field already has its type."""

    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))

    @classmethod
    def resolve(cls: type[C], config_file: str | Path | None = None, **flags) -> C:
        """Build the config from an optional YAML file, then flags that are not None."""
        values: dict[str, Any] = {}
        if config_file is not None:
            path = Path(config_file).expanduser()
            if not path.is_file():
                raise LoramError(f"config file {path} {'is a folder' if path.is_dir() else 'not found'}; "
                                 "give a YAML file of option: value lines")
            try:
                loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_YamlLoader) or {}
            except yaml.YAMLError as e:
                raise LoramError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from e
            except (UnicodeDecodeError, OSError) as e:
                raise LoramError(f"config file {path} cannot be read as UTF-8 text ({e}); save it as UTF-8") from e
            if not isinstance(loaded, dict):
                raise LoramError(f"config file {path} must hold a mapping of option: value")
            odd = [k for k in loaded if not isinstance(k, str)]  # 1: 2, null: 2, ...
            if odd:
                raise LoramError(f"config file {path}: the key {odd[0]!r} is not an option name; write option: value "
                                 "lines, e.g. steps: 100")
            values.update({k.replace("-", "_"): v for k, v in loaded.items()})
        values.update({k: v for k, v in flags.items() if v is not None})
        return cls.from_dict(values)

    @classmethod
    def given(cls: type[C], config: "C | None" = None, **kwargs) -> C:
        """The config an API function runs (`train(config)`, `train(**options)`, or both): `config` with the keyword
        options that are not None applied on top (checked again, as one config), or the options alone (and
        `config_file=`, as `resolve`)."""
        if config is None:
            return cls.resolve(**kwargs)
        if not isinstance(config, cls):
            raise LoramError(f"config must be a {cls.__name__}, got {type(config).__name__}; or pass the options as "
                             "keyword arguments")
        given = {k: v for k, v in kwargs.items() if v is not None}
        return cls.from_dict({**config.to_dict(), **given}) if given else config

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any]) -> C:
        hints = _hints(cls)
        known = {f.name: f for f in cls.fields()}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise LoramError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values = {k: _coerce(known[k], hints[k], v) for k, v in values.items()}  # a bad value before a missing one
        return cls(**values)  # a required option missing: `__new__` says which

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
