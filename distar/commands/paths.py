"""Checks of path arguments shared by the commands."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError


def writable_dir(path: str | Path, flag: str = "--out") -> Path:
    """Create `path` if needed; a directory that cannot be created or written is a UserError naming `flag`."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{flag} {str(out)!r}: cannot create the directory ({err.strerror or err})") from None
    if not out.is_dir() or not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {str(out)!r}: directory is not writable")
    return out
