"""Settings dataclasses seen as one flat list of options.

A command's settings are a dataclass whose fields are options (:func:`option`) or nested
settings dataclasses (:func:`group`): ``TrainConfig`` nests each algorithm's own settings and the
reward's. Every option has one flat name, unique within its command: the field's name, or the
name it declares (``RewardConfig.name`` is ``reward``). The flat names are what a user types and
reads: the CLI's ``--kebab-case`` options, config-file keys, a run's ``config.json`` and the
presets. The nesting is what the code reads (``cfg.dpok.alpha``): each algorithm's settings next
to its code, checked by it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal


def option(default: Any, help: str, *, name: str = "") -> Any:  # noqa: A002 - the CLI's word
    """A dataclass field that is an option; ``help`` is its CLI help, ``name`` its flat name if not the field's."""
    meta = {"help": help, **({"option": name} if name else {})}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def group(cls: type, **defaults: Any) -> Any:
    """A dataclass field holding a nested settings dataclass (its options join the command's);
    ``defaults``: this command's own defaults of some of its fields."""
    return field(default_factory=lambda: cls(**defaults), metadata={"group": True, "defaults": defaults})


@dataclass(frozen=True)
class OptionField:
    """One flat option of a settings dataclass.

    ``name``: the flat name; ``path``: attribute names from the top (``("dpok", "alpha")``);
    ``kind``: the resolved type; ``title``: the group it is listed under (its settings class's
    ``title``, or '' for top-level options).
    """

    name: str
    path: tuple[str, ...]
    field: dataclasses.Field
    kind: Any
    title: str
    override: tuple[Any, ...] = ()  # (default,) when the enclosing group sets this command's own default

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def help(self) -> str:
        return str(self.field.metadata.get("help", ""))

    def default(self) -> Any:
        if self.override:
            return self.override[0]
        f = self.field
        return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


@functools.cache
def option_fields(cls: type) -> tuple[OptionField, ...]:
    """Every option of ``cls``, nested groups included, in declaration order."""
    out: list[OptionField] = []

    def walk(kind: type, prefix: tuple[str, ...], title: str, defaults: dict[str, Any]) -> None:
        hints = typing.get_type_hints(kind)
        for f in dataclasses.fields(kind):
            if f.metadata.get("group"):
                sub = hints[f.name]
                walk(sub, (*prefix, f.name), getattr(sub, "title", "") or sub.__name__, f.metadata["defaults"])
            else:
                override = (defaults[f.name],) if f.name in defaults else ()
                out.append(OptionField(f.metadata.get("option", f.name), (*prefix, f.name), f, hints[f.name], title,
                                       override))

    walk(cls, (), "", {})
    names = [o.name for o in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TypeError(f"{cls.__name__}: option names used twice: {', '.join(duplicates)}")
    return tuple(out)


def option_names(cls: type) -> list[str]:
    return [o.name for o in option_fields(cls)]


def from_options(cls: type, values: Mapping[str, Any]) -> Any:
    """An instance of ``cls`` from flat option values (the others at their defaults).

    An unknown name is a ``ValueError`` naming it."""
    fields = {o.name: o for o in option_fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown setting(s) of {cls.__name__}: {', '.join(unknown)}")
    nested: dict[str, Any] = {}
    for name, value in values.items():
        *parents, leaf = fields[name].path
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return _build(cls, nested)


def _build(cls: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("group"):
            kwargs[f.name] = _build(hints[f.name], {**f.metadata["defaults"], **values.get(f.name, {})})
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def get_option(obj: Any, o: OptionField) -> Any:
    for attr in o.path:
        obj = getattr(obj, attr)
    return obj


def to_options(obj: Any) -> dict[str, Any]:
    """Flat option name -> value (lists copied), in declaration order."""
    out = {}
    for o in option_fields(type(obj)):
        value = get_option(obj, o)
        out[o.name] = list(value) if isinstance(value, list) else value
    return out


def replace_options(obj: Any, **changes: Any) -> Any:
    """A copy of ``obj`` with flat options changed."""
    return from_options(type(obj), {**to_options(obj), **changes})


def option_errors(settings: Any) -> list[str]:
    """Type-level errors of any settings dataclass: non-finite floats, values outside a ``Literal``'s choices."""
    errors = []
    for o in option_fields(type(settings)):
        value = get_option(settings, o)
        if isinstance(value, float) and not math.isfinite(value):  # inf / nan pass range checks (or fail them unclearly)
            errors.append(f"{o.flag} must be a finite number (got {value})")
        if typing.get_origin(o.kind) is Literal and value not in typing.get_args(o.kind):
            choices = ", ".join(repr(c) for c in typing.get_args(o.kind))
            errors.append(f"{o.flag} must be one of {choices} (got {value!r})")
    return errors
