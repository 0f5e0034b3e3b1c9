"""One distribution named `loram`, three folders mapped by the build backend."""

import subprocess
import sys
import zipfile

import pytest

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_import_loram_does_not_import_the_publisher():
    code = ("import sys, loram; bad = [m for m in sys.modules if m.startswith('loram.publisher')]; "
            "assert not bad, bad; assert 'loram.shared' in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_publisher_is_importable_as_a_subpackage():
    out = subprocess.run([sys.executable, "-c", "import loram.publisher, loram.shared.architectures"],
                         capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr


@pytest.mark.slow
def test_wheel_contains_every_package_and_no_tests(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path), str(REPO)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("loram-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packages = {n.rsplit("/", 1)[0] for n in names if n.endswith("__init__.py")}
    assert {"loram", "loram/shared", "loram/publisher"} <= packages
    # every module of each source folder is in the wheel under its package
    for folder, package in (("consumer", "loram"), ("shared", "loram/shared"), ("publisher", "loram/publisher")):
        for src in (REPO / folder).rglob("*.py"):
            rel = src.relative_to(REPO / folder).as_posix()
            assert f"{package}/{rel}" in names, f"{folder}/{rel} missing from the wheel"
    assert not [n for n in names if n.startswith("tests/") or "/tests/" in n or "conftest" in n]
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert entry and "loram = loram.command:main" in zipfile.ZipFile(wheel).read(entry[0]).decode()
