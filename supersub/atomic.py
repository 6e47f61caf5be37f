"""Files that are either whole or absent: atomic writes, recorded hashes, leftovers.

* **Atomic writes.** :func:`atomic_path` hands out a temporary name in the target's own folder
  (``<name>.tmp<pid>``), and when the block succeeds flushes it to disk (``fsync``) and renames it
  into place (``os.replace``, atomic within a filesystem), then syncs the folder so the rename
  itself survives a power cut. A kill or a full disk inside the block leaves the old file (or
  none) and at worst a ``*.tmp<pid>`` leftover — never a half-written file under the real name.
* **Recorded outputs.** :func:`record` gives ``{relative path: {"bytes", "sha256"}}`` of a
  task's outputs; :func:`damaged` checks them again (size first: cheap and catches truncation;
  then sha256) and says in one line which file is wrong and how. Hashes are memoised per
  ``(path, inode, size, mtime)`` so a file is read at most once a process (``network_hash``
  reuses the same memo).
* **Leftovers.** :func:`remove_leftovers` removes the temporary files and folders of processes
  that are gone (a pid that still runs on this machine keeps its files: another job may be
  writing them).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

# <name>.tmp<pid> (a file or a folder: bundle.tmp<pid>/, checkpoint.pt.tmp<pid>).
temp_pattern = _TMP = re.compile(r"^(?P<stem>.+)\.tmp(?P<pid>\d+)$")
_memo: dict[tuple[str, int, int, int], str] = {}
_memo_lock = threading.Lock()


def temp_name(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def fsync_dir(folder: str | Path) -> None:
    """Makes the renames inside ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; renamed into place when the block
    succeeds, removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        full = isinstance(e, Exception) and not no_space(e) and disk_full(path.parent)
        with contextlib.suppress(OSError):
            tmp.unlink()
        if full:  # writers that hide the errno (torch.save, safetensors): say what happened
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from e
        raise
    fsync_dir(path.parent)


def disk_full(folder: str | Path, below: int = 1 << 20) -> bool:
    """Whether the filesystem of ``folder`` has less than ``below`` bytes left for us."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < below


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def fsync_tree(folder: str | Path) -> None:
    """Flushes every file under ``folder`` and the folders themselves (before a folder rename)."""
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_file(Path(root) / name)
        fsync_dir(root)


# ----------------------------------------------------------------------------- hashes
def sha256_file(path: str | Path) -> str:
    """sha256 of a file, memoised per (path, inode, size, mtime): read at most once a process."""
    st = os.stat(path)
    key = (str(Path(path).absolute()), st.st_ino, st.st_size, st.st_mtime_ns)
    with _memo_lock:
        if key in _memo:
            return _memo[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    with _memo_lock:
        _memo[key] = h.hexdigest()
    return _memo[key]


def output_files(folder: str | Path, names: Iterable[str]) -> list[str]:
    """The files ``names`` stand for under ``folder`` (a folder name stands for every file in it),
    as sorted relative POSIX paths; temporary files left out."""
    folder, out = Path(folder), set()
    for name in names:
        p = folder / name
        for f in ([p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]):
            if not _TMP.match(f.name):
                out.add(f.relative_to(folder).as_posix())
    return sorted(out)


def record(folder: str | Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{relative path: {"bytes", "sha256"}}`` of the outputs ``names`` under ``folder``."""
    folder = Path(folder)
    return {rel: {"bytes": (folder / rel).stat().st_size, "sha256": sha256_file(folder / rel)}
            for rel in output_files(folder, names)}


def damaged(folder: str | Path, recorded: dict[str, dict[str, Any]]) -> str | None:
    """Why the recorded outputs under ``folder`` cannot be trusted, in one line, or None."""
    folder = Path(folder)
    for rel, want in sorted(recorded.items()):  # sizes first: a stat each, catches truncation
        p = folder / rel
        if not p.is_file():
            return f"{rel} is missing"
        size = p.stat().st_size
        if size != want["bytes"]:
            return f"{rel} is damaged ({size:,} bytes, {want['bytes']:,} recorded)"
    for rel, want in sorted(recorded.items()):
        if sha256_file(folder / rel) != want["sha256"]:
            return f"{rel} is damaged (its sha256 differs from the one recorded)"
    return None


# ----------------------------------------------------------------------------- leftovers
def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def temporary(name: str) -> bool:
    """Whether ``name`` is a temporary file or folder's (``*.tmp<pid>``), its process alive or not."""
    return bool(_TMP.match(name))


def leftover(path: Path) -> bool:
    """Whether ``path`` is a temporary file or folder of a process that is gone."""
    m = _TMP.match(path.name)
    return bool(m) and int(m["pid"]) != os.getpid() and not pid_alive(int(m["pid"]))


def remove_leftovers(root: str | Path, skip: Iterable[str] = ()) -> list[Path]:
    """Removes the leftovers of dead processes under ``root`` (not descending into ``skip``
    folder names, e.g. Ray's own run state); returns what it removed."""
    removed: list[Path] = []
    skip = set(skip)
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in list(dirnames):
            if name in skip:
                dirnames.remove(name)
            elif leftover(here / name):
                shutil.rmtree(here / name, ignore_errors=True)
                dirnames.remove(name)
                removed.append(here / name)
        for name in filenames:
            if leftover(here / name):
                with contextlib.suppress(FileNotFoundError):
                    (here / name).unlink()
                removed.append(here / name)
    return removed


def no_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC
