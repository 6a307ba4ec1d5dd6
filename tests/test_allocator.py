"""Tests for decline filters and the hierarchical DRF allocator (master/allocator/)."""

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agora.resources import Resources
from master.allocator.allocator import Allocator, Offer
from master.allocator.filters import MAX_REFUSE_SECONDS, Filters, refuse_until

R = Resources.parse


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(**kw):
    clock = FakeClock()
    return Allocator(clock=clock, rng=random.Random(7), **kw), clock


def by_framework(offers):
    out = {}
    for o in offers:
        out.setdefault(o.framework_id, []).append(o)
    return out


def held_on(al, agent_id):
    """Everything the frameworks hold on an agent, summed."""
    return Resources.sum(al.allocated(f).get(agent_id, Resources()) for f in al.frameworks())


# --- filters ------------------------------------------------------------------------------


def test_refuse_until_caps_and_ignores_non_positive():
    """refuse_seconds <= 0 or None installs nothing; more than 365 days is capped."""
    assert refuse_until(10.0, None) is None
    assert refuse_until(10.0, 0) is None
    assert refuse_until(10.0, -3) is None
    assert refuse_until(10.0, float("nan")) is None
    assert refuse_until(10.0, 5) == 15.0
    assert refuse_until(10.0, 2**31 - 1) == 10.0 + MAX_REFUSE_SECONDS


def test_filter_refuses_only_what_it_contains_until_it_expires():
    """A filter refuses offers contained in what was declined, until it expires, then is dropped."""
    f = Filters()
    f.add("fw", "*", "ag", R("cpus:2;mem:512"), 10, now=0.0)
    assert f.refuses("fw", "*", "ag", R("cpus:2;mem:512"), now=5.0)
    assert f.refuses("fw", "*", "ag", R("cpus:1"), now=5.0)
    assert not f.refuses("fw", "*", "ag", R("cpus:3;mem:512"), now=5.0)
    assert not f.refuses("fw", "other-role", "ag", R("cpus:1"), now=5.0)
    assert not f.refuses("other-fw", "*", "ag", R("cpus:1"), now=5.0)
    assert not f.refuses("fw", "*", "ag", R("cpus:1"), now=10.0)
    assert f.count() == 0  # the expired filter was dropped when looked at


def test_filters_clear_per_framework_and_role():
    """clear() removes a framework's filters (all roles, or the given ones) and reports the agents."""
    f = Filters()
    f.add("fw", "a", "ag1", R("cpus:1"), 100, now=0.0)
    f.add("fw", "b", "ag2", R("cpus:1"), 100, now=0.0)
    f.add("other", "a", "ag1", R("cpus:1"), 100, now=0.0)
    assert f.clear("fw", ["b"]) == {"ag2"}
    assert f.refuses("fw", "a", "ag1", R("cpus:1"), now=1.0)
    assert f.clear("fw") == {"ag1"}
    assert not f.refuses("fw", "a", "ag1", R("cpus:1"), now=1.0)
    assert f.refuses("other", "a", "ag1", R("cpus:1"), now=1.0)
    f.remove_agent("ag1")
    assert f.count() == 0


# --- DRF order ------------------------------------------------------------------------------


def test_offer_goes_to_lowest_share_framework():
    """A freed agent is offered to the framework with the lowest dominant share."""
    al, _ = make()
    al.add_agent("a1", R("cpus:4;mem:4096"))
    al.add_agent("a2", R("cpus:4;mem:4096"))
    al.add_framework("big", ["*"], used={})
    al.add_framework("small", ["*"])
    al.allocate_used("big", "a1", R("cpus:2;mem:1024"))
    offers = al.allocate(["a2"])
    assert [(o.framework_id, o.agent_id) for o in offers] == [("small", "a2")]
    assert isinstance(offers[0], Offer)


def test_offer_goes_to_lowest_share_role_first():
    """Roles are ordered by DRF first; within the role, frameworks by DRF."""
    al, _ = make(min_allocatable=[])
    al.add_agent("a1", R("cpus:10;mem:10"))
    al.add_agent("a2", R("cpus:1;mem:1"))
    al.add_framework("x1", ["x"])
    al.add_framework("x2", ["x"])
    al.add_framework("y1", ["y"])
    al.allocate_used("x1", "a1", R("cpus:5;mem:5"))  # role x now has share 5/11
    offers = al.allocate(["a2"])
    assert [(o.framework_id, o.role) for o in offers] == [("y1", "y")]
    al.recover("y1", "a2", offers[0].resources)
    al.remove_framework("y1")
    offers = al.allocate(["a2"])
    assert [(o.framework_id, o.role) for o in offers] == [("x2", "x")]  # x2 has the lower share in x


