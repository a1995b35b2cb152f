"""Output paths: checked before any work, and finished files put in place without replacing a user's file.

`check_output_file` / `check_output_folder` run before weights load, so that an output that cannot
be written (below a regular file, in a read-only folder, an existing folder where a file is to
go, a FIFO, an existing file without --overwrite) is a one-line `OutputError` instead of a
failure after minutes of compute. Writability is probed by creating and removing a hidden file
in the nearest existing folder, which also catches read-only file systems and root on them.
"""
from __future__ import annotations

import errno
import os
import stat
import uuid
from collections.abc import Iterable
from pathlib import Path

# What an OSError means for an output path, and the fix; the rest is reported with strerror.
_FIXES = {
    errno.EACCES: "permission denied; choose another {flag} or fix the folder's permissions",
    errno.EPERM: "permission denied; choose another {flag} or fix the folder's permissions",
    errno.EROFS: "the file system is read-only; choose another {flag}",
    errno.ENOSPC: "no space left on the device; free some space or choose another {flag}",
    errno.EDQUOT: "disk quota exceeded; free some space or choose another {flag}",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter {flag}",
}


class OutputError(ValueError):
    """An output path that cannot be written; the message names it, what is wrong and the fix."""


def os_problem(exc: OSError, flag: str = "output path") -> str:
    """'strerror; fix' for an OSError met while writing an output."""
    fix = _FIXES.get(exc.errno)
    return fix.format(flag=flag) if fix else (exc.strerror or str(exc))


def _existing_folder(folder: Path, target: Path) -> Path:
    """The nearest of `folder` and its ancestors that exists; OutputError if that is not a folder
    (files cannot be created below a regular file)."""
    current = folder
    while True:
        try:
            st = os.stat(current)
        except (FileNotFoundError, NotADirectoryError):
            if current.parent == current:
                return current
            current = current.parent
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{target}: {current} is a file, not a folder; choose another output path")
        return current


def _probe(folder: Path, target: Path, flag: str) -> None:
    """Create and remove a hidden file in `folder` (proves that files can be made there)."""
    probe = folder / f".nsarm-probe-{uuid.uuid4().hex[:12]}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise OutputError(f"{flag} {target}: cannot create files in {folder}: {os_problem(exc, flag)}") from None
    os.close(fd)
    os.unlink(probe)


def check_output_folder(folder: str | os.PathLike, flag: str = "--output") -> Path:
    """`folder` (existing, or to be created) can receive new files. Returns it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{flag} {folder}: is a file, not a folder; choose a folder (or another name)")
    _probe(_existing_folder(folder, folder), folder, flag)
    return folder


def check_output_file(path: str | os.PathLike, overwrite: bool, flag: str = "--output") -> Path:
    """`path` can be written: not a folder or special file, existing only with `overwrite`, in a
    folder (existing, or to be created) where files can be made. Returns it."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # (below a file: reported by _existing_folder)
        st = None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            try:
                st = os.stat(path)
            except OSError:
                st = None  # a dangling link is replaced like a file
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{flag} {path}: is an existing folder, not a file; name a file, or give the "
                              "folder where a file name is not expected")
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{flag} {path}: exists and is not a regular file (FIFO, device or socket); "
                              "choose another name")
        if not overwrite:
            raise OutputError(f"{flag} {path}: already exists; pass --overwrite to replace it or choose another name")
    _probe(_existing_folder(path.parent, path), path, flag)
    return path


def place_new(tmp: Path, candidates: Iterable[Path]) -> Path | None:
    """Move the finished file `tmp` to the first name of `candidates` that does not exist yet, in
    one atomic step (a hard link, which fails when the name exists; on file systems without hard
    links: check, then rename). Returns that name, or None when every candidate exists (`tmp` is
    then left in place for the caller to remove)."""
    for cand in candidates:
        try:
            os.link(tmp, cand)
        except FileExistsError:
            continue
        except OSError:  # no hard links on this file system
            if cand.exists():
                continue
            os.replace(tmp, cand)
            return cand
        os.unlink(tmp)
        return cand
    return None
