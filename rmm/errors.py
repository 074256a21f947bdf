"""One error type for everything a user can get wrong, with a message that says where and why."""

from __future__ import annotations

from pathlib import Path


class RMMError(ValueError):
    """Bad input: names the file and, when known, the module, and says what to do.

    Raised before anything is written, so a refused run leaves no partial output.
    """

    def __init__(self, reason: str, *, file: str | Path | None = None, module: str | None = None):
        self.file, self.module, self.reason = file, module, reason
        where = []
        if file is not None:
            where.append(str(file))
        if module is not None:
            where.append(f"module {module}")
        super().__init__(f"{': '.join(where)}: {reason}" if where else reason)


def first_line(e: Exception) -> str:
    """The first line of a library's error (or its type's name), for a one-line message."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
