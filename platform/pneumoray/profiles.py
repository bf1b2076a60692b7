"""Profiles: YAML files naming the data, models, hardware and hyper-parameters of every stage.

A profile is a built-in name (`tiny`, `rtx3090`, the files in profiles/) or a path to a YAML file.
Command-line overrides are `dotted.key=value` strings naming a key the profile already has (a typo is
an error, not a silently new key); values are parsed as YAML (`3` is an int, `true` a bool, `[8, 16]` a list).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml

BUILTIN_DIR = Path(__file__).with_name("profiles")


class ProfileError(ValueError):
    pass


def builtin_profiles() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def load_profile(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    path = Path(name_or_path)
    if not path.suffix:  # a bare name: one of ours
        path = BUILTIN_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ProfileError(
            f"unknown profile {name_or_path!r}: give one of {', '.join(builtin_profiles())} "
            "or a path to a YAML profile file"
        )
    profile = yaml.safe_load(path.read_text()) or {}
    return apply_overrides(profile, overrides)


def apply_overrides(profile: dict, overrides) -> dict:
    """A copy of ``profile`` with ``--set``-style overrides (``section.key=value``, the value as YAML)."""
    values = []  # in order: a later --set of the same key wins
    for item in overrides or ():
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ProfileError(f"bad override {item!r}: write it as section.key=value, e.g. train.lr=1e-4")
        values.append((key, parse_value(raw), item))
    return _set_all(profile, values)


# YAML 1.1 (PyYAML) reads 1e-4 as a string: its floats need a dot (1.0e-4). On a command line 1e-4 means the number.
_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_value(raw: str):
    """An override's value as YAML (``3`` an int, ``true`` a bool, ``[8, 16]`` a list), ``1e-4`` a float."""
    return _numbers(yaml.safe_load(raw)) if raw != "" else None


def _numbers(value):
    if isinstance(value, str) and _EXPONENT.fullmatch(value):
        return float(value)
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    return value


def apply_values(profile: dict, values: dict) -> dict:
    """A copy of ``profile`` with ``{"section.key": value}`` set (values as Python objects, e.g. a
    profile's own ``pipeline.overrides``); the same checks as ``apply_overrides``."""
    return _set_all(profile, [(key, value, f"{key}={value!r}") for key, value in (values or {}).items()])


def _set_all(profile: dict, values: list[tuple[str, object, str]]) -> dict:
    profile = copy.deepcopy(profile)
    for key, value, item in values:
        parts = key.split(".")
        node = profile
        for depth, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                known = ", ".join(sorted(node)) if isinstance(node, dict) else "none (it is a value)"
                where = ".".join(parts[:depth]) or "the profile"
                raise ProfileError(f"bad override {item!r}: no key {part!r} in {where}; known keys: {known}")
            if depth < len(parts) - 1:
                node = node[part]
        node[parts[-1]] = copy.deepcopy(value)
    return profile
