"""Leaf helpers every config schema shares: the strict pydantic base, merging, one-line errors.

This module imports nothing of the project, so every package (the model's own `ModelConfig`
included) can build on it without a cycle.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, ValidationError


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, ser_json_inf_nan="strings")


def deep_merge(base: dict, override: dict) -> dict:
    """Recursively merge `override` into a copy of `base` (dicts merge, other values replace)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# Keys that cross-field checks name at the start of their message ("pattern length (3) must ...").
_SECTION_KEYS = {"preset", "pattern", "mlp", "dt_min", "a_init_range", "dt_limit", "warmup_steps", "global_batch_tokens"}


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line: 'key.path: message (got value)' for each problem, joined by '; '."""
    msgs = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        loc = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the schema in config/ for the allowed keys)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif "input" in err and err["type"] not in ("value_error", "assertion_error") and not isinstance(err["input"], dict):
            msg += f" (got {err['input']!r})"
        head = re.match(r"[a-z_][a-z0-9_.]*(?= )", msg)
        names_key = head is not None and ("." in head.group(0) or head.group(0) in _SECTION_KEYS)
        if err["type"] == "value_error" and names_key:
            msgs.append(f"{loc}.{msg}")  # a cross-field check names the key it is about
        else:
            msgs.append(f"{loc}: {msg}")
    return "; ".join(msgs)
