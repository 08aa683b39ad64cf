"""Atomic file writes: a half-written artifact never replaces a good one."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; move it into place only if the block succeeds.

    The temporary name keeps the target's suffix, because some writers (Keras,
    matplotlib) choose the format from it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=target.suffix)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        # mkstemp creates the file private (0600); give it the permissions any new file would get.
        temporary.chmod(0o666 & ~_umask())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _to_builtin(value: Any) -> Any:
    """Make NumPy scalars and arrays JSON-serialisable."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_json(target: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(target) as temporary:
        temporary.write_text(json.dumps(data, indent=2, default=_to_builtin) + "\n")
    return Path(target)


def write_text(target: str | os.PathLike[str], text: str) -> Path:
    with atomic_path(target) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(target)


def write_csv(target: str | os.PathLike[str], frame) -> Path:
    """Write a pandas DataFrame as CSV (no index), atomically."""
    with atomic_path(target) as temporary:
        frame.to_csv(temporary, index=False)
    return Path(target)


def read_json(source: str | os.PathLike[str], *, produced_by: str | None = None) -> Any:
    """Read a JSON artifact; a missing one names the stage that should have written it."""
    source = Path(source)
    if not source.is_file():
        hint = f" Run the {produced_by} stage first (`fmnist run --stage {produced_by}`)." if produced_by else ""
        raise FileNotFoundError(f"{source}: not found.{hint}")
    return json.loads(source.read_text())