def test_role_weights_scale_shares():
    """A role with weight 2 may hold twice the share before it loses its turn."""
    al, _ = make()
    al.set_weight("heavy", 2.0)
    al.add_agent("a0", R("cpus:30;mem:30720"))
    al.add_agent("a1", R("cpus:1;mem:1024"))
    al.add_framework("h", ["heavy"])
    al.add_framework("l", ["light"])
    al.allocate_used("h", "a0", R("cpus:10;mem:10240"))  # share .32, weighted .16
    al.allocate_used("l", "a0", R("cpus:6;mem:6144"))  # share .19, weighted .19
    assert al.role_order() == ["heavy", "light"]
    assert al.allocate(["a1"])[0].framework_id == "h"
    with pytest.raises(ValueError):
        al.set_weight("heavy", 0)


def test_one_offer_per_agent_holds_all_free_resources():
    """Each framework gets one offer per agent with everything free there; agents spread over frameworks."""
    al, _ = make()
    for i in range(4):
        al.add_agent(f"a{i}", R("cpus:2;mem:1024;ports:[31000-31010]"))
    for f in ("f1", "f2"):
        al.add_framework(f, ["*"])
    offers = al.allocate()
    assert len(offers) == 4
    assert {len(v) for v in by_framework(offers).values()} == {2}
    for o in offers:
        assert o.resources == R("cpus:2;mem:1024;ports:[31000-31010]")
        assert not al.free(o.agent_id)
    assert al.allocate() == []  # nothing left


def test_same_seed_same_offers():
    """With a seeded rng the cycle is deterministic."""
    def run():
        al = Allocator(clock=lambda: 0.0, rng=random.Random(42))
        for i in range(20):
            al.add_agent(f"a{i}", R("cpus:2;mem:1024"))
        for f in range(5):
            al.add_framework(f"f{f}", ["*"])
        return al.allocate(set(al.agents()))
    assert run() == run()


# --- filters in the allocator ----------------------------------------------------------------


def test_declined_resources_are_filtered_until_refuse_seconds_pass():
    """A framework that declined with refuse_seconds is not offered the agent again until they pass."""
    al, clock = make()
    al.add_agent("a1", R("cpus:4;mem:4096"))
    al.add_framework("f", ["*"])
    (offer,) = al.allocate()
    al.recover("f", "a1", offer.resources, refuse_seconds=10)
    assert al.is_filtered("f", "a1", offer.resources)
    assert al.allocate() == []
    clock.advance(9.9)
    assert al.allocate() == []
    clock.advance(0.2)
    assert [o.framework_id for o in al.allocate()] == ["f"]


def test_decline_without_refuse_seconds_installs_no_filter():
    """recover() without refuse_seconds (or 0) lets the framework be offered again right away."""
    al, _ = make()
    al.add_agent("a1", R("cpus:4;mem:4096"))
    al.add_framework("f", ["*"])
    (offer,) = al.allocate()
    al.recover("f", "a1", offer.resources, refuse_seconds=0)
    assert [o.framework_id for o in al.allocate()] == ["f"]


def test_filtered_framework_lets_the_next_one_have_the_agent():
    """The agent goes to the next framework in DRF order when the first one filters it."""
    al, _ = make()
    al.add_agent("a1", R("cpus:4;mem:4096"))
    al.add_framework("f1", ["*"])
    al.add_framework("f2", ["*"])
    (offer,) = al.allocate()
    first = offer.framework_id
    al.recover(first, "a1", offer.resources, refuse_seconds=3600)
    (offer,) = al.allocate()
    assert offer.framework_id != first


