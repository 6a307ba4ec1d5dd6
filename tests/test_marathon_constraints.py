"""Placement: constraint operators, attribute formatting, the named checks of the offer
pipeline and the 'why not placed' statistics."""

import random

import pytest

from agora.resources import Resources
from frameworks.marathon import constraints as c
from frameworks.marathon import validation


def offer(hostname="h1", resources="cpus:2;mem:1024;disk:100;ports:[31000-31009]",
          attributes=(), ip="10.0.0.1"):
    return c.Offer.from_mesos({
        "id": {"value": "o-" + hostname}, "agent_id": {"value": "a-" + hostname},
        "hostname": hostname, "url": {"address": {"ip": ip, "port": 5051}},
        "resources": Resources.parse(resources).to_json(), "attributes": list(attributes)})


def text(name, value):
    return {"name": name, "type": "TEXT", "text": {"value": value}}


def app(**extra):
    return validation.normalize_app({"id": "/web", "cmd": "x", "cpus": 0.5, "mem": 100,
                                     **extra})


def place(a, o, placed_fields=(), rng=None):
    request = c.Request.of_app(a)
    return c.place(request, o, c.Pool(o.resources), c.Placed(request.constraints, placed_fields),
                   rng or random.Random(0))


def test_attributes_are_formatted_as_marathon_does():
    """Scalars 0.###, ranges [b-e], sets {a,b} sorted; text as is."""
    assert c.format_scalar(1.0) == "1"
    assert c.format_scalar(1.23456) == "1.235"
    assert c.format_scalar(0.0005) == "0"
    assert c.format_attribute({"type": "RANGES", "ranges": {"range": [
        {"begin": 1, "end": 3}, {"begin": 7, "end": 9}]}}) == "[1-3,7-9]"
    assert c.format_attribute({"type": "SET", "set": {"item": ["b", "a"]}}) == "{a,b}"
    o = offer(attributes=[text("rack", "r1"),
                          {"name": "gen", "type": "SCALAR", "scalar": {"value": 2.5}}])
    assert o.fields == {"rack": "r1", "gen": "2.5", "hostname": "h1", "@hostname": "h1"}


@pytest.mark.parametrize("constraint,value,placed,ok", [
    (["hostname", "UNIQUE"], "h1", {}, True),
    (["hostname", "UNIQUE"], "h1", {"h1": 1}, False),
    (["hostname", "UNIQUE"], "h2", {"h1": 1}, True),
    (["rack", "CLUSTER", "r1"], "r1", {}, True),
    (["rack", "CLUSTER", "r1"], "r2", {}, False),
    (["rack", "CLUSTER"], "r2", {}, True),
    (["rack", "CLUSTER"], "r2", {"r1": 2}, False),
    (["rack", "CLUSTER"], "r1", {"r1": 2}, True),
    (["rack", "LIKE", "r[12]"], "r1", {}, True),
    (["rack", "LIKE", "r[12]"], "r10", {}, False),  # a full match, not a search
    (["rack", "UNLIKE", "r1"], "r2", {}, True),
    (["rack", "UNLIKE", "r1"], None, {}, True),  # a missing field matches only UNLIKE
    (["rack", "LIKE", ".*"], None, {}, False),
    (["rack", "MAX_PER", "2"], "r1", {"r1": 1}, True),
    (["rack", "MAX_PER", "2"], "r1", {"r1": 2}, False),
    (["gen", "IS", "2.50"], "2.5", {}, True),
    (["rack", "IS", "r1"], "r2", {}, False),
    (["rack", "GROUP_BY"], "r3", {"r1": 1, "r2": 1}, True),  # a new group
    (["rack", "GROUP_BY", "2"], "r1", {"r1": 2, "r2": 1}, False),  # not the smallest group
    (["rack", "GROUP_BY", "2"], "r2", {"r1": 2, "r2": 1}, True),
    (["rack", "GROUP_BY", "3"], "r1", {"r1": 1, "r2": 1}, False),  # a third group is due
])
def test_operators(constraint, value, placed, ok):
    """Each operator as Marathon's Constraints.scala decides it."""
    import collections
    assert c.meets(constraint, value, collections.Counter(placed)) is ok


