"""Checks of the JSON that files carry (artifact and state metadata, session files): types and ranges.

Each format declares its schema once, beside its reader, and checks it before it uses a value:
a mutated file then fails with one line naming the field, never with a KeyError or TypeError deep
inside the code that trusted it. `load_json` parses with a bound on nesting depth, so a header
nested thousands of levels deep is refused as such instead of exhausting the recursion limit.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

MAX_DEPTH = 64


class SchemaError(ValueError):
    """A value has the wrong type or range; the message names the field (e.g. `config.n_layer`)."""


def load_json(raw: bytes | str, max_depth: int = MAX_DEPTH):
    """Parse JSON, refusing invalid text, NaN/Infinity literals, and nesting deeper than `max_depth`."""
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise SchemaError(f"JSON nested deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise SchemaError(f"not valid JSON ({str(e).splitlines()[0][:80] if str(e) else type(e).__name__})") from None
    if depth(value) > max_depth:
        raise SchemaError(f"JSON nested deeper than {max_depth} levels")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def depth(value) -> int:
    """Nesting depth of lists/objects, computed without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = v.values()
        elif not isinstance(v, list):
            continue
        deepest = max(deepest, d)
        stack.extend((x, d + 1) for x in v if isinstance(x, (dict, list)))
    return deepest


# --------------------------------------------------------------------------- schema nodes

@dataclass(frozen=True)
class Int:
    lo: int | None = None
    hi: int | None = None

    def check(self, v, where):
        if isinstance(v, bool) or not isinstance(v, int):
            raise SchemaError(f"{where} must be an integer, got {_show(v)}")
        if (self.lo is not None and v < self.lo) or (self.hi is not None and v > self.hi):
            raise SchemaError(f"{where} = {_show(v)} is outside [{self.lo}, {self.hi}]")


@dataclass(frozen=True)
class Num:
    lo: float | None = None
    hi: float | None = None

    def check(self, v, where):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SchemaError(f"{where} must be a number, got {_show(v)}")
        try:
            ok = math.isfinite(v)
        except OverflowError:  # an integer too large for a float
            ok = False
        if not ok or (self.lo is not None and v < self.lo) or (self.hi is not None and v > self.hi):
            raise SchemaError(f"{where} = {_show(v)} is outside [{self.lo}, {self.hi}]")


@dataclass(frozen=True)
class Str:
    max_len: int = 1 << 16
    choices: tuple = ()
    pattern: str | None = None

    def check(self, v, where):
        if not isinstance(v, str):
            raise SchemaError(f"{where} must be a string, got {_show(v)}")
        if len(v) > self.max_len:
            raise SchemaError(f"{where} is longer than {self.max_len} characters")
        if self.choices and v not in self.choices:
            raise SchemaError(f"{where} = {_show(v)} is not one of {list(self.choices)}")
        if self.pattern is not None and not re.fullmatch(self.pattern, v):
            raise SchemaError(f"{where} = {_show(v)} is not of the expected form")


@dataclass(frozen=True)
class Opt:
    """The inner schema, or null."""
    inner: object

    def check(self, v, where):
        if v is not None:
            self.inner.check(v, where)


@dataclass(frozen=True)
class List:
    item: object
    max_len: int = 1 << 20

    def check(self, v, where):
        if not isinstance(v, list):
            raise SchemaError(f"{where} must be a list, got {_show(v)}")
        if len(v) > self.max_len:
            raise SchemaError(f"{where} has more than {self.max_len} items")
        for i, x in enumerate(v):
            self.item.check(x, f"{where}[{i}]")


@dataclass(frozen=True)
class Obj:
    """An object with the given fields; `optional` fields may be absent; `extra` checks other keys'
    values (None: other keys are allowed with any value)."""
    fields: dict
    optional: frozenset = frozenset()
    extra: object = None
    max_keys: int = 1 << 20

    def check(self, v, where):
        if not isinstance(v, dict):
            raise SchemaError(f"{where} must be an object, got {_show(v)}")
        if len(v) > self.max_keys:
            raise SchemaError(f"{where} has more than {self.max_keys} keys")
        for k, s in self.fields.items():
            if k in v:
                s.check(v[k], f"{where}.{k}" if where else k)
            elif k not in self.optional:
                raise SchemaError(f"{where + '.' if where else ''}{k} is missing")
        if self.extra is not None:
            for k, x in v.items():
                if k not in self.fields:
                    self.extra.check(x, f"{where}.{k}" if where else k)


@dataclass(frozen=True)
class Any_:
    def check(self, v, where):
        pass


ANY = Any_()


def _show(v) -> str:
    if isinstance(v, (dict, list)):
        return type(v).__name__
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) > 10**12:
        return f"an integer of {len(str(abs(v)))} digits" if abs(v) < 10**4000 else "a huge integer"
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."
