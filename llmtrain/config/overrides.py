"""Command-line overrides checked against the schema before Hydra composes, so that a mistyped
field or a list written without brackets gets an answer that says what to type (Hydra's own
would suggest `+key=value`, which the typed config refuses anyway)."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing

from llmtrain.config.aliases import ALIASES
from llmtrain.config.schema import Config

_PLAIN = re.compile(r"(?P<key>[A-Za-z_][\w.]*)=(?P<value>.*)", re.S)


def _resolve(annotation):
    """The dataclass or list type behind Optional[...] / list[...]; None for plain values."""
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    for hint in typing.get_args(annotation) if optional else (annotation,):
        if dataclasses.is_dataclass(hint):
            return hint
        if typing.get_origin(hint) is list:
            return list
    return None


def _suggestion(group: str, name: str, fields: list[str]) -> str:
    alias = ALIASES.get(name)
    if alias and alias.key.startswith(f"{group}."):
        return f"did you mean {alias.key}? "
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    return f"did you mean {group}.{close[0]}? " if close else ""


def problems(args: list[str]) -> list[str]:
    """What is wrong with the `a.b=value` and `+a.b=value` overrides among `args` (Hydra's
    flags, `~` overrides, groups and hydra.* keys are left to Hydra)."""
    hints = typing.get_type_hints(Config)
    found = []
    for arg in args:
        # `+key=value` adds a key: only free-form maps (launcher.env) take new ones.
        match = _PLAIN.fullmatch(arg.removeprefix("++").removeprefix("+"))
        if not match or "." not in match.group("key"):
            continue
        parts = match.group("key").split(".")
        node = _resolve(hints.get(parts[0]))
        path = parts[0]
        for part in parts[1:]:
            if node is None or node is list:
                break  # dicts and free-form values take any key
            fields = typing.get_type_hints(node)
            if part not in fields:
                hint = _suggestion(path, part, list(fields))
                found.append(f"{path}.{part} is not a setting: {hint}the fields of {path} are: "
                             f"{', '.join(fields)}")
                break
            node, path = _resolve(fields[part]), f"{path}.{part}"
        else:
            value = match.group("value")
            if node is list and not (value.startswith("[") or value in ("null", "[]")):
                found.append(f"{path} takes a list: write {path}=[{value}]")
    return found
