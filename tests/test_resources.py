"""Tests for agora.resources: parsing, Mesos JSON, arithmetic, roles and reservations."""

import json
import subprocess
import sys

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agora.resources import (
    DEFAULT_AGENT_RESOURCE_NAMES,
    RANGES,
    SCALAR,
    SET,
    Resource,
    Resources,
    validate_role,
)

P = Resources.parse


# --- text parsing ----------------------------------------------------------------------


def test_parse_agent_resources_text():
    """The Mesos agent --resources syntax gives scalars, ranges and sets."""
    r = P("cpus:4;mem:2048;disk:1000;ports:[31000-32000,33000-33010];gpus:1;zones:{a,b}")
    assert r.scalars() == {"cpus": 4.0, "mem": 2048.0, "disk": 1000.0, "gpus": 1.0}
    assert r.ranges("ports") == ((31000, 32000), (33000, 33010))
    assert r.set_items("zones") == frozenset({"a", "b"})
    assert len(r) == 6
    assert all(x.role == "*" and not x.reserved for x in r)


def test_parse_static_reservation_and_default_role():
    """'cpus(ads):8' reserves statically; items without a role get default_role."""
    r = P("cpus(ads):8;mem:512", default_role="web")
    assert {(x.name, x.role, x.dynamic) for x in r} == {("cpus", "ads", False), ("mem", "web", False)}
    assert P("cpus(*):1", default_role="web").unreserved() == P("cpus:1")


def test_parse_tolerates_whitespace_repeats_and_trailing_separator():
    """Whitespace is ignored, repeated items add up, empty items are skipped."""
    r = P(" cpus : 1 ; cpus:0.5;; ports:[ 1-3 , 10 ] ; zones:{ a , b };")
    assert r == P("cpus:1.5;ports:[1-3,10-10];zones:{a,b}")
    assert P("") == Resources() and P("  ;  ") == Resources()


def test_parse_json_list_text():
    """Text starting with '[' is a JSON list of Mesos Resources, honouring default_role."""
    text = '[{"name":"cpus","type":"SCALAR","scalar":{"value":2}}, {"name":"mem","type":"SCALAR","scalar":{"value":64},"role":"*"}]'
    r = P(text, default_role="ads")
    assert r == P("cpus(ads):2;mem:64")


@pytest.mark.parametrize(
    "text, message",
    [
        ("cpus:abc", "'abc' is not a number"),
        ("cpus", "missing ':'"),
        ("cpus:", "missing value"),
        (":4", "missing name"),
        ("cpus:-1", "negative"),
        ("cpus:nan", "not a finite number"),
        ("ports:[5-3]", "begin > end; write it as 3-5"),
        ("ports:[a-b]", "non-negative integers"),
        ("ports:[1-3", "must end with ']'"),
        ("zones:{a,b", "must end with '}'"),
        ("cpus(ads:1", "'(' without ')'"),
        ("cpus(ads)4", "expected ':'"),
        ("cpus(-x):1", "starting with '-'"),
        ("cpus(a//b):1", "empty component"),
        ("cpus(ads,bogus):1", "unknown reservation attribute 'bogus'"),
        ("cpus(*,principal=p):1", "needs a role other than '*'"),
        ('[{"name": "cpus"', "look like JSON but do not parse"),
    ],
)
def test_parse_rejects_bad_text_with_a_helpful_message(text, message):
    """Bad --resources text raises ValueError saying what is wrong and how to write it."""
    with pytest.raises(ValueError) as e:
        P(text)
    assert message in str(e.value)
    assert "cpus:4" in str(e.value)  # the syntax hint


def test_parse_rejects_non_text():
    """parse() needs a string."""
    with pytest.raises(ValueError, match="expected resources as text"):
        P(42)


# --- Mesos JSON ------------------------------------------------------------------------


