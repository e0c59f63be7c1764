"""ShardFeed: shards prepared in a thread, handed out in order, one ahead only when told, a
preparing error raised at the shard that raised it."""

from __future__ import annotations

import threading
import time

import pytest

from embedkit.errors import EmbedkitError
from embedkit.generation.feed import ShardFeed
from embedkit.io.shards import plan_shards


class Recorder:
    """A prepare function that notes which shards it started (an Event per shard) and can fail one."""

    def __init__(self, shards: int, fail: int | None = None):
        self.started = [threading.Event() for _ in range(shards)]
        self.threads: set[str] = set()
        self.fail = fail

    def __call__(self, shard):
        self.threads.add(threading.current_thread().name)
        self.started[shard.index].set()
        if shard.index == self.fail:
            raise EmbedkitError(f"shard {shard.index} cannot be read")
        return ("prepared", shard.index)


def test_shards_come_in_order_from_a_thread_of_their_own():
    shards = plan_shards(10, 3)  # 4 shards
    rec = Recorder(len(shards))
    with ShardFeed(rec, shards, ahead=True) as feed:
        got = [feed.next() for _ in shards]
        with pytest.raises(IndexError):
            feed.next()
    assert got == [("prepared", i) for i in range(4)]
    assert rec.threads == {"embedkit-shard-feed"}


def test_the_next_shard_is_prepared_while_the_caller_holds_one_only_when_ahead():
    shards = plan_shards(9, 3)
    ahead, lazy = Recorder(3), Recorder(3)
    with ShardFeed(ahead, shards, ahead=True) as feed_ahead, ShardFeed(lazy, shards, ahead=False) as feed_lazy:
        assert feed_ahead.next() == ("prepared", 0) and feed_lazy.next() == ("prepared", 0)
        # ahead: shard 1 starts without being asked for; shard 2 does not (two shards held at most)
        assert ahead.started[1].wait(10)
        time.sleep(0.3)
        assert not ahead.started[2].is_set()
        assert not lazy.started[1].is_set()  # lazy: nothing starts until the caller asks
        assert feed_lazy.next() == ("prepared", 1) and lazy.started[1].is_set()
        assert feed_ahead.next() == ("prepared", 1)
        assert ahead.started[2].wait(10)


@pytest.mark.parametrize("ahead", [True, False])
def test_a_preparing_error_is_raised_at_its_shard_after_the_shards_before_it(ahead):
    shards = plan_shards(12, 3)
    rec = Recorder(4, fail=2)
    feed = ShardFeed(rec, shards, ahead=ahead)
    assert [feed.next() for _ in range(2)] == [("prepared", 0), ("prepared", 1)]
    with pytest.raises(EmbedkitError, match="shard 2 cannot be read"):
        feed.next()
    time.sleep(0.3)
    assert not rec.started[3].is_set()  # the feed stopped at the error