def test_filter_does_not_refuse_more_than_was_declined():
    """As Mesos's RefusedOfferFilter: once the agent has more free than was declined, it is offered."""
    al, _ = make()
    al.add_agent("a1", R("cpus:4;mem:4096"))
    al.add_framework("f", ["*"])
    al.add_framework("g", ["*"], active=False)
    (offer,) = al.allocate()
    part = R("cpus:2;mem:2048")
    al.recover("f", "a1", offer.resources - part, refuse_seconds=3600)  # declines half, keeps half
    assert al.allocate() == []
    al.recover("f", "a1", part)  # e.g. its task finished: now cpus:4 free, more than declined
    (again,) = al.allocate()
    assert again.framework_id == "f" and again.resources == R("cpus:4;mem:4096")


def test_filter_is_capped_at_365_days():
    """refuse_seconds beyond 365 days expires after 365 days."""
    al, clock = make()
    al.add_agent("a1", R("cpus:4;mem:4096"))
    al.add_framework("f", ["*"])
    (offer,) = al.allocate()
    al.recover("f", "a1", offer.resources, refuse_seconds=10**12)
    clock.advance(MAX_REFUSE_SECONDS - 1)
    assert al.allocate() == []
    clock.advance(2)
    assert len(al.allocate()) == 1


def test_revive_clears_filters():
    """REVIVE removes the framework's filters so it is offered the agent at once."""
    al, _ = make()
    al.add_agent("a1", R("cpus:4;mem:4096"))
    al.add_framework("f", ["*"])
    (offer,) = al.allocate()
    al.recover("f", "a1", offer.resources, refuse_seconds=3600)
    assert al.allocate() == []
    al.revive("f")
    assert "a1" in al.pending_agents()
    assert [o.framework_id for o in al.allocate(al.pending_agents())] == ["f"]


# --- suppress, activation, reservations, minimum ---------------------------------------------


def test_suppress_stops_offers_per_role_and_revive_resumes():
    """A framework suppressed for one role still gets offers for its other roles; revive resumes."""
    al, _ = make()
    al.add_agent("a1", R("cpus:4;mem:4096"))
    al.add_framework("f", ["r1", "r2"])
    al.suppress("f", ["r1"])
    (offer,) = al.allocate()
    assert offer.role == "r2"
    al.recover("f", "a1", offer.resources)
    al.suppress("f")
    assert al.allocate() == []
    al.revive("f", ["r1"])
    (offer,) = al.allocate()
    assert offer.role == "r1"
    with pytest.raises(ValueError):
        al.suppress("f", ["not-my-role"])


def test_framework_added_suppressed_gets_nothing():
    """suppressed_roles at add_framework are honoured."""
    al, _ = make()
    al.add_agent("a1", R("cpus:4;mem:4096"))
    al.add_framework("f", ["*"], suppressed_roles=["*"])
    assert al.allocate() == []


def test_reserved_resources_go_only_to_their_role():
    """Resources reserved to a role are offered only to that role; unreserved ones to anyone."""
    al, _ = make()
    al.add_agent("a1", R("cpus(ads):4;mem(ads):4096"))
    al.add_framework("other", ["web"])
    assert al.allocate() == []
    al.add_framework("ads-fw", ["ads"])
    (offer,) = al.allocate(al.pending_agents())
    assert (offer.framework_id, offer.role) == ("ads-fw", "ads")
    assert offer.resources == R("cpus(ads):4;mem(ads):4096")


def test_mixed_agent_offers_reservations_with_the_unreserved_part():
    """On an agent with reserved and unreserved resources, the role's offer holds both; other roles get the rest."""
    al, _ = make()
    al.add_agent("a1", R("cpus:2;mem:2048;cpus(ads):4;mem(ads):1024"))
    al.add_framework("web-fw", ["web"])
    al.add_framework("ads-fw", ["ads"])
    offers = {o.role: o for o in al.allocate()}
    # Both roles start at share 0; "ads" sorts first by name and takes all it may.
    assert offers["ads"].resources == R("cpus:2;mem:2048;cpus(ads):4;mem(ads):1024")
    assert "web" not in offers
    al.recover("ads-fw", "a1", R("cpus:2;mem:2048"))  # gives back the unreserved part
    (offer,) = al.allocate(al.pending_agents())
    assert (offer.role, offer.resources) == ("web", R("cpus:2;mem:2048"))


