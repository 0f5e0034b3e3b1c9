"""Outputs appear whole or not at all: write into a hidden sibling, rename when complete.

The hidden siblings carry the pid of the process that made them (`.NAME.tmp-PID-XXXX`, `.NAME.old-PID`),
so the next run to the same output removes the ones a killed process (kill -9, out of memory) left
behind. Finished outputs get the permissions the umask gives (tempfile creates 0700 folders and 0600
files), like any file the user writes.
"""

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from loram.shared.errors import LoramError


def check_output_dir(out: Path, overwrite: bool, fix: str = "choose another --out") -> None:
    """Refuse an existing, non-empty output directory unless `overwrite` is set, an `out` that is or holds a
    cache (`check_not_a_cache`) or the working folder (`check_not_the_working_folder`), and an `out` that cannot
    be created (`check_writable`)."""
    out = Path(out)
    try:
        exists = out.exists()
        if exists and not out.is_dir():
            raise LoramError(f"output path {out} exists and is not a directory; {fix}")
        check_not_a_cache(out, fix)
        if exists:
            check_not_the_working_folder(out, fix)
        if exists and any(out.iterdir()) and not overwrite:
            raise LoramError(f"output directory {out} already exists; {fix} or pass --overwrite")
    except OSError as e:  # a name too long, a folder that cannot be listed
        raise LoramError(f"cannot use {out} as an output folder ({e.strerror or e}); {fix}") from e
    check_writable(out, fix=fix)


def caches() -> dict[str, Path]:
    """The folders no output may replace: the Hugging Face home (its token file) and Hub cache, LoRAM's."""
    from huggingface_hub import constants

    from loram.shared.cache import cache_root

    return {"the Hugging Face home (HF_HOME)": Path(constants.HF_HOME),
            "the Hugging Face Hub cache (HF_HUB_CACHE)": Path(constants.HF_HUB_CACHE),
            "the LoRAM cache (LORAM_CACHE)": cache_root()}


def check_not_a_cache(out: Path, fix: str = "choose another --out") -> None:
    """Refuse an `out` that is, or holds, a cache folder: replacing it (--overwrite) would delete every model
    downloaded, and the Hub token."""
    target = Path(os.path.abspath(Path(out).expanduser()))
    for name, folder in caches().items():
        folder = Path(os.path.abspath(folder.expanduser()))
        if where := _is_or_holds(target, folder):
            raise LoramError(f"--out {out} {where} {name} {folder}: writing there would delete it; {fix}")


def check_not_the_working_folder(out: Path, fix: str = "choose another --out") -> None:
    """Refuse an existing `out` that holds the working folder, or is it and has files: replacing it would delete
    them and leave the shell in a deleted folder. An empty working folder (`--out .` in a new folder) is filled
    in place (`replace_dir`)."""
    target, cwd = Path(out).expanduser().resolve(), Path.cwd().resolve()
    where = _is_or_holds(target, cwd)
    if where == "holds" or (where == "is" and any(target.iterdir())):
        raise LoramError(f"--out {out} {where} the working folder{'' if where == 'is' else f' {cwd}'}: writing there "
                         f"would replace it and leave the shell in a deleted folder; {fix}, e.g. a new folder inside it")


def _is_or_holds(out: Path, path: Path) -> str | None:
    """"is" when the folder `out` is `path`, "holds" when `path` lies below it, else None (both normalized the
    same way by the caller)."""
    if path == out:
        return "is"
    return "holds" if out in path.parents else None


def check_not_an_input(out, inputs: dict, fix: str = "choose another --out") -> None:
    """Refuse an output that is one of the command's local inputs, or a folder holding one: writing it (with
    --overwrite) would delete the input. `inputs` maps how each is named (a flag) to its path, or to None or a
    name that is no local path (a Hub id, a built-in split), which is skipped."""
    target = Path(out).expanduser().resolve()
    for name, value in inputs.items():
        path = Path(str(value)).expanduser() if value is not None and str(value) else None
        if path is None or not path.exists():
            continue
        if where := _is_or_holds(target, path.resolve()):
            raise LoramError(f"--out {out} {where} {name} {value}: writing there would replace it; {fix}")


def check_writable(out: Path, *, into: bool = False, fix: str = "choose another --out") -> None:
    """Refuse an output folder that cannot be made: its nearest existing ancestor (or `out` itself, with
    `into`, for a run that writes inside an existing `out`) must be a folder this process may write to."""
    out = Path(out)
    candidates = (out, *out.parents) if into else out.parents
    parent = next((p for p in candidates if p.exists()), Path.cwd())
    if not parent.is_dir():
        raise LoramError(f"cannot create {out}: {parent} is a file, not a folder; {fix}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LoramError(f"cannot write to {parent} (permission denied); {fix}")


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False, fix: str = "choose another --out") -> Iterator[Path]:
    """Yield a temporary directory next to `out`; on success it replaces `out` in one rename.

    On any exception the temporary directory is removed and `out` is left as it was.
    """
    check_output_dir(Path(out).expanduser(), overwrite, fix)  # its errors name --out as given
    out = Path(os.path.abspath(Path(out).expanduser()))  # `--out .` has no name to make a sibling of
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for path in (tmp, *tmp.rglob("*")):  # safetensors and tempfile write 0600: outputs get a plain file's mode
        apply_umask(path)
    replace_dir(tmp, out)


def remove_stale(out: Path) -> None:
    """Remove the hidden siblings `.NAME.tmp-PID-*` / `.NAME.old-PID` of `out` whose process is gone (a
    killed run's leftovers); ones of a live process, or without a pid in their name, are kept."""
    out = Path(out)
    _remove_dead(out.parent, rf"\.{re.escape(out.name)}\.(?:tmp-(\d+)-[^-]*|old-(\d+))")


def _remove_dead(folder: Path, pattern: str) -> None:
    """Remove the entries of `folder` whose name matches `pattern` and whose pid (its first non-empty
    group) names no live process."""
    regex = re.compile(pattern)
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for path in entries:
        found = regex.fullmatch(path.name)
        if found is None or _alive(int(next(g for g in found.groups() if g))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process, or not a pid we can ask about: keep
    return True


def _umask() -> int:
    """The process umask, read without changing it where Linux reports it (else set and restored)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give `path` the mode a plain mkdir / open would have: 0o777 & ~umask for a folder, 0o666 & ~umask
    for a file (tempfile makes them 0700 / 0600). A symlink is left alone (chmod would change its target)."""
    path = Path(path)
    if path.is_symlink():
        return
    mask = _umask()
    with contextlib.suppress(OSError):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the complete folder `tmp` at `out` (a sibling), replacing what was there: two renames, and the
    old folder is removed only once the new one is in place. An empty `out` that is the working folder keeps
    its place (a rename would leave the shell in a deleted folder): `tmp`'s entries are renamed into it."""
    tmp, out = Path(tmp), Path(out)
    if out.is_dir() and out.resolve() == Path.cwd().resolve() and not any(out.iterdir()):
        for entry in sorted(tmp.iterdir()):
            entry.rename(out / entry.name)
        tmp.rmdir()
        return
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
    _remove_dead(folder, r"\.final-(\d+)-[^-]*")  # left by a killed run's final write
    tmp = Path(tempfile.mkdtemp(prefix=f".final-{os.getpid()}-", dir=folder))
    try:
        yield tmp
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == last):
            if f.is_file():
                apply_umask(f)
            f.replace(folder / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary file path next to `path`; it is renamed onto `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    tmp = Path(name)
    os.close(fd)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    apply_umask(tmp)
    tmp.replace(path)
