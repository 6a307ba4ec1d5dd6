"""Placement: does this offer fit one more instance of this app, and if not, why not.

`place(request, offer, pool, placed, rng)` runs a pipeline of named checks, each of which
may reject the offer with its reason (Marathon's NoOfferMatchReason names, §4.3):

    UnfulfilledRole        no resources in the app's acceptedResourceRoles
    UnfulfilledConstraint  a constraint (UNIQUE, CLUSTER, GROUP_BY, LIKE, UNLIKE, MAX_PER, IS)
    InsufficientCpus / InsufficientMemory / InsufficientDisk / InsufficientGpus
    InsufficientPorts      not enough free ports, or not the ports requirePorts names

The first check that fails names the reason; every rejection is counted per app, which is
what `/v2/queue` and `agora app why APP` show. An offer that passes yields a `Placement`: the
exact resources (as Mesos JSON, reservations kept) and host ports to launch with, taken from
the `Pool` of what is left of the offer.

Constraint fields: `hostname` / `@hostname`, `@region`, `@zone`, or an agent attribute,
formatted as Marathon does (scalars `0.###`, ranges `[b-e,...]`, sets `{a,b}`). A missing
field matches only UNLIKE. Only this app's placed instances count (§2.3).

Pure: no I/O (the random choice of ports comes from the `rng` passed in).
"""

from __future__ import annotations

import collections
import re
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Iterable, Mapping

import attrs

from agora.resources import RANGES, SCALAR, Resources

ROLE, CONSTRAINT, CPUS, MEM, DISK, GPUS, PORTS = (
    "UnfulfilledRole", "UnfulfilledConstraint", "InsufficientCpus", "InsufficientMemory",
    "InsufficientDisk", "InsufficientGpus", "InsufficientPorts")
#: The funnel, in the order offers go through it.
REASONS = (ROLE, CONSTRAINT, CPUS, MEM, DISK, GPUS, PORTS)


def format_attribute(attr: dict) -> str | None:
    """A Mesos attribute's value as Marathon compares it (None if it has none)."""
    kind = attr.get("type")
    if kind == "TEXT":
        return str((attr.get("text") or {}).get("value", ""))
    if kind == "SCALAR":
        return format_scalar((attr.get("scalar") or {}).get("value", 0))
    if kind == "RANGES":
        ranges = (attr.get("ranges") or {}).get("range") or []
        return "[" + ",".join(f"{r.get('begin')}-{r.get('end')}" for r in ranges) + "]"
    if kind == "SET":
        return "{" + ",".join(sorted((attr.get("set") or {}).get("item") or [])) + "}"
    return None


def format_scalar(value) -> str:
    """DecimalFormat("0.###") with HALF_EVEN, as Marathon formats scalar attributes."""
    d = Decimal(str(value)).quantize(Decimal("0.001"), rounding=ROUND_HALF_EVEN)
    text = format(d, "f").rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


@attrs.frozen
class Offer:
    """The parts of a Mesos offer placement looks at."""

    id: str
    agent_id: str
    hostname: str
    ip: str | None
    fields: Mapping[str, str]  # constraint field -> value (hostname, @region, attributes)
    resources: Resources

    @classmethod
    def from_mesos(cls, offer: dict) -> Offer:
        fields = {}
        for attr in offer.get("attributes") or []:
            if isinstance(attr, dict) and attr.get("name"):
                value = format_attribute(attr)
                if value is not None:
                    fields[attr["name"]] = value
        domain = ((offer.get("domain") or {}).get("fault_domain") or {})
        if domain.get("region", {}).get("name"):
            fields["@region"] = domain["region"]["name"]
        if domain.get("zone", {}).get("name"):
            fields["@zone"] = domain["zone"]["name"]
        hostname = offer.get("hostname") or ""
        fields["hostname"] = fields["@hostname"] = hostname
        address = (offer.get("url") or {}).get("address") or {}
        return cls(offer["id"]["value"], offer["agent_id"]["value"], hostname,
                   address.get("ip"), fields, Resources.from_json(offer.get("resources") or []))


# --- constraints --------------------------------------------------------------------------

class Placed:
    """How many of the app's placed instances have each value of each constraint field."""

    def __init__(self, constraints: Iterable[list], placed_fields: Iterable[Mapping[str, str]]):
        self.fields = sorted({c[0] for c in constraints})
        self.counts: dict[str, collections.Counter] = {f: collections.Counter()
                                                       for f in self.fields}
        for values in placed_fields:
            self.add(values)

    def add(self, values: Mapping[str, str]) -> None:
        for f in self.fields:
            self.counts[f][values.get(f)] += 1

    def of(self, field: str) -> collections.Counter:
        return self.counts.get(field) or collections.Counter()


