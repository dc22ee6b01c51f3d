"""Typed settings from plain tables: dataclass fields documented by their attribute docstrings,
values checked against the annotations, and unknown names answered with the closest valid one.

Used wherever a user hands saelib settings as text: the TOML configs of ``saelib train`` and the
``-p KEY=VALUE`` knobs of the book's runner.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import re
import textwrap
import types
import typing
from typing import Any, Callable

__all__ = ["ConfigError", "Field", "field_docs", "fields_of", "suggest", "type_name", "check_value", "check_table",
           "build"]


class ConfigError(ValueError):
    """A config file or --set override is invalid; the message names the key."""


def field_docs(cls: type) -> dict[str, tuple[str, str]]:
    """{field: (annotation source, attribute docstring)} read from the class source, so each field is
    documented once, under its definition."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            doc = after.value.value if (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                                        and isinstance(after.value.value, str)) else ""
            docs[node.target.id] = (ast.unparse(node.annotation), inspect.cleandoc(doc))
    return docs


class Field(typing.NamedTuple):
    type: Any
    default: Any
    """The default value, or dataclasses.MISSING for a required field."""
    doc: str


def fields_of(target: type | Callable) -> dict[str, Field]:
    """The fields of a dataclass (documented by attribute docstrings) or a function's parameters."""
    hints = typing.get_type_hints(target)
    if dataclasses.is_dataclass(target):
        docs = field_docs(target)
        return {f.name: Field(hints[f.name], f.default if f.default is not dataclasses.MISSING else
                              f.default_factory() if f.default_factory is not dataclasses.MISSING
                              else dataclasses.MISSING, docs.get(f.name, ("", ""))[1])
                for f in dataclasses.fields(target)}
    return {p.name: Field(hints.get(p.name, Any), dataclasses.MISSING if p.default is inspect.Parameter.empty
                          else p.default, "") for p in inspect.signature(target).parameters.values()}


def suggest(key: str, known: dict[str, Field]) -> str | None:
    """The field a mistyped key most likely meant: by name, else by the key's words against phrases of
    each field's docstring (so that learning_rate finds lr, "Peak Adam learning rate")."""
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return close[0]
    words = " ".join(key.lower().replace("_", " ").split())

    def score(name: str) -> float:
        doc = re.findall(r"[a-z0-9]+", known[name].doc.lower())
        n = len(words.split())
        return max((difflib.SequenceMatcher(None, words, " ".join(doc[i:i + n])).ratio()
                    for i in range(len(doc))), default=0.0)

    best = max(known, key=score, default=None)
    return best if best is not None and score(best) >= 0.8 else None


def type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def check_value(value: Any, tp: Any, key: str) -> Any:
    """``value`` converted to ``tp`` (int -> float, list -> tuple) or a ConfigError naming ``key``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        # TOML has no null: an optional field that is present must have the non-None type.
        (inner,) = [a for a in args if a is not type(None)]
        return check_value(value, inner, key)
    if origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(check_value(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is Any or isinstance(value, origin or tp):
        return value
    raise ConfigError(f"{key}: expected {type_name(tp)}, got {type(value).__name__} {value!r}")


def check_table(table: Any, known: dict[str, tuple[Any, Any]], prefix: str) -> dict:
    """Type-checked copy of a TOML table; unknown keys are rejected with the closest valid name."""
    if not isinstance(table, dict):
        raise ConfigError(f"{prefix}: expected a table, got {type(table).__name__} {table!r}")
    out = {}
    for key, value in table.items():
        if key not in known:
            close = suggest(key, known)
            hint = f"did you mean {prefix}.{close}?" if close else f"valid keys: {', '.join(known)}"
            raise ConfigError(f"{prefix}.{key}: unknown key; {hint}")
        out[key] = check_value(value, known[key].type, f"{prefix}.{key}")
    return out


def build(cls: type, kwargs: dict, prefix: str) -> Any:
    """``cls(**kwargs)``, with missing required fields and the class's own validation errors
    (e.g. k > d_sae) reported under the key they name."""
    known = fields_of(cls)
    missing = [name for name, f in known.items() if f.default is dataclasses.MISSING and name not in kwargs]
    if missing:
        raise ConfigError(f"{prefix}: missing required key(s) {', '.join(f'{prefix}.{m}' for m in missing)}")
    try:
        return cls(**kwargs)
    except ValueError as e:
        # Validation messages name the field they reject ("k must be ...", "unknown aux loss ...").
        named = [w for w in re.findall(r"[A-Za-z_]\w*", str(e)) if w in known]
        raise ConfigError(f"{prefix}.{named[0]}: {e}" if named else f"{prefix}: {e}") from e
