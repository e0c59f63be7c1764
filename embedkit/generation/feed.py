"""A shard's inputs prepared ahead of the model: its rows read and its prompts tokenized in a thread.

Reading a shard and tokenizing its prompts needs only the tokenizer and the model's config, not
the weights; it costs 1.6-2.0 s of host time for 60k pydocs prompts on the H200 machine, time in
which the GPU had nothing to do. `ShardFeed` runs it in a thread, one shard ahead of the caller:

- the first shard is prepared while the model's weights load (after the tokenizer, whose load
  includes most of transformers' imports);
- on CUDA, shard k+1 is prepared while shard k is on the GPU; on CPU, where the model's work
  already takes every core, a shard is prepared only when the caller asks for it.

The fast tokenizer's batch call runs in Rust with the GIL released, but building the prompts and
the token lists holds it: measured on the H200 machine, the load and the decoding beside the
thread take 0.4-1.0 s longer each, less than the tokenizing they hide (benchmarks.md, generate
run 24). At most two shards' inputs are held at once (the caller's and the next). The thread is
a daemon: an interrupted run exits without waiting for a shard nobody will use, and only the
caller commits, so nothing half-prepared is written.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import pickle
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from ..config import GenerateConfig
from ..errors import EmbedkitError, first_line
from ..io.corpus import Columns, Corpus, drop_empty, open_corpus
from ..io.shards import Shard
from .tasks import input_tokens, task_inputs, timed

# prepare the next shard while the caller runs the model on this one, by device type: on CPU the
# model's work already uses every core (a test turns it on there to run the path without a GPU)
PREPARE_AHEAD = {"cuda": True, "cpu": False}
# prepare shards in a child process (`ShardProcess`) rather than in the feed's own thread: the
# tokenizing then holds none of this process's GIL. On CPU a child costs its start-up (imports,
# tokenizer) for no overlap worth having.
PREPARE_IN_PROCESS = {"cuda": True, "cpu": False}


@dataclass(frozen=True)
class ShardInputs:
    """A shard's rows with text (empty ones dropped, counted) and what the model reads for each."""

    shard: Shard
    table: pa.Table
    empty: int
    inputs: list
    flags: list[bool]
    prompt_tokens: int
    phases: dict[str, float] = field(default_factory=dict)  # read and inputs seconds, wherever they ran


def prepare_shard(corpus: Corpus, shard: Shard, cfg: GenerateConfig, template: str, tok: Any, config: Any) -> ShardInputs:
    """Read a shard's rows and build the task's inputs for them (`tasks.task_inputs`)."""
    phases: dict[str, float] = {}
    with timed(phases, "read"):
        table, empty = drop_empty(corpus.read(shard.start, shard.stop), keep_empty=False)
    with timed(phases, "inputs"):
        inputs, flags = task_inputs(table.column("text").to_pylist(), table.column("id").to_pylist(), cfg, template, tok, config)
        prompt_tokens = sum(input_tokens(x) for x in inputs)
    return ShardInputs(shard, table, empty, inputs, flags, prompt_tokens, phases)


class ShardFeed:
    """`prepare(shard)` for each shard in order, in a daemon thread; `next()` returns them in order.

    With `ahead`, the shard after the one `next()` returned is prepared at once (while the
    caller works on it); without, only when `next()` asks for it. The first shard is always
    started at construction. An exception raised preparing a shard is raised by the `next()`
    that asks for that shard, after the shards before it were handed out."""

    def __init__(self, prepare: Callable[[Shard], ShardInputs], shards: list[Shard], *, ahead: bool):
        self._prepare, self.shards, self._ahead = prepare, list(shards), ahead
        self._requests: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[tuple[ShardInputs | None, BaseException | None]] = queue.SimpleQueue()
        self._handed = 0  # shards returned by next()
        self.waited = 0.0  # seconds next() spent waiting for the thread: the preparing left on the caller's path
        self._thread = threading.Thread(target=self._work, name="embedkit-shard-feed", daemon=True)
        self._thread.start()
        if self.shards:
            self._requests.put(0)

    def _work(self) -> None:
        while True:
            k = self._requests.get()
            if k is None:
                return
            try:
                self._results.put((self._prepare(self.shards[k]), None))
            except BaseException as e:  # raised where the caller asks for this shard
                self._results.put((None, e))

    def next(self) -> ShardInputs:
        """The next shard's inputs (waiting for the thread if they are not ready)."""
        k = self._handed
        if k >= len(self.shards):
            raise IndexError("every shard was handed out")
        if k > 0 and not self._ahead:
            self._requests.put(k)
        t = time.perf_counter()
        prepared, error = self._results.get()
        self.waited += time.perf_counter() - t
        self._handed = k + 1
        if error is not None:
            self.close()
            raise error
        if self._ahead and k + 1 < len(self.shards):
            self._requests.put(k + 1)  # prepared while the caller works on this one
        return prepared

    def close(self) -> None:
        """Stop the thread after the shard it is preparing (if any); nothing more is prepared."""
        self._requests.put(None)

    def __enter__(self) -> "ShardFeed":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def open_feed(input: str | os.PathLike, corpus: Corpus, cfg: GenerateConfig, template: str, target: str, device_type: str,
              shards: list[Shard]) -> Iterator[tuple[ShardFeed, Any]]:  # fmt: skip
    """The feed of `shards` for a run on `device_type`, started before this process loads its
    tokenizer (yielded with the feed) and the model: in a child process where
    PREPARE_IN_PROCESS says so, else in the feed's thread once the tokenizer is loaded."""
    from .model import load_tokenizer

    ahead = PREPARE_AHEAD[device_type]
    if PREPARE_IN_PROCESS[device_type]:
        source = FeedSource(str(input), Columns(cfg.text_column, cfg.id_column), cfg, template, target)
        with ShardProcess(source) as child, ShardFeed(child, shards, ahead=ahead) as feed:
            tok, _, _ = load_tokenizer(target)  # this process's own: for the summaries' texts
            yield feed, tok
        return
    tok, config, _ = load_tokenizer(target)
    with ShardFeed(functools.partial(prepare_shard, corpus, cfg=cfg, template=template, tok=tok, config=config), shards, ahead=ahead) as feed:
        yield feed, tok