def test_from_json_accepts_pymesos_style_items():
    """Ints and numeric strings work for numbers; unknown keys and allocation_info are ignored."""
    r = Resources.from_json(
        [
            {"name": "cpus", "type": "SCALAR", "scalar": {"value": 32}},
            {"name": "mem", "type": "SCALAR", "scalar": {"value": "128.5"}, "bogus": 1, "allocation_info": {"role": "x"}},
            {"name": "ports", "type": "RANGES", "ranges": {"range": [{"begin": "4", "end": 5.0}, {"begin": 1, "end": 3}]}},
            {"name": "zones", "type": "SET", "set": {"item": ["b", "a", "a"]}, "role": "*"},
        ]
    )
    assert r == P("cpus:32;mem:128.5;ports:[1-5];zones:{a,b}")


def test_from_json_infers_a_missing_type_from_the_value_field():
    """A Resource without 'type' but with exactly one value field is accepted."""
    assert Resources.from_json([{"name": "cpus", "scalar": {"value": 1}}]) == P("cpus:1")


def test_from_json_pre_and_post_refinement_reservations():
    """'role'+'reservation' and a one-element 'reservations' give the same dynamic reservation."""
    labels = {"labels": [{"key": "b", "value": "2"}, {"key": "a", "value": "1"}]}
    pre = Resources.from_json(
        [{"name": "cpus", "type": "SCALAR", "scalar": {"value": 1}, "role": "ads", "reservation": {"principal": "ops", "labels": labels}}]
    )
    post = Resources.from_json(
        [{"name": "cpus", "type": "SCALAR", "scalar": {"value": 1}, "reservations": [{"type": "DYNAMIC", "role": "ads", "principal": "ops", "labels": labels}]}]
    )
    assert pre == post
    (res,) = pre
    assert (res.role, res.principal, res.labels, res.dynamic) == ("ads", "ops", (("a", "1"), ("b", "2")), True)
    static = Resources.from_json([{"name": "cpus", "type": "SCALAR", "scalar": {"value": 1}, "reservations": [{"type": "STATIC", "role": "ads"}]}])
    assert static == P("cpus(ads):1")


def test_from_json_keeps_extras_apart_and_round_trips_them():
    """Persistent volumes and revocable resources stay distinct from plain disk and cpus."""
    items = [
        {"name": "disk", "type": "SCALAR", "scalar": {"value": 10}, "role": "ads", "reservation": {"principal": "p"}, "disk": {"persistence": {"id": "v1", "principal": "p"}, "volume": {"mode": "RW", "container_path": "data"}}},
        {"name": "disk", "type": "SCALAR", "scalar": {"value": 10}, "role": "ads", "reservation": {"principal": "p"}},
        {"name": "cpus", "type": "SCALAR", "scalar": {"value": 1}, "revocable": {}},
    ]
    r = Resources.from_json(items)
    assert len(r) == 3
    assert Resources.from_json(r.to_json()) == r
    assert P(str(r)) == r
    vol = next(x for x in r if x.name == "disk" and x.extras)
    assert vol.to_json()["disk"]["persistence"]["id"] == "v1"


@pytest.mark.parametrize(
    "item, message",
    [
        ({"type": "SCALAR", "scalar": {"value": 1}}, "non-empty 'name'"),
        ({"name": "cpus", "type": "SCALAR", "scalar": {"value": -1}}, "negative"),
        ({"name": "cpus", "type": "SCALAR", "scalar": {"value": "lots"}}, "not a number"),
        ({"name": "cpus", "type": "SCALAR", "scalar": {"value": True}}, "expected a number"),
        ({"name": "cpus", "type": "SCALAR"}, "needs \"scalar\""),
        ({"name": "cpus", "type": "TEXT", "text": {"value": "x"}}, "unknown type 'TEXT'"),
        ({"name": "cpus"}, "missing 'type'"),
        ({"name": "ports", "type": "RANGES", "ranges": {"range": [{"begin": 5, "end": 3}]}}, "begin > end"),
        ({"name": "ports", "type": "RANGES", "ranges": {"range": [{"begin": 1.5, "end": 3}]}}, "not an integer"),
        ({"name": "ports", "type": "RANGES", "ranges": {"range": [{"begin": 1}]}}, "'begin' and 'end'"),
        ({"name": "zones", "type": "SET", "set": {"item": [1]}}, "non-empty strings"),
        ({"name": "cpus", "type": "SCALAR", "scalar": {"value": 1}, "reservation": {}}, "needs a 'role'"),
        ({"name": "cpus", "type": "SCALAR", "scalar": {"value": 1}, "role": "a b"}, "whitespace"),
        (
            {"name": "cpus", "type": "SCALAR", "scalar": {"value": 1}, "reservations": [{"type": "STATIC", "role": "a"}, {"type": "DYNAMIC", "role": "a/b"}]},
            "refinement",
        ),
        ({"name": "cpus", "type": "SCALAR", "scalar": {"value": 1}, "reservations": [{"role": "a"}]}, "STATIC or DYNAMIC"),
        ({"name": "cpus", "type": "SCALAR", "scalar": {"value": 1}, "role": "b", "reservations": [{"type": "STATIC", "role": "a"}]}, "conflicts"),
        ({"name": "cpus", "type": "SCALAR", "scalar": {"value": 1}, "role": "a", "reservation": {"labels": {"labels": [{"value": "v"}]}}}, "'key'"),
        ("cpus", "expected a Resource object"),
    ],
)
def test_from_json_rejects_invalid_items(item, message):
    """Invalid JSON Resources raise ValueError naming the item and the problem."""
    with pytest.raises(ValueError) as e:
        Resources.from_json([item])
    assert message in str(e.value)
    assert str(e.value).startswith("resources[0]: ")


