"""Config files: YAML or TOML settings mapped onto the typed settings dataclasses.

A config file is a flat mapping of option names (``learning_rate`` or ``learning-rate``) to
values, read for any command that takes settings (``dpok train --config FILE``). The values are
checked against the dataclass's field types before anything else happens: an unknown key is an
error naming the key and the nearest valid one, a value of the wrong type names the key, its type
and the line it is on. Options given on the command line override the file.

YAML is read with PyYAML's safe loader, extended only so that ``5e-4`` is a float (as in YAML 1.2
and TOML; YAML 1.1 would read it as a string); TOML with :mod:`tomllib` and written with
``tomli_w``. Nothing is ever unpickled.
"""

from __future__ import annotations

import difflib
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .assets import preset_dir
from .config import PRESETS
from .options import option_fields, to_options
from .utils.diskwrite import write_text_atomic

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

FORMATS = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml"}


class ConfigFileError(ValueError):
    """A config file that cannot be read or holds a setting that does not fit; the message says where."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, with YAML 1.2's float syntax (``1e-4`` needs no dot)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


@dataclass(frozen=True)
class ConfigFile:
    """The checked settings of one config file.

    - ``values``: field name -> value, converted to the field's type (an int for a float field
      becomes a float, a single string for a list field a one-item list)
    - ``lines``: field name -> 1-based line of its key in the file (where the format tells)
    """

    path: Path
    format: str
    values: dict[str, Any] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)

    def where(self, name: str) -> str:
        """``FILE, line N`` (or just ``FILE``) for the key of field ``name``."""
        line = self.lines.get(name)
        return f"{self.path}, line {line}" if line else str(self.path)


def config_format(path: str | Path) -> str:
    """``yaml`` or ``toml`` from the file's suffix; other suffixes are an error."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ConfigFileError(f"config file {path}: unknown format {Path(path).suffix or '(no suffix)'!r}; "
                              f"name it *.yaml, *.yml or *.toml")
    return fmt


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigFileError(f"cannot read config file {path}: {e.strerror or e}") from e
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigFileError(f"config file {path} is not UTF-8 text (invalid byte at line {line}); "
                              "save it with UTF-8 encoding") from None


def _parse_yaml(path: Path, text: str) -> tuple[dict[str, Any], dict[str, int]]:
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise ConfigFileError(f"config file {path}: not valid YAML: nested too deeply; give a flat mapping of "
                              "option names to values") from None
    except (ValueError, OverflowError) as e:  # PyYAML's own bugs, e.g. an escape "\\U7fffffff" past Unicode
        raise ConfigFileError(f"config file {path}: not valid YAML: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigFileError(f"config file {path}{where}: not valid YAML: {problem}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
        raise ConfigFileError(f"config file {path}: the top level must be a mapping of option names to values "
                              f"(e.g. 'learning_rate: 1e-4'), not a {type(data).__name__}")
    lines: dict[str, int] = {}
    for key_node, _ in node.value:
        key = str(key_node.value)
        if key in lines:
            raise ConfigFileError(f"config file {path}, line {key_node.start_mark.line + 1}: key {key!r} is "
                                  f"given twice (first on line {lines[key]})")
        lines[key] = key_node.start_mark.line + 1
    return {str(k): v for k, v in data.items()}, lines


def _parse_toml(path: Path, text: str) -> tuple[dict[str, Any], dict[str, int]]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigFileError(f"config file {path}: not valid TOML: {e}") from None
    except RecursionError:
        raise ConfigFileError(f"config file {path}: not valid TOML: nested too deeply; give option = value "
                              "lines") from None
    # tomllib gives no positions: the line of each top-level key, found as the parser would see it
    lines: dict[str, int] = {}
    for n, line in enumerate(text.split("\n"), start=1):
        match = re.match(r"\s*(?:\"([^\"]+)\"|'([^']+)'|([A-Za-z0-9_-]+))\s*=", line)
        if match:
            lines.setdefault(next(g for g in match.groups() if g is not None), n)
        elif re.match(r"\s*\[", line):
            break  # keys after a [table] header belong to the table
    return data, lines


def parse_config_file(path: str | Path) -> tuple[str, dict[str, Any], dict[str, int]]:
    """``(format, raw mapping, key -> line)`` of a YAML or TOML file; unchecked."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigFileError(f"config file {path} does not exist")
    if path.is_dir():
        raise ConfigFileError(f"config file {path} is a directory; give a .yaml or .toml file")
    fmt = config_format(path)
    text = _read_text(path)
    data, lines = (_parse_yaml if fmt == "yaml" else _parse_toml)(path, text)
    return fmt, data, lines


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is typing.Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(kind))
    if typing.get_origin(kind) is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, "a list of strings")


def _convert(kind: Any, value: Any) -> Any:
    """``value`` as field type ``kind``; raises TypeError when it does not fit."""
    if typing.get_origin(kind) is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
    elif typing.get_origin(kind) is list and typing.get_args(kind)[0] is not str:
        item = typing.get_args(kind)[0]
        items = value if isinstance(value, list) else [value]
        try:
            return [_convert(item, v) for v in items]
        except TypeError:
            raise TypeError(f"a list of {_type_name(item).removeprefix('a ').removeprefix('an ')}s") from None
    elif typing.get_origin(kind) is typing.Literal:
        if isinstance(value, str) and value in typing.get_args(kind):
            return value
    elif typing.get_origin(kind) is list:
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list) and all(isinstance(v, str) for v in items):
            return list(items)
    elif kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    raise TypeError(_type_name(kind))


def check_settings(raw: dict[str, Any], cls: type, source: str, lines: dict[str, int] | None = None,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check a mapping of settings against dataclass ``cls``; returns field name -> converted value.

    Keys may use ``-`` or ``_``. ``extra`` names further keys the command accepts (name -> type,
    e.g. ``{"preset": str}``). Every unknown key or ill-typed value is reported, with ``source``
    (the file) and the key's line, in one :class:`ConfigFileError`.
    """
    lines = lines or {}
    kinds: dict[str, Any] = {o.name: o.kind for o in option_fields(cls)}
    kinds.update(extra or {})
    valid = sorted(kinds)
    values: dict[str, Any] = {}
    errors: list[str] = []
    for key, value in raw.items():
        where = f"{source}, line {lines[key]}" if key in lines else source
        name = key.replace("-", "_")
        if name not in kinds:
            near = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(valid)}"
            errors.append(f"{where}: unknown key {key!r}{hint}")
            continue
        if name in values:
            errors.append(f"{where}: {key!r} is given twice (as {name!r} and {name.replace('_', '-')!r})")
            continue
        if value is None:
            errors.append(f"{where}: {key!r} has no value; give {_type_name(kinds[name])} or leave the key out")
            continue
        try:
            values[name] = _convert(kinds[name], value)
        except TypeError as e:
            shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
            quote = " (quote it to make it a string)" if kinds[name] is str and not isinstance(value, str) else ""
            errors.append(f"{where}: {key!r} must be {e}{quote}, not {shown}")
    if errors:
        raise ConfigFileError("invalid config file:\n  " + "\n  ".join(errors))
    return values


