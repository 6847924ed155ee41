"""One training run per output directory: an exclusive lock on ``<output_dir>/.lock``.

Two ``ogls-sd train -o runs/x`` started side by side would otherwise both run: the second unlinks
the first's ``metrics.jsonl`` and overwrites its config, summary and checkpoints. :func:`run_lock`
takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``<output_dir>/.lock`` and writes the holder's PID (and
host) into it; a second run fails at once with :class:`RunLockedError`, one line naming that PID.

* The lock lives as long as the open file: it is released when the run ends, by an error too, and
  by the kernel when the process dies, even by SIGKILL. A ``.lock`` file left behind is harmless:
  its content is only read when its lock is held.
* The file is never deleted (deleting a lock file races with a process that is opening it); the
  PID in it is cleared on release.
* Data parallel: only global rank 0 (``RANK`` as torchrun / accelerate launch set it before the
  process group exists, or the MPI rank variables) takes the lock; rank 0 is also the only process
  that writes the run's files. A run refused the lock fails on rank 0, and the launcher stops the
  other ranks.
* Processes forked from the holder (e.g. data-loader workers) do not keep the lock alive: the
  descriptor is close-on-exec and closed in the child after ``os.fork``.
* On a filesystem without ``flock`` support the run continues without the lock, with a warning.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import sys
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
_held: set[int] = set()  # descriptors of locks this process holds (closed in forked children)


class RunLockedError(RuntimeError):
    """The output directory is locked by another live run (one line, names its PID)."""


def _close_in_child() -> None:
    for fd in list(_held):
        try:
            os.close(fd)  # the child's copy only: the parent keeps its lock
        except OSError:
            pass
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


# the global rank as launchers set it before any process group exists: torchrun / accelerate
# launch (RANK), MPI (accelerate's multi-process CPU launch)
_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMIX_RANK")


def _is_lock_rank() -> bool:
    for var in _RANK_VARS:
        if os.environ.get(var, "").strip():
            try:
                return int(os.environ[var]) == 0
            except ValueError:
                return True
    return True


def _read_holder(fd: int) -> tuple[int | None, str]:
    try:
        words = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
    except OSError:
        return None, ""
    pid = int(words[0]) if words and words[0].isdigit() else None
    return pid, (words[1] if len(words) > 1 else "")


def _holder_text(fd: int) -> str:
    """``pid N on host H``; the holder writes its PID right after taking the lock, so wait briefly
    while the file is still empty (or still names a previous, dead holder on this host)."""
    host = socket.gethostname()
    pid, where = _read_holder(fd)
    for _ in range(40):
        if pid is not None and (where != host or _alive(pid)):
            break
        time.sleep(0.025)
        pid, where = _read_holder(fd)
    if pid is None:
        return "pid unknown"
    return f"pid {pid}" + (f" on host {where}" if where and where != host else "")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, but not ours to signal
    return True


class RunLock:
    """The lock on one output directory; :meth:`acquire` / :meth:`release` (or ``with``)."""

    def __init__(self, output_dir: str | os.PathLike):
        self.dir = Path(output_dir)
        self.path = self.dir / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        if fcntl is None or not _is_lock_rank():
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        # not O_TRUNC: the file may name the current holder, which the refusal below reports
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = _holder_text(fd)
                os.close(fd)
                raise RunLockedError(
                    f"{self.dir} is in use by another run ({holder}; lock {self.path}): wait for it to finish, stop "
                    "it, or pass another output directory (-o / train.output_dir)") from None
            os.close(fd)
            print(f"warning: {self.path}: cannot lock ({os.strerror(e.errno or 0)}); nothing stops a second run "
                  "from using the same output directory", file=sys.stderr)
            return self
        self.fd = fd
        _held.add(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        return self

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is None or fd not in _held:  # not held, or a forked child's stale copy (closed already)
            return
        _held.discard(fd)
        try:
            os.ftruncate(fd, 0)  # while still held: never clears a later holder's PID
        except OSError:
            pass
        os.close(fd)  # releases the flock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def run_lock(output_dir: str | os.PathLike) -> RunLock:
    """``with run_lock(dir): ...`` holds ``<dir>/.lock`` (created with ``dir``) for the block."""
    return RunLock(output_dir)


def holding_run_lock(fn):
    """Decorator for ``train(cfg, ...)``: the whole call holds the lock of ``cfg.train.output_dir``,
    taken before anything in it is read or written."""

    @functools.wraps(fn)
    def wrapper(cfg, *args, **kwargs):
        with run_lock(cfg.train.output_dir):
            return fn(cfg, *args, **kwargs)

    return wrapper


# ------------------------------------------------------------------ a fresh run in a used directory
RUN_FILES = ("config.yaml", "metrics.jsonl", "completions.jsonl", "summary.json", "checkpoints", "eval", "tb")


class RunDirInUse(ValueError):
    """A fresh run was asked for in a directory that holds another run's files (one line)."""


def previous_run_files(output_dir: str | os.PathLike) -> list[str]:
    """The files and directories of a run already in ``output_dir`` (names from :data:`RUN_FILES`)."""
    d = Path(output_dir)
    return [name for name in RUN_FILES if (d / name).exists()]


def check_fresh_run_dir(output_dir: str | os.PathLike, overwrite: bool, restart_unsaved: bool = False) -> list[str]:
    """A fresh run may start in ``output_dir`` only when it holds no other run, unless ``overwrite``
    (``ogls-sd train --overwrite``): a fresh run would otherwise mix its metrics and checkpoints
    with the old run's. ``restart_unsaved`` (``--resume latest`` found no checkpoint): a run that
    was stopped before its first checkpoint and never finished may restart. Raises
    :class:`RunDirInUse`; returns the files that :func:`clear_previous_run` will remove."""
    found = previous_run_files(output_dir)
    blocking = [n for n in found if n == "summary.json"] if restart_unsaved else found
    if blocking and not overwrite:
        raise RunDirInUse(
            f"{output_dir} holds another run ({', '.join(found)}): a fresh run there would mix with it. Resume it "
            "(--resume latest), choose another output directory (-o / train.output_dir), or pass --overwrite to "
            "replace it")
    return found


def clear_previous_run(output_dir: str | os.PathLike, names: list[str]) -> None:
    """Remove the previous run's files (``--overwrite``), once every check of the new run passed."""
    import shutil

    d = Path(output_dir)
    for name in names:
        p = d / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