def test_min_allocatable_resources():
    """An agent with less free than any min_allocatable quantity is not offered."""
    al, _ = make()
    al.add_agent("tiny", R("mem:16;disk:100"))
    al.add_agent("cpu-only", R("cpus:0.01"))
    al.add_framework("f", ["*"])
    assert [o.agent_id for o in al.allocate()] == ["cpu-only"]

    al2, _ = make(min_allocatable=[R("cpus:1;mem:256")])
    al2.add_agent("small", R("cpus:1;mem:128"))
    al2.add_agent("ok", R("cpus:1;mem:256"))
    al2.add_framework("f", ["*"])
    assert [o.agent_id for o in al2.allocate()] == ["ok"]

    with pytest.raises(ValueError):
        make(min_allocatable=[R("ports:[1-2]")])


def test_deactivated_framework_gets_nothing():
    """A deactivated (disconnected) framework is not offered anything until activated."""
    al, _ = make()
    al.add_agent("a1", R("cpus:4;mem:4096"))
    al.add_framework("f", ["*"], active=False)
    assert al.allocate() == []
    al.activate_framework("f")
    assert len(al.allocate(al.pending_agents())) == 1
    al.add_agent("a2", R("cpus:4;mem:4096"))
    al.deactivate_framework("f")
    assert al.allocate() == []


def test_deactivated_agent_is_not_offered():
    """An inactive agent's resources are not offered; activation puts it back."""
    al, _ = make()
    al.add_agent("a1", R("cpus:4;mem:4096"))
    al.add_framework("f", ["*"])
    al.deactivate_agent("a1")
    assert al.allocate() == []
    al.activate_agent("a1")
    assert al.pending_agents() == {"a1"}
    assert len(al.allocate(al.pending_agents())) == 1


# --- framework and agent lifecycle -------------------------------------------------------------


def test_remove_framework_returns_its_resources():
    """Removing a framework frees what it held; another framework is then offered it."""
    al, _ = make()
    al.add_agent("a1", R("cpus:4;mem:4096"))
    al.add_framework("f", ["*"])
    (offer,) = al.allocate()
    al.add_framework("g", ["*"])
    assert al.allocate() == []
    al.remove_framework("f")
    assert al.free("a1") == R("cpus:4;mem:4096")
    assert al.pending_agents() == {"a1"}
    (offer,) = al.allocate(al.pending_agents())
    assert offer.framework_id == "g"
    al.recover("f", "a1", R("cpus:1"))  # a late recover for a removed framework is harmless


def test_recover_more_than_held_is_rejected_and_changes_nothing():
    """recover() of resources the framework does not hold raises ValueError and leaves state intact."""
    al, _ = make()
    al.add_agent("a1", R("cpus:4;mem:4096"))
    al.add_framework("f", ["*"])
    (offer,) = al.allocate()
    with pytest.raises(ValueError):
        al.recover("f", "a1", R("cpus:5"))
    assert al.allocated("f") == {"a1": offer.resources}
    assert not al.free("a1")


def test_agent_reregistering_before_its_framework():
    """Used resources of a framework not yet added are not free, and are adopted when it subscribes."""
    al, _ = make()
    al.add_agent("a1", R("cpus:4;mem:4096"), used={"late": R("cpus:3;mem:1024")})
    assert al.free("a1") == R("cpus:1;mem:3072")
    al.add_framework("late", ["*"], used={"a1": R("cpus:3;mem:1024")})
    assert al.allocated("late") == {"a1": R("cpus:3;mem:1024")}
    assert al.free("a1") == R("cpus:1;mem:3072")
    assert al.role_share("*") == pytest.approx(0.75)


def test_orphaned_resources_come_back_when_recovered():
    """Tasks of a framework that never came back return to the pool on recover or remove_framework."""
    al, _ = make()
    al.add_agent("a1", R("cpus:4;mem:4096"), used={"gone": R("cpus:3;mem:1024")})
    al.recover("gone", "a1", R("cpus:1;mem:512"))
    assert al.free("a1") == R("cpus:2;mem:3584")
    al.remove_framework("gone")
    assert al.free("a1") == R("cpus:4;mem:4096")


def test_add_agent_with_used_counts_towards_the_framework_share():
    """Used resources reported at agent registration count in the framework's DRF share."""
    al, _ = make()
    al.add_framework("busy", ["*"])
    al.add_framework("idle", ["*"])
    al.add_agent("a1", R("cpus:4;mem:4096"), used={"busy": R("cpus:2;mem:2048")})
    (offer,) = al.allocate()
    assert offer.framework_id == "idle" and offer.resources == R("cpus:2;mem:2048")


