"""A typed-YAML loader with its schema as a parameter: a nested dataclass built from parsed YAML, with
`--section.key=value` overrides, every type error and unknown key (with a 'did you mean') reported at once.

Field types: bool, int, float (finite), str, Literal[...], list[X], X | None, X | Y and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Literal

import yaml


def schema_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted key of a dataclass schema, sections included."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += schema_keys(hints[f.name], prefix + f.name + ".")
    return keys


def suggest(key: str, schema, aliases: dict[str, str]) -> str:
    """'; did you mean ...?' for an unknown dotted key: same name in another section, an alias, or a close match."""
    keys = schema_keys(schema)
    leaves = [k for k in keys if not any(o.startswith(k + ".") for o in keys)]
    section, _, leaf = key.rpartition(".")
    leaf = aliases.get(leaf, leaf)
    siblings = [k for k in leaves if k.rpartition(".")[0] == section]
    close = ([k for k in siblings if k.rpartition(".")[2] == leaf]
             or [k for k in leaves if k.rpartition(".")[2] == leaf]
             or difflib.get_close_matches(f"{section}.{leaf}" if section else leaf, siblings, n=1, cutoff=0.6)
             or difflib.get_close_matches(key, leaves, n=1, cutoff=0.6))
    return f"; did you mean '{close[0]}'?" if close else ""


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    return {bool: "true/false", int: "an integer", float: "a finite number", str: "a string"}.get(tp, str(tp))


def _coerce(tp, value):
    """(True, value) when `value` fits type `tp`, else (False, None)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return (value in args and not isinstance(value, bool)), value
    if origin in (typing.Union, types.UnionType) and type(None) not in args:  # X | Y: the first that fits
        for arm in args:
            ok, coerced = _coerce(arm, value)
            if ok:
                return True, coerced
        return False, None
    if args and type(None) in args:  # Optional[X] / X | None
        if value is None:
            return True, None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value)
    if origin in (typing.Union, types.UnionType):  # X | Y: the first that fits
        for arm in args:
            ok, coerced = _coerce(arm, value)
            if ok:
                return True, coerced
        return False, None
    if origin is list:
        ok = isinstance(value, list) and all(_coerce(args[0], v)[0] for v in value)
        return ok, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:  # finite only: inf/nan pass every range check and train a NaN adapter
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return math.isfinite(value), value
        if isinstance(value, str):  # YAML 1.1 reads 4e-3 (no dot) as a string
            try:
                return math.isfinite(float(value)), float(value)
            except ValueError:
                return False, None
        return False, None
    if tp is str:
        return isinstance(value, str), value
    raise TypeError(f"unsupported schema type {tp}")


class Checker:
    """Builds a typed dataclass `schema` from parsed YAML and collects every problem (`errors`) instead of stopping at
    the first; `aliases` maps names from other tools to the schema's (for 'did you mean')."""

    def __init__(self, schema, aliases: dict[str, str] | None = None, overridden: dict[str, str] | None = None):
        self.schema, self.aliases = schema, dict(aliases or {})
        self.errors: list[str] = []
        self.bad: set[str] = set()  # keys already reported: cross-field checks skip them
        self.overridden = dict(overridden or {})  # dotted key -> the override text that set it

    def is_bad(self, key: str) -> bool:
        return any(key == b or key.startswith(b + ".") for b in self.bad)

    def err(self, key: str, msg: str) -> None:
        """Report one problem per key: a later check of a key (or section) already reported would only echo it."""
        if self.is_bad(key):
            return
        origin = f" (set by {self.overridden[key]})" if key in self.overridden else ""
        self.errors.append(f"{key}: {msg}{origin}")
        self.bad.add(key)

    def cross(self, keys: tuple[str, ...], msg: str) -> None:
        """A cross-field error, skipped when one of its keys already has an error of its own."""
        if not any(self.is_bad(k) for k in keys):
            self.err(keys[0], msg)

    def build(self, cls, data, prefix: str = ""):
        """An instance of `cls` from `data`; a bad or missing value is reported and replaced by its default (or a
        placeholder for a required one), so that the remaining checks still run and everything is reported at once."""
        if not isinstance(data, dict):
            self.err(prefix.rstrip(".") or "<top level>", f"expected a mapping of keys, got {data!r}")
            data = {}
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in names:
                full = prefix + str(key)
                self.errors.append(f"unknown key '{full}'{suggest(full, self.schema, self.aliases)}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            key, tp = prefix + f.name, hints[f.name]
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if f.name not in data:
                if required:
                    self.err(key, "required but missing")
                    kwargs[f.name] = _placeholder(tp)
                continue
            value = data[f.name]
            if dataclasses.is_dataclass(tp):
                kwargs[f.name] = self.build(tp, {} if value is None else value, key + ".")
                continue
            ok, value = _coerce(tp, value)
            if ok:
                kwargs[f.name] = value
            else:
                self.err(key, f"got {data[f.name]!r}; expected {_type_name(tp)}")
                if required:
                    kwargs[f.name] = _placeholder(tp)
        return cls(**kwargs)


def _placeholder(tp):
    """Stands in for a missing required value (already reported) so checking can go on."""
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return tp(**{f.name: _placeholder(hints[f.name]) for f in dataclasses.fields(tp)
                     if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING})
    return ""


def parse_overrides(overrides, checker: Checker) -> dict:
    """`--a.b=value` / `--a.b value` -> nested dict, values parsed as YAML scalars."""
    nested: dict = {}
    valid = set(schema_keys(checker.schema))
    sections = {k for k in valid if any(o.startswith(k + ".") for o in valid)}
    items = list(overrides or [])
    i = 0
    while i < len(items):
        text = items[i]
        i += 1
        if not text.startswith("--"):
            checker.errors.append(f"unexpected argument {text!r}; overrides look like --training.learning_rate=1e-4")
            continue
        key, sep, raw = text[2:].partition("=")
        if not sep:
            if i < len(items) and not items[i].startswith("--"):
                raw, text = items[i], f"{text} {items[i]}"
                i += 1
            else:
                checker.errors.append(f"override {text!r} has no value; write {text}=VALUE")
                continue
        if key not in valid:
            checker.errors.append(f"override {text!r}: unknown key '{key}'{suggest(key, checker.schema, checker.aliases)}")
            continue
        if key in sections:
            example = next(k for k in sorted(valid) if k.startswith(key + "."))
            checker.errors.append(f"override {text!r}: '{key}' is a section; set one of its keys, e.g. --{example}=...")
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            checker.errors.append(f"override {text!r}: value is not valid YAML ({e.problem})")
            continue
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
        checker.overridden[key] = text
    return nested


def merge_dicts(base: dict, over: dict) -> dict:
    """`base` with `over` on top, section by section."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