def test_from_json_needs_a_list():
    """A single object instead of a list is rejected."""
    with pytest.raises(ValueError, match="expected a JSON list"):
        Resources.from_json({"name": "cpus"})


def test_to_json_matches_the_mesos_offer_format():
    """Unreserved resources come out as in a pre-MULTI_ROLE offer (spec §3.2), sorted by name."""
    r = P("ports:[31000-32000];mem:7168;cpus:4;disk:10000")
    assert r.to_json() == [
        {"name": "cpus", "type": "SCALAR", "scalar": {"value": 4.0}, "role": "*"},
        {"name": "disk", "type": "SCALAR", "scalar": {"value": 10000.0}, "role": "*"},
        {"name": "mem", "type": "SCALAR", "scalar": {"value": 7168.0}, "role": "*"},
        {"name": "ports", "type": "RANGES", "ranges": {"range": [{"begin": 31000, "end": 32000}]}, "role": "*"},
    ]
    assert isinstance(r.to_json()[0]["scalar"]["value"], float)


def test_to_json_reservations_and_allocation_info():
    """Dynamic reservations carry 'reservation'; allocation_role adds allocation_info; refined uses 'reservations'."""
    r = Resources([Resource("cpus", SCALAR, 2, role="ads", principal="ops", labels={"k": "v"}), Resource("zones", SET, {"b", "a"}, role="ads")])
    assert r.to_json(allocation_role="ads") == [
        {
            "name": "cpus", "type": "SCALAR", "scalar": {"value": 2.0}, "role": "ads",
            "reservation": {"principal": "ops", "labels": {"labels": [{"key": "k", "value": "v"}]}},
            "allocation_info": {"role": "ads"},
        },
        {"name": "zones", "type": "SET", "set": {"item": ["a", "b"]}, "role": "ads", "allocation_info": {"role": "ads"}},
    ]
    refined = r.to_json(refined=True)
    assert refined[0]["reservations"] == [{"type": "DYNAMIC", "role": "ads", "principal": "ops", "labels": {"labels": [{"key": "k", "value": "v"}]}}]
    assert refined[1]["reservations"] == [{"type": "STATIC", "role": "ads"}]
    assert "role" not in refined[0]
    assert Resources.from_json(refined) == r


# --- ranges ----------------------------------------------------------------------------


def test_adjacent_and_overlapping_ranges_merge():
    """[1-3]+[4-5] is [1-5]; overlaps merge; disjoint ranges stay sorted."""
    assert (P("p:[1-3]") + P("p:[4-5]")).ranges("p") == ((1, 5),)
    assert (P("p:[10-20]") + P("p:[1-3,15-30]")).ranges("p") == ((1, 3), (10, 30))
    assert P("p:[7-8,1-2,3-3]").ranges("p") == ((1, 3), (7, 8))


