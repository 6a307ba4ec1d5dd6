"""Resource model and arithmetic: scalars, ranges and sets with roles and reservations.

A `Resource` is one immutable named quantity (``cpus:4``, ``ports:[31000-32000]``,
``zones:{a,b}``) that is unreserved (role ``*``), statically reserved to a role (agent
``--resources "cpus(ads):8"``) or dynamically reserved (with a principal and labels).
`Resources` is an immutable collection with Mesos semantics: items with the same name, type,
role and reservation combine (scalars add, ranges and sets union); subtraction removes;
scalars are fixed-point with three decimals, as in Mesos; empty items disappear.

Persistent-volume, revocable, shared and provider information (``disk``, ``revocable``,
``shared``, ``provider_id`` in Mesos JSON) is carried opaquely in `Resource.extras`: it keeps
such resources apart and survives round trips, but gets no special arithmetic (shared
resources are not reference counted).

Pure Python: no Twisted, msgpack or kazoo.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from urllib.parse import unquote

import attrs

__all__ = [
    "DEFAULT_AGENT_RESOURCE_NAMES",
    "DEFAULT_PORTS",
    "EXTRA_FIELDS",
    "RANGES",
    "SCALAR",
    "SET",
    "TYPES",
    "Resource",
    "Resources",
    "validate_role",
]

SCALAR = "SCALAR"
RANGES = "RANGES"
SET = "SET"
TYPES = (SCALAR, RANGES, SET)

#: What an agent detects (or takes from ``--resources``) when nothing else is said.
DEFAULT_AGENT_RESOURCE_NAMES = ("cpus", "mem", "disk", "ports")
#: Mesos's default agent port range (src/slave/constants.hpp).
DEFAULT_PORTS = ((31000, 32000),)
#: Mesos Resource fields kept opaquely (as canonical JSON) in `Resource.extras`.
EXTRA_FIELDS = ("disk", "provider_id", "revocable", "shared")

_MILLI = 1000  # Mesos fixed point: three decimal digits

_SYNTAX_HINT = (
    "write 'name:value' items separated by ';', e.g. 'cpus:4;mem:2048;ports:[31000-32000];"
    "zones:{a,b}' ('cpus(ads):8' reserves to role ads), or a JSON list of Mesos Resources"
)


# --- roles -----------------------------------------------------------------------------

_ROLE_WHITESPACE = frozenset("\t\n\v\f\r ")
_valid_roles: set[str] = {"*"}


def validate_role(role: object) -> None:
    """Raise ValueError unless `role` is a valid Mesos role name (``*`` or ``a/b/c``)."""
    if role in _valid_roles:
        return
    if not isinstance(role, str) or not role:
        raise ValueError(f"role must be a non-empty string, got {role!r}")
    for part in role.split("/"):
        if not part:
            raise ValueError(f"role {role!r} has an empty component; write e.g. 'eng/backend'")
        if part in (".", "..", "*"):
            raise ValueError(f"role {role!r} may not have {part!r} as a component")
        if part.startswith("-"):
            raise ValueError(f"role {role!r} has a component starting with '-'")
        if not _ROLE_WHITESPACE.isdisjoint(part):
            raise ValueError(f"role {role!r} contains whitespace")
    if len(_valid_roles) < 4096:
        _valid_roles.add(role)


def _is_ancestor_role(ancestor: str, role: str) -> bool:
    return role.startswith(ancestor) and role[len(ancestor) : len(ancestor) + 1] == "/"


# --- values ----------------------------------------------------------------------------


def _to_millis(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"{what}: {value!r} is not a number; write e.g. 4 or 0.5") from None
    if not isinstance(value, (int, float)):
        raise ValueError(f"{what}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{what}: {value!r} is not a finite number")
    if value < 0:
        raise ValueError(f"{what}: {value!r} is negative; scalar resources must be >= 0")
    return math.floor(value * _MILLI + 0.5)


def _to_int(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected an integer, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"{what}: {text!r} is not an integer") from None
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{what}: {value!r} is not an integer")
        value = int(value)
    if not isinstance(value, int):
        raise ValueError(f"{what}: expected an integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{what}: {value} is negative; range bounds must be >= 0")
    return value


def _merge(pairs: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Merge ranges sorted by begin into sorted, non-overlapping, non-adjacent ranges."""
    out: list[tuple[int, int]] = []
    for lo, hi in pairs:
        if out and lo <= out[-1][1] + 1:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return tuple(out)


