"""Writes that never leave a half-written file, a stray temp folder, or a folder two runs share.

- :func:`atomic_file` / :func:`atomic_dir` — write under a temp name beside the target
  (``.<name>.tmp<pid>``), then ``os.replace`` it into place. A crash leaves the old version intact;
  a failure removes the temp; a full disk (``ENOSPC``/``EDQUOT``) becomes one :class:`WriteError`
  naming the path. Finished files get the user's umask (safetensors and ``mkstemp`` create 0600).
- :func:`sweep_stale_temps` — removes temps a killed writer left behind, only after checking that
  the PID in their name is not a live process.
- :class:`OutputLock` — a lock file in an output folder naming its owner (PID, host, command); a
  second run writing to the same folder is refused while the first is alive. It is an ``flock``, so
  the kernel releases it when its owner dies, even by SIGKILL: a resumed run is never locked out.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import IO, Iterator

from jointdit.errors import LockError, WriteError

LOCK_FILE = ".jointdit.lock"
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# Temp names written by this module (``.<name>.tmp<pid>``), the cache (``.tmp-<name>.<pid>``) and the
# trainer (``.tmp_step_000100``, no PID: stale whenever the folder's OutputLock is ours).
_TEMP_PATTERNS = (re.compile(r"^\..+\.tmp(?P<pid>\d+)$"), re.compile(r"^\.tmp-.+\.(?P<pid>\d+)$"),
                  re.compile(r"^\.tmp_.+$"), re.compile(r"^\..+\.old$"))


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give ``path`` (recursively) the permissions a plain ``open``/``mkdir`` would: 0666/0777 minus umask."""
    mask = umask()
    path = Path(path)
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
        for root, dirs, files in os.walk(path):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
    elif path.exists():
        os.chmod(path, 0o666 & ~mask)


def temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp{os.getpid()}")


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in _DISK_FULL


def write_error(err: OSError, path: Path) -> WriteError:
    """The :class:`WriteError` for an ``OSError`` met while writing ``path`` (disk full named as such)."""
    if is_disk_full(err):
        return WriteError(f"disk full while writing {path} ({os.strerror(err.errno)}); nothing was replaced and "
                          f"the temp files were removed", hint=f"free space on the disk holding {path.parent} "
                                                               f"(or point the output elsewhere) and rerun")
    return WriteError(f"cannot write {path}: {err.strerror or err}", hint="check that the folder exists and is "
                                                                        "writable by you")


def discard(path: Path) -> None:
    """Remove a temp file or folder, whatever is there (nothing is an error)."""
    _remove(Path(path))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temp folder into place; an existing ``final`` is moved aside first, then removed."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        _remove(old)
        os.replace(final, old)
        os.replace(tmp, final)
        _remove(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """``with atomic_file(p, "w") as fh: fh.write(...)`` — ``p`` appears complete or not at all."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    try:
        with open(tmp, mode) as handle:  # plain open: the umask applies
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as err:
        _remove(tmp)
        raise write_error(err, final) from err
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_file(path, "w") as handle:
        handle.write(text)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_file(path, "wb") as handle:
        handle.write(data)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, tmp: str | os.PathLike | None = None) -> Iterator[Path]:
    """``with atomic_dir(folder) as tmp: <write into tmp>`` — then ``tmp`` replaces ``folder`` whole.

    On any failure the temp folder is removed and ``folder`` (an older version of it) is untouched; a
    full disk raises :class:`WriteError` naming ``folder``. Files get the user's umask.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tmp) if tmp is not None else temp_name(final)
    _remove(work)
    try:
        work.mkdir(parents=True)
        yield work
        apply_umask(work)
        replace_dir(work, final)
    except OSError as err:
        _remove(work)
        raise write_error(err, final) from err
    except BaseException:
        _remove(work)
        raise


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


def stale_temps(folder: Path, own_folder: bool = False) -> list[Path]:
    """Temp entries directly in ``folder`` whose writer is gone.

    A name with a PID is stale when that PID is not alive (or is this process's, from an earlier,
    failed write). A name without one (the trainer's ``.tmp_step_*``, ``.<name>.old``) is stale only
    when ``own_folder`` says this process holds the folder's :class:`OutputLock`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        for pattern in _TEMP_PATTERNS:
            match = pattern.match(entry.name)
            if match is None:
                continue
            pid = match.groupdict().get("pid")
            if pid is None:
                if own_folder:
                    found.append(entry)
            elif not pid_alive(int(pid)) or int(pid) == os.getpid():
                found.append(entry)
            break
    return sorted(found)


def sweep_stale_temps(*folders: Path, own_folder: bool = False, log=None) -> list[Path]:
    """Remove :func:`stale_temps` of each folder; returns what was removed."""
    removed = []
    for folder in folders:
        for entry in stale_temps(Path(folder), own_folder=own_folder):
            _remove(entry)
            removed.append(entry)
    if removed and log is not None:
        log(f"removed {len(removed)} stale temp file(s) left by a killed writer: "
            + ", ".join(str(p) for p in removed[:5]) + (" ..." if len(removed) > 5 else ""))
    return removed


class OutputLock:
    """``with OutputLock(folder): ...`` — refuse a second live writer of ``folder``.

    The lock file ``<folder>/.jointdit.lock`` holds the owner's PID, host, start time and command as
    JSON; the lock itself is an exclusive ``flock`` on it, released by the kernel when the owner exits
    or is killed, so no stale lock ever blocks a resume.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "run") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.what = what
        self._fd: int | None = None

    def owner(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "OutputLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            owner = self.owner()
            who = (f"PID {owner.get('pid', '?')} on {owner.get('host', '?')}, started "
                   f"{owner.get('started', '?')}: {owner.get('command', '?')}")
            raise LockError(f"{self.folder} is in use by another {self.what} ({who})",
                            hint=f"wait for PID {owner.get('pid', '?')} to finish, or write elsewhere "
                                 f"(hydra.run.dir=<another folder>)") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
