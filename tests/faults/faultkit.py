"""Helpers of the fault suite: the real CLI in subprocesses, kills at points found by polling OUT.

Nothing here stands in for an embedkit component. A fault is made the way it happens: a
SIGKILL to the running command, a file-size limit on the child process, a damaged file, a
folder the child may not write to. Kill points are found by polling the output folder (cheap
directory listings), never by waiting a fixed time.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pyarrow as pa

HANG_GUARD_S = 300  # only stops a hung test; no assertion depends on time
CLI = [sys.executable, "-m", "embedkit.cli"]

# The shared corpus (conftest.py): 60 sample rows cut to 64 tokens, six shards of 10.
ROWS = 60
SHARD_ROWS = 10
MAX_SEQ = 64
# the options of every encode over the corpus (after INPUT OUT)
ENCODE_OPTIONS = ["--shard-rows", str(SHARD_ROWS), "--max-seq-length", str(MAX_SEQ), "-q"]


@dataclass(frozen=True)
class Result:
    """A finished CLI subprocess."""

    returncode: int
    stdout: str
    stderr: str


def _env(extra: dict | None = None) -> dict:
    return dict(os.environ, PYTHONWARNINGS="ignore", **(extra or {}))


def run(*args: object, preexec: Callable[[], None] | None = None, env: dict | None = None) -> Result:
    """Run `embedkit ARGS` to completion; `preexec` runs in the child before it starts, `env`
    adds to its environment."""
    with warnings.catch_warnings():
        # a preexec_fn makes subprocess fork this process, which has imported lance (it warns)
        warnings.filterwarnings("ignore", message=".*fork-safe.*")
        p = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=_env(env), timeout=HANG_GUARD_S,
                           preexec_fn=preexec)  # fmt: skip
    return Result(p.returncode, p.stdout, p.stderr)


def run_all(commands: Sequence[Sequence[object]]) -> list[Result]:
    """Run several CLI commands at once (they are independent); results in the given order.

    Most of a short command is interpreter and model start-up, mostly on one core, so a handful
    side by side take much less time than one after another.
    """
    procs = [subprocess.Popen([*CLI, *map(str, c)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
             for c in commands]  # fmt: skip
    results = []
    for p in procs:
        out, err = p.communicate(timeout=HANG_GUARD_S)
        results.append(Result(p.returncode, out, err))
    return results


def start(args: Sequence[object], log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start `embedkit ARGS` in its own session, output to a file (an unread pipe could stall it)."""
    with open(log, "w") as sink:
        return subprocess.Popen([*CLI, *map(str, args)], stdout=sink, stderr=subprocess.STDOUT, env=_env(env),
                                start_new_session=True)  # fmt: skip


def run_to_kill(args: Sequence[object], log: Path, kill_at: str) -> None:
    """Run `embedkit ARGS` with the fault hook EMBEDKIT_TEST_KILL_AT=`kill_at` (PHASE:SHARD):
    the command sends itself SIGKILL at that point. Fails unless it died that way."""
    proc = start(args, log, env={"EMBEDKIT_TEST_KILL_AT": kill_at})
    try:
        proc.wait(timeout=HANG_GUARD_S)
    finally:
        kill_group(proc)  # what it started (tokenizer workers) goes with it
    assert proc.returncode == -signal.SIGKILL, (f"not killed at {kill_at}", proc.returncode, log.read_text()[-3000:])


class RunEnded(AssertionError):
    """The command finished before the awaited point: too fast to catch this time."""