def _ranges_add(a, b):
    if not a:
        return b
    if not b:
        return a
    return _merge(sorted(a + b))


def _ranges_contain(a, b) -> bool:
    """Whether merged ranges `a` cover merged ranges `b`."""
    i, n = 0, len(a)
    for lo, hi in b:
        while i < n and a[i][1] < lo:
            i += 1
        if i == n or a[i][0] > lo or a[i][1] < hi:
            return False
    return True


def _ranges_sub(a, b):
    """Merged ranges `a` minus merged ranges `b` (linear sweep)."""
    if not b:
        return a
    out: list[tuple[int, int]] = []
    j, nb = 0, len(b)
    for lo, hi in a:
        while j < nb and b[j][1] < lo:
            j += 1
        k, cur = j, lo
        while k < nb and b[k][0] <= hi:
            blo, bhi = b[k]
            if blo > cur:
                out.append((cur, blo - 1))
            if bhi >= cur:
                cur = bhi + 1
            if cur > hi:
                break
            k += 1
        if cur <= hi:
            out.append((cur, hi))
    return tuple(out)


def _normalize_ranges(value: object, what: str) -> tuple[tuple[int, int], ...]:
    pairs = []
    try:
        items = list(value)  # type: ignore[call-overload]
    except TypeError:
        raise ValueError(f"{what}: expected (begin, end) pairs, got {value!r}") from None
    for item in items:
        try:
            lo, hi = item
        except (TypeError, ValueError):
            raise ValueError(f"{what}: expected a (begin, end) pair, got {item!r}") from None
        lo, hi = _to_int(lo, what), _to_int(hi, what)
        if lo > hi:
            raise ValueError(f"{what}: range {lo}-{hi} has begin > end; write it as {hi}-{lo}")
        pairs.append((lo, hi))
    pairs.sort()
    return _merge(pairs)


def _normalize_set(value: object, what: str) -> frozenset[str]:
    if isinstance(value, str):
        raise ValueError(f"{what}: expected a collection of strings, got the string {value!r}")
    try:
        items = frozenset(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{what}: expected a collection of strings, got {value!r}") from None
    for item in items:
        if not isinstance(item, str) or not item:
            raise ValueError(f"{what}: set items must be non-empty strings, got {item!r}")
    return items


def _labels(value: object) -> tuple[tuple[str, str], ...]:
    """Labels as a sorted tuple of (key, value): Mesos compares labels irrespective of order."""
    if isinstance(value, dict):
        value = value.items()
    out = []
    for pair in value:  # type: ignore[union-attr]
        try:
            k, v = pair
        except (TypeError, ValueError):
            raise ValueError(f"labels must be (key, value) pairs, got {pair!r}") from None
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"label keys and values must be strings, got {pair!r}")
        out.append((k, v))
    out.sort()
    return tuple(out)


def _extras(value: object) -> tuple[tuple[str, str], ...]:
    if isinstance(value, dict):
        value = value.items()
    out = []
    for pair in value:  # type: ignore[union-attr]
        k, text = pair
        if k not in EXTRA_FIELDS:
            raise ValueError(f"unknown extra resource field {k!r}; known: {', '.join(EXTRA_FIELDS)}")
        if not isinstance(text, str):
            text = _canonical_json(text)
        out.append((k, text))
    out.sort()
    return tuple(out)


def _canonical_json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# --- Resource --------------------------------------------------------------------------

# Internal key of a collection entry: everything but the quantity.
# (name, type, role, principal, labels, dynamic, extras)
_Key = tuple


