"""The one way threeds replaces a file: write a temporary sibling, fsync it, rename it over the
target. Readers (the app, a resumed run) see the old file or the new one, never half of one."""

from __future__ import annotations

import errno
import glob
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], object], mode: str = "wb") -> None:
    """Call `write(file)` on a temporary file opened with `mode` ("wb" or "w"), then rename it to `path`.
    The file gets the mode a plain open() would (0644 under umask 022), and an OS error names `path`,
    never the temporary file."""
    path = Path(path)
    if path.is_dir():  # else os.replace would name the temporary file in its error
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    make_parent(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes it 0600: a trainer on a shared cache could not read it
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename in (None, tmp):  # ENOSPC from write or fsync, EACCES from mkstemp
            raise type(exc)(exc.errno, exc.strerror, str(path)) from exc
        raise


def follow_umask(folder: str | os.PathLike) -> None:
    """Give `folder` and everything in it the modes plain mkdir/open would (0755/0644 under umask 022):
    tempfile.mkdtemp makes a folder 0700 and safetensors writes its files 0600, so a model cache or
    an adapter shared with a trainer or a server in another account could not be read."""
    mask = current_umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_writable(path: str | os.PathLike) -> None:
    """Fail now, naming `path`, if a file could not be written there (a directory in the way, a
    read-only or full folder): for a command whose output comes after other work it must not redo
    or leave half done."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    make_parent(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise type(exc)(exc.errno, exc.strerror, str(path)) from exc
    os.close(fd)
    os.unlink(tmp)


def remove_temps(folder: str | os.PathLike, names: tuple[str, ...] | None = None) -> list[Path]:
    """Remove the temporary files a killed `atomic_write` left in `folder` (of the targets `names`,
    or all of them); only the folder's one writer may call this. Returns what was removed."""
    folder = Path(folder)
    patterns = [f".{glob.escape(name)}.*.tmp" for name in names] if names is not None else [".*.tmp"]
    found = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})
    for path in found:
        path.unlink(missing_ok=True)
    return found


def make_parent(path: str | os.PathLike) -> None:
    """Create the folder `path` goes in; a file in the way is named (mkdir would say "exists")."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), path.parent)
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(blocker)) from exc
