"""The alignment grid's objectives are the ones its rows name, and objective_cost.py measures them per 512 tokens."""

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import alignment_grid  # noqa: E402
import objective_cost  # noqa: E402

from loram.publisher.align import AlignConfig  # noqa: E402


def config(flags: list) -> AlignConfig:
    """The `loram publish align` config that `flags` (as the grid renders them) resolve to, nothing run."""
    values, items = {"pruned": "pruned", "out": "aligned", "data": []}, iter(map(str, flags))
    for flag in items:
        key = flag[2:].replace("-", "_")
        if key == "overwrite":
            values[key] = True
        elif key == "data":
            values["data"].append(next(items))
        else:
            values[key] = next(items)
    return AlignConfig.from_dict(values)


@pytest.mark.parametrize("objective", [o for o, flags in alignment_grid.OBJECTIVES.items() if flags is not None])
def test_every_grid_objective_is_a_valid_align_command(objective):
    cfg = config(alignment_grid.align_args(objective, 40, 0, "ORIGINAL", Path("/work")))
    assert cfg.steps == 40 and cfg.seq_len == 256 and cfg.data


def test_the_grid_objectives_are_what_their_rows_say_not_what_align_defaults_to():
    """The LM and logit rows were measured when LM was align's default; re-run today they must still be LM and KD."""
    def objective(name):
        cfg = config(alignment_grid.align_args(name, 40, 0, "ORIGINAL", Path("/work")))
        return cfg.distill_from, cfg.kd_weight, cfg.hidden_weight, cfg.hidden_layers

    assert objective("lm")[0] == "none"  # the paper's LM loss alone
    assert objective("kd") == ("ORIGINAL", 0.5, 0.0, "pruned")  # logit KD + LM, half and half
    assert objective("kd-pure")[1:3] == (1.0, 0.0)
    assert objective("hidden-mse")[1:] == (0.0, 0.5, "all")  # hidden MSE + LM
    assert objective(alignment_grid.DEFAULT) == ("ORIGINAL", 0.0, 1.0, "pruned")  # align's default, spelled out


def test_objective_cost_measures_every_objective_on_the_same_text_per_512_tokens():
    flags = objective_cost.run_args(alignment_grid.DEMO, 6, "ORIGINAL")
    assert flags.count("--data") == 1 and flags[flags.index("--data") + 1] == "wiki-chat"  # the demo's two sources gone
    assert objective_cost.batch(flags) == 1 and config(flags).batch == 1  # steps of one sequence stay so
    assert objective_cost.batch(objective_cost.run_args("lm", 6, "ORIGINAL")) == 2  # the grid's steps of two
    report = {"step_seconds": [9.0, 1.0, 1.2, 1.1], "peak_memory_bytes": 3 * 2**30}
    assert objective_cost.measured(report, 1) == {"s_per_512": 2.2, "step_s": 1.1, "peak_mib": 3072}
    assert objective_cost.measured(report, 2)["s_per_512"] == 1.1
    runs = {"lm": [{"s_per_512": 2.0, "peak_mib": 2400}, {"s_per_512": 2.2, "peak_mib": 2420}],
            alignment_grid.DEFAULT: [{"s_per_512": 2.4, "peak_mib": 2800}, {"s_per_512": 2.6, "peak_mib": 2790}]}
    lm, default = objective_cost.summarize(runs)
    assert lm["vs_lm"] == 1.0 and default["vs_lm"] == 1.19 and default["vs_default"] == 1.0
    assert default["spread"] == 0.2 and default["peak_mib"] == 2800 and default["rounds"] == [2.4, 2.6]
