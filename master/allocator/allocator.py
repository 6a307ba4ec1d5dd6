"""The allocator: turns agents' free resources into offers by hierarchical weighted DRF.

State: agents (total, free, what each framework holds there), frameworks (roles, active,
suppressed roles, what they hold), a role `Sorter` and one framework `Sorter` per role over
a shared `Pool` (the cluster total), and decline `Filters`. Every method takes values and
changes that state; `allocate()` returns the decisions as `Offer`s. Time comes from the
injected `clock`; the agent visit order from the injected `rng`. No I/O, no Twisted.

One cycle, for each agent (in random order, as Mesos shuffles): walk roles in DRF order,
and within a role its frameworks in DRF order; skip frameworks that are inactive or
suppressed for the role (they are not in the role's sort at all) and frameworks whose
decline filter refuses what is on offer; the first framework left gets one offer with
*everything* on the agent allocatable to the role (unreserved + reserved to the role),
provided it has at least one of the `min_allocatable` quantities. Offered resources count
as allocated to the framework until `recover()` gives them back.

What makes it fast (see README.md):

* sorters keep their order across the cycle (an offer moves one client by bisect);
* an agent with no reservations takes a fast path: the offer *is* its free `Resources`
  object (no arithmetic), and its quantity vector is cached with it;
* per agent, the frameworks whose filters refuse all of its current free resources are
  kept in a set, so the walk skips them at C speed (`itertools.filterfalse`) instead of
  checking each filter again every cycle;
* after a visit an agent is marked idle: it is skipped until something could change the
  outcome (its free resources grew, a framework became able to receive -- new, activated,
  revived, new role --, or a filter that refused it expires). `pending_agents()` lists the
  agents that are not idle, so the master can run incremental cycles on just those.
"""

from __future__ import annotations

import gc
import heapq
import math
import random
from collections.abc import Callable, Iterable, Mapping
from itertools import filterfalse

import attrs

from agora.resources import SCALAR, Resources

from .filters import Filters
from .sorter import Pool, Sorter, Vector, vadd, vsub

__all__ = ["DEFAULT_MIN_ALLOCATABLE", "Allocator", "Offer"]

#: Mesos's default --min_allocatable_resources: "cpus:0.01|mem:32".
DEFAULT_MIN_ALLOCATABLE = ("cpus:0.01", "mem:32")

_EMPTY = Resources()
_NO_QUANTITIES: Vector = []  # shared; quantity vectors are never modified in place


@attrs.frozen
class Offer:
    """One allocation decision: `resources` on `agent_id` go to `framework_id` for `role`."""

    framework_id: str
    agent_id: str
    role: str
    resources: Resources


class _Held:
    """Resources a framework holds on one agent for one role, and their quantity vector."""

    __slots__ = ("resources", "quantities")

    def __init__(self, resources: Resources, quantities: Vector):
        self.resources = resources
        self.quantities = quantities


class _Agent:
    __slots__ = (
        "id", "total", "total_q", "free", "free_q", "reserved", "active",
        "users", "orphans", "idle_epoch", "idle_until", "wake_at",
        "covered", "covered_free", "covered_until",
    )

    def __init__(self, agent_id: str, total: Resources, total_q: Vector, free: Resources):
        self.id = agent_id
        self.total = total
        self.total_q = total_q
        self.free = free
        self.free_q: Vector | None = None  # quantity vector of free, computed when needed
        self.reserved = bool(total.reserved())  # False: the fast path applies
        self.active = True
        self.users: set[str] = set()  # frameworks holding resources here
        self.orphans: dict[str, Resources] = {}  # in use by frameworks not (yet) added
        self.idle_epoch = -1  # == Allocator._epoch: visited, nothing changed since ...
        self.idle_until = math.inf  # ... until this time (a refusing filter expires)
        self.wake_at = math.inf  # earliest entry for this agent in Allocator._wakes
        # role -> frameworks whose filters refuse all of `covered_free` until `covered_until`
        self.covered: dict[str, set[str]] = {}
        self.covered_free: Resources | None = None
        self.covered_until = math.inf


class _Framework:
    __slots__ = ("id", "roles", "suppressed", "active", "alloc", "tracked")

    def __init__(self, framework_id: str, roles: tuple[str, ...], suppressed: set[str], active: bool):
        self.id = framework_id
        self.roles = roles
        self.suppressed = suppressed
        self.active = active
        self.alloc: dict[str, dict[str, _Held]] = {}  # agent -> role -> held
        self.tracked: set[str] = set()  # roles whose framework sorter has this framework

    def eligible(self, role: str) -> bool:
        return self.active and role in self.roles and role not in self.suppressed