def read_config_file(path: str | Path, cls: type, extra: dict[str, Any] | None = None) -> ConfigFile:
    """Parse and check a YAML/TOML config file for dataclass ``cls`` (see :func:`check_settings`)."""
    path = Path(path).expanduser()
    fmt, raw, lines = parse_config_file(path)
    values = check_settings(raw, cls, str(path), lines, extra)
    named = {key.replace("-", "_"): line for key, line in lines.items()}
    return ConfigFile(path, fmt, values, {k: v for k, v in named.items() if k in values})


def annotate_errors(error: str, source: ConfigFile | None) -> str:
    """Add ``(FILE, line N)`` to each line of a settings error whose ``--option`` came from the file."""
    if source is None:
        return error
    out = []
    for line in error.split("\n"):
        names = [m.replace("-", "_") for m in re.findall(r"--([a-z][a-z0-9-]*)", line)]
        from_file = [n for n in names if n in source.values]
        out.append(f"{line} ({source.where(from_file[0])})" if from_file else line)
    return "\n".join(out)


def dump_config(values: dict[str, Any], fmt: str, header: str = "") -> str:
    """The text of a config file holding ``values`` (YAML or TOML), with ``header`` as comment lines."""
    comment = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
    if fmt == "yaml":
        body = yaml.safe_dump(values, sort_keys=False, allow_unicode=True, default_flow_style=False,
                              width=1000) if values else ""
    elif fmt == "toml":
        import tomli_w

        body = tomli_w.dumps(values)
    else:
        raise ConfigFileError(f"unknown config format {fmt!r}; use 'yaml' or 'toml'")
    return comment + body


def write_config_file(values: dict[str, Any], path: str | Path, header: str = "") -> Path:
    """Write ``values`` to ``path`` in the format its suffix names; returns the path."""
    path = Path(path)
    text = dump_config(values, config_format(path), header)
    write_text_atomic(path, text)
    return path


# ------------------------------------------------------------------------------- run folders and presets

RUN_CONFIG_EXCLUDED = ("output_dir", "resume")  # where a run is, not what it is


def run_config_values(cfg: Any) -> dict[str, Any]:
    """A resolved :class:`~dpok.config.TrainConfig` as config-file values (without its folder)."""
    return {k: v for k, v in to_options(cfg).items() if k not in RUN_CONFIG_EXCLUDED}


def write_run_config(cfg: Any, folder: str | Path, fmt: str = "yaml") -> Path:
    """``FOLDER/config.yaml`` (or ``.toml``): every setting of the run, so that
    ``dpok train --config FOLDER/config.yaml --output-dir NEW`` runs it again."""
    header = ("dpok train settings of this run, resolved (every value, automatic batch sizes filled in).\n"
              "Run it again with: dpok train --config THIS_FILE --output-dir NEW_FOLDER")
    return write_config_file(run_config_values(cfg), Path(folder) / f"config.{fmt}", header)


PRESET_DIR = preset_dir()


def preset_file(name: str) -> Path:
    """The shipped config file of preset ``name`` (``dpok/presets/NAME.yaml``)."""
    return PRESET_DIR / f"{name}.yaml"


def preset_text(name: str) -> str:
    """The text of preset ``name``'s config file: its documentation as comments, then its values."""
    import inspect


    if name not in PRESETS:
        raise ConfigFileError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    doc = inspect.cleandoc(PRESETS[name].__doc__ or "")
    values = PRESETS[name]()
    flow = values.pop("flow_overrides", {})
    on_flow = ("\n\nOn a flow-matching model (SD3, FLUX) --preset also sets: "
               + ", ".join(f"{k}: {v}" for k, v in flow.items())) if flow else ""
    header = (f"Preset {name!r}: the same settings as 'dpok train --preset {name}'.\n\n{doc}{on_flow}\n\n"
              f"Copy this file, change what you need and run: dpok train --config FILE\n"
              "(options on the command line override the file; every other option keeps its default)")
    return dump_config(values, "yaml", header)


def write_preset_files(folder: str | Path) -> list[Path]:
    """Write every preset's config file into ``folder``; returns the paths."""

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in PRESETS:
        path = folder / f"{name}.yaml"
        path.write_text(preset_text(name), encoding="utf-8")
        paths.append(path)
    return paths
