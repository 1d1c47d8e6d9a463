"""An ablation's output folder: one run at a time, and earlier runs set aside, never deleted.

A run holds ``<output>/.run.lock`` with ``fcntl.flock`` for as long as it runs (the command line holds it until
its report is written). The kernel drops the lock when the process ends, however it ends, so a killed run never
blocks its rerun; a second run on a folder in use is refused with :class:`OutputInUseError` instead of appending
duplicate rows. The lock file itself stays (deleting a lock file races with a run that has just opened it); it is
empty of meaning once no process holds it.

``--fresh`` moves everything the folder holds (rows, config, reports, plots) into a sibling folder
``<output>.previous-<UTC time>`` before the new run writes its first row: the earlier results stay whole there
(``read_rows(<that folder>)`` reads them, its report stays beside them) and nothing is deleted.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LOCK_NAME", "OutputInUseError", "hold", "keep_held", "set_aside"]

LOCK_NAME = ".run.lock"


class OutputInUseError(OSError):
    """Another process is running on this output folder (an ``OSError``: ``pyrtok`` commands print it as one
    line and exit with status 2)."""


@dataclass
class _Held:
    fd: int
    users: int


_HELD: dict[Path, _Held] = {}  # resolved folder -> the lock this process holds on it
_KEEPING = 0  # > 0 inside keep_held(): locks whose last user let go stay held until the block ends


def _acquire(folder: Path) -> None:
    """Take ``folder``'s lock (creating the folder), or count one more user of a lock this process holds."""
    key = folder.resolve()
    if key in _HELD:
        _HELD[key].users += 1
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: someone holds it
        holder = " ".join(os.pread(fd, 200, 0).decode(errors="replace").split()) or "another process"
        os.close(fd)
        raise OutputInUseError(f"{folder} is in use by another run ({holder}; lock {folder / LOCK_NAME}): wait for "
                               f"it to end, or give this run another --output") from None
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode(), 0)
    _HELD[key] = _Held(fd, 1)


def _release(folder: Path) -> None:
    key = folder.resolve()
    held = _HELD.get(key)
    if held is None:
        return
    held.users -= 1
    if held.users <= 0 and not _KEEPING:
        _close(key)


def _close(key: Path) -> None:
    held = _HELD.pop(key)
    fcntl.flock(held.fd, fcntl.LOCK_UN)
    os.close(held.fd)


@contextmanager
def hold(output: str | Path, state: Any = None) -> Iterator[Path]:
    """Hold ``output`` (created if missing) exclusively for the block; yields it as a ``Path``.

    With an accelerate ``state`` of several processes, every process must enter together: the main process
    takes the lock and tells the others whether it got it, so all of them raise or none does. Re-entering in a
    process that holds the lock is allowed (the command line holds it around the runner, which takes it too).

    Raises:
        OutputInUseError: another process holds the lock; the message names the folder and the holder.
    """
    folder = Path(output)
    main = state is None or state.is_main_process
    failure: OSError | None = None
    if main:
        try:
            _acquire(folder)
        except OSError as error:  # the refusal, or a folder that cannot be created: every process raises it
            failure = error
    if state is not None and state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = [None if failure is None else str(failure)]
        broadcast_object_list(message)
        if failure is None and message[0] is not None:
            failure = OutputInUseError(message[0])
    if failure is not None:
        raise failure
    try:
        yield folder
    finally:
        if main:
            _release(folder)


@contextmanager
def keep_held() -> Iterator[None]:
    """Locks that :func:`hold` takes inside this block stay held until the block ends (the command line wraps
    the run and its report in it, so no other run starts between the last row and the report)."""
    global _KEEPING
    _KEEPING += 1
    try:
        yield
    finally:
        _KEEPING -= 1
        if not _KEEPING:
            for key in [k for k, held in _HELD.items() if held.users <= 0]:
                _close(key)


def set_aside(output: str | Path) -> Path | None:
    """Move everything in ``output`` but its lock into a new sibling folder ``<output>.previous-<UTC time>``;
    returns that folder, or ``None`` when ``output`` holds nothing to keep. Call it holding the lock."""
    folder = Path(output)
    entries = sorted(p for p in folder.iterdir() if p.name != LOCK_NAME) if folder.is_dir() else []
    if not entries:
        return None
    base = folder if folder.name not in ("", ".", "..") else folder.resolve()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target, n = base.with_name(f"{base.name}.previous-{stamp}"), 1
    while True:  # two fresh starts within a second get two folders
        try:
            target.mkdir()
            break
        except FileExistsError:
            n += 1
            target = base.with_name(f"{base.name}.previous-{stamp}-{n}")
    for entry in entries:
        shutil.move(str(entry), str(target / entry.name))
    return target