@dataclass(frozen=True)
class FeedSource:
    """What a child process needs to prepare shards on its own: the input, its columns, the
    stage's config and prompt template, and the model's resolved name (for its tokenizer)."""

    input: str
    columns: Columns
    cfg: GenerateConfig
    template: str
    target: str


class ShardProcess:
    """`prepare_shard` in a child Python (`feed._serve`), called like a
    function (from the feed's thread, which waits on the pipe without holding the GIL).

    Tokenizing in a thread holds this process's GIL for building prompts and token lists, which
    slows the decoding and the model's load beside it; in a child it holds none. The child sends
    a shard's token lists as one flat int32 array (pickled at memory speed), turned back into
    lists here in one pass. The child ignores Ctrl-C (the parent ends it) and exits when its
    input closes, so it ends with a parent that is killed."""

    def __init__(self, source: FeedSource):
        self._stderr = tempfile.TemporaryFile()
        # this embedkit first on the child's path (not whatever its working folder holds); its
        # tokenizer is fresh, so its fast tokenizer may use every core
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "true", "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
        code = "import sys; del sys.path[0]; from embedkit.generation.feed import _serve; _serve()"  # path[0]: the working folder
        self._proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=env)
        self._send(source)

    def _send(self, message: Any) -> None:
        try:
            pickle.dump(message, self._proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            raise self._ended() from None

    def _ended(self) -> EmbedkitError:
        code = self._proc.wait()
        self._stderr.seek(0)
        lines = [line for line in self._stderr.read().decode(errors="replace").splitlines() if line.strip()]
        return EmbedkitError(f"the process preparing shards ended (exit code {code}){': ' + lines[-1] if lines else ''}")

    def __call__(self, shard: Shard) -> ShardInputs:
        self._send(shard)
        try:
            kind, value = pickle.load(self._proc.stdout)
        except (EOFError, pickle.UnpicklingError, OSError):
            raise self._ended() from None
        if kind == "error":
            raise value
        return _unpack(value)

    def close(self) -> None:
        """End the child: its input closed, then killed if it is still busy with a shard."""
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc.stdout.close()
        self._stderr.close()

    def __enter__(self) -> "ShardProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pack(prepared: ShardInputs) -> ShardInputs:
    """For the pipe: the rows' ids only (all a commit needs) and token lists as (flat int32, lengths)."""
    inputs: Any = prepared.inputs
    if all(isinstance(x, list) for x in inputs):  # summarize and classify: token lists; score's pairs go as they are
        lengths = np.fromiter(map(len, inputs), dtype=np.int64, count=len(inputs))
        inputs = ("flat", np.fromiter(itertools.chain.from_iterable(inputs), dtype=np.int32, count=int(lengths.sum())), lengths)
    return replace(prepared, table=prepared.table.select(["id"]), inputs=inputs)


def _unpack(prepared: ShardInputs) -> ShardInputs:
    inputs: Any = prepared.inputs
    if isinstance(inputs, tuple) and inputs[0] == "flat":
        _, flat, lengths = inputs
        ids = flat.tolist()  # one pass over the shard's tokens in C, then list slices
        ends = np.cumsum(lengths).tolist()
        inputs = [ids[a:b] for a, b in zip([0, *ends[:-1]], ends)]
    return replace(prepared, inputs=inputs)


def _portable(e: BaseException) -> BaseException:
    """An exception the parent can unpickle: itself when it pickles, else its first line."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return EmbedkitError(first_line(e))


def _serve() -> None:
    """The child's loop: a FeedSource, then shards to prepare until its input closes (or None)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the parent, which ends this process
    out = os.fdopen(os.dup(1), "wb")  # the replies; anything a library prints goes to stderr
    os.dup2(2, 1)
    source: FeedSource = pickle.load(sys.stdin.buffer)
    setup: tuple | BaseException
    try:
        from .model import load_tokenizer

        tok, config, _ = load_tokenizer(source.target)
        setup = (open_corpus(source.input, source.columns), tok, config)
    except BaseException as e:  # reported for the first shard asked for
        setup = e
    while True:
        try:
            shard = pickle.load(sys.stdin.buffer)
        except EOFError:
            return
        if shard is None:
            return
        try:
            if isinstance(setup, BaseException):
                raise setup
            corpus, tok, config = setup
            reply: tuple = ("ok", _pack(prepare_shard(corpus, shard, source.cfg, source.template, tok, config)))
        except BaseException as e:
            reply = ("error", _portable(e))
        try:
            pickle.dump(reply, out, protocol=pickle.HIGHEST_PROTOCOL)
            out.flush()
        except (BrokenPipeError, OSError):  # the parent is gone
            return
