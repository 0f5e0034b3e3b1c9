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
