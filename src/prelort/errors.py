"""Errors for bad user input: the CLI prints their one-line message and exits with status 2.

Also the one-line error protocol of every command line (``prelort``, ``python -m
prelort.flower.local``): ``fail``, ``os_error_line`` and an argparse parser whose usage errors
are ``UserError``.
"""

from __future__ import annotations

import argparse
import errno
import sys
from typing import NoReturn


class UserError(ValueError):
    """Bad input from the user (config, data, checkpoint, model path): one clear line."""


class ConfigError(UserError):
    """An invalid configuration file or override."""


class UsageError(UserError):
    """A command-line usage error: one line, status 2 (argparse would print the usage too)."""


class UsageParser(argparse.ArgumentParser):
    """Raises ``UsageError`` on bad usage; its sub-command parsers are ``UsageParser`` too."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def fail(message: str) -> int:
    """Print ``message`` as the one ``prelort: error:`` line on stderr; exit status 2."""
    one_line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    print(f"prelort: error: {one_line}", file=sys.stderr)
    return 2


def os_error_line(exc: OSError) -> str:
    """``<path>: <what>; <what to do>`` for a file-system error."""
    permissions = "check its permissions or choose another path"
    full = "free some disk space or choose another path"
    hints = {
        errno.EACCES: permissions,
        errno.EPERM: permissions,
        errno.EROFS: "the file system is read-only; choose another path",
        errno.ENOENT: "check that the path exists",
        errno.EEXIST: "a file is in the way; remove it or choose another path",
        errno.ENOTDIR: "a file is in the way where a folder is needed; choose another path",
        errno.EISDIR: "it is a folder; give a file path",
        errno.ENOSPC: full,
        errno.EDQUOT: full,
    }
    what = exc.strerror or str(exc) or type(exc).__name__
    hint = hints.get(exc.errno or 0, "check the path and try again")
    if exc.filename is None:
        return f"{what}; {hint}"
    return f"{exc.filename}: {what}; {hint}"
