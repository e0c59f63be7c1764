"""ShardFeed: shards prepared in a thread, handed out in order, one ahead only when told, a
preparing error raised at the shard that raised it; ShardProcess: its child's errors, its
death, and its parent's, each ending in one line or a child gone (the real child Python)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from embedkit.config import DEFAULT_PROMPTS, GenerateConfig
from embedkit.errors import EmbedkitError
from embedkit.generation.feed import FeedSource, ShardFeed, ShardProcess
from embedkit.io.corpus import Columns
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


# ---- the child process (ShardProcess) ------------------------------------------------------


def _source(target: str) -> FeedSource:
    return FeedSource("/nonexistent/docs.parquet", Columns(), GenerateConfig(), DEFAULT_PROMPTS["summarize"], target)


def test_a_child_that_cannot_set_up_fails_the_first_shard_with_its_one_line_error():
    with ShardProcess(_source("/nonexistent/model")) as child, ShardFeed(child, plan_shards(4, 2), ahead=True) as feed:
        with pytest.raises(EmbedkitError, match="--model /nonexistent/model: no such folder"):
            feed.next()


def test_a_killed_child_fails_the_shard_asked_for_in_one_line():
    with ShardProcess(_source("/nonexistent/model")) as child:
        child._proc.kill()
        with pytest.raises(EmbedkitError, match=r"the process preparing shards ended \(exit code -9\)"):
            child(plan_shards(4, 2)[0])


def _exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # a zombie has exited (nobody reaped it yet)
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_child_ends_when_its_parent_is_killed(tmp_path):
    """SIGKILL of the run's process: its child sees its input close and exits (no orphan left tokenizing)."""
    script = (
        "import sys, time\n"
        "from tests.test_feed import _source\n"
        "from embedkit.generation.feed import ShardProcess\n"
        "child = ShardProcess(_source('/nonexistent/model'))\n"
        "print(child._proc.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        pid = int(parent.stdout.readline())
        assert not _exited(pid)
        parent.kill()
        parent.wait()
        deadline = time.time() + 20
        while not _exited(pid) and time.time() < deadline:
            time.sleep(0.1)
        assert _exited(pid), "the child outlived its killed parent"
    finally:
        parent.kill()
