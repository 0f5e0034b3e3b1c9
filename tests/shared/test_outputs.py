import pytest

from loram.shared.errors import LoramError
from loram.shared.outputs import atomic_file, atomic_output_dir


def test_complete_output_appears_at_once(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "a.txt").write_text("hello")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "hello"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_leaves_nothing_half_written(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_output_dir(out) as tmp:
        (tmp / "a.txt").write_text("partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(LoramError, match="already exists.*--overwrite"), atomic_output_dir(out):
        pass
    assert (out / "old.txt").exists()
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_overwrite_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_output_dir(out, overwrite=True):
        raise KeyboardInterrupt
    assert (out / "old.txt").read_text() == "old"


def test_atomic_file(tmp_path):
    target = tmp_path / "f.json"
    with atomic_file(target) as tmp:
        tmp.write_text("{}")
        assert not target.exists()
    assert target.read_text() == "{}"
    with pytest.raises(ValueError), atomic_file(target) as tmp:
        tmp.write_text("broken")
        raise ValueError
    assert target.read_text() == "{}" and len(list(tmp_path.iterdir())) == 1


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporary_siblings_of_a_killed_run_are_removed(tmp_path):
    import os

    dead, live = _dead_pid(), os.getppid()  # our parent is alive for the whole test
    stale = [tmp_path / f".out.tmp-{dead}-abc_12", tmp_path / f".out.old-{dead}"]
    kept = [tmp_path / f".out.tmp-{live}-xyz", tmp_path / ".out.tmp-nopid1", tmp_path / f".other.tmp-{dead}-abc",
            tmp_path / f".out.old-{live}"]
    for folder in stale + kept:
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "weights.bin").write_bytes(b"x" * 100)
    with atomic_output_dir(tmp_path / "out") as tmp:
        assert str(os.getpid()) in tmp.name
        (tmp / "a.txt").write_text("new")
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)
    assert (tmp_path / "out" / "a.txt").read_text() == "new"


def test_stale_final_staging_folder_is_removed(tmp_path):
    from loram.shared.outputs import staged_files

    run = tmp_path / "run"
    (run / f".final-{_dead_pid()}-abc").mkdir(parents=True)
    with staged_files(run) as tmp:
        (tmp / "f.txt").write_text("x")
    assert sorted(p.name for p in run.iterdir()) == ["f.txt"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_get_the_permissions_the_umask_gives(tmp_path, umask):
    import os
    import stat

    import torch
    from safetensors.torch import save_file

    from loram.shared.outputs import staged_files

    def mode(p):
        return stat.S_IMODE(p.stat().st_mode)

    outside = tmp_path / "outside.txt"
    outside.write_text("not ours")

    old = os.umask(umask)
    try:
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "plain.txt").write_text("x")
            with atomic_file(tmp / "atomic.json") as f:
                f.write_text("{}")
            (tmp / "sub").mkdir()
            save_file({"w": torch.zeros(2)}, str(tmp / "sub" / "weights.safetensors"))  # safetensors writes 0600
            os.chmod(outside, 0o600)
            (tmp / "link").symlink_to(outside)
        with atomic_file(tmp_path / "single.json") as f:
            f.write_text("{}")
        with staged_files(tmp_path / "run") as tmp, atomic_file(tmp / "staged.json") as f:
            f.write_text("{}")
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert mode(out) == mode(out / "sub") == 0o777 & ~umask
    for f in (out / "plain.txt", out / "atomic.json", out / "sub" / "weights.safetensors", tmp_path / "single.json",
              tmp_path / "run" / "staged.json"):
        assert mode(f) == 0o666 & ~umask, f
    assert mode(outside) == 0o600  # a symlink's target is not ours to change
