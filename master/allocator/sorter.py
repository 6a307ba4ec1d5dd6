"""Weighted dominant-resource-fairness order over clients (roles, or frameworks in a role).

A `Sorter` holds clients, each with a weight and the scalar quantities allocated to it, and
a `Pool` (the total the shares are taken of). `sort()` returns the active clients in order of
(dominant share / weight, allocation count, name), as Mesos's DRF sorter does, so equal
shares are served round-robin and the order never depends on insertion or hash order.

The order is kept, not recomputed: `allocated()` moves only the client it touched to its new
place (bisect on the kept keys), so an allocation cycle that calls `sort()` before every
agent and `allocated()` after every offer pays O(log n) comparisons plus one list shift per
offer, never a full re-sort. This is the same idea as Mesos commit 86653356 ("Avoided
dirtying the DRF sorter when an allocation is performed"), which keeps the order valid by
shifting the node in place rather than leaving it stale. Changes that move many clients at
once (the total, which changes every share; `unallocated()`, which comes in bursts when
offers are declined or frameworks leave) only mark the order dirty; the next `sort()`
recomputes every share and sorts once.

Quantities are ``dict[str, float]`` (e.g. `Resources.scalars()`) or, on the hot path,
vectors laid out by the `Pool` (``pool.vector(dict)``); only scalars take part in DRF, as in
Mesos. Pure: no I/O, no time.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from operator import add, sub, truediv

__all__ = ["Pool", "Sorter", "Vector", "vadd", "vsub"]

_EPSILON = 1e-9  # Resources are fixed point at 0.001; smaller leftovers are float noise

#: Scalar quantities indexed by `Pool.index` (``pool.vector({"cpus": 1})``). Shorter vectors
#: than the pool's names are fine: missing entries are zero. Never modified in place.
Vector = list


def vadd(a: Vector, b: Vector) -> Vector:
    """a + b, element-wise."""
    if len(a) == len(b):
        return list(map(add, a, b))
    if len(a) < len(b):
        a, b = b, a
    return list(map(add, a, b + [0.0] * (len(a) - len(b))))


def vsub(a: Vector, b: Vector) -> Vector:
    """a - b, element-wise, with float noise (and anything below zero) clamped to zero."""
    if len(a) < len(b):
        a = a + [0.0] * (len(b) - len(a))
    elif len(b) < len(a):
        b = b + [0.0] * (len(a) - len(b))
    return [x if x > _EPSILON else 0.0 for x in map(sub, a, b)]


class Pool:
    """The total scalar quantities that shares are computed against, and the vector layout.

    One pool may be shared by many sorters (the allocator's role sorter and every role's
    framework sorter all see the whole cluster, as in Mesos): a change bumps `version`, and
    each sorter re-sorts lazily when it sees a version it has not sorted for.

    Quantities are kept as vectors indexed by resource name (`index`), so that adding an
    allocation and computing a dominant share are two C-level `map`s rather than dict walks.
    """

    __slots__ = ("names", "index", "_total", "_excluded", "_divisors", "version")

    def __init__(self, total: Mapping[str, float] | None = None, fair_excluded: Iterable[str] = ()):
        self.names: list[str] = []
        self.index: dict[str, int] = {}
        self._total: Vector = []
        self._excluded = frozenset(fair_excluded)
        self._divisors: Vector | None = None
        self.version = 0
        if total:
            self.add(total)

    def vector(self, quantities: Mapping[str, float]) -> Vector:
        """`quantities` as a vector in this pool's layout (new names get new slots)."""
        index = self.index
        v = [0.0] * len(self.names)
        for k, q in quantities.items():
            i = index.get(k)
            if i is None:
                i = index[k] = len(self.names)
                self.names.append(k)
                self._total.append(0.0)
                self._divisors = None
                v.append(0.0)
            v[i] = float(q)
        return v

    def quantities(self, v: Vector) -> dict[str, float]:
        """A vector back as a dict of its non-zero entries."""
        return {self.names[i]: x for i, x in enumerate(v) if x}

    def total(self) -> dict[str, float]:
        """The total quantities."""
        return self.quantities(self._total)

    def divisors(self) -> Vector:
        """Per slot, the total that counts for DRF, or inf for a slot that does not count
        (excluded from fairness, e.g. ``gpus``, or none of it in the pool)."""
        d = self._divisors
        if d is None:
            ex = self._excluded
            names = self.names
            d = self._divisors = [
                t if t > _EPSILON and names[i] not in ex else math.inf for i, t in enumerate(self._total)
            ]
        return d

    def update(self, quantities: Mapping[str, float] | Vector) -> None:
        """Replace the total."""
        v = quantities if type(quantities) is list else self.vector(quantities)
        self._total = [max(x, 0.0) for x in v] + [0.0] * (len(self.names) - len(v))
        self._changed()

    def add(self, quantities: Mapping[str, float] | Vector) -> None:
        """Add quantities to the total (an agent joined or grew)."""
        v = quantities if type(quantities) is list else self.vector(quantities)
        self._total = vadd(self._total, v)
        self._changed()

    def remove(self, quantities: Mapping[str, float] | Vector) -> None:
        """Take quantities out of the total (an agent left or shrank)."""
        v = quantities if type(quantities) is list else self.vector(quantities)
        self._total = vsub(self._total, v)
        self._changed()

    def _changed(self) -> None:
        self._divisors = None
        self.version += 1


