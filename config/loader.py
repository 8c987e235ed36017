"""Loading any config document: YAML file + `--set a.b=value` overrides -> a validated model.

Every error is a `ConfigError` with one line that names the dotted key and what is allowed, so
entrypoints can print it and exit before doing any work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from config.base import deep_merge, format_validation_error

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line naming the key."""


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; missing file, bad YAML or a non-mapping are ConfigErrors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path}{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """'a.b=value' -> (['a', 'b'], value) with the value parsed as YAML (12, true, [1, 2], text)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set each dotted key in a copy of `data`, creating intermediate sections as needed."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def validate(model: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Validate `data` into `model`, turning pydantic's errors into one-line ConfigErrors."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"config error: {format_validation_error(exc, prefix)}") from None


def load(model: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
         defaults: dict[str, Any] | None = None) -> T:
    """defaults <- YAML file <- overrides, validated into `model`."""

    data = dict(defaults or {})
    if path is not None:
        data = deep_merge(data, read_yaml(path))
    return validate(model, apply_overrides(data, overrides))


def dump_yaml(cfg: BaseModel) -> str:
    """Resolved config as YAML (round-trips through `load` to an equal object)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def resolve_named_yaml(name_or_path: str | Path, folder: Path, kind: str) -> Path:
    """A YAML path, or the name of a file in `folder` (with or without .yaml); `kind` names it in errors."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (folder / f"{name_or_path}.yaml", folder / str(name_or_path)):
        if cand.is_file():
            return cand
    known = ", ".join(sorted(f.stem for f in folder.glob("*.yaml")))
    raise ConfigError(f"{kind} {name_or_path} not found (a YAML path or one of: {known})")

