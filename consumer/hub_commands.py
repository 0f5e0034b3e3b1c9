"""`loram pull` and `loram push`: the consumer's side of the Hugging Face Hub.

    loram pull ORG/smollm2-p50 --revision v1                    # into the Hub cache, every file verified
    loram pull ORG/smollm2-p50 --out smollm2-p50                # ... and copied into a folder
    loram push adapter-original --repo-id ORG/smollm2-gsm8k     # a recovered adapter with its card

Pull verifies files against the LoRAM manifest (pruned checkpoints) or the Hub's own hashes
(`loram.shared.hub`); with HF_HUB_OFFLINE=1 a revision pulled before is used from the cache. Every
command that takes a Hub id (train, recover, merge, eval...) pulls the same way.

Push publishes a recovered adapter (the output of `loram recover`): the adapter, its sidecar and
config, and a card naming the original model as base (`base_model_relation: adapter`), so
`AutoPeftModelForCausalLM.from_pretrained("ORG/NAME")` loads the original model and applies it.
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import typer

from loram.recover import ADAPTER_CONFIG, ADAPTER_WEIGHTS, SIDECAR, adapter_config_json
from loram.shared.cli_support import add_config_command
from loram.shared.configs import Config, option
from loram.shared.errors import LoramError
from loram.shared.hub import (
    ModelSource,
    PushOptions,
    PushResult,
    endpoint_option,
    looks_like_repo_id,
    pull_repo,
    revision_option,
)
from loram.shared.model_cards import adapter_card
from loram.shared.outputs import atomic_output_dir, check_output_dir


@dataclass
class PullConfig(Config):
    repo_id: str = option(help="Hub repository ORG/NAME: a pruned checkpoint, an adapter or any model.",
                          argument=True)
    revision: str | None = revision_option("REPO_ID")
    out: Path | None = option(None, "Also copy the verified files into this folder (default: the Hub cache only).")
    endpoint: str | None = endpoint_option()
    overwrite: bool = option(False, "Replace an existing --out.")


@dataclass
class PushConfig(PushOptions):
    folder: Path = option(help="A recovered adapter folder (the output of `loram recover`).", argument=True)


def pull(config: PullConfig | None = None, **kwargs) -> ModelSource:
    """Download and verify `config.repo_id`; with `out`, copy it there (the returned path)."""
    cfg = PullConfig.given(config, **kwargs)
    if cfg.out is not None:
        check_output_dir(Path(cfg.out), cfg.overwrite)  # before downloading anything
    source = pull_repo(cfg.repo_id, cfg.revision, cfg.endpoint, kind="Hub repository")
    if cfg.out is None:
        return source
    with atomic_output_dir(Path(cfg.out), overwrite=cfg.overwrite) as tmp:
        for path in sorted(source.path.rglob("*")):
            if path.is_file():
                target = tmp / path.relative_to(source.path)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)  # follows the cache's symlinks
    return ModelSource(Path(cfg.out), source.id, source.revision)


def push(config: PushConfig | None = None, **kwargs) -> PushResult:
    """Publish the recovered adapter in `config.folder` with its card (see the module docstring)."""
    cfg = PushConfig.given(config, **kwargs)
    folder = Path(cfg.folder)
    if not folder.is_dir():
        raise LoramError(f"{folder} is not a folder; give the folder `loram recover` wrote")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, SIDECAR):
        if not (folder / name).is_file():
            raise LoramError(f"{folder} is not a recovered adapter (no {name}); run `loram recover` first, "
                             "and publish pruned checkpoints with `loram publish push`")
    adapter_config = adapter_config_json(folder)  # valid JSON, and complete safetensors weights
    try:
        sidecar = json.loads((folder / SIDECAR).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise LoramError(f"{folder / SIDECAR} is not valid JSON ({str(e).splitlines()[0]}); recover the adapter "
                         "again with `loram recover`") from e
    if not isinstance(sidecar, dict) or not isinstance(sidecar.get("pruned_model"), dict):
        raise LoramError(f"{folder / SIDECAR} is not a recovery record; recover the adapter again with "
                         "`loram recover`")
    base = adapter_config.get("base_model_name_or_path") or ""
    if not (adapter_config.get("revision") and looks_like_repo_id(base)):  # resolved from the Hub at a commit
        raise LoramError(f"the adapter's base model is {base!r}, a local folder rather than a Hub repository, so "
                         "nobody could load it from the Hub; recover it with `loram recover ADAPTER --original "
                         "ORG/NAME --out ...`")
    recorded = sidecar.get("original_model") if isinstance(sidecar.get("original_model"), dict) else {}
    if (recorded.get("id"), recorded.get("revision")) != (base, adapter_config.get("revision")):
        raise LoramError(f"{folder / ADAPTER_CONFIG} names the base {base}@{adapter_config.get('revision')}, but "
                         f"{SIDECAR} records the recovery for {recorded.get('id')}@{recorded.get('revision')}; the "
                         "adapter was edited after recovery: recover it again with `loram recover`")
    files: dict[str, Path | bytes] = {p.name: p for p in sorted(folder.iterdir())
                                      if p.is_file() and not p.name.startswith(".") and p.name != "README.md"}
    files["README.md"] = adapter_card(sidecar, adapter_config, repo_id=cfg.repo_id).encode()
    return cfg.push(files, f"LoRAM adapter for {base} (trained on {sidecar['pruned_model']['id']})")


def _pull(cfg: PullConfig) -> None:
    source = pull(cfg)
    typer.echo(f"{source.id}@{source.revision}: verified")
    typer.echo(str(source.path))


def register(app: typer.Typer) -> None:
    add_config_command(
        app, "pull", PullConfig, _pull,
        help="Download a Hub repository into the Hub cache (or --out), checking every file against the "
             "LoRAM manifest or the Hub's hashes; prints its local path.",
        examples=["loram pull ORG/smollm2-p50",
                  "loram pull ORG/smollm2-p50 --revision v1 --out smollm2-p50-v1",
                  "HF_HUB_OFFLINE=1 loram pull ORG/smollm2-p50 --revision v1"],
    )
    add_config_command(
        app, "push", PushConfig, lambda cfg: typer.echo(push(cfg).summary()),
        help="Publish a recovered adapter to the Hub with a card naming the original model as its base.",
        examples=["loram push adapter-original --repo-id ORG/smollm2-gsm8k",
                  "loram push adapter-original --repo-id ORG/smollm2-gsm8k --branch exp --tag v2 --private"],
    )
