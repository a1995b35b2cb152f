"""Putting finished files in place without ever replacing a user's file."""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


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