def test_range_subtraction_splits_and_contains_checks_coverage():
    """Removing the middle of a range splits it; containment needs full coverage."""
    ports = P("ports:[31000-32000]")
    left = ports - P("ports:[31000-31000,31500-31600,32000-32000]")
    assert left.ranges("ports") == ((31001, 31499), (31601, 31999))
    assert ports.contains(P("ports:[31000-31010,31990-32000]"))
    assert not ports.contains(P("ports:[30999-31005]"))
    assert not left.contains(P("ports:[31499-31601]"))


# --- arithmetic, roles and reservations ------------------------------------------------


def test_scalars_are_fixed_point_with_three_decimals():
    """Scalars round to 0.001 as in Mesos, so float noise never leaves crumbs."""
    tenth = P("cpus:0.1")
    assert Resources.sum([tenth] * 10) == P("cpus:1")
    assert (P("cpus:0.3") - P("cpus:0.1") - P("cpus:0.2")).is_empty()
    assert P("cpus:0.0004").is_empty()
    assert P("mem:1.2344").scalar("mem") == 1.234


def test_roles_and_reservations_never_combine():
    """Different roles, static vs dynamic, principals and labels are kept apart."""
    r = (
        P("cpus:1;cpus(ads):1")
        + Resources([Resource("cpus", SCALAR, 1, role="ads", dynamic=True)])
        + Resources([Resource("cpus", SCALAR, 1, role="ads", principal="a")])
        + Resources([Resource("cpus", SCALAR, 1, role="ads", principal="a", labels=(("k", "v"),))])
    )
    assert len(r) == 5
    assert r.scalar("cpus") == 5.0 and r.scalars() == {"cpus": 5.0}
    assert not r.contains(P("cpus:2"))
    assert r.flatten().contains(P("cpus:5"))


def test_labels_compare_irrespective_of_order():
    """Reservations whose labels differ only in order combine, as in Mesos."""
    a = Resource("cpus", SCALAR, 1, role="ads", labels=(("x", "1"), ("y", "2")))
    b = Resource("cpus", SCALAR, 2, role="ads", labels=(("y", "2"), ("x", "1")))
    assert len(Resources([a, b])) == 1 and Resources([a, b]).scalar("cpus") == 3.0


def test_subtracting_what_is_not_there_raises():
    """'-' refuses to go below zero or to take resources of another role."""
    with pytest.raises(ValueError, match=r"cannot subtract cpus:5: not contained \(have cpus:4\)"):
        P("cpus:4") - P("cpus:5")
    with pytest.raises(ValueError, match=r"cpus\(ads\):1: not contained \(have none\)"):
        P("cpus:4") - P("cpus(ads):1")
    with pytest.raises(ValueError, match="not contained"):
        P("zones:{a}") - P("zones:{b}")


def test_views_by_role():
    """unreserved, reserved and allocatable_to select by role; ancestors' reservations are allocatable."""
    r = P("cpus:1;cpus(eng):2;cpus(eng/web):4;cpus(ads):8")
    assert r.unreserved() == P("cpus:1")
    assert r.reserved() == P("cpus(eng):2;cpus(eng/web):4;cpus(ads):8")
    assert r.reserved("eng") == P("cpus(eng):2")
    assert r.allocatable_to("eng/web") == P("cpus:1;cpus(eng):2;cpus(eng/web):4")
    assert r.allocatable_to("engine") == P("cpus:1")
    assert r.flatten("ads") == P("cpus(ads):15")
    assert r.filter(lambda x: x.value > 2) == P("cpus(eng/web):4;cpus(ads):8")


def test_collection_protocol():
    """len, bool, iteration order, equality, hashing, repr and builtin sum behave."""
    r = P("mem:64;cpus(ads):1;cpus:2")
    assert [(x.name, x.role) for x in r] == [("cpus", "*"), ("cpus", "ads"), ("mem", "*")]
    assert len(r) == 3 and r and not Resources()
    assert hash(r) == hash(P("cpus:2;mem:64;cpus(ads):1"))
    assert eval(repr(r), {"Resources": Resources}) == r
    assert sum([P("cpus:1"), P("cpus:2")]) == P("cpus:3")
    assert r >= P("cpus:1") and P("cpus:1") <= r and not P("cpus:1") >= r
    assert r + Resource("cpus", SCALAR, 1) == P("mem:64;cpus(ads):1;cpus:3")
    assert r.names() == frozenset({"cpus", "mem"})
    assert r.ranges("ports") == () and r.scalar("gpus") == 0.0


