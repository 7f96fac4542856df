"""Strict YAML + dotted-override loading into the typed :class:`MegaspanConfig`.

Design: a recipe is a partial nested mapping; overrides are ``a.b.c=value`` strings whose value
is parsed as YAML (so ``true``, ``1e-3``, ``[1, 2]`` and ``null`` work). Both go through one
function, :func:`_assign`, which walks the dataclass tree and type-checks against the field's
annotation, so a typo anywhere fails with one line naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from megaspan.config.schema import MegaspanConfig
from megaspan.errors import ConfigError

RECIPE_DIR = Path(__file__).parent / "recipes"


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list[{_type_name(get_args(tp)[0])}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` checked (and minimally converted) against annotation ``tp``."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads "1e-3" without a dot as a string; users write it anyway.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")  # pragma: no cover - schema bug


def _fields(obj: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def _assign(obj: Any, path: list[str], value: Any, prefix: str = "") -> None:
    """Set ``obj.<path> = value`` with strict key and type checks."""
    name, rest = path[0], path[1:]
    key = f"{prefix}{name}"
    fields = _fields(obj)
    if name not in fields:
        section = prefix.rstrip(".") or "the top level"
        raise ConfigError(
            f"unknown config key '{key}' (valid keys in {section}: {', '.join(sorted(fields))})"
        )
    current = getattr(obj, name)
    if isinstance(current, dict):
        # An open mapping (model.norm): keys are checked once the placement is known, by
        # norm_options() at the end of load_config (the placement may be set after its options).
        if len(rest) > 1:
            raise ConfigError(
                f"unknown config key '{key}.{'.'.join(rest)}' ('{key}.{rest[0]}' is not a section)"
            )
        if rest:
            current[rest[0]] = value
        elif isinstance(value, dict):
            current.update({str(k): v for k, v in value.items()})
        else:
            raise ConfigError(f"{key}: expected a mapping of option: value")
        return
    if dataclasses.is_dataclass(current):
        if rest:
            _assign(current, rest, value, key + ".")
            return
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {', '.join(sorted(_fields(current)))}")
        for sub, sub_value in value.items():
            _assign(current, [str(sub)], sub_value, key + ".")
        return
    if rest:
        raise ConfigError(f"unknown config key '{key}.{'.'.join(rest)}' ('{key}' is not a section)")
    setattr(obj, name, _coerce(key, value, fields[name]))


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe is a path to a YAML file or the name of one shipped in megaspan/config/recipes."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.yaml"))[:5]
        hint = f" (it holds {', '.join(found)})" if found else ""
        raise ConfigError(
            f"config file '{name_or_path}' is a directory{hint}: give the path of a YAML recipe file"
        )
    for candidate in (RECIPE_DIR / name_or_path, RECIPE_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
    raise ConfigError(f"config file '{name_or_path}' not found (shipped recipes: {shipped})")


def load_config(recipe: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> MegaspanConfig:
    """Build a config from defaults, an optional YAML recipe and ``key=value`` overrides."""
    cfg = MegaspanConfig()
    if recipe is not None:
        path = resolve_recipe(recipe)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of sections")
        for key, value in data.items():
            _assign(cfg, [str(key)], value)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _assign(cfg, key.strip().split("."), value)
    cfg.model.norm = norm_options(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> MegaspanConfig:
    """A config from a nested dict (a resolved ``config.yaml`` or a checkpoint's saved config),
    with the same strict checks as a recipe."""
    cfg = MegaspanConfig()
    for key, value in data.items():
        _assign(cfg, [str(key)], value)
    cfg.model.norm = norm_options(cfg)
    return cfg


def norm_options(cfg: MegaspanConfig):
    """``model.norm`` resolved against ``model.norm_placement``: that placement's ``Options``.

    Accepts the raw mapping (from YAML/overrides or a fresh ``MegaspanConfig()``) or options that
    are already resolved. A key that is not an option of the selected placement fails in one line
    naming the valid ones (and the placement it belongs to, if any).
    """
    # The placement registry is torch-free and imported only here, at call time, so
    # `import megaspan.config` stays independent of megaspan.norms (see megaspan.norms.registry).
    from megaspan.norms.registry import available, get_placement_class

    name = cfg.model.norm_placement
    cls = get_placement_class(name)
    raw = cfg.model.norm
    if isinstance(raw, cls.Options):
        return raw
    if dataclasses.is_dataclass(raw):
        # Options of another placement (norm_placement changed in code): carry over what was set.
        defaults = type(raw)()
        raw = {
            f.name: getattr(raw, f.name)
            for f in dataclasses.fields(raw)
            if getattr(raw, f.name) != getattr(defaults, f.name)
        }
    options = cls.Options()
    valid = sorted(_fields(options))
    for key, value in dict(raw).items():
        if key not in valid:
            owners = [
                n for n, c in available().items() if key in {f.name for f in dataclasses.fields(c.Options)}
            ]
            owner = f"; it is an option of {', '.join(owners)}" if owners else ""
            raise ConfigError(
                f"model.norm.{key} is not an option of model.norm_placement={name} "
                f"(its options: {', '.join(valid)}){owner}"
            )
        _assign(options, [key], value, "model.norm.")
    return options


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: MegaspanConfig, path: str | Path) -> None:
    """Write the fully resolved config (round-trips through :func:`load_config`)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
