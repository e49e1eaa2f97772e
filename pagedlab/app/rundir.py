"""Run directories: one run writes one directory, and never over finished results by accident.

A run takes an exclusive lock on ``<run dir>/.pagedlab.lock`` for its whole duration (``flock``:
the OS drops it when the process dies, so a crashed run never leaves its directory locked) and
refuses a directory that already holds results unless ``overwrite=true``, in which case the old
``finished.json`` goes first, so a run that then fails leaves no finished-looking results behind.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Any, ClassVar, final

from hydra.errors import CompactHydraException

from pagedlab.engine.result import MARKER, has_results

LOCK = ".pagedlab.lock"


class RunDirError(CompactHydraException):
    """A run dir that cannot be used (holds results, locked, not writable); Hydra prints just this."""


class LockHeld(RuntimeError):
    """A lock file held by another process."""

    def __init__(self, path: Path, pid: int | None) -> None:
        super().__init__(f"{path} is held by pid {pid}")
        self.path, self.pid = path, pid


def lock_holder(path: Path) -> int | None:
    """The pid written in a lock file (None if absent or unreadable)."""
    try:
        return int(path.read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


@final
class FileLock:
    """An exclusive ``flock`` on a file that holds the owner's pid. Taking a lock this process
    already holds reuses it (the first holder releases it)."""

    _held: ClassVar[dict[Path, int]] = {}  # path -> fd, in this process

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).absolute()
        self.fd: int | None = None

    def acquire(self, timeout: float = 0.0) -> FileLock:
        """Take the lock, waiting up to ``timeout`` seconds; raises LockHeld (or OSError: no access)."""
        if self.path in self._held:
            return self
        deadline = time.monotonic() + timeout
        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() >= deadline:
                    raise LockHeld(self.path, lock_holder(self.path)) from None
                time.sleep(0.05)
                continue
            try:  # the holder before us may have unlinked the file as we opened it: lock the one there now
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self.fd = self._held[self.path] = fd
            return self

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still locked: a waiter then retries on the new file
        os.close(self.fd)  # drops the flock
        del self._held[self.path]
        self.fd = None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim_run_dir(run_dir: Path, overwrite: bool) -> FileLock:
    """Lock run_dir for this process; refuse it if it holds results (unless overwrite: then its
    marker goes first), if another live run holds it, or if it cannot be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(run_dir / LOCK).acquire()
    except LockHeld as exc:
        raise RunDirError(f"pagedlab: {run_dir} is in use by another run (pid {exc.pid}, lock file {exc.path}); "
                          "wait for it or pick another hydra.run.dir") from None
    except OSError as exc:
        raise RunDirError(f"pagedlab: cannot write to {run_dir} ({exc.strerror or exc}); "
                          "pick another hydra.run.dir") from None
    if has_results(run_dir):
        if not overwrite:
            lock.release()
            raise RunDirError(f"pagedlab: {run_dir} already holds results ({MARKER} or result files); "
                              "nothing was run: pass overwrite=true to replace them, or pick another hydra.run.dir")
        (run_dir / MARKER).unlink(missing_ok=True)
    (run_dir / "failed.json").unlink(missing_ok=True)
    return lock


def _cli_values(overrides: list[str]) -> dict[str, Any] | None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # noqa: BLE001 - Hydra reports bad overrides itself
        return None
    return {p.key_or_group: p.value() for p in parsed if not p.is_sweep_override() and not p.is_delete()}


def cli_dir_lock(overrides: list[str], multirun: bool) -> FileLock | None:
    """Check (and for a single run, lock) the output dir a command line names with
    ``hydra.run.dir=`` / ``hydra.sweep.dir=`` before Hydra writes anything into it. A sweep dir
    that holds results is refused unless ``overwrite=true``; each job then replaces only its own."""
    values = _cli_values(overrides)
    if values is None:
        return None
    overwrite = str(values.get("overwrite")).lower() == "true"
    target = values.get("hydra.sweep.dir" if multirun else "hydra.run.dir")
    if not isinstance(target, str) or "${" in target:
        return None
    path = Path(target).absolute()
    if not multirun:
        return claim_run_dir(path, overwrite)
    if not overwrite and path.is_dir() and ((path / "summary.parquet").exists() or any(path.rglob(MARKER))):
        raise RunDirError(f"pagedlab: {path} already holds results of a sweep; nothing was run: pass "
                          "overwrite=true to replace them job by job, or pick another hydra.sweep.dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".pagedlab-write-check-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise RunDirError(f"pagedlab: cannot write to {path} ({exc.strerror or exc}); "
                          "pick another hydra.sweep.dir") from None
    return None