def test_remove_and_update_agent():
    """Removing an agent drops its holdings; changing its total keeps what is in use."""
    al, _ = make()
    al.add_agent("a1", R("cpus:4;mem:4096"))
    al.add_agent("a2", R("cpus:4;mem:4096"))
    al.add_framework("f", ["*"])
    al.allocate_used("f", "a1", R("cpus:1;mem:1024"))
    al.update_agent_total("a1", R("cpus:8;mem:4096"))
    assert al.free("a1") == R("cpus:7;mem:3072")
    with pytest.raises(ValueError):
        al.update_agent_total("a1", R("cpus:0.5;mem:4096"))
    al.remove_agent("a1")
    assert al.allocated("f") == {}
    assert al.agents() == ["a2"]
    with pytest.raises(ValueError):
        al.add_agent("a2", R("cpus:1"))


def test_multi_role_recover_splits_by_role():
    """Leftovers of two offers for different roles, recovered together, go back to each role."""
    al, _ = make()
    al.add_agent("a1", R("cpus:2;mem:2048;cpus(b):2;mem(b):1024"))
    al.add_framework("f", ["a", "b"])
    offers = al.allocate()
    assert {o.role for o in offers} == {"a", "b"} or len(offers) == 1
    total = Resources.sum(o.resources for o in offers)
    al.recover("f", "a1", total)
    assert al.free("a1") == R("cpus:2;mem:2048;cpus(b):2;mem(b):1024")
    assert al.allocated("f") == {}


def test_update_framework_roles():
    """A framework that joins a role is offered for it; one that leaves a role is not."""
    al, _ = make()
    al.add_agent("a1", R("cpus(new):4;mem(new):4096"))
    al.add_framework("f", ["old"])
    assert al.allocate() == []
    al.update_framework_roles("f", ["new"])
    (offer,) = al.allocate(al.pending_agents())
    assert offer.role == "new"
    al.recover("f", "a1", offer.resources)
    al.update_framework_roles("f", ["old"])
    assert al.allocate() == []
    assert al.framework_order("new") == []


# --- incremental cycles -------------------------------------------------------------------------


def test_incremental_cycles_visit_only_changed_agents():
    """After a cycle only agents whose free resources grew (or whose filters expired) are pending."""
    al, clock = make()
    for i in range(10):
        al.add_agent(f"a{i}", R("cpus:4;mem:4096"))
    al.add_framework("f", ["*"])
    assert al.pending_agents() == {f"a{i}" for i in range(10)}
    offers = al.allocate(al.pending_agents())
    assert len(offers) == 10
    assert al.pending_agents() == set()

    declined = [o for o in offers if o.agent_id in ("a3", "a7")]
    for o in declined:
        al.recover("f", o.agent_id, o.resources, refuse_seconds=5)
    assert al.pending_agents() == {"a3", "a7"}
    assert al.allocate(al.pending_agents()) == []
    assert al.last_cycle["visited"] == 2
    assert al.pending_agents() == set()

    # A full cycle skips idle agents without looking at them again.
    assert al.allocate() == []
    assert al.last_cycle == {"visited": 0, "skipped": 10, "offers": 0}

    clock.advance(5)
    assert al.pending_agents() == {"a3", "a7"}  # their filters expired
    assert len(al.allocate(al.pending_agents())) == 2

    al.add_framework("g", ["*"])  # a new framework may take what others did not
    assert al.pending_agents() == set()  # ... but nothing is free now
    al.recover("f", "a1", R("cpus:1"))
    assert al.pending_agents() == {"a1"}
    (offer,) = al.allocate(al.pending_agents())
    assert offer.framework_id == "g" and offer.resources == R("cpus:1")


def test_new_framework_makes_idle_agents_pending():
    """Agents that no framework wanted become pending when a framework arrives or revives."""
    al, _ = make()
    for i in range(3):
        al.add_agent(f"a{i}", R("cpus:4;mem:4096"))
    al.add_framework("f", ["*"])
    for o in al.allocate():
        al.recover("f", o.agent_id, o.resources, refuse_seconds=100)
    assert al.allocate(al.pending_agents()) == []
    assert al.pending_agents() == set()
    al.add_framework("g", ["*"])
    assert al.pending_agents() == {"a0", "a1", "a2"}
    assert {o.framework_id for o in al.allocate(al.pending_agents())} == {"g"}