class _Client:
    __slots__ = ("name", "weight", "alloc", "count", "active", "key")

    def __init__(self, name: str, weight: float, active: bool):
        self.name = name
        self.weight = weight
        self.alloc: Vector = []
        self.count = 0
        self.active = active
        self.key: tuple = (0.0, 0, name)


class Sorter:
    """Clients in weighted DRF order, kept incrementally; see the module docstring."""

    def __init__(self, pool: Pool | None = None, fair_excluded: Iterable[str] = ()):
        if pool is not None and fair_excluded:
            raise ValueError("give fair_excluded to the shared Pool, not to the Sorter")
        self.pool = pool if pool is not None else Pool(fair_excluded=fair_excluded)
        self._clients: dict[str, _Client] = {}
        # Active clients in order, and their keys (share / weight, count, name), in step.
        self._order: list[str] = []
        self._keys: list[tuple] = []
        self._dirty = False
        self._version = self.pool.version

    # --- clients ---------------------------------------------------------------------

    def add(self, client: str, weight: float = 1.0, active: bool = True) -> None:
        """Add a client with no allocation (ValueError if present or weight <= 0)."""
        if client in self._clients:
            raise ValueError(f"client {client!r} is already in the sorter")
        _check_weight(weight)
        c = self._clients[client] = _Client(client, float(weight), False)
        if active:
            self.activate(client)
        else:
            c.key = self._key(c)

    def remove(self, client: str) -> None:
        """Remove a client and forget its allocation."""
        c = self._client(client)
        if c.active:
            self._take_out(c)
        del self._clients[client]

    def activate(self, client: str) -> None:
        """Include the client in `sort()` (idempotent)."""
        c = self._client(client)
        if not c.active:
            c.active = True
            self._put_in(c)

    def deactivate(self, client: str) -> None:
        """Leave the client out of `sort()`; it keeps its allocation (idempotent)."""
        c = self._client(client)
        if c.active:
            self._take_out(c)
            c.active = False

    def update_weight(self, client: str, weight: float) -> None:
        """Change a client's weight (ValueError if weight <= 0)."""
        _check_weight(weight)
        c = self._client(client)
        if c.active:
            self._take_out(c)
            c.weight = float(weight)
            self._put_in(c)
        else:
            c.weight = float(weight)

    def __contains__(self, client: str) -> bool:
        return client in self._clients

    def __len__(self) -> int:
        return len(self._clients)

    def clients(self) -> list[str]:
        """All clients, active or not, in insertion order."""
        return list(self._clients)

    def is_active(self, client: str) -> bool:
        return self._client(client).active

    def active_count(self) -> int:
        """How many clients take part in `sort()`."""
        return len(self._order)

    # --- allocations -----------------------------------------------------------------

    def allocated(self, client: str, quantities: Mapping[str, float] | Vector) -> None:
        """Record an allocation to `client`; its count goes up by one (as in Mesos).

        Keeps the order valid by moving just this client, unless the order is already dirty.
        `quantities` is a dict or a `pool.vector()` (faster: the allocator's hot path).
        """
        c = self._clients[client]
        v = quantities if type(quantities) is list else self.pool.vector(quantities)
        a = c.alloc
        c.alloc = a = list(map(add, a, v)) if len(a) == len(v) else vadd(a, v)
        c.count += 1
        if not c.active or self._dirty or self._version != self.pool.version:
            return
        pool = self.pool
        d = pool._divisors
        if d is None:
            d = pool.divisors()
        key = ((max(map(truediv, a, d)) if a else 0.0) / c.weight, c.count, client)
        keys = self._keys
        i = bisect_left(keys, c.key)
        j = bisect_left(keys, key)  # counts the old key too when it sorts before the new one
        c.key = key
        if j > i + 1:
            del keys[i]
            del self._order[i]
            keys.insert(j - 1, key)
            self._order.insert(j - 1, client)
        elif j < i:
            del keys[i]
            del self._order[i]
            keys.insert(j, key)
            self._order.insert(j, client)
        else:
            keys[i] = key  # same place

    def unallocated(self, client: str, quantities: Mapping[str, float] | Vector) -> None:
        """Record that `client` gave quantities back (the count is unchanged, as in Mesos)."""
        c = self._clients[client]
        v = quantities if type(quantities) is list else self.pool.vector(quantities)
        c.alloc = vsub(c.alloc, v)
        if c.active:
            self._dirty = True

    def allocation(self, client: str) -> dict[str, float]:
        """The quantities allocated to `client`."""
        return self.pool.quantities(self._client(client).alloc)

    def allocation_count(self, client: str) -> int:
        return self._client(client).count

    # --- total -----------------------------------------------------------------------

    def update_total(self, quantities: Mapping[str, float] | Vector) -> None:
        """Replace the pool total (affects every sorter sharing the pool)."""
        self.pool.update(quantities)

    def add_to_total(self, quantities: Mapping[str, float] | Vector) -> None:
        self.pool.add(quantities)

    def remove_from_total(self, quantities: Mapping[str, float] | Vector) -> None:
        self.pool.remove(quantities)

    # --- order -----------------------------------------------------------------------

    def share(self, client: str) -> float:
        """The client's dominant share of the pool (not divided by its weight)."""
        c = self._client(client)
        return self._share(c)

    def sort(self) -> list[str]:
        """Active clients, lowest weighted dominant share first (a new list)."""
        return list(self.order())

    def order(self) -> list[str]:
        """The kept order itself, without copying: for the allocator's inner loop.

        Do not modify it; it changes under you when `allocated()` is called, so stop
        iterating after an allocation (or copy it with `sort()`).
        """
        if self._dirty or self._version != self.pool.version:
            self._resort()
        return self._order

    # --- internals -------------------------------------------------------------------

    def _client(self, client: str) -> _Client:
        try:
            return self._clients[client]
        except KeyError:
            raise KeyError(f"no client {client!r} in the sorter") from None

    def _share(self, c: _Client) -> float:
        a = c.alloc
        return max(map(truediv, a, self.pool.divisors())) if a else 0.0

    def _key(self, c: _Client) -> tuple:
        return (self._share(c) / c.weight, c.count, c.name)

    def _put_in(self, c: _Client) -> None:
        if self._dirty or self._version != self.pool.version:
            self._order.append(c.name)  # placed properly by the coming re-sort
            self._keys.append(c.key)
            self._dirty = True
            return
        c.key = key = self._key(c)
        j = bisect_left(self._keys, key)
        self._keys.insert(j, key)
        self._order.insert(j, c.name)

    def _take_out(self, c: _Client) -> None:
        if self._dirty or self._version != self.pool.version:
            i = self._order.index(c.name)
        else:
            i = bisect_left(self._keys, c.key)
        del self._keys[i]
        del self._order[i]

    def _resort(self) -> None:
        clients = self._clients
        keys = []
        for name in self._order:
            c = clients[name]
            c.key = self._key(c)
            keys.append(c.key)
        keys.sort()
        self._keys = keys
        self._order = [k[2] for k in keys]
        self._dirty = False
        self._version = self.pool.version


def _check_weight(weight: float) -> None:
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight > 0:
        raise ValueError(f"weight must be a positive number, got {weight!r}")
    if weight == math.inf:
        raise ValueError("weight must be finite")