def meets(constraint: list, value: str | None, placed: collections.Counter) -> bool:
    """Whether an offer whose field has `value` (None: absent) satisfies `constraint`, given
    how many of the app's instances are placed on each value of that field."""
    op = constraint[1]
    arg = constraint[2] if len(constraint) > 2 else None
    if value is None:
        return op == "UNLIKE"
    placed_values = {v: n for v, n in placed.items() if n > 0 and v is not None}
    if op == "UNIQUE":
        return placed_values.get(value, 0) == 0
    if op == "CLUSTER":
        if arg:
            return value == arg
        return not placed_values or set(placed_values) == {value}
    if op == "LIKE":
        return re.fullmatch(arg, value) is not None
    if op == "UNLIKE":
        return re.fullmatch(arg, value) is None
    if op == "MAX_PER":
        return placed_values.get(value, 0) < int(arg)
    if op == "IS":
        try:
            return value == format_scalar(float(arg))
        except ValueError:
            return value == arg
    if op == "GROUP_BY":
        groups = 2 ** 31 - 1 if arg == "inf" else int(arg or 0)
        if value not in placed_values:
            return True
        return len(placed_values) >= groups and \
            placed_values[value] == min(placed_values.values())
    return False


# --- resources ---------------------------------------------------------------------------

@attrs.frozen
class Request:
    """What one instance of an app needs from an offer."""

    cpus: float
    mem: float
    disk: float
    gpus: float = 0.0
    ports: tuple[int, ...] = ()  # one entry per host port: 0 = any, else exactly that one
    roles: frozenset[str] | None = None  # acceptedResourceRoles (None: any)
    constraints: tuple = ()

    @classmethod
    def of_app(cls, app: dict) -> Request:
        if "portDefinitions" in app:
            ports = tuple(p["port"] if app.get("requirePorts") else 0
                          for p in app["portDefinitions"])
        else:
            ports = tuple(m["hostPort"] for m in (app.get("container") or {})
                          .get("portMappings") or [] if "hostPort" in m)
        roles = app.get("acceptedResourceRoles")
        return cls(app["cpus"], app["mem"], app["disk"], app.get("gpus") or 0, ports,
                   frozenset(roles) if roles else None,
                   tuple(tuple(c) for c in app.get("constraints") or ()))


class Pool:
    """What is left of one offer as instances are placed on it (kept per resource item, so
    that reservations are launched exactly as offered)."""

    def __init__(self, resources: Resources):
        self.templates = [r.to_json() for r in resources]
        self.items = list(resources)
        self.left = [r.value for r in self.items]

    def usable(self, roles: frozenset[str] | None) -> list[int]:
        return [k for k, r in enumerate(self.items) if roles is None or r.role in roles]

    def scalar(self, name: str, usable: list[int]) -> float:
        return sum(self.left[k] for k in usable if self.items[k].name == name and
                   self.items[k].type == SCALAR)

    def take_scalar(self, name: str, amount: float, usable: list[int]) -> list[dict]:
        out = []
        # Reserved resources first: they are for us, the unreserved ones are anyone's.
        for k in sorted(usable, key=lambda k: self.items[k].role == "*"):
            item = self.items[k]
            if amount <= 1e-9:
                break
            if item.name != name or item.type != SCALAR or self.left[k] <= 1e-9:
                continue
            take = min(amount, self.left[k])
            self.left[k] = round(self.left[k] - take, 3)
            amount = round(amount - take, 3)
            out.append({**self.templates[k], "scalar": {"value": round(take, 3)}})
        return out

    def free_ports(self, usable: list[int]) -> list[tuple[int, int, int]]:
        """(item index, begin, end) of every free port range."""
        return [(k, b, e) for k in usable if self.items[k].name == "ports" and
                self.items[k].type == RANGES for b, e in self.left[k]]

    def take_ports(self, chosen: list[tuple[int, int]]) -> list[dict]:
        """Remove the (item index, port) pairs; the Mesos JSON resources, one per item, with
        the ports in the order chosen (PORT0 is the first)."""
        by_item: dict[int, list[int]] = {}
        for k, port in chosen:
            by_item.setdefault(k, []).append(port)
            self.left[k] = _remove_port(self.left[k], port)
        out = []
        for k, ports in by_item.items():
            out.append({**self.templates[k],
                        "ranges": {"range": [{"begin": p, "end": p} for p in ports]}})
        return out


