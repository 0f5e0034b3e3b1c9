"""Where a model comes from: a local directory or a Hugging Face Hub repository at a revision.

Everything that talks to the Hub goes through huggingface_hub with an explicit endpoint when one is
given; tokens come from huggingface_hub's own mechanisms and are never printed.
"""

from dataclasses import dataclass
from pathlib import Path

from loram.shared.errors import LoramError


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: its local folder plus where it came from."""

    path: Path
    id: str  # the local path or the Hub repo id the user named
    revision: str | None  # the commit sha for Hub models, None for local folders


def resolve_model(name: str | Path, revision: str | None = None, endpoint: str | None = None,
                  required: str = "config.json", kind: str = "model checkpoint") -> ModelSource:
    """A local directory as is; otherwise download repo `name` from the Hub at `revision`.

    `required` is the file that makes a local folder a `kind` (config.json for models,
    adapter_config.json for adapters)."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / required).is_file():
            raise LoramError(f"{path} is not a {kind} (no {required})")
        if revision:
            raise LoramError(f"--revision applies to Hub repositories, but {path} is a local folder")
        return ModelSource(path.resolve(), str(name), None)
    if str(name).count("/") != 1 or str(name).startswith((".", "/", "~")):
        raise LoramError(f"model {name!r} is neither an existing folder nor a Hub repo id (ORG/NAME)")
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        info = HfApi(endpoint=endpoint).model_info(str(name), revision=revision)
        folder = snapshot_download(str(name), revision=info.sha, endpoint=endpoint)
    except RevisionNotFoundError as e:
        raise LoramError(f"revision {revision!r} not found in Hub repository {name}") from e
    except RepositoryNotFoundError as e:
        raise LoramError(f"Hub repository {name} not found (or private without a token)") from e
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise LoramError(f"could not download {name} from the Hub ({type(e).__name__}); check the network, "
                         "the --endpoint, or use a local folder") from e
    return ModelSource(Path(folder), str(name), info.sha)
