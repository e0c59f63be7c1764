"""The collector kept off a run's path (run/heap.py): what is frozen, what is still collected, what is counted."""

import gc
import weakref

from embedkit.run.heap import CollectorTime, frozen_heap


class _Node:
    pass


def _cycle() -> weakref.ref:
    """A reference cycle only the cyclic collector can free; a weak reference to one of its nodes."""
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_objects_alive_at_the_start_are_frozen_and_handed_back():
    gc.disable()  # no automatic collection between the cycle's making and the freeze
    try:
        before = _cycle()  # garbage already, but only a collection can free it
        assert gc.get_freeze_count() == 0
        with frozen_heap():
            assert gc.get_freeze_count() > 0
            gc.collect()
            assert before() is not None  # frozen: the collector does not walk it
            during = _cycle()
            gc.collect()
            assert during() is None  # made during the block: collected as before
        assert gc.get_freeze_count() == 0
        gc.collect()
        assert before() is None  # handed back: collected again
    finally:
        gc.enable()


def test_a_heap_the_caller_froze_is_left_frozen():
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with frozen_heap():
            pass
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()


def test_collections_are_counted_with_their_seconds():
    with CollectorTime() as t:
        gc.collect()
        gc.collect(0)
    assert t.collections == 2 and t.full == 1
    assert t.seconds > 0
    assert t.stats() == {"collections": 2, "full": 1, "seconds": round(t.seconds, 3)}
    gc.collect()
    assert t.collections == 2  # counted only inside the block