# --- invariants under random operations ----------------------------------------------------------

_agents = [f"a{i}" for i in range(4)]
_fws = ["f0", "f1", "f2"]
_totals = [
    R("cpus:4;mem:4096;ports:[31000-31009]"),
    R("cpus:2;mem:1024;cpus(r1):2;mem(r1):512"),
    R("cpus:8;mem:512;disk:100"),
    R("cpus(r2):1;mem(r2):64;mem:32"),
]

_op = st.one_of(
    st.tuples(st.just("allocate"), st.sets(st.sampled_from(_agents)) | st.none()),
    st.tuples(st.just("decline"), st.integers(0, 50), st.sampled_from([None, 0, 5, 50])),
    st.tuples(st.just("use"), st.integers(0, 50)),  # a framework launches on part of an offer
    st.tuples(st.just("finish"), st.integers(0, 50)),
    st.tuples(st.just("advance"), st.sampled_from([1, 10, 60])),
    st.tuples(st.sampled_from(["suppress", "revive", "activate", "deactivate", "remove", "add"]), st.sampled_from(_fws)),
    st.tuples(st.sampled_from(["agent_off", "agent_on", "agent_remove", "agent_add"]), st.integers(0, 3)),
)


@settings(max_examples=120, deadline=None)
@given(st.lists(_op, max_size=40), st.integers(0, 2**16))
def test_invariants_under_random_operations(ops, seed):
    """Offers never exceed an agent's free resources nor repeat; free + held == total on every agent."""
    clock = FakeClock()
    al = Allocator(clock=clock, rng=random.Random(seed))
    roles = {"f0": ["*"], "f1": ["r1", "*"], "f2": ["r2"]}
    for f in _fws:
        al.add_framework(f, roles[f])
    for i, a in enumerate(_agents):
        al.add_agent(a, _totals[i])
    outstanding: list[Offer] = []  # offers not yet answered
    in_use: list[tuple[str, str, Resources]] = []  # (framework, agent, resources) launched

    def check():
        for i, a in enumerate(al.agents()):
            total = al.total(a)
            assert al.free(a) + held_on(al, a) == total

    for op in ops:
        kind = op[0]
        if kind == "allocate":
            ids = None if op[1] is None else op[1]
            free_before = {a: al.free(a) for a in al.agents()}
            offers = al.allocate(ids)
            seen = set()
            for o in offers:
                assert (o.framework_id, o.agent_id, o.role) not in seen
                seen.add((o.framework_id, o.agent_id, o.role))
                assert o.resources
                assert free_before[o.agent_id].contains(o.resources)
                free_before[o.agent_id] = free_before[o.agent_id] - o.resources  # disjoint offers
                assert o.resources.allocatable_to(o.role) == o.resources
            outstanding.extend(offers)
        elif kind in ("decline", "use") and not outstanding or kind == "finish" and not in_use:
            pass
        elif kind == "decline":
            o = outstanding.pop(op[1] % len(outstanding))
            if o.framework_id in al.frameworks() and o.agent_id in al.agents():
                al.recover(o.framework_id, o.agent_id, o.resources, refuse_seconds=op[2], role=o.role)
        elif kind == "use":
            o = outstanding.pop(op[1] % len(outstanding))
            if o.framework_id in al.frameworks() and o.agent_id in al.agents():
                cpus = o.resources.filter(lambda r: r.name == "cpus" and r.role == "*")
                rest = o.resources - cpus
                if rest:
                    al.recover(o.framework_id, o.agent_id, rest, role=o.role)
                if cpus:
                    in_use.append((o.framework_id, o.agent_id, cpus))
        elif kind == "finish":
            f, a, r = in_use.pop(op[1] % len(in_use))
            if f in al.frameworks() and a in al.agents():
                al.recover(f, a, r)
        elif kind == "advance":
            clock.advance(op[1])
        elif kind in ("suppress", "revive", "activate", "deactivate", "remove", "add"):
            f = op[1]
            known = f in al.frameworks()
            if kind == "add" and not known:
                al.add_framework(f, roles[f])
            elif kind == "remove" and known:
                al.remove_framework(f)
                outstanding[:] = [o for o in outstanding if o.framework_id != f]
                in_use[:] = [u for u in in_use if u[0] != f]
            elif known and kind != "add":
                getattr(al, {"suppress": "suppress", "revive": "revive",
                             "activate": "activate_framework", "deactivate": "deactivate_framework"}[kind])(f)
        else:
            a = _agents[op[1]]
            known = a in al.agents()
            if kind == "agent_add" and not known:
                al.add_agent(a, _totals[op[1]])
            elif kind == "agent_remove" and known:
                al.remove_agent(a)
                outstanding[:] = [o for o in outstanding if o.agent_id != a]
                in_use[:] = [u for u in in_use if u[1] != a]
            elif kind == "agent_off" and known:
                al.deactivate_agent(a)
            elif kind == "agent_on" and known:
                al.activate_agent(a)
        check()

    # Whatever is pending, a cycle over just those agents offers what a full cycle would.
    pending = al.pending_agents()
    offers = al.allocate(pending)
    assert {o.agent_id for o in offers} <= pending
    assert al.allocate() == []