class Allocator:
    """Hierarchical weighted DRF allocator (pure state and decisions); see the module doc."""

    def __init__(
        self,
        clock: Callable[[], float],
        min_allocatable: Iterable[Resources | str] | None = None,
        fair_excluded: tuple[str, ...] = (),
        rng: random.Random | None = None,
        shuffle: bool = True,
    ):
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._shuffle = shuffle
        self._pool = Pool(fair_excluded=fair_excluded)
        self._min = [
            _min_quantities(self._pool, m)
            for m in (DEFAULT_MIN_ALLOCATABLE if min_allocatable is None else min_allocatable)
        ]
        self._roles = Sorter(self._pool)
        self._fsorters: dict[str, Sorter] = {}
        self._weights: dict[str, float] = {}
        self._agents: dict[str, _Agent] = {}
        self._frameworks: dict[str, _Framework] = {}
        self._orphaned: dict[str, set[str]] = {}  # framework -> agents with orphans of it
        self._filters = Filters()
        self._epoch = 0  # bumped when a framework becomes able to receive
        self._scanned_epoch = 0
        self._dirty: set[str] = set()  # agents to visit: free grew, added, activated, ...
        self._wakes: list[tuple[float, str]] = []  # (time, agent): a refusing filter expires
        #: Figures from the last `allocate()`: agents visited, skipped as idle, offers made.
        self.last_cycle = {"visited": 0, "skipped": 0, "offers": 0}

    # --- agents ----------------------------------------------------------------------

    def add_agent(
        self, agent_id: str, total: Resources, used: Mapping[str, Resources] | None = None
    ) -> None:
        """Add an agent; `used` maps framework id -> resources in use there (tasks, executors).

        Used resources of frameworks not added yet are set aside (not free, not counted in
        any share) until `add_framework` adopts them, as Mesos does on master failover.
        """
        if agent_id in self._agents:
            raise ValueError(f"agent {agent_id!r} is already added")
        used = {fid: r for fid, r in (used or {}).items() if r}
        free = total - Resources.sum(used.values()) if used else total
        a = self._agents[agent_id] = _Agent(agent_id, total, self._vec(total), free)
        self._pool.add(a.total_q)
        for fid, r in used.items():
            fw = self._frameworks.get(fid)
            if fw is None:
                a.orphans[fid] = r
                self._orphaned.setdefault(fid, set()).add(agent_id)
            else:
                self._hold(fw, a, self._role_for(fw, r, None), r, self._vec(r))
        self._touch(a)

    def remove_agent(self, agent_id: str) -> None:
        """Remove an agent; what frameworks held there is forgotten (not returned anywhere)."""
        a = self._agents.pop(agent_id, None)
        if a is None:
            return
        for fid in a.users:
            fw = self._frameworks[fid]
            for role, held in fw.alloc.pop(agent_id).items():
                self._roles.unallocated(role, held.quantities)
                self._fsorters[role].unallocated(fid, held.quantities)
                self._maybe_untrack(fw, role)
        for fid in a.orphans:
            agents = self._orphaned[fid]
            agents.discard(agent_id)
            if not agents:
                del self._orphaned[fid]
        self._pool.remove(a.total_q)
        self._filters.remove_agent(agent_id)
        self._dirty.discard(agent_id)

    def update_agent_total(self, agent_id: str, total: Resources) -> None:
        """Change an agent's total; what is offered or in use there must still fit (ValueError)."""
        a = self._agent(agent_id)
        in_use = a.total - a.free
        try:
            free = total - in_use
        except ValueError:
            raise ValueError(
                f"agent {agent_id!r}: new total {total} does not hold the resources offered or in use "
                f"there ({in_use}); recover them first"
            ) from None
        self._pool.remove(a.total_q)
        a.total, a.total_q = total, self._vec(total)
        self._pool.add(a.total_q)
        a.free, a.free_q = free, None
        a.reserved = bool(total.reserved())
        self._touch(a)

    def activate_agent(self, agent_id: str) -> None:
        """Offer this agent's resources again."""
        a = self._agent(agent_id)
        if not a.active:
            a.active = True
            self._touch(a)

    def deactivate_agent(self, agent_id: str) -> None:
        """Stop offering this agent's resources (e.g. it disconnected); holdings stay."""
        self._agent(agent_id).active = False

    # --- frameworks ------------------------------------------------------------------

    def add_framework(
        self,
        framework_id: str,
        roles: Iterable[str],
        used: Mapping[str, Resources] | None = None,
        suppressed_roles: Iterable[str] = (),
        active: bool = True,
    ) -> None:
        """Add a framework subscribed to `roles`; `used` maps agent id -> resources in use.

        Resources the agent reported for this framework (see `add_agent`) are adopted;
        `used` on agents that did not report it are taken from their free resources
        (ValueError if not free); `used` on unknown agents is ignored (they report it when
        they register).
        """
        if framework_id in self._frameworks:
            raise ValueError(f"framework {framework_id!r} is already added")
        roles = _roles(roles)
        suppressed = set(suppressed_roles)
        if not suppressed <= set(roles):
            raise ValueError(
                f"suppressed roles {sorted(suppressed - set(roles))} are not among the roles {list(roles)}"
            )
        orphaned = self._orphaned.get(framework_id, set())
        used = {
            aid: r for aid, r in (used or {}).items() if r and aid in self._agents and aid not in orphaned
        }
        for aid, r in used.items():
            if not self._agents[aid].free.contains(r):
                raise ValueError(
                    f"framework {framework_id!r} uses {r} on agent {aid!r}, which is not free there"
                )
        fw = self._frameworks[framework_id] = _Framework(framework_id, roles, suppressed, active)
        for role in roles:
            self._track(fw, role)
        for aid in self._orphaned.pop(framework_id, ()):
            a = self._agents[aid]
            r = a.orphans.pop(framework_id)
            self._hold(fw, a, self._role_for(fw, r, None), r, self._vec(r))
        for aid, r in used.items():
            self.allocate_used(framework_id, aid, r)
        if any(fw.eligible(role) for role in roles):
            self._epoch += 1

    def remove_framework(self, framework_id: str) -> None:
        """Remove a framework: everything it holds goes back to the agents' free resources."""
        fw = self._frameworks.pop(framework_id, None)
        if fw is None:
            for aid in sorted(self._orphaned.get(framework_id, ())):
                a = self._agents[aid]
                self._release_orphan(a, framework_id, a.orphans[framework_id])
            return
        for aid, per_role in fw.alloc.items():
            a = self._agents[aid]
            for role, held in per_role.items():
                self._roles.unallocated(role, held.quantities)
                self._give(a, held.resources, held.quantities)
            a.users.discard(framework_id)
            self._touch(a)
        fw.alloc = {}
        for role in list(fw.tracked):
            self._untrack(fw, role)
        self._clear_filters(framework_id, None)

    def activate_framework(self, framework_id: str) -> None:
        """The framework (re)connected: it receives offers again."""
        fw = self._framework(framework_id)
        if not fw.active:
            fw.active = True
            self._sync_roles(fw)
            self._epoch += 1

    def deactivate_framework(self, framework_id: str) -> None:
        """The framework disconnected: no offers until it is activated; holdings stay.

        Its decline filters are dropped, as Mesos does: a returning scheduler starts afresh.
        """
        fw = self._framework(framework_id)
        if fw.active:
            fw.active = False
            self._sync_roles(fw)
            self._clear_filters(framework_id, None)

    def update_framework_roles(self, framework_id: str, roles: Iterable[str]) -> None:
        """Change the roles a framework is subscribed to; its holdings stay where they are.

        Suppression and filters for roles it leaves are dropped.
        """
        fw = self._framework(framework_id)
        roles = _roles(roles)
        old = fw.roles
        fw.roles = roles
        fw.suppressed &= set(roles)
        gone = [r for r in old if r not in roles]
        if gone:
            self._clear_filters(framework_id, gone)
        for role in roles:
            self._track(fw, role)
        for role in gone:
            self._sync(fw, role)
            self._maybe_untrack(fw, role)
        if any(r not in old for r in roles):
            self._epoch += 1

    def suppress(self, framework_id: str, roles: Iterable[str] = ()) -> None:
        """Stop offers to the framework for `roles` (all its roles if empty)."""
        fw = self._framework(framework_id)
        for role in self._roles_of(fw, roles):
            if role not in fw.suppressed:
                fw.suppressed.add(role)
                self._sync(fw, role)

    def revive(self, framework_id: str, roles: Iterable[str] = ()) -> None:
        """Resume offers for `roles` (all if empty) and clear the framework's filters there."""
        fw = self._framework(framework_id)
        chosen = self._roles_of(fw, roles)
        for role in chosen:
            if role in fw.suppressed:
                fw.suppressed.discard(role)
                self._sync(fw, role)
        self._clear_filters(framework_id, chosen)
        self._epoch += 1

    def set_weight(self, role: str, weight: float) -> None:
        """Set a role's DRF weight (default 1.0; must be > 0)."""
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0 < weight < math.inf:
            raise ValueError(f"weight of role {role!r} must be a positive number, got {weight!r}")
        self._weights[role] = float(weight)
        if role in self._roles:
            self._roles.update_weight(role, weight)

    def weights(self) -> dict:
        """role -> weight, for the roles whose weight was set."""
        return dict(self._weights)

    # --- resources coming back or in use -----------------------------------------------

    def recover(
        self,
        framework_id: str,
        agent_id: str,
        resources: Resources,
        refuse_seconds: float | None = None,
        role: str | None = None,
    ) -> None:
        """Resources come back from a framework (declined, rescinded or unused offer, task ended).

        With `refuse_seconds` > 0 the framework is not offered (a subset of) these resources
        on this agent again for that long (capped at 365 days). `role` says which of the
        framework's roles they were held for; without it, the role whose holding on the agent
        contains them (split across roles if they span several). Unknown agent, or a framework
        already removed: nothing to do (its resources were returned or forgotten then); a
        framework never added gives back what the agent reported for it (see `add_agent`).
        ValueError, with nothing changed, if the framework does not hold `resources` there.
        """
        if not resources:
            return
        a = self._agents.get(agent_id)
        if a is None:
            return
        fw = self._frameworks.get(framework_id)
        if fw is None:
            self._release_orphan(a, framework_id, resources)
            return
        per_role = fw.alloc.get(agent_id)
        if per_role is None:
            raise ValueError(
                f"framework {framework_id!r} holds nothing on agent {agent_id!r}; cannot recover {resources}"
            )
        if role is None:
            role = self._holding_role(per_role, resources)
            if role is None:  # spans roles, e.g. what is left of two offers accepted together
                for r, part in _split_by_role(per_role, resources, framework_id, agent_id):
                    self.recover(framework_id, agent_id, part, refuse_seconds, r)
                return
        held = per_role.get(role)
        if held is None:
            raise ValueError(
                f"framework {framework_id!r} holds nothing for role {role!r} on agent {agent_id!r}"
            )
        if held.resources is resources:
            left, quantities = _EMPTY, held.quantities
        else:
            try:
                left = held.resources - resources
            except ValueError:
                raise ValueError(
                    f"framework {framework_id!r} holds {held.resources} on agent {agent_id!r} for role "
                    f"{role!r}, which does not contain {resources}"
                ) from None
            quantities = self._vec(resources)
        if left:
            held.resources, held.quantities = left, vsub(held.quantities, quantities)
        else:
            del per_role[role]
            if not per_role:
                del fw.alloc[agent_id]
                a.users.discard(framework_id)
        self._roles.unallocated(role, quantities)
        self._fsorters[role].unallocated(framework_id, quantities)
        self._give(a, resources, quantities)
        self._touch(a)
        if refuse_seconds is not None:
            f = self._filters.add(framework_id, role, agent_id, resources, refuse_seconds, self._clock())
            if f is not None and resources is a.free and a.covered_free is resources:
                a.covered.setdefault(role, set()).add(framework_id)  # it refuses all that is free
                a.covered_until = min(a.covered_until, f.expires)
        if role not in fw.roles:
            self._maybe_untrack(fw, role)

    def allocate_used(
        self, framework_id: str, agent_id: str, resources: Resources, role: str | None = None
    ) -> None:
        """Mark free resources as in use by a framework without an offer (ValueError if not free).

        For holdings learnt outside an allocation cycle, e.g. an agent re-registering with
        tasks. `role` defaults to the framework role the resources are reserved to, else its
        first role.
        """
        a = self._agent(agent_id)
        fw = self._framework(framework_id)
        if not resources:
            return
        try:
            a.free = a.free - resources
        except ValueError:
            raise ValueError(
                f"agent {agent_id!r} has {a.free} free, which does not contain {resources}"
            ) from None
        a.free_q = None
        self._hold(fw, a, self._role_for(fw, resources, role), resources, self._vec(resources))

    # --- the allocation cycle ----------------------------------------------------------

    def allocate(self, agent_ids: Iterable[str] | None = None) -> list[Offer]:
        """Run one allocation cycle over `agent_ids` (all agents if None); return the offers.

        Agents are visited in a random order (shuffled with the injected `rng`; a set of ids
        is sorted first so a seeded `rng` gives the same order every run). Idle agents --
        visited before, nothing changed since -- are skipped at once.

        The cyclic garbage collector is paused for the cycle: the cycle creates no reference
        cycles (reference counting frees its garbage), and a full collection triggered
        half-way through would cost as much as the cycle itself on a large cluster.
        """
        paused = gc.isenabled()
        if paused:
            gc.disable()
        try:
            return self._allocate(agent_ids)
        finally:
            if paused:
                gc.enable()

    def _allocate(self, agent_ids: Iterable[str] | None) -> list[Offer]:
        now = self._clock()
        agents = self._agents
        if agent_ids is None:
            ids = list(agents)
        elif isinstance(agent_ids, (set, frozenset)):
            ids = sorted(agent_ids)
        else:
            ids = list(dict.fromkeys(agent_ids))
        if self._shuffle:
            self._rng.shuffle(ids)

        epoch = self._epoch
        offers: list[Offer] = []
        append = offers.append
        dirty = self._dirty
        role_order = self._roles.order
        fsorters = self._fsorters
        by_agent = self._filters._by_agent
        first_taker = self._first_taker
        frameworks = self._frameworks
        min_ok = self._min_ok
        hold = self._hold
        role_allocated = self._roles.allocated
        inf = math.inf
        visited = skipped = 0

        for aid in ids:
            a = agents.get(aid)
            if a is None:
                continue
            if a.idle_epoch == epoch and now < a.idle_until:
                skipped += 1
                continue
            visited += 1
            dirty.discard(aid)
            until = inf
            if not a.active:
                continue  # activate_agent() marks it again
            free = a.free
            if not free:
                pass
            elif a.reserved:
                until = self._visit_reserved(a, now, offers)
            else:
                # Fast path: nothing reserved, so every role may take all of `free`.
                q = a.free_q
                if q is None:
                    q = a.free_q = self._vec(free)
                if min_ok(q):
                    agent_filters = by_agent.get(aid)
                    for role in role_order():
                        order = fsorters[role].order()
                        if not order:
                            continue
                        fid = order[0]
                        if agent_filters:
                            found_by_fw = agent_filters.get(role)
                            if found_by_fw is not None and fid in found_by_fw:
                                fid = first_taker(a, role, order, found_by_fw, free, now)
                                until = a.covered_until
                                if fid is None:
                                    continue
                        append(Offer(fid, aid, role, free))
                        a.free, a.free_q = _EMPTY, _NO_QUANTITIES
                        fw = frameworks[fid]
                        per_role = fw.alloc.get(aid)
                        if per_role is None:  # the usual case, inlined
                            fw.alloc[aid] = {role: _Held(free, q)}
                            a.users.add(fid)
                            role_allocated(role, q)
                            fsorters[role].allocated(fid, q)
                        else:
                            hold(fw, a, role, free, q)
                        until = inf
                        break  # the order just changed; nothing is left anyway
            # Idle until something changes; see pending_agents().
            a.idle_epoch = epoch
            a.idle_until = until
            if until < a.wake_at:
                a.wake_at = until
                heapq.heappush(self._wakes, (until, aid))

        self.last_cycle = {"visited": visited, "skipped": skipped, "offers": len(offers)}
        return offers

    def _first_taker(
        self, a: _Agent, role: str, order: list[str], found_by_fw: dict, free: Resources, now: float
    ) -> str | None:
        """The first framework in `order` that does not refuse all of `free` (None if all do).

        Frameworks known to refuse this very `free` object (`a.covered`) are skipped at C
        speed; those found refusing on the way join them. `a.covered_until` ends up as the
        earliest time one of them stops refusing.
        """
        if a.covered_free is not free or now >= a.covered_until:
            a.covered, a.covered_free, a.covered_until = {}, free, math.inf
        skip = a.covered.get(role)
        if skip is None:
            skip = a.covered[role] = set()
        check = self._filters.check
        for fid in filterfalse(skip.__contains__, order):
            found = found_by_fw.get(fid)
            if found is not None:
                t = check(fid, role, a.id, found, free, now)
                if t is not None:
                    skip.add(fid)
                    if t < a.covered_until:
                        a.covered_until = t
                    continue
            return fid
        return None

    def _visit_reserved(self, a: _Agent, now: float, offers: list[Offer]) -> float:
        """The general path for an agent with reservations: each role gets what it may take."""
        until = math.inf
        aid = a.id
        reserved_roles = {r.role for r in a.free.reserved()}
        has_unreserved = bool(a.free.unreserved())
        for role in self._roles.sort():  # a copy: offers below reorder the roles
            free = a.free
            if not free:
                break
            if not has_unreserved and not _may_take(role, reserved_roles):
                continue
            available = free.allocatable_to(role)
            if not available:
                continue
            q = self._vec(available)
            if not self._min_ok(q):
                continue
            found_by_fw = self._filters.on_agent(aid, role)
            for fid in self._fsorters[role].order():
                if found_by_fw is not None:
                    found = found_by_fw.get(fid)
                    if found is not None:
                        t = self._filters.check(fid, role, aid, found, available, now)
                        if t is not None:
                            until = min(until, t)
                            continue
                offers.append(Offer(fid, aid, role, available))
                a.free, a.free_q = free - available, None
                self._hold(self._frameworks[fid], a, role, available, q)
                if has_unreserved:
                    has_unreserved = bool(a.free.unreserved())
                    reserved_roles = {r.role for r in a.free.reserved()}
                break
        return until

    def pending_agents(self) -> set[str]:
        """Agents an allocation cycle should visit: free resources grew, agent added or
        activated, a framework became able to receive (new, activated, revived, new role),
        or a filter that refused the agent has expired. Visiting clears them."""
        now = self._clock()
        agents = self._agents
        dirty = self._dirty
        wakes = self._wakes
        while wakes and wakes[0][0] <= now:
            t, aid = heapq.heappop(wakes)
            a = agents.get(aid)
            if a is None or a.wake_at != t:
                continue  # stale entry
            a.wake_at = math.inf
            if a.idle_until <= now:
                dirty.add(aid)
            elif a.idle_until < math.inf:
                a.wake_at = a.idle_until
                heapq.heappush(wakes, (a.idle_until, aid))
        if self._scanned_epoch != self._epoch:
            epoch = self._epoch
            for aid, a in agents.items():
                if a.idle_epoch != epoch and a.free:
                    dirty.add(aid)
            self._scanned_epoch = epoch
        return {aid for aid in dirty if agents[aid].active and agents[aid].free}

    # --- inspection ---------------------------------------------------------------------

    def free(self, agent_id: str) -> Resources:
        """The agent's resources neither offered nor in use."""
        return self._agent(agent_id).free

    def total(self, agent_id: str) -> Resources:
        return self._agent(agent_id).total

    def allocated(self, framework_id: str) -> dict[str, Resources]:
        """Agent id -> resources the framework holds there (offered or in use), all roles."""
        fw = self._framework(framework_id)
        return {
            aid: Resources.sum(h.resources for h in per_role.values()) for aid, per_role in fw.alloc.items()
        }

    def allocation(self, framework_id: str) -> dict[str, dict[str, Resources]]:
        """Agent id -> role -> resources the framework holds there."""
        fw = self._framework(framework_id)
        return {
            aid: {role: h.resources for role, h in per_role.items()} for aid, per_role in fw.alloc.items()
        }

    def agents(self) -> list[str]:
        return list(self._agents)

    def frameworks(self) -> list[str]:
        return list(self._frameworks)

    def role_order(self) -> list[str]:
        """Roles with a framework able to receive, in DRF order."""
        return self._roles.sort()

    def framework_order(self, role: str) -> list[str]:
        """Frameworks able to receive for `role`, in DRF order."""
        s = self._fsorters.get(role)
        return [] if s is None else s.sort()

    def role_share(self, role: str) -> float:
        """A role's dominant share of the cluster (0.0 if unknown)."""
        return self._roles.share(role) if role in self._roles else 0.0

    def is_filtered(
        self, framework_id: str, agent_id: str, resources: Resources, role: str | None = None
    ) -> bool:
        """Whether a decline filter refuses `resources` on the agent to the framework now."""
        fw = self._framework(framework_id)
        now = self._clock()
        roles = fw.roles if role is None else (role,)
        return any(self._filters.refuses(framework_id, r, agent_id, resources, now) for r in roles)

    # --- internals ----------------------------------------------------------------------

    def _agent(self, agent_id: str) -> _Agent:
        try:
            return self._agents[agent_id]
        except KeyError:
            raise KeyError(f"unknown agent {agent_id!r}") from None

    def _framework(self, framework_id: str) -> _Framework:
        try:
            return self._frameworks[framework_id]
        except KeyError:
            raise KeyError(f"unknown framework {framework_id!r}") from None

    def _clear_filters(self, framework_id: str, roles: Iterable[str] | None) -> None:
        for aid in self._filters.clear(framework_id, roles):
            a = self._agents.get(aid)
            if a is not None:
                a.covered_free = None  # its covered sets may name this framework

    def _touch(self, a: _Agent) -> None:
        """Something may have changed what `a` can be offered: visit it next cycle."""
        a.idle_epoch = -1
        self._dirty.add(a.id)

    def _vec(self, resources: Resources) -> Vector:
        return self._pool.vector(resources.scalars())

    def _min_ok(self, q: Vector) -> bool:
        """Whether quantities `q` hold at least one of the min_allocatable quantities."""
        if not self._min:
            return True
        n = len(q)
        for m in self._min:
            for i, v in m:
                if i >= n or q[i] < v:
                    break
            else:
                return True
        return False

    def _release_orphan(self, a: _Agent, framework_id: str, resources: Resources) -> None:
        """Resources a never-added framework used on `a` are free again."""
        r = a.orphans.get(framework_id)
        if r is None:
            return
        try:
            left = r - resources
        except ValueError:
            raise ValueError(
                f"agent {a.id!r} reported {r} for framework {framework_id!r}, not {resources}"
            ) from None
        if left:
            a.orphans[framework_id] = left
        else:
            del a.orphans[framework_id]
            agents = self._orphaned[framework_id]
            agents.discard(a.id)
            if not agents:
                del self._orphaned[framework_id]
        self._give(a, resources, self._vec(resources))
        self._touch(a)

    def _give(self, a: _Agent, resources: Resources, quantities: Vector) -> None:
        if a.free:
            a.free, a.free_q = a.free + resources, None
        else:
            a.free, a.free_q = resources, quantities

    def _hold(
        self, fw: _Framework, a: _Agent, role: str, resources: Resources, quantities: Vector
    ) -> None:
        """Record that `fw` holds `resources` on `a` for `role` (the agent's free is done)."""
        per_role = fw.alloc.get(a.id)
        if per_role is None:
            fw.alloc[a.id] = {role: _Held(resources, quantities)}
            a.users.add(fw.id)
        else:
            held = per_role.get(role)
            if held is None:
                per_role[role] = _Held(resources, quantities)
            else:
                held.resources = held.resources + resources
                held.quantities = vadd(held.quantities, quantities)
        if role not in fw.tracked:
            self._track(fw, role)
        self._roles.allocated(role, quantities)
        self._fsorters[role].allocated(fw.id, quantities)

    def _track(self, fw: _Framework, role: str) -> None:
        """Make sure `fw` is a client of the role's sorter (and the role of the role sorter)."""
        s = self._fsorters.get(role)
        if s is None:
            s = self._fsorters[role] = Sorter(self._pool)
            self._roles.add(role, weight=self._weights.get(role, 1.0), active=False)
        if role not in fw.tracked:
            s.add(fw.id, active=False)
            fw.tracked.add(role)
        self._sync(fw, role)

    def _untrack(self, fw: _Framework, role: str) -> None:
        s = self._fsorters[role]
        s.remove(fw.id)
        fw.tracked.discard(role)
        if len(s) == 0:
            del self._fsorters[role]
            self._roles.remove(role)
        elif s.active_count() == 0:
            self._roles.deactivate(role)

    def _maybe_untrack(self, fw: _Framework, role: str) -> None:
        """Drop `fw` from a role it left once it holds nothing more there."""
        if role in fw.roles or role not in fw.tracked:
            return
        if any(role in per_role for per_role in fw.alloc.values()):
            return
        self._untrack(fw, role)

    def _sync(self, fw: _Framework, role: str) -> None:
        """Match sorter activation to whether `fw` may receive offers for `role`."""
        if role not in fw.tracked:
            return
        s = self._fsorters[role]
        if fw.eligible(role):
            s.activate(fw.id)
            self._roles.activate(role)
        else:
            s.deactivate(fw.id)
            if s.active_count() == 0:
                self._roles.deactivate(role)

    def _sync_roles(self, fw: _Framework) -> None:
        for role in list(fw.tracked):
            self._sync(fw, role)

    def _roles_of(self, fw: _Framework, roles: Iterable[str]) -> tuple[str, ...]:
        roles = tuple(roles)
        if not roles:
            return fw.roles
        unknown = [r for r in roles if r not in fw.roles]
        if unknown:
            raise ValueError(
                f"framework {fw.id!r} is not subscribed to roles {unknown}; its roles are {list(fw.roles)}"
            )
        return roles

    def _role_for(self, fw: _Framework, resources: Resources, role: str | None) -> str:
        if role is not None:
            return role
        if len(fw.roles) == 1:  # what the rules below give, without looking at reservations
            return fw.roles[0]
        reserved = {r.role for r in resources.reserved()}
        for r in fw.roles:
            if r in reserved:
                return r
        if fw.roles:
            return fw.roles[0]
        return next(iter(sorted(reserved)), "*")

    @staticmethod
    def _holding_role(per_role: dict[str, _Held], resources: Resources) -> str | None:
        if len(per_role) == 1:
            return next(iter(per_role))
        for role in sorted(per_role):
            held = per_role[role].resources
            if held is resources or held.contains(resources):
                return role
        return None