def test_values_are_immutable():
    """Neither a Resource nor a Resources can be changed in place."""
    r = P("cpus:1")
    with pytest.raises(AttributeError):
        r._map = {}
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        next(iter(r)).value = 2.0


def test_resource_validation():
    """A Resource normalizes its value and rejects inconsistent reservations."""
    assert Resource("ports", RANGES, [(5, 6), [1, 4]]).value == ((1, 6),)
    assert Resource("cpus", SCALAR, 1).value == 1.0
    assert str(Resource("cpus", SCALAR, 1, role="a", principal="p")) == "cpus(a,principal=p):1"
    with pytest.raises(ValueError, match="needs a role other than"):
        Resource("cpus", SCALAR, 1, principal="p")
    with pytest.raises(ValueError, match="need a dynamic reservation"):
        Resource("cpus", SCALAR, 1, role="a", principal="p", dynamic=False)
    with pytest.raises(ValueError, match="unknown type"):
        Resource("cpus", "TEXT", "x")
    with pytest.raises(ValueError, match="non-empty string"):
        Resource("", SCALAR, 1)


def test_validate_role():
    """Role names follow Mesos: '*' or slash-separated components without whitespace."""
    for good in ("*", "ads", "eng/backend", "a.b"):
        validate_role(good)
    for bad in ("", ".", "a/..", "-a", "a b", "a/*", "/a", 3):
        with pytest.raises(ValueError):
            validate_role(bad)


def test_default_agent_resource_names():
    """The agent's default resources are cpus, mem, disk and ports."""
    assert DEFAULT_AGENT_RESOURCE_NAMES == ("cpus", "mem", "disk", "ports")


