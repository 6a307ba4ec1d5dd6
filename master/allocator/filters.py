"""Decline filters: a framework that declined resources on an agent is not offered them again.

When a framework declines (or otherwise returns) an offer with ``refuse_seconds`` > 0, a
`Filter` for (framework, role, agent) holds the declined resources until ``now +
refuse_seconds`` (capped at 365 days, as Mesos caps it). Like Mesos's `RefusedOfferFilter`,
a filter refuses only offers *contained in* what was declined: if the agent later has more
to give (a task finished, another framework declined too), the framework sees the bigger
offer at once instead of waiting out its filter. A filter never refuses after it expires;
expired filters are dropped lazily when they are next looked at. REVIVE clears a
framework's filters (`clear`).

Pure: time is an argument.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from agora.resources import Resources

__all__ = ["MAX_REFUSE_SECONDS", "Filter", "Filters", "refuse_until"]

#: Mesos caps refuse_seconds at 365 days (hierarchical.cpp, recoverResources).
MAX_REFUSE_SECONDS = 365 * 24 * 3600.0


class Filter:
    """Declined `resources`, refused until time `expires`."""

    __slots__ = ("resources", "expires")

    def __init__(self, resources: Resources, expires: float):
        self.resources = resources
        self.expires = expires

    def refuses(self, offered: Resources, now: float) -> bool:
        """Whether this filter refuses `offered` at time `now`."""
        if now >= self.expires:
            return False
        r = self.resources
        return r is offered or r.contains(offered)

    def __repr__(self) -> str:
        return f"Filter({self.resources}, expires={self.expires})"


def refuse_until(now: float, refuse_seconds: float | None) -> float | None:
    """When a filter for `refuse_seconds` ends, or None if there should be no filter.

    None, zero, negative or NaN means no filter (the master applies Mesos's default of 5 s
    when a DECLINE carries no `filters.refuse_seconds`); more than 365 days is capped.
    """
    if refuse_seconds is None or not refuse_seconds > 0:
        return None
    return now + min(float(refuse_seconds), MAX_REFUSE_SECONDS)


class Filters:
    """All decline filters, indexed by agent (for the allocation loop) and by framework.

    ``on_agent(agent, role)`` returns the live ``{framework: [Filter, ...]}`` map the
    allocation loop probes with one dict lookup per framework; most frameworks have no
    filter on a given agent, so that lookup is all they cost.
    """

    def __init__(self) -> None:
        # agent -> role -> framework -> filters
        self._by_agent: dict[str, dict[str, dict[str, list[Filter]]]] = {}
        # framework -> agents it has filters on
        self._by_framework: dict[str, set[str]] = {}

    def add(
        self,
        framework: str,
        role: str,
        agent: str,
        resources: Resources,
        refuse_seconds: float | None,
        now: float,
    ) -> Filter | None:
        """Install a filter (None if `refuse_seconds` asks for none; see `refuse_until`)."""
        expires = refuse_until(now, refuse_seconds)
        if expires is None or not resources:
            return None
        f = Filter(resources, expires)
        by_fw = self._by_agent.setdefault(agent, {}).setdefault(role, {})
        existing = by_fw.get(framework)
        if existing is None:
            by_fw[framework] = [f]
        else:
            # Drop what has expired or is covered by the new filter for at least as long.
            keep = [
                g for g in existing
                if g.expires > now and not (g.expires <= expires and resources.contains(g.resources))
            ]
            keep.append(f)
            by_fw[framework] = keep
        self._by_framework.setdefault(framework, set()).add(agent)
        return f

    def on_agent(self, agent: str, role: str) -> dict[str, list[Filter]] | None:
        """Live map framework -> filters for (agent, role), or None. Do not modify it."""
        roles = self._by_agent.get(agent)
        return None if roles is None else roles.get(role)

    def refusal(
        self, framework: str, role: str, agent: str, offered: Resources, now: float
    ) -> float | None:
        """Until when `framework` refuses `offered` on `agent` for `role`, or None if it does not.

        Drops the expired filters it meets.
        """
        by_fw = self.on_agent(agent, role)
        if by_fw is None:
            return None
        found = by_fw.get(framework)
        if found is None:
            return None
        return self.check(framework, role, agent, found, offered, now)

    def check(
        self,
        framework: str,
        role: str,
        agent: str,
        found: list[Filter],
        offered: Resources,
        now: float,
    ) -> float | None:
        """`refusal` for filters already looked up with `on_agent` (the allocator's fast path)."""
        until = None
        expired = False
        for f in found:
            if now >= f.expires:
                expired = True
            elif f.resources is offered or f.resources.contains(offered):
                if until is None or f.expires > until:
                    until = f.expires
        if expired:
            live = [f for f in found if now < f.expires]
            if live:
                found[:] = live
            else:
                self._drop(framework, role, agent)
        return until

    def refuses(self, framework: str, role: str, agent: str, offered: Resources, now: float) -> bool:
        """Whether `framework` refuses `offered` on `agent` for `role` at `now`."""
        return self.refusal(framework, role, agent, offered, now) is not None

    def next_expiry(self, agent: str) -> float:
        """The earliest time a filter on `agent` expires (inf if none)."""
        roles = self._by_agent.get(agent, {})
        return min(
            (f.expires for by_fw in roles.values() for fs in by_fw.values() for f in fs),
            default=math.inf,
        )

    def clear(self, framework: str, roles: Iterable[str] | None = None) -> set[str]:
        """Remove the framework's filters (for `roles`, or all); return the agents affected."""
        agents = self._by_framework.get(framework)
        if not agents:
            return set()
        wanted = None if roles is None else set(roles)
        affected = set()
        for agent in list(agents):
            by_role = self._by_agent.get(agent, {})
            for role in list(by_role) if wanted is None else wanted & by_role.keys():
                if framework in by_role[role]:
                    self._drop(framework, role, agent)
                    affected.add(agent)
        return affected

    def remove_agent(self, agent: str) -> None:
        """Forget every filter on `agent`."""
        roles = self._by_agent.pop(agent, None)
        if not roles:
            return
        for by_fw in roles.values():
            for framework in by_fw:
                fws = self._by_framework.get(framework)
                if fws is not None:
                    fws.discard(agent)
                    if not fws:
                        del self._by_framework[framework]

    def count(self, now: float | None = None) -> int:
        """How many filters there are (live at `now`, if given)."""
        return sum(
            1
            for roles in self._by_agent.values()
            for by_fw in roles.values()
            for fs in by_fw.values()
            for f in fs
            if now is None or now < f.expires
        )

    def _drop(self, framework: str, role: str, agent: str) -> None:
        roles = self._by_agent[agent]
        by_fw = roles[role]
        del by_fw[framework]
        if not by_fw:
            del roles[role]
        if not any(framework in fw for fw in roles.values()):
            fws = self._by_framework[framework]
            fws.discard(agent)
            if not fws:
                del self._by_framework[framework]
        if not roles:
            del self._by_agent[agent]