def wait_for(proc: subprocess.Popen, ready: Callable[[], bool], log: Path, what: str, poll: float = 0.0002) -> None:
    """Return as soon as `ready()` holds; fail if the command ends first. Polls every `poll`
    seconds: short enough to land inside a phase of a few milliseconds, long enough not to
    take a core from the command on a small machine."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not ready():
        if proc.poll() is not None:
            raise RunEnded(f"the run ended before {what}", log.read_text()[-3000:])
        assert time.monotonic() < deadline, f"never reached: {what}"
        time.sleep(poll)


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], log: Path, what: str) -> None:
    """SIGKILL the command's main process (as the OOM killer or a preemption would) as soon as
    `ready()` holds."""
    wait_for(proc, ready, log, what)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, log.read_text()[-3000:])


def kill_at(args: Sequence[object], logs: Path, what: str, ready: Callable[[subprocess.Popen], Callable[[], bool]],
            landed: Callable[[], bool], reset: Callable[[], None] | None = None, attempts: int = 3) -> int:
    """Start the command and SIGKILL it at the point `ready(proc)()` detects; returns the attempts taken.

    On a busy machine the poll may see a short phase only after the command has left it:
    `landed()` (which also checks the state the kill left) then says so, and the kill is tried
    again in a fresh run, after `reset()` puts back what the late run changed.
    """
    for attempt in range(1, attempts + 1):
        if reset is not None and attempt > 1:
            reset()
        log = logs / f"{what.replace(' ', '-').replace(',', '')}-{attempt}.log"
        proc = start(args, log)
        try:
            kill_when(proc, ready(proc), log, what)
        except RunEnded:  # the phase was over before the poll saw it: as late as a late kill
            if attempt == attempts:
                raise
            continue
        finally:
            kill_group(proc)
        if landed():
            return attempt
    raise AssertionError(f"{attempts} kills in a row came too late for: {what}")


def kill_group(proc: subprocess.Popen) -> None:
    """End what is left of a command started by `start` (a tokenizer worker, say)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def has_children(pid: int) -> bool:
    """Whether the process's main thread has started a child (the tokenizer worker)."""
    try:
        return bool(Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
    except OSError:
        return False


def listing(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def versions(dataset: Path) -> int:
    """Manifests in a Lance dataset folder: one per commit."""
    return sum(name.endswith(".manifest") for name in listing(dataset / "_versions"))


def data_files(dataset: Path) -> set[str]:
    return set(listing(dataset / "data"))


def referenced_files(dataset: Path) -> set[str]:
    import lance

    ds = lance.dataset(str(dataset))
    return {f.path for frag in ds.get_fragments() for f in frag.data_files()}


def assert_one_line_error(result: Result, *needles: str) -> str:
    """Non-zero exit (2), no traceback, one stderr line starting with 'error:' that holds every needle."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def file_size_limit(limit: int) -> Callable[[], None]:
    """preexec_fn: files the child writes may not grow past `limit` bytes (a full disk, for one file).

    Python ignores SIGXFSZ, so the write fails with EFBIG instead of killing the child.
    """

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER = 1, 2, 3
PR_CAPBSET_DROP = 24


def without_override() -> None:
    """preexec_fn: as root, give up the capabilities that ignore file modes, so a folder
    without write permission is read-only for the child too (a no-op for other users)."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            os._exit(97)  # cannot drop it here: the test skips on this exit status


def make_read_only(folder: Path) -> None:
    for root, dirs, files in os.walk(folder):
        for name in files:
            os.chmod(Path(root) / name, 0o444)
        os.chmod(root, 0o555)


def make_writable(folder: Path) -> None:
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(Path(root) / name, 0o644)


def read_vectors(out: Path) -> pa.Table:
    import lance

    return lance.dataset(str(out / "vectors.lance")).to_table()


def assert_exactly_once(out: Path, ids: list) -> pa.Table:
    """OUT's vectors hold every id once and nothing else, and the dataset passes Lance's own check."""
    import lance

    ds = lance.dataset(str(out / "vectors.lance"))
    ds.validate()  # reads every referenced file: manifests, fragments, data
    table = ds.to_table()
    got = table.column("id").to_pylist()
    assert len(got) == len(set(got)), "an id is stored more than once"
    assert sorted(got) == sorted(ids)
    return table


def session_processes(sid: int) -> dict[int, str]:
    """pid -> command line of every live process in session `sid` (a command started by `start`
    leads its own session: its workers, and Ray's processes, stay in it)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        if fields[0] != "Z" and int(fields[3]) == sid:  # state, ppid, pgrp, session
            found[int(entry)] = cmd
    return found


def kill_session(proc: subprocess.Popen) -> None:
    """End every process left in the session of a command started by `start`, one by one."""
    for pid in session_processes(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
