"""Outputs appear whole or not at all: write into a hidden sibling, rename when complete."""

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from loram.shared.errors import LoramError


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an existing, non-empty output directory unless `overwrite` is set."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LoramError(f"output path {out} exists and is not a directory; choose another --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise LoramError(f"output directory {out} already exists; choose another --out or pass --overwrite")


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `out`; on success it replaces `out` in one rename.

    On any exception the temporary directory is removed and `out` is left as it was.
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the complete folder `tmp` at `out` (a sibling), replacing what was there: two renames, and the
    old folder is removed only once the new one is in place."""
    tmp, out = Path(tmp), Path(out)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_files(folder: Path, last: str | None = None) -> Iterator[Path]:
    """Yield a hidden temporary folder inside `folder`; on success its files are moved into `folder`
    (the one named `last` at the very end, e.g. the manifest that makes a folder loadable).

    For outputs that join a folder already in use (a training run's folder holds its checkpoints); on any
    exception nothing is moved and the temporary folder is removed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=folder))
    try:
        yield tmp
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == last):
            f.replace(folder / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary file path next to `path`; it is renamed onto `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    tmp = Path(name)
    os.close(fd)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