@attrs.frozen
class Resource:
    """One named quantity with its role and reservation; values are normalized on creation.

    Scalars are rounded to 0.001; ranges are sorted, merged, inclusive ``(begin, end)``
    pairs; sets are frozensets of non-empty strings. ``role="*"`` is unreserved; any other
    role is a static reservation unless `dynamic` (which defaults to True when a principal
    or labels are given).
    """

    name: str
    type: str
    value: float | tuple[tuple[int, int], ...] | frozenset[str]
    role: str = "*"
    principal: str | None = None
    labels: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_labels)
    dynamic: bool = attrs.field()
    extras: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_extras)

    @dynamic.default
    def _dynamic_default(self) -> bool:
        return self.principal is not None or bool(self.labels)

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"resource name must be a non-empty string, got {self.name!r}")
        what = f"resource {self.name!r}"
        if self.type == SCALAR:
            value: object = _to_millis(self.value, what) / _MILLI
        elif self.type == RANGES:
            value = _normalize_ranges(self.value, what)
        elif self.type == SET:
            value = _normalize_set(self.value, what)
        else:
            raise ValueError(f"{what}: unknown type {self.type!r}; use SCALAR, RANGES or SET")
        object.__setattr__(self, "value", value)
        validate_role(self.role)
        if self.principal is not None and not isinstance(self.principal, str):
            raise ValueError(f"{what}: principal must be a string or None, got {self.principal!r}")
        if not isinstance(self.dynamic, bool):
            raise ValueError(f"{what}: dynamic must be a bool, got {self.dynamic!r}")
        if not self.dynamic and (self.principal is not None or self.labels):
            raise ValueError(f"{what}: a principal or labels need a dynamic reservation")
        if self.dynamic and self.role == "*":
            raise ValueError(f"{what}: a dynamic reservation needs a role other than '*'")

    @property
    def reserved(self) -> bool:
        """Whether this resource is reserved (statically or dynamically) to a role."""
        return self.role != "*"

    def is_empty(self) -> bool:
        """Whether the quantity is zero (an empty range list or set counts as zero)."""
        return not self.value

    def _key(self) -> _Key:
        return (self.name, self.type, self.role, self.principal, self.labels, self.dynamic, self.extras)

    def _internal(self):
        if self.type == SCALAR:
            return math.floor(self.value * _MILLI + 0.5)  # type: ignore[operator]
        return self.value

    @classmethod
    def from_json(cls, item: object, default_role: str = "*") -> Resource:
        """One Mesos v1 JSON Resource (pre- or post-refinement format); see `Resources.from_json`."""
        return _resource_from_json(item, default_role)

    def to_json(self, allocation_role: str | None = None, refined: bool = False) -> dict:
        """This resource as a Mesos v1 JSON Resource; see `Resources.to_json`."""
        return _item_json(self._key(), self._internal(), allocation_role, refined)

    def __str__(self) -> str:
        return _item_text(self._key(), self._internal())


# --- Resources -------------------------------------------------------------------------


def _sort_key(key: _Key):
    name, typ, role, principal, labels, dynamic, extras = key
    return (name, role, typ, dynamic, principal is not None, principal or "", labels, extras)