def test_pipeline_names_the_first_check_that_fails():
    """Role, then constraints, then cpus, mem, disk, ports: the first failure is the reason."""
    assert place(app(acceptedResourceRoles=["*"]), offer(
        resources="cpus(web):2;mem(web):1024")).reason == c.ROLE
    unique = app(constraints=[["hostname", "UNIQUE"]], cpus=100)
    assert place(unique, offer(), [{"hostname": "h1"}]).reason == c.CONSTRAINT
    assert place(unique, offer()).reason == c.CPUS
    assert place(app(mem=5000), offer()).reason == c.MEM
    assert place(app(disk=500), offer()).reason == c.DISK
    many = app(portDefinitions=[{"port": 0}] * 11)
    assert place(many, offer()).reason == c.PORTS
    required = app(requirePorts=True, portDefinitions=[{"port": 8080}])
    rejection = place(required, offer())
    assert rejection.reason == c.PORTS and "8080" in rejection.detail


def test_placement_takes_exact_resources_and_distinct_ports():
    """A fit takes cpus/mem and host ports out of the pool, reservations kept as offered."""
    a = app(portDefinitions=[{"port": 0}, {"port": 0}])
    o = offer(resources="cpus(web):0.2;cpus:2;mem:1024;ports:[31000-31003]")
    pool = c.Pool(o.resources)
    request = c.Request.of_app(a)
    placed = c.Placed((), ())
    first = c.place(request, o, pool, placed, random.Random(1))
    cpus = [r for r in first.resources if r["name"] == "cpus"]
    assert sorted((r["role"], r["scalar"]["value"]) for r in cpus) == [("*", 0.3), ("web", 0.2)]
    second = c.place(request, o, pool, placed, random.Random(2))
    ports = first.ports + second.ports
    assert len(set(ports)) == 4 and all(31000 <= p <= 31003 for p in ports)
    assert isinstance(c.place(request, o, pool, placed, random.Random(3)), c.Rejection)
    fixed = c.place(c.Request(0.1, 1, 0, ports=(31005, 0)), offer(), c.Pool(offer().resources),
                    placed, random.Random(0))
    assert fixed.ports[0] == 31005 and fixed.ports[1] != 31005


def test_unique_hostname_spreads_over_offers():
    """With UNIQUE hostname, instances land on distinct hosts and the fourth waits."""
    a = app(constraints=[["hostname", "UNIQUE"]], cpus=0.1, mem=10)
    request = c.Request.of_app(a)
    placed = c.Placed(request.constraints, ())
    hosts = []
    for h in ("h1", "h2", "h3"):
        o = offer(h)
        pool = c.Pool(o.resources)
        while isinstance(c.place(request, o, pool, placed, random.Random(0)), c.Placement):
            placed.add(o.fields)
            hosts.append(h)
    assert hosts == ["h1", "h2", "h3"]


def test_stats_count_each_reason_through_the_funnel():
    """PlacementStats: processed/declined per stage, in funnel order, and the last offers."""
    stats = c.PlacementStats(keep=2)
    o = offer()
    stats.used(1.0)
    stats.rejected(c.Rejection(c.CPUS, "cpus"), o, 2.0)
    stats.rejected(c.Rejection(c.CPUS, "cpus"), o, 3.0)
    stats.rejected(c.Rejection(c.CONSTRAINT, "unique"), o, 4.0)
    assert (stats.processed, stats.unused) == (4, 3)
    funnel = {f["reason"]: f for f in stats.funnel(stats.total, stats.processed)}
    assert funnel[c.ROLE] == {"reason": c.ROLE, "declined": 0, "processed": 4}
    assert funnel[c.CONSTRAINT]["declined"] == 1
    assert funnel[c.CPUS] == {"reason": c.CPUS, "declined": 2, "processed": 3}
    assert funnel[c.MEM]["processed"] == 1
    assert [r.reason for _, r, _ in stats.last] == [c.CPUS, c.CONSTRAINT]
