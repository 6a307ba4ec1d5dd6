"""Tests for the weighted DRF sorter (master/allocator/sorter.py).

The Mesos cases are ports of src/tests/sorter_tests.cpp (DRFSorterTest.DRF, .WDRF,
.AllocationCountTieBreak); the progressive-filling case is the DRF paper's example
(perf-anchors.md §3.2).
"""

import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from master.allocator.sorter import Pool, Sorter, vadd, vsub


def q(cpus=0.0, mem=0.0, **more):
    out = {"cpus": float(cpus), "mem": float(mem)}
    out.update({k: float(v) for k, v in more.items()})
    return {k: v for k, v in out.items() if v}


def test_pure_modules_import_no_io_libraries():
    """The sorter, filters and allocator import no Twisted, msgpack or kazoo."""
    code = (
        "import sys; import master.allocator.sorter, master.allocator.filters, master.allocator.allocator; "
        "bad = [m for m in ('twisted', 'msgpack', 'kazoo') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr


def test_mesos_drf():
    """Port of Mesos DRFSorterTest.DRF: orders follow dominant shares as allocations and the total change."""
    s = Sorter()
    s.update_total(q(100, 100))
    assert s.sort() == []

    s.add("a")
    s.allocated("a", q(5, 5))
    s.add("b")
    s.allocated("b", q(6, 6))
    assert s.sort() == ["a", "b"]  # a = .05, b = .06

    s.add("c")
    s.allocated("c", q(1, 1))
    s.add("d")
    s.allocated("d", q(3, 1))
    assert s.sort() == ["c", "d", "a", "b"]

    s.remove("a")
    s.unallocated("b", q(4, 4))
    assert s.sort() == ["c", "b", "d"]  # b = .02, c = .01, d = .03

    s.add("e")
    s.allocated("e", q(1, 5))
    s.update_total(q(50, 100))
    assert s.sort() == ["c", "b", "e", "d"]  # b = .04, c = .02, d = .06, e = .05

    s.update_total(q(50, 200))
    s.add("f")
    s.allocated("f", q(5, 1))
    s.allocated("c", q(0, 15))
    assert s.sort() == ["e", "b", "d", "c", "f"]  # b = .04, c = .08, d = .06, e = .025, f = .1

    assert "b" in s and "a" not in s
    assert len(s) == 5
    s.deactivate("d")
    assert "d" in s
    assert s.sort() == ["e", "b", "c", "f"]
    assert len(s) == 5
    s.activate("d")
    assert s.sort() == ["e", "b", "d", "c", "f"]


def test_mesos_wdrf():
    """Port of Mesos DRFSorterTest.WDRF: shares are divided by weights."""
    s = Sorter()
    s.update_total(q(100, 100))
    s.add("a")
    s.allocated("a", q(5, 5))
    s.add("b")
    s.update_weight("b", 2)
    s.allocated("b", q(6, 6))
    assert s.sort() == ["b", "a"]  # a = .05, b = .03

    s.add("c")
    s.allocated("c", q(4, 4))
    assert s.sort() == ["b", "c", "a"]

    s.add("d")
    s.update_weight("d", 10)
    s.allocated("d", q(10, 20))
    assert s.sort() == ["d", "b", "c", "a"]  # d = .02

    s.remove("b")
    assert s.sort() == ["d", "c", "a"]

    s.allocated("d", q(10, 25))
    assert s.sort() == ["c", "d", "a"]  # d = .045

    s.add("e", weight=0.1)
    s.allocated("e", q(1, 1))
    assert s.sort() == ["c", "d", "a", "e"]  # e = .1

    s.remove("a")
    assert s.sort() == ["c", "d", "e"]


def test_mesos_allocation_count_tie_break():
    """Port of Mesos DRFSorterTest.AllocationCountTieBreak: equal shares order by allocation count, then name."""
    s = Sorter()
    s.update_total(q(100, 100))
    for name in "abcde":
        s.add(name)
    s.allocated("a", q(3, 3))
    s.allocated("b", q(3, 3))
    for _ in range(3):
        s.allocated("c", q(1, 1))
    s.allocated("d", q(2, 2))
    s.allocated("d", q(1, 1))
    s.allocated("e", q(3, 3))
    assert s.sort() == ["a", "b", "e", "d", "c"]

    s.unallocated("c", q(3, 3))  # does not reset the count
    assert s.sort() == ["c", "a", "b", "e", "d"]
    s.allocated("c", q(3, 3))
    assert s.sort() == ["a", "b", "e", "d", "c"]

    s.deactivate("c")
    s.activate("c")
    assert s.sort() == ["a", "b", "e", "d", "c"]

    s.unallocated("c", q(3, 3))
    s.allocated("c", q(3, 3))
    assert s.sort() == ["a", "b", "e", "d", "c"]

    s.deactivate("a")  # allocations to an inactive client still count
    s.unallocated("a", q(1, 3))
    s.allocated("a", q(1, 3))
    assert s.sort() == ["b", "e", "d", "c"]
    s.activate("a")
    assert s.sort() == ["b", "e", "a", "d", "c"]


def test_drf_paper_progressive_filling():
    """DRF paper example: 9 CPU / 18 GB, A needs <1 CPU, 4 GB>, B <3 CPU, 1 GB> -> A 3 tasks, B 2."""
    demand = {"A": q(1, 4), "B": q(3, 1)}
    total = q(9, 18)
    s = Sorter()
    s.update_total(total)
    s.add("A")
    s.add("B")
    used = {"cpus": 0.0, "mem": 0.0}
    tasks = {"A": 0, "B": 0}
    picks = []
    while True:
        for client in s.sort():
            need = demand[client]
            if all(used[k] + v <= total[k] for k, v in need.items()):
                s.allocated(client, need)
                for k, v in need.items():
                    used[k] += v
                tasks[client] += 1
                picks.append(client)
                break
        else:
            break
    assert tasks == {"A": 3, "B": 2}
    assert used == {"cpus": 9.0, "mem": 14.0}
    assert s.share("A") == pytest.approx(2 / 3) and s.share("B") == pytest.approx(2 / 3)
    # Same as the paper's trace (§3.2) except the first tie, which Mesos breaks by name.
    assert picks == ["A", "B", "A", "B", "A"]


def test_ties_are_deterministic_regardless_of_insertion_order():
    """Equal shares and counts order by name, whatever the order clients were added in."""
    for names in (["c", "a", "b"], ["b", "c", "a"], ["a", "b", "c"]):
        s = Sorter()
        s.update_total(q(10, 10))
        for n in names:
            s.add(n)
            s.allocated(n, q(1, 1))
        assert s.sort() == ["a", "b", "c"]


def test_fair_excluded_resources_do_not_count():
    """Resources excluded from fairness (e.g. gpus) do not affect the dominant share."""
    pool = Pool(fair_excluded=("gpus",))
    s = Sorter(pool)
    s.update_total(q(10, 10, gpus=2))
    s.add("gpu-user")
    s.allocated("gpu-user", q(1, 1, gpus=2))
    s.add("cpu-user")
    s.allocated("cpu-user", q(2, 1))
    assert s.share("gpu-user") == pytest.approx(0.1)
    assert s.sort() == ["gpu-user", "cpu-user"]


def test_shared_pool_dirties_every_sorter():
    """Sorters sharing a Pool re-sort when any of them changes the total."""
    pool = Pool()
    s1, s2 = Sorter(pool), Sorter(pool)
    for s in (s1, s2):
        s.add("cpu-heavy")
        s.allocated("cpu-heavy", q(4, 1))
        s.add("mem-heavy")
        s.allocated("mem-heavy", q(1, 4))
    s1.update_total(q(100, 10))
    assert s2.sort() == ["cpu-heavy", "mem-heavy"]
    s1.update_total(q(10, 100))
    assert s2.sort() == ["mem-heavy", "cpu-heavy"]


def test_quantity_vectors_grow_with_new_names():
    """Vectors made before a resource name appeared still add, subtract and share correctly."""
    pool = Pool()
    old = pool.vector({"cpus": 2.0})
    new = pool.vector({"gpus": 1.0})
    assert pool.names == ["cpus", "gpus"] and old == [2.0] and new == [0.0, 1.0]
    assert vadd(old, new) == [2.0, 1.0] == vadd(new, old)
    assert vsub(vadd(old, new), old) == [0.0, 1.0]
    assert vsub(old, [2.0000000001]) == [0.0]  # float noise clamps to zero
    s = Sorter(pool)
    pool.add({"cpus": 10.0, "gpus": 4.0})
    s.add("x")
    s.allocated("x", old)
    s.allocated("x", new)
    assert s.share("x") == pytest.approx(0.25)
    assert s.allocation("x") == {"cpus": 2.0, "gpus": 1.0}


def test_bad_weights_and_unknown_clients_are_rejected():
    """Weights must be positive and finite; unknown clients raise KeyError; duplicates ValueError."""
    s = Sorter()
    for bad in (0, -1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError):
            s.add("x", weight=bad)
    s.add("x")
    with pytest.raises(ValueError):
        s.add("x")
    with pytest.raises(KeyError):
        s.update_weight("nobody", 2)


# --- incremental order == full sort, under any sequence of operations ---------------------

_names = st.sampled_from(["a", "b", "c", "d", "e"])
_quantities = st.fixed_dictionaries(
    {"cpus": st.integers(0, 5), "mem": st.integers(0, 5), "disk": st.integers(0, 5)}
).map(lambda d: {k: float(v) for k, v in d.items() if v})
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), _names, st.sampled_from([0.5, 1.0, 2.0])),  # powers of two divide exactly
        st.tuples(st.just("remove"), _names),
        st.tuples(st.just("allocated"), _names, _quantities),
        st.tuples(st.just("unallocated"), _names, _quantities),
        st.tuples(st.just("activate"), _names),
        st.tuples(st.just("deactivate"), _names),
        st.tuples(st.just("weight"), _names, st.sampled_from([0.25, 1.0, 4.0])),
        st.tuples(st.just("total"), _quantities),
        st.tuples(st.just("sort"),),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(_ops)
