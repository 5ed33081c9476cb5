"""Input schemas: every key with its type, default, aliases and doc, checked in full before any work starts.

A schema is a tree of dargs Arguments (DeePMD-kit's own argument library), so `dpmd doc-train-input` prints
it the way `dp doc-train-input` does and exports it as a JSON schema.  Checking is ours, so that every
problem is one line naming the key and what was expected:

- an unknown key lists the valid ones; keys starting with "_" are comments (DeePMD-kit drops them too);
- an alias is renamed to its key; both given is an error;
- the type of a section (`type: se_e2_a`) is checked before its keys, and an unsupported type says so;
- a key made with `fixed=True` is one DeePMD-kit has and dpmd does not implement yet: only its default passes;
- numbers are finite; an int passes where a float is expected, a bool never passes as a number.

No torch here: the MD and campaign inputs check their keys with the same machinery (`key`, `normalize`,
`check_number`, `read_file`, `apply_overrides` for --set), and labelling workers import it cheaply.
"""

from __future__ import annotations

import copy
import json
import math
import re
import types
import typing
from pathlib import Path

import yaml
from dargs import Argument, Variant
from dargs.dargs import _Flags

from dpmd.errors import ConfigError

REQUIRED = object()  # `key(..., default=REQUIRED)`: the input must give it
UNSET = object()     # `key(..., default=UNSET)`: optional without a default; None when left out

_NAMES = {bool: ("true or false", "true/false values"), int: ("an integer", "integers"),
          float: ("a number", "numbers"), str: ("a string", "strings"), dict: ("a mapping", "mappings"),
          list: ("a list", "lists"), type(None): ("null", "nulls")}


# ---------------------------------------------------------------- building a schema
def key(name: str, dtype, default=UNSET, doc: str = "", *, alias=(), check=None, expect: str = "",
        what: str = "", fixed: bool = False, sub=None, variants=None) -> Argument:
    """One key of a schema (a dargs Argument).

    default: its value when left out (REQUIRED: the input must give it; UNSET: None).
    check, expect: a predicate on a well-typed value and what it wants, for the message
        ("positive" gives "'learning_rate.start_lr' must be positive, got -1").
    what: the type in words for messages, when the dtype's own words are unclear ("a list of element names").
    fixed: a DeePMD-kit key that dpmd does not implement yet: only the default is accepted.
    sub, variants: the keys of a section, and its Variants (see `choice`).
    """
    if fixed:
        doc += (" dpmd: not supported yet" + ("" if default in (UNSET, REQUIRED) else
                                              f"; only the default ({_show(default)}) is accepted") + ".")
    kw = {} if default in (UNSET, REQUIRED) else {"default": default}
    arg = Argument(name, dtype, sub_fields=sub, sub_variants=variants, optional=default is not REQUIRED,
                   alias=list(alias), extra_check=check, extra_check_errmsg=expect, doc=doc, **kw)
    arg.fixed, arg.what = fixed, what
    return arg


def choice(noun: str, choices: list[Argument], default: str | None = None, doc: str = "") -> Variant:
    """The `type` key of a section choosing its keys (a dargs Variant); `noun` names it in messages."""
    variant = Variant("type", choices, optional=default is not None, default_tag=default or "", doc=doc)
    variant.noun = noun
    return variant


def section(name: str, fields: list[Argument], doc: str = "", *, variants=None, default=REQUIRED) -> Argument:
    return key(name, dict, default, doc, sub=fields, variants=variants)


# ---------------------------------------------------------------- checking an input against it
def normalize(schema: Argument, value, where: str = ""):
    """The input `value` of section `schema`, aliases renamed and defaults filled in; the first problem is
    a ConfigError naming the key ('where.key')."""
    if value is None and dict in schema.dtype and type(None) not in schema.dtype:
        value = {}  # `section:` left empty in YAML: all defaults
    check_type(value, schema.dtype, where or "input", getattr(schema, "what", ""))
    if not isinstance(value, dict) or not (schema.sub_fields or schema.sub_variants):
        return copy.deepcopy(value)
    value = {k: v for k, v in value.items() if not (isinstance(k, str) and k.startswith("_"))}
    fields = dict(schema.sub_fields)
    out = {}
    for variant in schema.sub_variants.values():
        chosen = _choose(variant, value, where)
        out[variant.flag_name] = chosen.name
        fields.update(chosen.sub_fields)
    value = _rename_aliases(value, fields, where)
    unknown = [k for k in value if k not in fields and k not in out]
    if unknown:
        raise ConfigError(f"unknown key {_path(where, unknown[0])!r}; valid keys: "
                          f"{', '.join(sorted([*out, *fields]))}")
    for name, arg in fields.items():
        here = _path(where, name)
        if name not in value or (value[name] is None and arg.fixed):
            if not arg.optional:
                raise ConfigError(f"{here!r} is required")
            out[name] = None if arg.default is _Flags.NONE else copy.deepcopy(arg.default)
            if arg.sub_fields or arg.sub_variants:
                out[name] = normalize(arg, out[name], here)
            continue
        if arg.fixed and value[name] != (None if arg.default is _Flags.NONE else arg.default):
            only = "" if arg.default is _Flags.NONE else f" (dpmd accepts only {_show(arg.default)})"
            raise ConfigError(f"{here!r} = {_show(value[name])} is not supported yet{only}")
        out[name] = normalize(arg, value[name], here)
        if arg.extra_check is not None and out[name] is not None and not arg.extra_check(out[name]):
            raise ConfigError(f"{here!r} must be {arg.extra_check_errmsg}, got {_show(value[name])}")
    return out


