"""The cyclic collector during a run (run/heap.py): paused, run between shards, counted, restored."""

import gc
import weakref

import pytest

from embedkit.run.heap import RunCollector


class _Node:
    pass


def _cycle() -> weakref.ref:
    """A reference cycle only the cyclic collector can free; a weak reference to one of its nodes."""
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_no_automatic_collection_inside_the_block():
    with RunCollector() as c:
        assert not gc.isenabled()
        cycle = _cycle()
        kept = [[i] for i in range(50_000)]  # 70 young collections' worth of new containers
        assert cycle() is not None  # nothing collected it: reference counting cannot
    assert c.collections == 0 and c.seconds == 0
    assert gc.isenabled() and len(kept) == 50_000
    gc.collect()
    assert cycle() is None


def test_between_frees_the_cycles_made_since_and_is_counted():
    with RunCollector() as c:
        cycle = _cycle()
        c.between()
        assert cycle() is None
    assert c.stats() == {"collections": 1, "full": 0, "seconds": round(c.seconds, 3)}
    assert c.seconds > 0


def test_the_callers_setting_is_restored_even_when_the_block_raises():
    with pytest.raises(RuntimeError):
        with RunCollector():
            raise RuntimeError("a shard failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with RunCollector() as c:
            c.between()
        assert not gc.isenabled()  # off before: left off
    finally:
        gc.enable()
    gc.collect()
    assert c.collections == 1  # counted only inside the block