class Resources:
    """An immutable collection of resources with Mesos arithmetic.

    Build one with ``Resources(items)`` (Resource objects, or a text/JSON string as for
    `parse`), `parse`, `from_json` or `sum`. ``+`` combines, ``-`` removes (ValueError if
    not contained), ``>=`` is `contains`. Iteration yields `Resource` items in a fixed order
    (by name, then role).
    """

    __slots__ = ("_map", "_order", "_hash")

    def __init__(self, items: Iterable[Resource] | str = ()) -> None:
        if isinstance(items, str):
            m = Resources.parse(items)._map
        else:
            m = {}
            for r in items:
                if not isinstance(r, Resource):
                    raise TypeError(f"Resources() takes Resource items, got {r!r}")
                _accumulate(m, r._key(), r._internal())
            m = {k: v for k, v in m.items() if v}
        object.__setattr__(self, "_map", m)
        object.__setattr__(self, "_order", None)
        object.__setattr__(self, "_hash", None)

    def __setattr__(self, name, value):
        raise AttributeError("Resources is immutable")

    @classmethod
    def _make(cls, m: dict) -> Resources:
        obj = object.__new__(cls)
        object.__setattr__(obj, "_map", m)
        object.__setattr__(obj, "_order", None)
        object.__setattr__(obj, "_hash", None)
        return obj

    # --- construction --------------------------------------------------------------

    @classmethod
    def parse(cls, text: str, default_role: str = "*") -> Resources:
        """Parse agent ``--resources`` text, or a JSON list if the text starts with ``[``.

        Text: ``cpus:4;mem:2048;ports:[31000-32000,33000-33010];zones:{a,b}``; a role in
        parentheses makes a static reservation (``cpus(ads):8``). Items without a role get
        `default_role`. Repeated items add up. Our `str` form extends the syntax for dynamic
        reservations: ``cpus(ads,principal=p,label:k=v):1`` (``dynamic`` when there is
        neither), with ``%XX`` escapes for special characters.
        """
        if not isinstance(text, str):
            raise ValueError(f"expected resources as text, got {text!r}; {_SYNTAX_HINT}")
        validate_role(default_role)
        stripped = text.strip()
        if stripped.startswith("["):
            try:
                items = json.loads(stripped)
            except json.JSONDecodeError as e:
                raise ValueError(f"resources look like JSON but do not parse: {e}; {_SYNTAX_HINT}") from None
            return cls.from_json(items, default_role=default_role)
        m: dict = {}
        for part in stripped.split(";"):
            part = part.strip()
            if part:
                key, value = _parse_item(part, default_role)
                _accumulate(m, key, value)
        return cls._make({k: v for k, v in m.items() if v})

    @classmethod
    def from_json(cls, items: object, default_role: str = "*") -> Resources:
        """Build from a Mesos v1 JSON Resource list (spec §3.3), tolerantly.

        Accepts ints or numeric strings for numbers and ignores unknown keys and
        ``allocation_info``; ``reservation`` (pre-refinement) and a one-element
        ``reservations`` (post-refinement) are both understood. An item with neither a
        role nor reservations gets `default_role`. Raises ValueError on invalid input.
        """
        if not isinstance(items, list):
            raise ValueError(f"expected a JSON list of Mesos Resource objects, got {type(items).__name__}")
        m: dict = {}
        for i, item in enumerate(items):
            try:
                r = _resource_from_json(item, default_role)
            except ValueError as e:
                raise ValueError(f"resources[{i}]: {e}") from None
            _accumulate(m, r._key(), r._internal())
        return cls._make({k: v for k, v in m.items() if v})

    @classmethod
    def sum(cls, collections: Iterable[Resources]) -> Resources:
        """The sum of many collections, without building every intermediate sum."""
        m: dict = {}
        for c in collections:
            for k, v in c._map.items():
                _accumulate(m, k, v)
        return cls._make(m)

    # --- output --------------------------------------------------------------------

    def _keys(self) -> list:
        order = self._order
        if order is None:
            order = sorted(self._map, key=_sort_key)
            object.__setattr__(self, "_order", order)
        return order

    def to_json(self, allocation_role: str | None = None, refined: bool = False) -> list[dict]:
        """Mesos v1 JSON Resource list, ordered by name then role.

        By default the pre-refinement format: ``role`` on every item (``*`` when
        unreserved) and ``reservation: {principal, labels}`` on dynamic reservations. With
        `refined`, the post-refinement ``reservations: [{type, role, principal, labels}]``
        instead. With `allocation_role`, each item gets ``allocation_info: {role}``.
        """
        m = self._map
        return [_item_json(k, m[k], allocation_role, refined) for k in self._keys()]

    def __str__(self) -> str:
        m = self._map
        return ";".join(_item_text(k, m[k]) for k in self._keys())

    def __repr__(self) -> str:
        return f"Resources({str(self)!r})"

    # --- collection protocol -------------------------------------------------------

    def __iter__(self) -> Iterator[Resource]:
        m = self._map
        for k in self._keys():
            yield _resource_from_key(k, m[k])

    def __len__(self) -> int:
        return len(self._map)

    def __bool__(self) -> bool:
        return bool(self._map)

    def is_empty(self) -> bool:
        """Whether there are no resources at all."""
        return not self._map

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Resources):
            return self._map == other._map
        return NotImplemented

    def __hash__(self) -> int:
        h = self._hash
        if h is None:  # immutable: computed once (views are cached by value)
            h = hash(frozenset(self._map.items()))
            object.__setattr__(self, "_hash", h)
        return h

    # --- arithmetic ----------------------------------------------------------------

    def __add__(self, other: Resources | Resource) -> Resources:
        if isinstance(other, Resource):
            other = Resources((other,))
        elif not isinstance(other, Resources):
            return NotImplemented
        if not other._map:
            return self
        if not self._map:
            return other
        m = dict(self._map)
        for k, v in other._map.items():
            _accumulate(m, k, v)
        return Resources._make(m)

    def __radd__(self, other: object) -> Resources:
        if other == 0:  # lets the builtin sum() start from 0
            return self
        return NotImplemented

    def __sub__(self, other: Resources | Resource) -> Resources:
        if isinstance(other, Resource):
            other = Resources((other,))
        elif not isinstance(other, Resources):
            return NotImplemented
        if not other._map:
            return self
        m = dict(self._map)
        for k, v in other._map.items():
            mine = m.get(k)
            left = None if mine is None else _subtract(k[1], mine, v)
            if left is None:
                have = "none" if mine is None else _item_text(k, mine)
                raise ValueError(f"cannot subtract {_item_text(k, v)}: not contained (have {have})")
            if left:
                m[k] = left
            else:
                del m[k]
        return Resources._make(m)

    def contains(self, other: Resources | Resource) -> bool:
        """Whether every resource of `other` is here, with the same role and reservation."""
        if isinstance(other, Resource):
            other = Resources((other,))
        m = self._map
        for k, v in other._map.items():
            mine = m.get(k)
            if mine is None:
                return False
            t = k[1]
            if t == SCALAR:
                if mine < v:
                    return False
            elif t == RANGES:
                if not _ranges_contain(mine, v):
                    return False
            elif not v <= mine:
                return False
        return True

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, (Resources, Resource)):
            return NotImplemented
        return self.contains(other)

    def __le__(self, other: object) -> bool:
        if isinstance(other, Resource):
            other = Resources((other,))
        if not isinstance(other, Resources):
            return NotImplemented
        return other.contains(self)

    # --- views ---------------------------------------------------------------------

    def _select(self, keep: Callable[[_Key], bool]) -> Resources:
        return Resources._make({k: v for k, v in self._map.items() if keep(k)})

    def filter(self, pred: Callable[[Resource], bool]) -> Resources:
        """The resources for which ``pred(resource)`` is true."""
        return Resources._make({k: v for k, v in self._map.items() if pred(_resource_from_key(k, v))})

    def unreserved(self) -> Resources:
        """The unreserved (role ``*``) resources."""
        return self._select(lambda k: k[2] == "*")

    def reserved(self, role: str | None = None) -> Resources:
        """Resources reserved to exactly `role`, or to any role when `role` is None."""
        if role is None:
            return self._select(lambda k: k[2] != "*")
        return self._select(lambda k: k[2] == role)

    def allocatable_to(self, role: str) -> Resources:
        """Unreserved resources plus those reserved to `role` or to one of its ancestors."""
        return self._select(lambda k: k[2] == "*" or k[2] == role or _is_ancestor_role(k[2], role))

    def flatten(self, role: str = "*") -> Resources:
        """The same quantities, all with `role` as a static reservation (or unreserved)."""
        validate_role(role)
        m: dict = {}
        for k, v in self._map.items():
            _accumulate(m, (k[0], k[1], role, None, (), False, k[6]), v)
        return Resources._make(m)

    def names(self) -> frozenset[str]:
        """Names of the resources present."""
        return frozenset(k[0] for k in self._map)

    def scalar(self, name: str) -> float:
        """Total quantity of scalar `name` across roles and reservations (0.0 if absent)."""
        return sum(v for k, v in self._map.items() if k[0] == name and k[1] == SCALAR) / _MILLI

    def scalars(self) -> dict[str, float]:
        """Total quantity of each scalar across roles and reservations."""
        totals: dict[str, int] = {}
        for k, v in self._map.items():
            if k[1] == SCALAR:
                totals[k[0]] = totals.get(k[0], 0) + v
        return {name: v / _MILLI for name, v in totals.items()}

    def ranges(self, name: str) -> tuple[tuple[int, int], ...]:
        """Merged ranges of `name` across roles and reservations."""
        out: tuple = ()
        for k, v in self._map.items():
            if k[0] == name and k[1] == RANGES:
                out = _ranges_add(out, v)
        return out

    def set_items(self, name: str) -> frozenset[str]:
        """Union of the set items of `name` across roles and reservations."""
        out: frozenset[str] = frozenset()
        for k, v in self._map.items():
            if k[0] == name and k[1] == SET:
                out = out | v
        return out