def test_import_pulls_in_no_io_libraries():
    """Importing agora.resources loads no Twisted, msgpack or kazoo."""
    code = (
        "import sys, agora.resources\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('twisted', 'msgpack', 'kazoo')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- properties ------------------------------------------------------------------------

# A fixed alphabet with the text form's syntax characters (and no cold Unicode table to build).
CHARS = "ab%;:,(){}[]= \t*/-.é"
NAMES = st.sampled_from([("cpus", SCALAR), ("mem", SCALAR), ("ports", RANGES), ("zones", SET)])
ODD_TEXT = st.text(CHARS, max_size=4)
RESERVATIONS = st.one_of(
    st.just(("*", None, (), False)),
    st.tuples(st.sampled_from(["ads", "eng/web"]), st.none(), st.just(()), st.booleans()),
    st.tuples(
        st.sampled_from(["ads", "eng/web"]),
        st.none() | ODD_TEXT,
        st.lists(st.tuples(ODD_TEXT, ODD_TEXT), max_size=2).map(tuple),
        st.just(True),
    ),
)
EXTRAS = st.sampled_from([(), (("revocable", "{}"),), (("disk", '{"persistence":{"id":"v 1"}}'),)])


def _resource(name_type, reservation, value, extras=()):
    role, principal, labels, dynamic = reservation
    return Resource(*name_type, value, role, principal, labels, dynamic, extras)


def _value(typ, draw):
    if typ == SCALAR:
        return draw(st.floats(0, 1e6, allow_nan=False))
    if typ == RANGES:
        return [(lo, lo + n) for lo, n in draw(st.lists(st.tuples(st.integers(0, 100), st.integers(0, 10)), max_size=4))]
    return draw(st.frozensets(st.text(CHARS, min_size=1, max_size=3), max_size=3))


@st.composite
def resources(draw, odd_names=False):
    """Arbitrary collections; ranges and sets may overlap between collections."""
    items = []
    for _ in range(draw(st.integers(0, 6))):
        name_type = draw(NAMES)
        if odd_names and draw(st.booleans()):
            name_type = (draw(st.text(CHARS, min_size=1, max_size=4)), name_type[1])
        items.append(_resource(name_type, draw(RESERVATIONS), _value(name_type[1], draw), draw(EXTRAS)))
    return Resources(items)


@st.composite
def disjoint(draw, n):
    """n collections whose ranges and sets never overlap (so '-' undoes '+' exactly)."""
    owners = [[] for _ in range(n)]
    taken = set()
    for _ in range(draw(st.integers(0, 12))):
        owner = draw(st.integers(0, n - 1))
        name_type, reservation = draw(NAMES), draw(RESERVATIONS)
        typ = name_type[1]
        unit = draw(st.integers(0, 40) if typ == RANGES else st.sampled_from("abcdef"))
        if typ != SCALAR:
            if (name_type, reservation, unit) in taken:
                continue
            taken.add((name_type, reservation, unit))
        value = draw(st.floats(0, 1e6)) if typ == SCALAR else [(unit, unit)] if typ == RANGES else {unit}
        owners[owner].append(_resource(name_type, reservation, value))
    return [Resources(items) for items in owners]


def _assert_normalized(r):
    for x in r:
        if x.type == RANGES:
            assert x.value, "empty ranges must disappear"
            for (_, hi), (lo, _) in zip(x.value, x.value[1:]):
                assert hi + 1 < lo, x.value
            assert all(lo <= hi for lo, hi in x.value)
        elif x.type == SCALAR:
            assert x.value > 0
        else:
            assert x.value


@given(disjoint(2))
def test_subtraction_undoes_addition(pair):
    """(a+b)-b == a when a and b share no ports or set items."""
    a, b = pair
    assert (a + b) - b == a


@given(resources(), resources())
def test_addition_commutes(a, b):
    """a+b == b+a."""
    assert a + b == b + a


@given(resources(), resources(), resources())
def test_addition_associates(a, b, c):
    """(a+b)+c == a+(b+c) == sum([a, b, c])."""
    assert (a + b) + c == a + (b + c) == Resources.sum([a, b, c])


@given(resources(), resources())
def test_sum_contains_its_parts_and_differences_are_contained(a, c):
    """(a+c) contains a and c; x-a is contained in x and adds back to x."""
    x = a + c
    assert x.contains(a) and x.contains(c) and x >= a
    rest = x - a
    assert x.contains(rest)
    assert rest + a == x
    for r in (x, rest):
        _assert_normalized(r)


@given(resources(odd_names=True))
def test_text_form_round_trips(a):
    """parse(str(a)) == a, whatever the names, principals and labels contain."""
    assert P(str(a)) == a


@given(resources(odd_names=True), st.none() | st.sampled_from(["ads", "*"]), st.booleans())
def test_json_round_trips(a, allocation_role, refined):
    """from_json(to_json(a)) == a, through real JSON text, in both reservation formats."""
    items = json.loads(json.dumps(a.to_json(allocation_role=allocation_role, refined=refined)))
    assert Resources.from_json(items) == a


@given(resources())
def test_flatten_keeps_quantities(a):
    """flatten() changes roles only: scalar totals and merged ranges stay the same."""
    flat = a.flatten()
    assert flat.scalars() == pytest.approx(a.scalars())
    assert flat.ranges("ports") == a.ranges("ports")
    assert flat == flat.unreserved()
    _assert_normalized(flat)


INTERVALS = st.lists(st.tuples(st.integers(0, 60), st.integers(0, 8)).map(lambda t: (t[0], t[0] + t[1])), max_size=6)


def _points(ranges):
    return {p for lo, hi in ranges for p in range(lo, hi + 1)}


@given(INTERVALS, INTERVALS)
@settings(max_examples=200)
def test_ranges_arithmetic_matches_a_set_of_points(xs, ys):
    """Range union, containment and difference agree with plain sets of integers."""
    a, b = (Resources([Resource("p", RANGES, v)]) for v in (xs, ys))
    pa, pb = _points(xs), _points(ys)
    assert _points((a + b).ranges("p")) == pa | pb
    _assert_normalized(a + b)
    assert a.contains(b) == (pb <= pa)
    if pb <= pa:
        diff = a - b
        assert _points(diff.ranges("p")) == pa - pb
        _assert_normalized(diff)
