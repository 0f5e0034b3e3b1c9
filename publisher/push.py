"""`loram publish push`: publish a pruned (or aligned) checkpoint to the Hugging Face Hub with its card.

    loram publish push smollm2-p50 --repo-id ORG/smollm2-p50 --tag v1

The recipe: read and validate the folder's manifest, check every file against the sha256 the manifest
records (never publish what the manifest does not describe), render the model card (metadata from the
manifest, alignment records, `eval*.json` results, the `prune_config.yaml` / `align_config.yaml`
recipes), then commit exactly the manifest's files + the manifest + README.md to the branch and tag
it. Files the branch held but the checkpoint does not are deleted; identical content makes no commit.
"""

from dataclasses import dataclass
from pathlib import Path

from loram.shared.configs import option
from loram.shared.errors import LoramError, warn
from loram.shared.hub import PushOptions, PushResult, looks_like_repo_id
from loram.shared.manifest import MANIFEST_JSON, MANIFEST_TENSORS, Manifest, verify_files
from loram.shared.model_cards import card_metadata, pruned_card


@dataclass
class PushConfig(PushOptions):
    folder: Path = option(help="The pruned (or aligned) checkpoint folder to publish.", argument=True)
    base_model: str | None = option(None, "Hub id of the original model for the card, when the manifest names a "
                                          "local folder.")
    license: str | None = option(None, "License for the card (default: the base model card's, when readable).")

    def check(self):
        super().check()
        if self.base_model is not None and not looks_like_repo_id(self.base_model):
            raise LoramError(f"--base-model {self.base_model!r} must be a Hub repo id ORG/NAME")


def checkpoint_files(folder: Path, manifest: Manifest) -> dict[str, Path]:
    """What a push uploads: the files the manifest lists, and the manifest itself."""
    names = sorted({*manifest.files, MANIFEST_JSON, MANIFEST_TENSORS})
    return {name: folder / name for name in names}


def push(config: PushConfig | None = None, **kwargs) -> PushResult:
    """Publish `config.folder` to `config.repo_id` (see the module docstring)."""
    cfg = PushConfig.given(config, **kwargs)
    folder = Path(cfg.folder)
    if not folder.is_dir():
        raise LoramError(f"{folder} is not a folder; give the pruned (or aligned) checkpoint folder")
    if not (folder / MANIFEST_JSON).is_file():
        raise LoramError(f"{folder} has no {MANIFEST_JSON}: `loram publish push` publishes pruned checkpoints "
                         "(`loram push` publishes recovered adapters)")
    manifest = Manifest.load(folder)
    verify_files(folder)
    if cfg.base_model is None and not manifest.base.revision:
        warn(f"the manifest names the original model by a local path ({manifest.base.id}): the card names no "
             "base_model, and consumers recover with `loram recover --original`; if that folder is a copy of a Hub "
             "model, pass --base-model ORG/NAME (or prune from the Hub id)")
    license = cfg.license or _base_license(manifest, cfg.endpoint)
    card = pruned_card(folder, manifest, repo_id=cfg.repo_id, base_model=cfg.base_model, license=license)
    files: dict[str, Path | bytes] = {**checkpoint_files(folder, manifest), "README.md": card.encode()}
    return cfg.push(files, f"LoRAM {manifest.method.kind} pruning ({manifest.method.criterion}) of "
                           f"{cfg.base_model or manifest.base.id}")


def _base_license(manifest: Manifest, endpoint: str | None) -> str | None:
    """The license in the base model's card, from its folder or its Hub repository; None when unknown."""
    base = Path(manifest.base.id).expanduser()
    card = base / "README.md"
    if manifest.base.revision:  # the base was pulled from the Hub at this commit
        from huggingface_hub import hf_hub_download

        try:
            card = Path(hf_hub_download(manifest.base.id, "README.md", revision=manifest.base.revision,
                                        endpoint=endpoint))
        except Exception:  # no card, unreachable, private: the card simply names no license
            return None
    if not card.is_file():
        return None
    license = card_metadata(card.read_text(encoding="utf-8", errors="replace")).get("license")
    return license if isinstance(license, str) else None
