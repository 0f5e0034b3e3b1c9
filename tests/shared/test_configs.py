from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loram.cli import app
from loram.merge import MergeConfig, merge
from loram.recover import RecoverConfig, recover
from loram.shared.configs import Config, option
from loram.shared.errors import LoramError
from loram.train import TrainConfig


def _escaped(message: str) -> str:
    return "".join("\\" + c if c in "[]().*+?|{}^$" else c for c in message)


@dataclass
class ToyConfig(Config):
    base: str = option(help="model", argument=True)
    ratio: float = option(0.5, "ratio")
    steps: int = option(10, "steps")
    out: Path = option(Path("out"), "where")
    targets: list = option(["q_proj"], "targets")
    quick: bool = option(False, "quick")

    def check(self):
        if not 0 <= self.ratio < 1:
            raise LoramError(f"--ratio must lie in [0, 1), got {self.ratio}")


@dataclass
class ChoiceConfig(Config):
    """A small config exercising every kind of field the commands declare."""

    mode: str = option("fast", "mode", choices=("fast", "exact"))
    parts: list[str] = option(["a"], "parts", choices=("a", "b", "c"))
    names: list[str] = option(["x", "y"], "names")
    steps: int | None = option(None, "steps")
    rate: float = option(0.1, "rate")
    quick: bool = option(False, "quick", flag="quick-run/full-run")
    label: str | None = option(None, "label")
    out: Path | None = option(None, "out")


def test_flags_override_file_and_types_are_coerced(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("base: m\nratio: 0.25\nsteps: '7'\nout: /tmp/x\n")
    cfg = ToyConfig.resolve(f, ratio=0.75, steps=None)
    assert cfg.base == "m" and cfg.ratio == 0.75 and cfg.steps == 7 and cfg.out == Path("/tmp/x")
    assert cfg.to_dict()["out"] == "/tmp/x"


def test_an_api_call_with_a_config_and_options_applies_both(tmp_path):
    """`train(TrainConfig(..., out=a), out=b)` ran into `a`: the keyword options were dropped without a word.
    Every command's API function reads its config with `Config.given`: the options apply on top, checked again."""
    cfg = ToyConfig(base="m", ratio=0.25)
    assert ToyConfig.given(cfg) is cfg and ToyConfig.given(cfg, steps=None) is cfg
    both = ToyConfig.given(cfg, steps="3", out=tmp_path)
    assert (both.base, both.ratio, both.steps, both.out) == ("m", 0.25, 3, tmp_path) and cfg.steps == 10
    with pytest.raises(LoramError, match=r"--ratio must lie in \[0, 1\), got 2"):
        ToyConfig.given(cfg, ratio=2)
    with pytest.raises(LoramError, match="unknown option.s. ratoi"):
        ToyConfig.given(cfg, ratoi=0.3)
    with pytest.raises(LoramError, match="config must be a ToyConfig, got ChoiceConfig; or pass the options as"):
        ToyConfig.given(ChoiceConfig())
    assert ToyConfig.given(base="n").base == "n"  # options alone, as before
    from tiny_models import tiny_config

    from loram.plan import PlanConfig, plan

    tiny_config().save_pretrained(tmp_path / "tiny")
    config = PlanConfig(model=str(tmp_path / "tiny"), layers="1:3")
    assert plan(config, ratio=0.25).training_params > plan(config).training_params  # the ratio was ignored
    assert plan(config, ratio=0.25).training_params == plan({"model": str(tmp_path / "tiny"), "layers": "1:3"},
                                                           ratio=0.25).training_params


def test_a_config_built_without_a_required_option_is_one_line():
    """`TrainConfig(model="x")` raised Python's TypeError ("__init__() missing 2 required positional arguments")."""
    with pytest.raises(LoramError, match=r"^missing required option\(s\): --data, --out \(on the command line, as keys "
                                         r"of a --config file, or as keyword arguments\)$"):
        TrainConfig(model="x")
    with pytest.raises(LoramError, match=r"^missing required argument\(s\) and option\(s\): MODEL, --out"):
        TrainConfig(data="d", steps=3)
    cfg = TrainConfig("m", "d", "o")  # positionally, as the dataclass takes them
    import copy

    assert cfg.out == Path("o") and copy.deepcopy(cfg) == cfg  # copy makes the object without options first


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
    ("ratio: 0.1\n", {}, "missing required argument(s): BASE (on the command line, as keys of a --config file, or "
                          "as keyword arguments)"),
    ("- a\n- b\n", {}, "must hold a mapping"),
    ("base: [unclosed\n", {}, "not valid YAML"),
    ("base: m\n", {"ratio": 1.5}, "--ratio must lie in [0, 1)"),
    ("base: m\nsteps: many\n", {}, "--steps must be a whole number; got 'many'"),
    ("base: m\n1: 2\n", {}, "the key 1 is not an option name; write option: value lines"),
    ("base: m\nnull: 2\n", {}, "the key None is not an option name"),
])
def test_user_mistakes_are_loram_errors(tmp_path, content, flags, message):
    f = tmp_path / "c.yaml"
    f.write_text(content)
    with pytest.raises(LoramError, match=_escaped(message)):
        ToyConfig.resolve(f, **flags)


