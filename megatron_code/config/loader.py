"""Building the config tree from dicts, YAML files and `--section.field=value` overrides, with
errors that name the field and where its value came from."""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .base import ConfigError
from .model import PRESETS, ModelConfig
from .tree import Config


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if isinstance(value, str) and str in args:
            return value
        return _convert(value, next(a for a in args if a is not str), where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}", where)
        return [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}", where)
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where} must be true or false, got {value!r}", where)
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}", where)
        try:
            out = tp(value) if not isinstance(value, str) else tp(float(value)) if tp is float else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be {'an integer' if tp is int else 'a number'}, got {value!r}",
                              where) from None
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where} must be an integer, got {value!r}", where)
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where} must be a string, got {value!r}", where)
        return str(value)
    return value


def _build(cls: type, values: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown field {where}.{unknown[0]} (known: {', '.join(sorted(names))})",
                          f"{where}.{unknown[0]}")
    values = dict(values)
    if cls is ModelConfig and values.get("preset"):
        preset = values["preset"]
        if preset not in PRESETS:
            raise ConfigError(f"{where}.preset={preset!r} is not one of {', '.join(PRESETS)}", f"{where}.preset")
        values = {**PRESETS[preset], **values}
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(arg: str) -> tuple[list[str], Any]:
    """`--train.steps=100` -> (['train', 'steps'], 100). Values are read as YAML scalars."""
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"override {arg!r} must look like --section.field=value")
    key, raw = arg[2:].split("=", 1)
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Config:
    """Config from an optional YAML file, then dotted overrides; validated before returning."""
    values: dict = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        values = _merge(values, loaded)
    for arg in overrides or []:
        keys, value = parse_override(arg)
        node = values
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {arg!r}: {k} is not a section")
        node[keys[-1]] = value
    try:
        config = _build(Config, values, "config")
        config.validate()
    except ConfigError as e:
        raise ConfigError(f"{_origin(e, path, overrides or [])}: {e}", e.field) from None
    return config


def _origin(error: ConfigError, path: Path | None, overrides: list[str]) -> str:
    """Where the value an error is about came from: the command-line override that set it (or a
    section above it, or one below it that made an unknown section), else the file. An error across fields (from `validate`) is the override's
    when it names the override's field."""
    for arg in reversed(overrides):  # the last override of a field wins, so blame it first
        key = arg[2:].split("=", 1)[0]
        if error.field is not None:
            field = error.field.removeprefix("config.")
            if field == key or field.startswith((key + ".", key + "[")) or key.startswith(field + "."):
                return f"override {arg}"
        elif re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", str(error)):
            return f"override {arg}"
    return str(path) if path is not None else "config"


def config_from_dict(values: dict, model_only: bool = False) -> Config:
    """Rebuild a saved config (e.g. from a checkpoint). `model_only` validates just the model
    section (a weights-only checkpoint made by import has no data sources)."""
    config = _build(Config, values, "config")
    (config.model if model_only else config).validate()
    return config
