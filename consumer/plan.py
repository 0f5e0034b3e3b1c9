"""`loram plan`: how many parameters and bytes training holds, before downloading any weight.

    from loram.plan import plan
    p = plan(model="meta-llama/Llama-3.1-70B", ratio=0.85)   # reads config.json only
    p.training_params, p.reduction, p.reduction_4bit           # 17,849,982,976  3.95x  15.81x

The counting itself lives in `loram.shared.accounting` (method.md §7); this module only finds the
config (a checkpoint directory, a bare config.json, or a Hub repo id) and prints the result.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import typer

from loram.shared.accounting import METHODS, ParamPlan, check_fraction, gib, plan_params
from loram.shared.cli_support import add_config_command, print_table
from loram.shared.configs import Config, option
from loram.shared.errors import LoramError


@dataclass
class PlanConfig(Config):
    """Options of `loram plan`."""

    model: str = option(help="Checkpoint directory, config.json file, or Hub repo id (only config.json is read).",
                        argument=True)
    revision: str | None = option(None, "Hub branch, tag or commit (Hub repo ids only).")
    method: str = option("structured", f"Pruning method: {' or '.join(METHODS)}.")
    ratio: float = option(0.85, "Pruning ratio p: default of --attn-ratio/--mlp-ratio, or of --sparsity.")
    attn_ratio: float | None = option(None, "Structured: ratio of KV groups to prune (default --ratio).")
    mlp_ratio: float | None = option(None, "Structured: ratio of MLP channels to prune (default --ratio).")
    layers: str | None = option(None, "Pruned layers, half-open A:B (e.g. 4:-2). Default: 4:-2 structured, "
                                      "all layers non-structured.")
    sparsity: float | None = option(None, "Non-structured: fraction of each linear weight zeroed (default --ratio).")
    json: bool = option(False, "Print one JSON object instead of the table.")

    def __post_init__(self):
        if self.method not in METHODS:
            raise LoramError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("ratio", "attn_ratio", "mlp_ratio", "sparsity"):
            check_fraction(name, getattr(self, name))


def read_model_config(model: str, revision: str | None = None, endpoint: str | None = None) -> dict:
    """The config.json of a checkpoint directory, a config file, or a Hub repo (config.json only;
    `endpoint` defaults to `HF_ENDPOINT`)."""
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise LoramError(f"{model} has no config.json")
    elif not path.is_file():
        if model.startswith((".", "/", "~")) or model.endswith(".json") or model.count("/") > 1:
            raise LoramError(f"{model} not found")
        path = _hub_config(model, revision, endpoint)
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoramError(f"{path} is not a readable JSON config: {str(e).splitlines()[0]}") from e
    if not isinstance(values, dict):
        raise LoramError(f"{path} must hold a JSON object")
    return values


def _hub_config(repo_id: str, revision: str | None, endpoint: str | None) -> Path:
    import logging

    from huggingface_hub import hf_hub_download

    # The client logs each retry; the user gets one line, the final error. Every client error is an
    # OSError (HTTP error, not found, offline, unreachable) or, for a malformed repo id, a ValueError.
    retries = logging.getLogger("huggingface_hub.utils._http")
    level = retries.level
    retries.setLevel(logging.ERROR)
    try:
        return Path(hf_hub_download(repo_id, "config.json", revision=revision, endpoint=endpoint))
    except (OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LoramError(f"cannot fetch config.json of {repo_id!r} from the Hub: {reason}") from e
    finally:
        retries.setLevel(level)


def plan(config: PlanConfig | dict | None = None, **kwargs) -> ParamPlan:
    """Count a plan: `plan(PlanConfig(...))`, `plan({"model": ...})` or `plan(model=..., ratio=...)`."""
    if not isinstance(config, PlanConfig):
        config = PlanConfig.from_dict({**(config or {}), **kwargs})
    values = read_model_config(config.model, config.revision)
    return plan_params(values, config.method, config.ratio, attn_ratio=config.attn_ratio,
                       mlp_ratio=config.mlp_ratio, layers=config.layers, sparsity=config.sparsity)


def table_rows(p: ParamPlan) -> list[dict]:
    """The readable table: original against what training holds, and their ratio."""
    def row(what, original, training, ratio=""):
        return {"": what, "original": original, "training": training, "reduction": ratio}

    def n(v):
        return f"{v:,}"

    rows = []
    if p.method == "structured":
        rows += [row("q heads / pruned layer", p.shape.num_heads, p.kept_q_heads),
                 row("kv heads / pruned layer", p.shape.num_kv_heads, p.kept_kv_heads),
                 row("MLP channels / pruned layer", p.shape.intermediate, p.kept_channels)]
    rows += [row("parameters", n(p.original_params), n(p.training_params), f"{p.reduction:.2f}x")]
    if p.method == "non-structured":
        rows.append(row("non-zero parameters", n(p.original_params), n(p.nonzero_params),
                        f"{p.original_params / p.nonzero_params:.2f}x"))
    rows += [
        row("params, 4-bit paper (training / 4)", n(p.original_params), f"{p.training_params / 4:,.0f}",
            f"{p.reduction_4bit:.2f}x"),
        row("HBM GiB, 16-bit", f"{gib(p.original_bytes_16bit):.2f}", f"{gib(p.training_bytes_16bit):.2f}",
            f"{p.reduction:.2f}x"),
        row("HBM GiB, 4-bit paper", f"{gib(p.original_bytes_16bit):.2f}", f"{gib(p.training_bytes_16bit) / 4:.2f}",
            f"{p.reduction_4bit:.2f}x"),
        row("GiB, bitsandbytes NF4 training", f"{gib(p.original_bytes_16bit):.2f}",
            f"{gib(p.training_bytes_4bit_bnb):.2f}", f"{p.reduction_4bit_bnb:.2f}x"),
    ]
    return rows


def _run(cfg: PlanConfig) -> None:
    p = plan(cfg)
    if cfg.json:
        typer.echo(json.dumps(p.to_dict()))
        return
    start, stop = p.layer_range
    how = (f"attn ratio {p.attn_ratio}, mlp ratio {p.mlp_ratio}" if p.method == "structured"
           else f"sparsity {p.sparsity}")
    typer.echo(f"{cfg.model}: {p.model_type}, {p.shape.num_layers} layers; {p.method} ({how}) "
               f"on layers [{start}, {stop})\n")
    print_table(table_rows(p))


def register(app: typer.Typer) -> None:
    add_config_command(
        app, "plan", PlanConfig, _run,
        help="Count the parameters and memory LoRAM training holds for a model, from its config alone.",
        examples=["loram plan meta-llama/Llama-3.1-70B --ratio 0.85",
                  "loram plan ./Llama-2-13b-hf --attn-ratio 0.65 --mlp-ratio 0.65 --layers 4:-2 --json",
                  "loram plan config.json --method non-structured --sparsity 0.55"],
    )
