"""The command line's one error path: an expected failure becomes one ``error:`` line, exit code 2.

Expected failures are what a user can fix without reading our code: a recipe key or value, a file
that is missing, damaged or unreadable, a full disk, a read-only folder. Anything else is a bug
and keeps its traceback. ``--debug`` (or ``DIFFDISTILL_DEBUG=1``) prints the traceback of an
expected failure too.
"""

from __future__ import annotations

import errno
import json
import os

import yaml
from safetensors import SafetensorError

EXIT_ERROR, EXIT_INTERRUPTED = 2, 130  # 2: what argparse uses for usage errors; 130: 128 + SIGINT, as shells report

OS_FIXES = {  # errno -> the fix, for the OSErrors a user meets on a real machine
    errno.ENOSPC: "free some space or choose another folder",
    errno.EDQUOT: "free some space or choose another folder",
    errno.EROFS: "the file system is read-only; choose a writable folder",
    errno.EACCES: "check its permissions or choose a writable folder",
    errno.EPERM: "check its permissions or choose a writable folder",
    errno.ENOENT: "check the path",
    errno.EISDIR: "give a file, not a folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
}


class Interrupted(SystemExit, KeyboardInterrupt):
    """Ctrl-C, once reported: the interpreter exits with its code (130) and no traceback, as for any
    SystemExit, while Python callers of ``main()`` (a notebook, a test) still catch a KeyboardInterrupt."""


def debug_requested(flag: bool) -> bool:
    return flag or os.environ.get("DIFFDISTILL_DEBUG", "") not in ("", "0")


def expected_errors() -> tuple[type[BaseException], ...]:
    """The classes of the failures a user can fix (imported here, lazily: they pull in torch)."""
    from diffdistill.backbones.loading import CheckpointError  # lazy, as in cli.py; ExportError is one
    from diffdistill.config import ConfigError  # lazy, as in cli.py
    from diffdistill.eval import MissingWeightsError  # lazy, as in cli.py

    return (ConfigError, CheckpointError, MissingWeightsError, OSError, SafetensorError, yaml.YAMLError,
            UnicodeDecodeError, json.JSONDecodeError)


def one_line(error: BaseException) -> str:
    """``error: ...``: what failed, where, and the fix, on a single line."""
    if isinstance(error, OSError) and error.strerror and type(error) in (OSError, FileNotFoundError, PermissionError,
                                                                          IsADirectoryError, NotADirectoryError):
        where = f": {error.filename}" if error.filename else ""
        fix = OS_FIXES.get(error.errno)
        message = f"{error.strerror}{where}" + (f"; {fix}" if fix else "")
    elif isinstance(error, SafetensorError):
        message = f"damaged or unwritable .safetensors file ({error}); if writing, check free space; if reading, re-create the file"
    elif isinstance(error, UnicodeDecodeError):
        message = f"a file is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8"
    elif isinstance(error, yaml.YAMLError):
        message = f"not valid YAML: {' '.join(str(error).split())}"
    elif isinstance(error, json.JSONDecodeError):
        message = f"not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); fix or re-create the file"
    else:
        message = str(error) or type(error).__name__
    return "error: " + " ".join(message.removeprefix("error: ").split())  # one line, whatever the message held