def _accumulate(m: dict, key: _Key, value) -> None:
    old = m.get(key)
    if old is None:
        m[key] = value
    elif key[1] == SCALAR:
        m[key] = old + value
    elif key[1] == RANGES:
        m[key] = _ranges_add(old, value)
    else:
        m[key] = old | value


def _subtract(typ: str, mine, v):
    """`mine` minus `v` for one type, or None when `v` is not contained in `mine`."""
    if typ == SCALAR:
        return mine - v if mine >= v else None
    if typ == RANGES:
        return _ranges_sub(mine, v) if _ranges_contain(mine, v) else None
    return mine - v if v <= mine else None


def _resource_from_key(k: _Key, v) -> Resource:
    name, typ, role, principal, labels, dynamic, extras = k
    return Resource(
        name, typ, v / _MILLI if typ == SCALAR else v, role, principal, labels, dynamic, extras
    )


# --- Mesos JSON ------------------------------------------------------------------------


def _labels_json(labels) -> dict:
    return {"labels": [{"key": key, "value": value} for key, value in labels]}


def _item_json(k: _Key, v, allocation_role: str | None, refined: bool) -> dict:
    name, typ, role, principal, labels, dynamic, extras = k
    d: dict = {"name": name, "type": typ}
    if typ == SCALAR:
        d["scalar"] = {"value": v / _MILLI}
    elif typ == RANGES:
        d["ranges"] = {"range": [{"begin": lo, "end": hi} for lo, hi in v]}
    else:
        d["set"] = {"item": sorted(v)}
    reservation: dict = {}
    if principal is not None:
        reservation["principal"] = principal
    if labels:
        reservation["labels"] = _labels_json(labels)
    if refined:
        if role != "*":
            d["reservations"] = [{"type": "DYNAMIC" if dynamic else "STATIC", "role": role, **reservation}]
    else:
        d["role"] = role
        if dynamic:
            d["reservation"] = reservation
    for field, text in extras:
        d[field] = json.loads(text)
    if allocation_role is not None:
        d["allocation_info"] = {"role": allocation_role}
    return d


