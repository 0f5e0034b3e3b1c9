from dataclasses import dataclass
from pathlib import Path

import pytest

from loram.shared.configs import Config, option
from loram.shared.errors import LoramError


@dataclass
class ToyConfig(Config):
    base: str = option(help="model", argument=True)
    ratio: float = option(0.5, "ratio")
    steps: int = option(10, "steps")
    out: Path = option(Path("out"), "where")
    targets: list = option(["q_proj"], "targets")
    quick: bool = option(False, "quick")

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise LoramError(f"--ratio must lie in [0, 1), got {self.ratio}")


def test_flags_override_file_and_types_are_coerced(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("base: m\nratio: 0.25\nsteps: '7'\nout: /tmp/x\n")
    cfg = ToyConfig.resolve(f, ratio=0.75, steps=None)
    assert cfg.base == "m" and cfg.ratio == 0.75 and cfg.steps == 7 and cfg.out == Path("/tmp/x")
    assert cfg.to_dict()["out"] == "/tmp/x"


def test_saved_config_resolves_to_the_same_object(tmp_path):
    cfg = ToyConfig.resolve(base="m", targets=("a", "b"), quick=True)
    cfg.save(tmp_path / "c.yaml")
    assert ToyConfig.resolve(tmp_path / "c.yaml") == cfg


def test_defaults_are_not_shared_between_instances():
    a, b = ToyConfig(base="x"), ToyConfig(base="y")
    a.targets.append("k_proj")
    assert b.targets == ["q_proj"]


@pytest.mark.parametrize("content,flags,message", [
    ("base: m\nratioo: 1\n", {}, "unknown option(s) ratioo"),
    ("ratio: 0.1\n", {}, "missing required option(s): base"),
    ("- a\n- b\n", {}, "must hold a mapping"),
    ("base: [unclosed\n", {}, "not valid YAML"),
    ("base: m\n", {"ratio": 1.5}, "--ratio must lie in [0, 1)"),
    ("base: m\nsteps: many\n", {}, "cannot read 'many' as int"),
])
def test_user_mistakes_are_loram_errors(tmp_path, content, flags, message):
    f = tmp_path / "c.yaml"
    f.write_text(content)
    with pytest.raises(LoramError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        ToyConfig.resolve(f, **flags)


def test_missing_config_file(tmp_path):
    with pytest.raises(LoramError, match="config file .* not found"):
        ToyConfig.resolve(tmp_path / "nope.yaml")