def _split_by_role(
    per_role: dict[str, _Held], resources: Resources, framework_id: str, agent_id: str
) -> list[tuple[str, Resources]]:
    """Split `resources` into parts held for each role (roles in name order; scalars may split)."""
    left = {role: per_role[role].resources for role in sorted(per_role)}
    parts: dict[str, Resources] = {}
    for item in resources:
        need = Resources((item,))
        for role, held in left.items():
            if held.contains(need):
                parts[role] = parts.get(role, _EMPTY) + need
                left[role] = held - need
                need = _EMPTY
                break
        if need and item.type == SCALAR:
            want = item.value
            for role, held in left.items():
                have = sum(h.value for h in held if _same_kind(h, item))
                take = min(want, have)
                if take > 0:
                    piece = Resources((attrs.evolve(item, value=take),))
                    parts[role] = parts.get(role, _EMPTY) + piece
                    left[role] = held - piece
                    want = round(want - take, 3)
                if want <= 0:
                    need = _EMPTY
                    break
        if need:
            raise ValueError(
                f"framework {framework_id!r} does not hold {item} on agent {agent_id!r} "
                f"(it holds {', '.join(f'{r}: {h.resources}' for r, h in sorted(per_role.items()))})"
            )
    return list(parts.items())


def _same_kind(a, b) -> bool:
    """Whether two Resource items differ at most in quantity."""
    return (a.name, a.type, a.role, a.principal, a.labels, a.dynamic, a.extras) == (
        b.name, b.type, b.role, b.principal, b.labels, b.dynamic, b.extras
    )


def _min_quantities(pool: Pool, m: Resources | str) -> list[tuple[int, float]]:
    """A min_allocatable entry as (vector slot, quantity) pairs."""
    r = Resources(m) if isinstance(m, str) else m
    if not isinstance(r, Resources):
        raise ValueError(f"min_allocatable entries must be Resources or text, got {m!r}")
    if any(item.type != SCALAR for item in r):
        raise ValueError(
            f"min_allocatable entry {r} has non-scalar resources; only scalar quantities are supported"
        )
    return [(i, v) for i, v in enumerate(pool.vector(r.scalars())) if v]


def _roles(roles: Iterable[str]) -> tuple[str, ...]:
    if isinstance(roles, str):
        raise ValueError(f"roles must be a collection of role names, got the string {roles!r}")
    return tuple(dict.fromkeys(roles))


def _may_take(role: str, reserved_roles: set[str]) -> bool:
    """Whether reservations to `reserved_roles` are allocatable to `role` (itself or an ancestor)."""
    if role in reserved_roles:
        return True
    while "/" in role:
        role = role.rsplit("/", 1)[0]
        if role in reserved_roles:
            return True
    return False