def test_missing_unreadable_or_folder_config_file(tmp_path):
    with pytest.raises(LoramError, match="config file .* not found; give a YAML file"):
        ToyConfig.resolve(tmp_path / "nope.yaml")
    with pytest.raises(LoramError, match="config file .* is a folder; give a YAML file"):
        ToyConfig.resolve(tmp_path)
    (tmp_path / "latin1.yaml").write_bytes(b"\xff\xfesteps: 1\n")
    with pytest.raises(LoramError, match="cannot be read as UTF-8 text .*; save it as UTF-8"):
        ToyConfig.resolve(tmp_path / "latin1.yaml")


def test_text_with_a_colon_in_a_yaml_file_is_text(tmp_path):
    """YAML 1.1 reads `layers: 1:3` as the base-60 integer 63 (and `nm: 2:4` as 124): read as written."""
    from loram.publisher.prune import PruneConfig

    (tmp_path / "p.yaml").write_text("base: m\nout: o\nmethod: wanda\nnm: 2:4\nlayers: 1:3\nseq_len: 64\n")
    cfg = PruneConfig.resolve(tmp_path / "p.yaml")
    assert (cfg.nm, cfg.layers, cfg.seq_len) == ("2:4", "1:3", 64)


def test_a_path_option_expands_the_home_folder(monkeypatch, tmp_path):
    """A quoted '~/x' on the command line, or `out: ~/x` in a YAML file, is the home folder's x, as the shell
    makes of an unquoted one (it was a literal folder named '~')."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert RecoverConfig.resolve(adapter="a", out="~/rec").out == tmp_path / "rec"


# --- choices: refused alike by the Python API (direct, resolve, command kwargs) and YAML files ---------------

BAD_CHOICES = [
    (RecoverConfig, {"adapter": "a", "out": "o"}, "fill", "normall", "--fill must be one of zero, normal"),
    (MergeConfig, {"adapter": "a", "out": "o"}, "dtype", "int4", "--dtype must be one of auto, bf16, fp32, fp16, float32, bfloat16, float16"),
    (TrainConfig, {"model": "m", "data": "d", "out": "o"}, "quant", "nf5", "--quant must be one of none, int8, nf4"),
    (ChoiceConfig, {}, "mode", "slow", "--mode must be one of fast, exact"),
    (ChoiceConfig, {}, "parts", ["a", "d"], "--parts must be a list of items each one of a, b, c; got the item 'd'"),
]


@pytest.mark.parametrize("cls,required,name,bad,message", BAD_CHOICES)
def test_bad_choice_is_refused_by_the_api(cls, required, name, bad, message):
    with pytest.raises(LoramError, match=_escaped(message)):
        cls(**required, **{name: bad})
    with pytest.raises(LoramError, match=_escaped(message)):
        cls.resolve(**required, **{name: bad})


@pytest.mark.parametrize("cls,required,name,bad,message", BAD_CHOICES)
def test_bad_choice_is_refused_in_a_yaml_file(tmp_path, cls, required, name, bad, message):
    import yaml

    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({**required, name: bad}))
    with pytest.raises(LoramError, match=_escaped(message)):
        cls.resolve(f)


def test_commands_refuse_a_bad_choice_before_doing_anything(tmp_path):
    with pytest.raises(LoramError, match=r"--fill must be one of zero, normal; got 'normall'"):
        recover(adapter=str(tmp_path / "none"), out=tmp_path / "o", fill="normall")
    with pytest.raises(LoramError, match=r"--dtype must be one of auto, bf16, fp32, fp16, float32, bfloat16, float16; got 'int4'"):
        merge(adapter=str(tmp_path / "none"), out=tmp_path / "o", dtype="int4")
    assert not (tmp_path / "o").exists()


def test_good_choices_pass():
    cfg = ChoiceConfig(mode="exact", parts=("b", "c"))
    assert cfg.mode == "exact" and cfg.parts == ["b", "c"]
    assert RecoverConfig(adapter="a", out="o", fill="normal").fill == "normal"


def test_a_bad_value_is_named_before_a_missing_option():
    with pytest.raises(LoramError, match="--fill must be one of zero, normal"):
        RecoverConfig.resolve(adapter="a", fill="normall")


# --- types -----------------------------------------------------------------------------------------------------

def _train_yaml(tmp_path, extra: str) -> Path:
    f = tmp_path / "train.yaml"
    f.write_text(f"model: m\ndata: d\nout: o\n{extra}\n")
    return f


def test_a_string_for_a_list_is_one_item(tmp_path):
    assert TrainConfig.resolve(_train_yaml(tmp_path, "targets: q_proj")).targets == ["q_proj"]
    assert ChoiceConfig(names="xyz").names == ["xyz"]
    assert ChoiceConfig(parts="b").parts == ["b"]
    # commas are the command's to split: train's --targets splits them, the base class does not
    assert ChoiceConfig(names="x,y").names == ["x,y"]
    assert TrainConfig.resolve(_train_yaml(tmp_path, "targets: q_proj,v_proj")).targets == ["q_proj", "v_proj"]


@pytest.mark.parametrize("extra,message", [
    ("lm_head: maybe", "--lm-head must be true or false (or yes/no, on/off, 1/0); got 'maybe'"),
    ("lm_head: 2", "--lm-head must be true or false (or yes/no, on/off, 1/0); got 2"),
    ("steps: 2.7", "--steps must be a whole number; got 2.7"),
    ("steps: true", "--steps must be a whole number; got True"),
    ("rank: '8.5'", "--rank must be a whole number; got '8.5'"),
    ("lr: fast", "--lr must be a number; got 'fast'"),
    ("alpha: false", "--alpha must be a number; got False"),
    ("targets: 7", "--targets must be a list of strings; got 7"),
    ("targets: [q_proj, 7]", "--targets must be a list of strings; got the item 7"),
    ("targets: {q: 1}", "--targets must be a list of strings; got {'q': 1}"),
    ("columns: 5", '--columns must be a string; got 5; quote it in a YAML file: "5"'),
    ("revision: 2024", '--revision must be a string; got 2024; quote it in a YAML file: "2024"'),
    ("out: 5", "--out must be a path; got 5"),
    ("model: [a, b]", "MODEL must be a string; got ['a', 'b']; write one string, as on the command line, not a list"),
])
def test_bad_types_in_a_yaml_file_name_the_flag(tmp_path, extra, message):
    with pytest.raises(LoramError, match=_escaped(message)):
        TrainConfig.resolve(_train_yaml(tmp_path, extra))


@pytest.mark.parametrize("kwargs,message", [
    ({"steps": 2.7}, "--steps must be a whole number; got 2.7"),
    ({"steps": False}, "--steps must be a whole number; got False"),
    ({"rate": "x"}, "--rate must be a number; got 'x'"),
    ({"rate": True}, "--rate must be a number; got True"),
    ({"quick": "maybe"}, "--quick-run must be true or false"),
    ({"quick": 1}, "--quick-run must be true or false"),
    ({"label": 3}, "--label must be a string; got 3"),
    ({"names": 3}, "--names must be a list of strings; got 3"),
    ({"mode": 3}, "--mode must be one of fast, exact; got 3"),
    ({"mode": None}, "--mode must be one of fast, exact; got None"),
    ({"out": 3.5}, "--out must be a path; got 3.5"),
])
def test_bad_types_from_the_api_name_the_flag(kwargs, message):
    with pytest.raises(LoramError, match=_escaped(message)):
        ChoiceConfig(**kwargs)
    with pytest.raises(LoramError, match=_escaped(message)):
        ChoiceConfig.from_dict(kwargs)


@pytest.mark.parametrize("word,value", [
    ("true", True), ("True", True), ("YES", True), ("on", True), ("1", True),
    ("false", False), ("No", False), ("OFF", False), ("0", False),
])
def test_bool_words_are_read(word, value):
    assert ChoiceConfig(quick=word).quick is value


def test_good_values_are_coerced(tmp_path):
    cfg = ChoiceConfig(steps="12", rate="1e-4", out="x/y", label=Path("a/b"))
    assert cfg.steps == 12 and cfg.rate == 1e-4 and cfg.out == Path("x/y") and cfg.label == "a/b"
    assert ChoiceConfig(steps=3.0).steps == 3 and type(ChoiceConfig(rate=2).rate) is float
    assert ChoiceConfig(steps=None, label=None, out=None).steps is None
    cfg = TrainConfig.resolve(_train_yaml(tmp_path, "lm_head: 'yes'\nsteps: 3\nlr: 1e-4\nrank: '4'"))
    assert cfg.lm_head is True and cfg.steps == 3 and cfg.lr == 1e-4 and cfg.rank == 4
    assert TrainConfig(model="m", data="d", out="o", lm_head="off").lm_head is False


def test_subclass_checks_run_after_the_types():
    @dataclass
    class Checked(Config):
        steps: int = option(1, "steps")

        def check(self):
            if self.steps < 1:  # would be a TypeError on a string without the base class's coercion
                raise LoramError("--steps must be >= 1")

    assert Checked(steps="5").steps == 5
    with pytest.raises(LoramError, match="--steps must be >= 1"):
        Checked(steps="0")


def test_a_subclass_cannot_skip_the_field_checks():
    with pytest.raises(TypeError, match="check"):
        @dataclass
        class Bypass(Config):
            steps: int = option(1, "steps")

            def __post_init__(self):
                pass


# --- the CLI ---------------------------------------------------------------------------------------------------

def test_cli_bad_choice_is_one_error_line_exit_2(tmp_path):
    result = CliRunner().invoke(app, ["recover", str(tmp_path / "adapter"), "--fill", "normall"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: --fill must be one of zero, normal; got 'normall'"]
    assert "Traceback" not in result.output


def test_cli_bad_number_is_the_same_error_as_in_yaml(tmp_path):
    result = CliRunner().invoke(app, ["train", "m", "--data", "d", "--out", str(tmp_path / "o"), "--steps", "2.7"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == ["error: --steps must be a whole number; got '2.7'"]


def test_cli_help_shows_list_defaults_and_choices():
    result = CliRunner().invoke(app, ["train", "--help"], terminal_width=200)
    assert result.exit_code == 0
    flat = " ".join(result.output.split())
    assert "--targets <list[str]>" in flat
    assert "[default: (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)]" in flat
    assert "--quant <none|int8|nf4>" in flat and "[default: (none)]" in flat
    assert "--rank <int>" in flat and "[default: (8)]" in flat
    assert "--lm-head / --no-lm-head" in flat and "[default: (False)]" in flat