def test_kept_order_matches_a_full_sort(ops):
    """Whatever happens, sort() equals sorting active clients by (share / weight, count, name) from scratch."""
    s = Sorter()
    s.update_total({"cpus": 20.0, "mem": 20.0, "disk": 20.0})
    model: dict[str, dict] = {}  # name -> {alloc, count, weight, active}
    total = {"cpus": 20.0, "mem": 20.0, "disk": 20.0}
    for op in ops:
        kind, name = op[0], op[1] if len(op) > 1 else None
        if kind == "add" and name not in model:
            s.add(name, weight=op[2])
            model[name] = {"alloc": {}, "count": 0, "weight": op[2], "active": True}
        elif kind == "total":
            s.update_total(op[1])
            total = dict(op[1])
        elif kind == "sort" or name not in model:
            pass
        elif kind == "remove":
            s.remove(name)
            del model[name]
        elif kind == "allocated":
            s.allocated(name, op[2])
            m = model[name]
            for k, v in op[2].items():
                m["alloc"][k] = m["alloc"].get(k, 0) + Fraction(v)
            m["count"] += 1
        elif kind == "unallocated":
            m = model[name]
            give = {k: min(v, float(m["alloc"].get(k, 0))) for k, v in op[2].items()}
            s.unallocated(name, give)
            for k, v in give.items():
                m["alloc"][k] = m["alloc"].get(k, 0) - Fraction(v)
        elif kind == "activate":
            s.activate(name)
            model[name]["active"] = True
        elif kind == "deactivate":
            s.deactivate(name)
            model[name]["active"] = False
        elif kind == "weight":
            s.update_weight(name, op[2])
            model[name]["weight"] = op[2]

        def key(n):
            m = model[n]
            share = max((m["alloc"].get(k, 0) / Fraction(t) for k, t in total.items() if t > 0), default=0)
            return (share / Fraction(m["weight"]), m["count"], n)

        assert s.sort() == sorted((n for n, m in model.items() if m["active"]), key=key)