def _json_labels(value: object, what: str) -> tuple:
    if value is None:
        return ()
    if not isinstance(value, dict) or not isinstance(value.get("labels", []), list):
        raise ValueError(f"{what}: labels must look like {{\"labels\": [{{\"key\": k, \"value\": v}}]}}")
    out = []
    for label in value.get("labels", []):
        if not isinstance(label, dict) or not isinstance(label.get("key"), str):
            raise ValueError(f"{what}: each label needs a string 'key', got {label!r}")
        val = label.get("value", "")
        if not isinstance(val, str):
            raise ValueError(f"{what}: label {label['key']!r} has a non-string value {val!r}")
        out.append((label["key"], val))
    return tuple(out)


def _json_principal(value: object, what: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{what}: principal must be a string, got {value!r}")
    return value


def _resource_from_json(item: object, default_role: str) -> Resource:
    if not isinstance(item, dict):
        raise ValueError(f"expected a Resource object, got {item!r}")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"a Resource needs a non-empty 'name', got {item!r}")
    what = f"resource {name!r}"
    typ = item.get("type")
    if typ is None:
        present = [t for t, field in ((SCALAR, "scalar"), (RANGES, "ranges"), (SET, "set")) if field in item]
        if len(present) != 1:
            raise ValueError(f"{what}: missing 'type'; set it to SCALAR, RANGES or SET")
        typ = present[0]
    if typ not in TYPES:
        raise ValueError(f"{what}: unknown type {typ!r}; use SCALAR, RANGES or SET")

    if typ == SCALAR:
        scalar = item.get("scalar")
        if not isinstance(scalar, dict) or "value" not in scalar:
            raise ValueError(f"{what}: a SCALAR needs \"scalar\": {{\"value\": <number>}}")
        value: object = _to_millis(scalar["value"], what) / _MILLI
    elif typ == RANGES:
        ranges = item.get("ranges")
        if not isinstance(ranges, dict) or not isinstance(ranges.get("range", []), list):
            raise ValueError(f"{what}: RANGES needs \"ranges\": {{\"range\": [{{\"begin\": b, \"end\": e}}]}}")
        pairs = []
        for r in ranges.get("range", []):
            if not isinstance(r, dict) or "begin" not in r or "end" not in r:
                raise ValueError(f"{what}: each range needs 'begin' and 'end', got {r!r}")
            pairs.append((_to_int(r["begin"], what), _to_int(r["end"], what)))
        value = pairs
    else:
        items = item.get("set")
        if not isinstance(items, dict) or not isinstance(items.get("item", []), list):
            raise ValueError(f"{what}: a SET needs \"set\": {{\"item\": [\"a\", \"b\"]}}")
        value = items.get("item", [])

    role = item.get("role")
    if role is not None and not isinstance(role, str):
        raise ValueError(f"{what}: role must be a string, got {role!r}")
    principal, labels, dynamic = None, (), False
    reservations = item.get("reservations")
    if reservations:
        if not isinstance(reservations, list):
            raise ValueError(f"{what}: 'reservations' must be a list")
        if len(reservations) > 1:
            raise ValueError(f"{what}: reservation refinement (more than one reservation) is not supported")
        res = reservations[0]
        if not isinstance(res, dict) or not isinstance(res.get("role"), str):
            raise ValueError(f"{what}: a reservation needs a 'role', got {res!r}")
        kind = res.get("type")
        if kind not in ("STATIC", "DYNAMIC"):
            raise ValueError(f"{what}: reservation type must be STATIC or DYNAMIC, got {kind!r}")
        if role not in (None, "*", res["role"]):
            raise ValueError(f"{what}: 'role' {role!r} conflicts with reservation role {res['role']!r}")
        role = res["role"]
        dynamic = kind == "DYNAMIC"
        principal = _json_principal(res.get("principal"), what)
        labels = _json_labels(res.get("labels"), what)
        if not dynamic and (principal is not None or labels):
            raise ValueError(f"{what}: a STATIC reservation cannot have a principal or labels")
    elif "reservation" in item:
        res = item["reservation"]
        if not isinstance(res, dict):
            raise ValueError(f"{what}: 'reservation' must be an object with principal and labels")
        if role in (None, "*"):
            raise ValueError(f"{what}: a dynamic reservation needs a 'role' other than '*'")
        dynamic = True
        principal = _json_principal(res.get("principal"), what)
        labels = _json_labels(res.get("labels"), what)
    elif role is None:
        role = default_role
    try:
        validate_role(role)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None

    extras = tuple((f, _canonical_json(item[f])) for f in EXTRA_FIELDS if f in item)
    return Resource(name, typ, value, role, principal, labels, dynamic, extras)


