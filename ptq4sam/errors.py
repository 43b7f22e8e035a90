"""Errors about what the user gave (files, configs, options, data), and atomic file writes.

Every :class:`UserError` names the file / key / value at fault and what was expected; the CLI prints it as one line on
stderr and exits with status 2 (``--debug`` shows the traceback). Anything else is a bug and keeps its traceback.
Torch-free and mmcv-free: importable everywhere.
"""
from __future__ import annotations

import contextlib
import math
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence, Union


def is_int(v) -> bool:
    """An integer read from JSON / YAML (``True`` is not one)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A finite number read from JSON / YAML (NaN / Inf would pass every range check and poison a run)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def short_repr(value, n: int = 60) -> str:
    """``repr(value)`` cut to ``n`` characters, for naming a bad value in a one-line error."""
    r = repr(value)
    return r if len(r) <= n else r[:n] + "..."


class UserError(Exception):
    """A problem with an input the user chose (file, config key, option, data), not with the toolkit."""


class InputError(UserError, ValueError):
    """A value in a file or option is not what the toolkit expects."""


class InputNotFound(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class UnknownName(UserError, KeyError):
    """A name (model type, key, image) that is not known; printed without KeyError's quotes."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class NonFiniteActivation(UserError, FloatingPointError):
    """NaN / Inf reached a quantizer during calibration (named), e.g. from a corrupt image or broken weights."""


class ImageReadError(UserError, OSError):
    """An image file cannot be decoded, or is truncated."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


class WorkDirError(UserError, OSError):
    """An output folder cannot be created or written."""


def check_writable_dir(path: Union[str, Path], what: str) -> Path:
    """Create ``path`` if needed and prove a file can be written there (before hours of work, not after)."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise WorkDirError(f"{what} {p}: cannot write there ({e.strerror or type(e).__name__}); give a folder you "
                           "can write to") from None
    return p


def atomic_write(path: Union[str, Path], write: Callable[[str], None]) -> Path:
    """``write(tmp_path)`` then rename onto ``path``: an interrupted run leaves the old file or none, never a
    truncated one that looks valid. The temporary file (same folder, so the rename is atomic) keeps the suffix, so
    writers that pick a format by extension still work."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make outputs private: use what open() would give
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # on disk before the rename, so a power cut cannot leave an empty file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def atomic_write_text(path: Union[str, Path], text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


KNOWN_USER_ERRORS = (UserError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def command_line(script: str, argv: Optional[Sequence[str]] = None) -> str:
    """The command a tool was run with, as a shell line that runs it again (arguments with spaces or shell characters
    quoted): what result files record beside their numbers. ``argv``: the tool's arguments (default: ``sys.argv``'s)."""
    return f"python {script} " + shlex.join(list(argv if argv is not None else sys.argv[1:]))


def run_cli(fn, args) -> int:
    """``fn(args)``; a known input error becomes one line ``error: ...`` on stderr and exit status 2 (``args.debug``:
    raised with its traceback)."""
    import sys  # noqa: PLC0415

    try:
        return fn(args) or 0
    except KNOWN_USER_ERRORS as e:
        if getattr(args, "debug", False):
            raise
        msg = " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())  # one line, even for key lists
        print(f"error: {msg}", file=sys.stderr)
        return 2