def _remove_port(ranges: tuple, port: int) -> tuple:
    out = []
    for b, e in ranges:
        if b <= port <= e:
            if b < port:
                out.append((b, port - 1))
            if port < e:
                out.append((port + 1, e))
        else:
            out.append((b, e))
    return tuple(out)


@attrs.frozen
class Placement:
    """An instance fits: launch it with these resources (Mesos JSON) and host ports."""

    resources: list
    ports: list


@attrs.frozen
class Rejection:
    """The offer does not fit; `reason` is one of REASONS, `detail` says what was missing."""

    reason: str
    detail: str


def place(request: Request, offer: Offer, pool: Pool, placed: Placed, rng) -> Placement | Rejection:
    """Fit one instance into what is left of `offer` (`pool`), or say why it does not fit.
    On success the resources are taken out of `pool`."""
    usable = pool.usable(request.roles)
    if request.roles is not None and not usable:
        return Rejection(ROLE, f"nothing offered to roles {', '.join(sorted(request.roles))}")
    for c in request.constraints:
        value = offer.fields.get(c[0])
        if not meets(list(c), value, placed.of(c[0])):
            return Rejection(CONSTRAINT, f"{':'.join(c)} not met by {c[0]}={value}")
    for reason, name, need in ((CPUS, "cpus", request.cpus), (MEM, "mem", request.mem),
                               (DISK, "disk", request.disk), (GPUS, "gpus", request.gpus)):
        if need > 0:
            have = pool.scalar(name, usable)
            if have + 1e-9 < need:
                return Rejection(reason, f"{name}: needs {need:g}, offer has {have:g}")
    chosen = _choose_ports(request.ports, pool.free_ports(usable), rng)
    if isinstance(chosen, Rejection):
        return chosen
    resources = []
    for name, need in (("cpus", request.cpus), ("mem", request.mem), ("disk", request.disk),
                       ("gpus", request.gpus)):
        if need > 0:
            resources.extend(pool.take_scalar(name, need, usable))
    if chosen:
        resources.extend(pool.take_ports(chosen))
    return Placement(resources, [p for _, p in chosen])


def _choose_ports(wanted: tuple[int, ...], free: list, rng):
    if not wanted:
        return []
    chosen: list[tuple[int, int]] = []
    taken: set[int] = set()
    for port in wanted:
        if port:
            spot = next((k for k, b, e in free if b <= port <= e), None)
            if spot is None or port in taken:
                return Rejection(PORTS, f"port {port} is not offered")
            chosen.append((spot, port))
            taken.add(port)
    dynamic = sum(1 for p in wanted if not p)
    total = sum(e - b + 1 for _, b, e in free) - len(taken)
    if total < dynamic:
        return Rejection(PORTS, f"ports: needs {len(wanted)}, offer has "
                                f"{total + len(taken)} free")
    picks: list[tuple[int, int]] = []
    while len(picks) < dynamic:
        n = rng.randrange(sum(e - b + 1 for _, b, e in free))
        for k, b, e in free:
            size = e - b + 1
            if n < size:
                port = b + n
                break
            n -= size
        if port not in taken:
            taken.add(port)
            picks.append((k, port))
    # Fixed ports keep their place in the order; dynamic ones fill the gaps.
    out, it = [], iter(picks)
    fixed = iter(chosen)
    for port in wanted:
        out.append(next(fixed) if port else next(it))
    return out


# --- why not placed -----------------------------------------------------------------------

class PlacementStats:
    """Why an app's instances were or were not placed on the offers it saw: what
    `/v2/queue` shows as processedOffersSummary and lastUnusedOffers."""

    def __init__(self, keep: int = 10):
        self.processed = 0
        self.unused = 0
        self.last_used_at: float | None = None
        self.last_unused_at: float | None = None
        self.total: collections.Counter = collections.Counter()
        self.last: collections.deque = collections.deque(maxlen=keep)

    def used(self, now: float) -> None:
        self.processed += 1
        self.last_used_at = now

    def rejected(self, rejection: Rejection, offer: Offer, now: float) -> None:
        self.processed += 1
        self.unused += 1
        self.last_unused_at = now
        self.total[rejection.reason] += 1
        self.last.append((offer, rejection, now))

    @property
    def last_round(self) -> collections.Counter:
        return collections.Counter(r.reason for _, r, _ in self.last)

    def funnel(self, counts: collections.Counter, processed: int | None = None) -> list:
        """[{reason, declined, processed}] in funnel order: how many offers reached each
        check and how many it turned down."""
        left = sum(counts.values()) if processed is None else processed
        out = []
        for reason in REASONS:
            declined = counts.get(reason, 0)
            out.append({"reason": reason, "declined": declined, "processed": left})
            left -= declined
        return out