# --- text form -------------------------------------------------------------------------

_PLAIN = re.compile(r"[^%;:,(){}\[\]=\s]*")


def _escape(s: str) -> str:
    """Percent-escape characters that the text form uses as syntax (and whitespace)."""
    if _PLAIN.fullmatch(s) and s.isprintable():
        return s
    out = []
    for c in s:
        if c in "%;:,(){}[]=" or c.isspace() or not c.isprintable():
            out.append("".join(f"%{b:02X}" for b in c.encode("utf-8")))
        else:
            out.append(c)
    return "".join(out)


def _format_millis(v: int) -> str:
    whole, frac = divmod(v, _MILLI)
    return str(whole) if not frac else f"{whole}.{frac:03d}".rstrip("0")


def _item_text(k: _Key, v) -> str:
    name, typ, role, principal, labels, dynamic, extras = k
    if typ == SCALAR:
        value = _format_millis(v)
    elif typ == RANGES:
        value = "[" + ",".join(f"{lo}-{hi}" for lo, hi in v) + "]"
    else:
        value = "{" + ",".join(_escape(x) for x in sorted(v)) + "}"
    tokens = []
    if principal is not None:
        tokens.append("principal=" + _escape(principal))
    tokens.extend(f"label:{_escape(a)}={_escape(b)}" for a, b in labels)
    if dynamic and not tokens:
        tokens.append("dynamic")
    tokens.extend(f"{f}={_escape(text)}" for f, text in extras)
    if role == "*" and not tokens:
        return f"{_escape(name)}:{value}"
    return f"{_escape(name)}({','.join([_escape(role), *tokens])}):{value}"