def _choose(variant: Variant, value: dict, where: str) -> Argument:
    here = _path(where, variant.flag_name)
    names = sorted(variant.choice_dict)
    tag = value.get(variant.flag_name, variant.default_tag or None)
    if tag is None:
        raise ConfigError(f"{here!r} is required (supported: {', '.join(names)})")
    if not isinstance(tag, str):
        raise ConfigError(f"{here!r} must be a string, got {_show(tag)}")
    name = variant.choice_alias.get(tag, tag)
    if name not in variant.choice_dict:
        aliases = "".join(f", {a} (= {n})" for a, n in sorted(variant.choice_alias.items()))
        raise ConfigError(f"{where or 'input'}: {variant.noun} type {tag!r} is not supported "
                          f"(supported: {', '.join(names)}{aliases})")
    return variant.choice_dict[name]


def _rename_aliases(value: dict, fields: dict, where: str) -> dict:
    value = dict(value)
    for name, arg in fields.items():
        given = [k for k in (name, *arg.alias) if k in value]
        if len(given) > 1:
            raise ConfigError(f"{_path(where, given[0])!r} and {_path(where, given[1])!r} are the same key "
                              f"({', '.join(arg.alias)} {'is an alias' if len(arg.alias) == 1 else 'are aliases'} "
                              f"of {name}): give one")
        if given and given[0] != name:
            value[name] = value.pop(given[0])
    return value


def check_type(value, dtypes, where: str, what: str = "") -> None:
    """value has one of the types `dtypes` (int, float, bool, str, dict, None, list[...], unions), and its
    numbers are finite; else a one-line ConfigError (saying `what` is expected, if given)."""
    if not any(_matches(value, t) for t in dtypes):
        if dtypes == (dict,):  # a section
            raise ConfigError(f"{where!r} must be a mapping of keys, got a {type(value).__name__}: {value!r:.60}")
        what = what or " or ".join(sorted(_describe(t) for t in dtypes))
        raise ConfigError(f"{where!r} must be {what}, got {_show(value)}")
    if not _finite(value):
        raise ConfigError(f"{where!r} must be a finite number, got {_show(value)}")


def check_number(value, where: str, *, integer=False, positive=False, minimum=None, allow_none=False):
    """A number (or integer) with optional bounds, else a one-line ConfigError naming `where`."""
    if value is None and allow_none:
        return None
    check_type(value, (int,) if integer else (float,), where)
    if positive and value <= 0:
        raise ConfigError(f"{where!r} must be positive, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where!r} must be >= {minimum}, got {value!r}")
    return value


def _matches(value, dtype) -> bool:
    origin, args = typing.get_origin(dtype), typing.get_args(dtype)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if dtype in (None, type(None)):
        return value is None
    if dtype is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if dtype is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, dtype)


def _finite(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def _describe(dtype, plural=False) -> str:
    origin, args = typing.get_origin(dtype), typing.get_args(dtype)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a, plural) for a in args)
    if origin is list:
        return ("lists of " if plural else "a list of ") + _describe(args[0], plural=True)
    return _NAMES.get(dtype, (getattr(dtype, "__name__", str(dtype)),) * 2)[plural]


def _path(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _show(value) -> str:
    """A value as the input file writes it (JSON), short."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------- reading input files
class _Loader(yaml.SafeLoader):
    """safe_load with YAML 1.2's numbers: PyYAML reads YAML 1.1, where 1e-3 and 1.0e3 are strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*[eE][-+]?[0-9]+)$"),
    list("-+0123456789."))


def load_yaml(text: str):
    """Plain YAML data (no tags that build objects), with YAML 1.2 numbers."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader


def parse_value(text: str, item: str):
    """A --set value as plain YAML with YAML 1.2 numbers (no tags: !!python/object is an error, never code)."""
    try:
        return load_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item!r}: not a plain YAML value ({str(err).splitlines()[0]})") from None


def apply_overrides(config: dict, overrides: list[str] | None, example: str = "training.numb_steps=200") -> dict:
    """A copy of `config` with `--set section.key=value` overrides applied (values parsed as YAML) before it is
    checked; `example` shows the form in the message for a malformed one."""
    config = copy.deepcopy(config)
    for item in overrides or []:
        name, eq, value = item.partition("=")
        if not eq or not name or "" in name.split("."):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. {example}")
        node, parts = config, name.split(".")
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:  # absent, or `section:` left empty (defaults)
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: '{'.'.join(parts[:i + 1])}' is not a section")
        node[parts[-1]] = parse_value(value, item)
    return config


def read_file(path: str | Path, what: str = "input"):
    """A JSON (.json) or YAML file as plain data; a missing or malformed file is one line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} file not found")
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        text = path.read_text()
        return json.loads(text) if kind == "JSON" else load_yaml(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: not valid {kind}: {str(err).splitlines()[0]}") from None


# ---------------------------------------------------------------- documentation
def doc_text(schema: Argument) -> str:
    """Every key, as `dp doc-train-input` prints DeePMD-kit's (reStructuredText)."""
    return "\n\n".join(arg.gen_doc(make_anchor=True) for arg in schema.sub_fields.values())


def doc_json(schema: Argument) -> str:
    """The keys as dargs' JSON description (`dp doc-train-input --out-type json`)."""
    from dargs.dargs import ArgumentEncoder

    return json.dumps(list(schema.sub_fields.values()), cls=ArgumentEncoder)


def json_schema(schema: Argument) -> str:
    """A JSON schema of the input (editors validate and complete with it)."""
    from dargs.json_schema import generate_json_schema

    return json.dumps(generate_json_schema(schema))