def test_pending_agents_cover_everything_a_full_cycle_would_offer():
    """An incremental cycle over pending_agents() misses nothing a full cycle would find."""
    rng = random.Random(3)
    for trial in range(30):
        clock = FakeClock()
        al = Allocator(clock=clock, rng=random.Random(trial))
        for i in range(8):
            al.add_agent(f"a{i}", R("cpus:2;mem:1024"))
        for f in range(3):
            al.add_framework(f"f{f}", ["*"])
        offers = al.allocate(al.pending_agents())
        for _ in range(6):
            for o in offers:
                refuse = rng.choice([None, 1, 3, math.inf])
                al.recover(o.framework_id, o.agent_id, o.resources, refuse_seconds=refuse)
            clock.advance(rng.choice([0, 1, 2]))
            if rng.random() < 0.3:
                al.revive(f"f{rng.randrange(3)}")
            offers = al.allocate(al.pending_agents())
            assert al.allocate() == []  # nothing was missed


def test_frameworks_that_refused_stay_skipped_until_revive_or_expiry():
    """Frameworks whose filters refuse an agent are skipped cycle after cycle; revive or expiry lets them back."""
    al, clock = make()
    al.add_agent("a1", R("cpus:4;mem:4096"))
    for f in ("f", "g", "h"):
        al.add_framework(f, ["*"])
    seen = []
    for _ in range(3):
        (offer,) = al.allocate()
        seen.append(offer.framework_id)
        al.recover(offer.framework_id, "a1", offer.resources, refuse_seconds=100 + len(seen))
    assert sorted(seen) == ["f", "g", "h"]
    assert al.allocate() == []
    al.revive(seen[1])
    assert [o.framework_id for o in al.allocate(al.pending_agents())] == [seen[1]]
    al.recover(seen[1], "a1", al.allocated(seen[1])["a1"])  # no filter this time
    clock.advance(101)  # seen[0]'s filter (100 + 1 s) has expired; seen[2]'s has not
    # seen[0] and seen[1] may both take it now; equal shares, so the lower allocation count wins.
    assert [o.framework_id for o in al.allocate(al.pending_agents())] == [seen[0]]


def test_deactivate_framework_drops_its_filters():
    """As in Mesos, a framework that disconnects loses its decline filters."""
    al, _ = make()
    al.add_agent("a1", R("cpus:4;mem:4096"))
    al.add_framework("f", ["*"])
    (offer,) = al.allocate()
    al.recover("f", "a1", offer.resources, refuse_seconds=1000)
    al.deactivate_framework("f")
    al.activate_framework("f")
    assert [o.framework_id for o in al.allocate(al.pending_agents())] == ["f"]


def test_new_resource_names_extend_quantity_vectors():
    """A resource name first seen late (e.g. gpus) gets a slot without disturbing earlier quantities."""
    al, _ = make()
    al.add_framework("f", ["*"])
    al.add_agent("a1", R("cpus:4;mem:4096"))
    (o1,) = al.allocate()
    al.add_agent("a2", R("cpus:1;mem:1024;gpus:2"))
    (o2,) = al.allocate()
    al.recover("f", "a1", o1.resources)
    al.recover("f", "a2", R("gpus:1"))
    assert al.free("a2") == R("gpus:1")
    assert al.role_share("*") == pytest.approx(max(1 / 5, 1024 / 5120, 1 / 2))