def _parse_item(part: str, default_role: str) -> tuple[_Key, object]:
    def fail(why: str) -> ValueError:
        return ValueError(f"bad resource {part!r}: {why}; {_SYNTAX_HINT}")

    colon = part.find(":")
    paren = part.find("(")
    principal, labels, dynamic, extras = None, [], False, []
    if paren != -1 and (colon == -1 or paren < colon):
        close = part.find(")", paren)
        if close == -1:
            raise fail("'(' without ')'")
        name = part[:paren].strip()
        rest = part[close + 1 :].lstrip()
        if not rest.startswith(":"):
            raise fail("expected ':' and a value after the role")
        value_text = rest[1:].strip()
        tokens = [t.strip() for t in part[paren + 1 : close].split(",")]
        role = unquote(tokens[0])
        for token in tokens[1:]:
            field, eq, arg = token.partition("=")
            if token == "dynamic":
                dynamic = True
            elif field == "principal" and eq:
                principal, dynamic = unquote(arg), True
            elif field.startswith("label:") and eq:
                labels.append((unquote(field[6:]), unquote(arg)))
                dynamic = True
            elif field in EXTRA_FIELDS and eq:
                try:
                    extras.append((field, _canonical_json(json.loads(unquote(arg)))))
                except json.JSONDecodeError:
                    raise fail(f"{field}= needs JSON") from None
            else:
                raise fail(f"unknown reservation attribute {token!r} (known: principal=, label:k=v, dynamic)")
    else:
        if colon == -1:
            raise fail("missing ':' between name and value")
        name = part[:colon].strip()
        value_text = part[colon + 1 :].strip()
        role = default_role
    name = unquote(name)
    if not name:
        raise fail("missing name")

    try:
        if value_text.startswith("["):
            if not value_text.endswith("]"):
                raise fail("ranges must end with ']', e.g. [31000-32000,33000-33010]")
            typ, value = RANGES, _parse_ranges(value_text[1:-1], fail)
        elif value_text.startswith("{"):
            if not value_text.endswith("}"):
                raise fail("sets must end with '}', e.g. {a,b}")
            items = [unquote(x.strip()) for x in value_text[1:-1].split(",")]
            typ, value = SET, frozenset(x for x in items if x)
        elif not value_text:
            raise fail("missing value after ':'")
        else:
            typ, value = SCALAR, _to_millis(value_text, f"resource {name!r}") / _MILLI
        r = Resource(name, typ, value, role, principal, labels, dynamic, extras)
    except ValueError as e:
        if str(e).startswith("bad resource"):
            raise
        raise fail(str(e)) from None
    return r._key(), r._internal()


def _parse_ranges(inner: str, fail) -> list[tuple[int, int]]:
    pairs = []
    for token in inner.split(","):
        token = token.strip()
        if not token:
            continue
        lo, dash, hi = token.partition("-")
        try:
            begin = int(lo)
            end = int(hi) if dash else begin
        except ValueError:
            raise fail(f"range {token!r} is not 'begin-end' with non-negative integers") from None
        if begin > end:
            raise fail(f"range {token!r} has begin > end; write it as {end}-{begin}")
        pairs.append((begin, end))
    return pairs
