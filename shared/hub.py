"""Where a model comes from, and how checkpoints travel through the Hugging Face Hub.

A model is a local folder or a Hub repository at a revision (branch, tag or commit sha). Everything
that talks to the Hub goes through huggingface_hub with the endpoint the user gave (None: the
client's default, `HF_ENDPOINT` or huggingface.co). Tokens come from huggingface_hub's own
mechanisms (`HF_TOKEN`, `hf auth login`); this module never takes, prints or writes one.

Pull (`pull_repo`, and `resolve_model` for any command given a Hub id): `snapshot_download` at the
named revision, so that with `HF_HUB_OFFLINE=1` a revision pulled before resolves from the local
cache. Then every file is checked: a file the LoRAM manifest lists against the manifest's sha256,
any other against the hash the Hub recorded for it. (The cache names each repo blob after its ETag:
the sha256 for LFS and Xet files, the git blob id for the others. A Xet blob may link on to the
cache-wide store, named by Xet hashes, so only the snapshot's own link counts.) A file that fails is
removed from the cache, so the next pull fetches it again, and the pull stops with a LoramError
naming it. A verified snapshot is remembered (file sizes, times and inodes) so later commands do not
hash tens of GB again; its `ModelSource.verified` tells the command that pulled it not to hash it again
either (`check_pruned_checkpoint`).

Push (`push_files`): one commit of the given files on a branch, deleting what the branch holds but
the push does not (`.gitattributes` aside); create_commit skips unchanged files, so pushing
identical content makes no commit. Then an optional tag; an existing tag is never moved, and a push
that would need to move one is refused before anything is committed (the content is compared with the
tagged head first: sizes, then LFS sha256 or git blob ids).
"""

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from loram.shared.configs import Config, option
from loram.shared.errors import LoramError, warn
from loram.shared.manifest import MANIFEST_JSON, MANIFEST_TENSORS, sha256_file
from loram.shared.outputs import atomic_file

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_KEEP_ON_HUB = {".gitattributes"}  # never deleted by a push


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: its local folder plus where it came from."""

    path: Path
    id: str  # the Hub repo id, or the local folder's absolute path (recorded in adapters and manifests, so
    # it names the same folder from any working directory and is never read back as a Hub id)
    revision: str | None  # the commit sha for Hub models, None for local folders
    verified: bool = False  # every file was just checked (a pulled snapshot), so need not be hashed again


def revision_option(of: str = "the model"):
    """The `--revision` option of every command that reads from the Hub: one meaning, one text."""
    return option(None, f"Hub revision (branch, tag or commit sha) of {of}, for Hub repo ids; default main.")


def verify_option():
    """The `--verify/--no-verify` switch of every command that reads a pruned checkpoint: one meaning, one text."""
    return option(True, "Check every file of the pruned checkpoint against the sha256 in its manifest before "
                        "reading it (about 1 s per GB; a Hub download is checked when pulled). The manifest is "
                        "validated either way.", flag="verify/no-verify")


def endpoint_option():
    """The `--endpoint` option of every command that talks to the Hub: one meaning, one text."""
    return option(None, "Hub endpoint URL for Hub repo ids (default: $HF_ENDPOINT, else huggingface.co).")


@dataclass
class PushOptions(Config):
    """What every push command takes (`loram publish push`, `loram push`); subclasses name the folder."""

    folder: Path = option(help="The folder to publish.", argument=True)
    repo_id: str = option(help="Hub repository ORG/NAME (created when missing).")
    branch: str | None = option(None, "Branch to commit to (created from main when missing); default main.")
    tag: str | None = option(None, "Tag the pushed commit, e.g. v1 (an existing tag is never moved).")
    private: bool = option(False, "Create the repository as private (no effect on an existing one).")
    message: str | None = option(None, "Commit message (default: names what is published and its base model).")
    endpoint: str | None = endpoint_option()

    def check(self):
        if not looks_like_repo_id(self.repo_id):  # before any file is hashed
            raise LoramError(f"--repo-id {self.repo_id!r} must be a Hub repo id ORG/NAME")
        check_ref("--branch", self.branch)
        check_ref("--tag", self.tag)

    def push(self, files: dict[str, "Path | bytes"], default_message: str) -> "PushResult":
        return push_files(self.repo_id, files, branch=self.branch, tag=self.tag, private=self.private,
                          endpoint=self.endpoint, message=self.message or default_message)


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    branch: str
    commit: str  # the branch head after the push
    changed: bool  # False: the branch already held exactly these files, no commit was made
    tag: str | None
    url: str

    def summary(self) -> str:
        what = f"committed {self.commit[:12]}" if self.changed else f"no changes (already at {self.commit[:12]})"
        return f"{self.repo_id}@{self.branch}: {what}{f', tag {self.tag}' if self.tag else ''}\nurl: {self.url}"


def looks_like_repo_id(text: str | Path) -> bool:
    """Spelled like a Hub repository id, `ORG/NAME`."""
    if not (_HUB_ID.fullmatch(str(text)) and ".." not in str(text)):
        return False
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(str(text))  # the Hub's own rule: ASCII, no leading '-', no '.git', 96 characters
    except HFValidationError:
        return False
    return True


_REF = re.compile(r"(?!-)(?!refs/)[A-Za-z0-9._/-]+")


def check_ref(flag: str, name: str | None) -> None:
    """Refuse a branch, tag or revision name git would not take as is (None: not given)."""
    if name is None:
        return
    if not _REF.fullmatch(name) or ".." in name or name.endswith((".", "/", ".lock")) or "//" in name \
            or name.startswith("/"):
        raise LoramError(f"{flag} {name!r} is not a valid branch or tag name; use letters, digits, '.', '_', '-' "
                         "and '/' (e.g. v1, exp/lr-3e-4)")


def is_hub_id(name: str | Path) -> bool:
    """A Hub repository id that is not also an existing local path (which `resolve_model` prefers)."""
    return looks_like_repo_id(name) and not Path(name).expanduser().exists()


def names_nothing(name: str | Path) -> bool:
    """Neither an existing local path nor a Hub repo id: what `resolve_model` refuses (a folder on another machine,
    say, recorded in a manifest or an adapter)."""
    return not Path(name).expanduser().exists() and not looks_like_repo_id(name)


def resolve_model(name: str | Path, revision: str | None = None, endpoint: str | None = None,
                  required: str = "config.json", kind: str = "model checkpoint") -> ModelSource:
    """A local directory as is; otherwise pull repo `name` from the Hub at `revision` (verified).

    `required` is the file that makes a folder a `kind` (config.json for models, adapter_config.json
    for adapters)."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / required).is_file():
            raise LoramError(f"{path} is not a {kind} (no {required})")
        if revision:
            raise LoramError(f"--revision applies to Hub repositories, but {path} is a local folder")
        return ModelSource(path.resolve(), str(path.resolve()), None)
    if names_nothing(name):
        noun = "adapter" if "adapter" in kind else "model"
        raise LoramError(f"{noun} {name!r} is neither an existing folder nor a Hub repo id (ORG/NAME)")
    return pull_repo(str(name), revision, endpoint, required=required, kind=kind)


def pull_repo(repo_id: str, revision: str | None = None, endpoint: str | None = None, *,
              required: str | None = None, kind: str = "model checkpoint") -> ModelSource:
    """Download `repo_id` at `revision` (default main) into the Hub cache and verify every file."""
    from huggingface_hub import constants, snapshot_download

    if revision is not None and not revision.strip():  # not main: a Hub revision may also be refs/pr/1
        raise LoramError(f"--revision {revision!r} names nothing; give a branch, tag or commit, or leave it out "
                         "for main")
    where = f"{repo_id}@{revision or 'main'}"
    # A branch or tag this cache has seen is served from it when the Hub cannot be reached, without a word from
    # the client: then the Hub is asked once more below, and a failure is said.
    may_fall_back = (not constants.is_offline_mode() and not _COMMIT.fullmatch(revision or "")
                     and _cached_ref(repo_id, revision or "main").is_file())
    try:
        folder = Path(snapshot_download(repo_id, revision=revision or "main", endpoint=endpoint))
    except Exception as e:
        if (error := hub_error(e, repo_id, revision, endpoint)) is None:
            raise
        raise error from e
    if required and not (folder / required).is_file():
        raise LoramError(f"Hub repository {where} is not a {kind} (no {required})")
    if may_fall_back and (reason := _unreachable(repo_id, revision or "main", endpoint)):
        warn(f"could not reach the Hub{_at(endpoint)} ({reason}): using {where} as this cache last saw it, commit "
             f"{folder.name[:12]}, which may be older than the Hub's; check the network or --endpoint, or set "
             "HF_HUB_OFFLINE=1 to use the cache on purpose")
    verify_snapshot(folder, where, offline=constants.is_offline_mode())
    return ModelSource(folder, repo_id, folder.name, verified=True)  # snapshots/<commit sha>


_COMMIT = re.compile(r"[0-9a-f]{40}")


def hub_error(e: BaseException, repo_id: str, revision: str | None, endpoint: str | None,
              file: str | None = None) -> LoramError | None:
    """The one-line LoramError for the Hub client's error `e` while fetching `repo_id` at `revision` (or only its
    `file`), or None when `e` is not a Hub failure (a bug, to be raised as it is)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision or 'main'}"
    if isinstance(e, RevisionNotFoundError):
        return LoramError(f"revision {revision or 'main'!r} not found in Hub repository {repo_id}")
    if isinstance(e, RepositoryNotFoundError):
        return LoramError(f"Hub repository {repo_id} not found{_at(endpoint)} (or it is private: set HF_TOKEN or run "
                          "`hf auth login`)")
    if isinstance(e, HFValidationError):
        return LoramError(f"{repo_id!r} is not a valid Hub repo id (ORG/NAME)")
    if isinstance(e, LocalEntryNotFoundError):  # offline, unreachable, or an incomplete cached snapshot
        if constants.is_offline_mode():
            return LoramError(f"{where} is not (completely) in the local Hub cache and HF_HUB_OFFLINE=1 forbids "
                              "downloading it; pull it once with network access")
        return LoramError(f"could not reach the Hub{_at(endpoint)} for {where} ({explain(e.__cause__ or e)}) and it "
                          "is not in the local cache; check the network or --endpoint")
    if file and isinstance(e, EntryNotFoundError):
        return LoramError(f"Hub repository {where} has no {file}")
    if _is_hub_failure(e):
        return LoramError(f"could not download {where} from the Hub ({explain(e)}); retry, or check the network or "
                          "--endpoint")
    return None


def _cached_ref(repo_id: str, revision: str) -> Path:
    """The Hub cache's record of the commit a branch or tag named when this cache last pulled it."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs" / revision


def _unreachable(repo_id: str, revision: str, endpoint: str | None) -> str | None:
    """Why the Hub cannot say what `revision` of `repo_id` is now, or None when it answers."""
    from huggingface_hub import HfApi

    try:
        HfApi(endpoint=endpoint).repo_info(repo_id, revision=revision)
    except Exception as e:  # noqa: BLE001 (any failure to answer is the reason)
        if _is_hub_failure(e):
            return explain(e)
        raise
    return None


# -- integrity --------------------------------------------------------------------------------------

def verify_snapshot(folder: Path, where: str, offline: bool = False) -> None:
    """Check every file of a downloaded snapshot (see the module docstring); evict the ones that fail.

    `offline`: the snapshot came from the cache without asking the Hub what the revision holds. Without a
    manifest, only a snapshot this cache saw pulled whole is known complete; another (files fetched one by one,
    e.g. by `loram plan`) is used with a warning and not recorded as whole."""
    listed = _manifest_hashes(folder)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    missing = sorted(set(listed) - set(files))
    if missing:
        raise LoramError(f"{where}: {missing[0]} is listed in {MANIFEST_JSON} but missing from the repository")
    stamp = {name: _stat(folder / name) for name in files}
    record = _record_path(folder)
    if record.is_file() and json.loads(record.read_text()) == stamp:
        return
    partial = offline and not listed
    if partial:
        warn(f"{where} comes from the local Hub cache (HF_HUB_OFFLINE=1), which never held it whole here: only its "
             f"{len(files)} cached file(s) are checked, and files it lacks go unnoticed; pull it once with network "
             "access")
    failed = [(name, against) for name in files if (against := _mismatch(folder / name, listed.get(name)))]
    for name, _ in failed:
        _evict(folder / name)
    if failed:
        name, against = failed[0]
        more = f" (and {len(failed) - 1} more file(s))" if len(failed) > 1 else ""
        raise LoramError(f"{where}: {name}{more} does not match {against} (integrity check failed); the bad copies "
                         "were removed from the cache: pull again to refetch them, and if this repeats the files "
                         "were modified on the Hub")
    if not partial:
        with atomic_file(record) as tmp:
            tmp.write_text(json.dumps(stamp))


def _mismatch(path: Path, promised: str | None) -> str | None:
    """What `path` fails to match, if anything: the manifest's sha256, or the hash its cache blob is named after."""
    blob = Path(os.readlink(path)).name if path.is_symlink() else path.name  # one hop: blobs/<etag>
    checks = [(MANIFEST_JSON, promised, "sha256")] if promised else []
    if re.fullmatch(r"[0-9a-f]{64}", blob):
        checks.append(("the Hub's LFS sha256", blob, "sha256"))
    elif re.fullmatch(r"[0-9a-f]{40}", blob):
        checks.append(("the Hub's git blob id", blob, "git"))
    actual: dict[str, str] = {}
    for against, expected, algo in checks:
        if algo not in actual:
            actual[algo] = sha256_file(path) if algo == "sha256" else _git_blob_id(path)
        if actual[algo] != expected:
            return against
    return None


def _manifest_hashes(folder: Path) -> dict[str, str]:
    """file -> sha256 that the manifest promises (none without a manifest)."""
    path = folder / MANIFEST_JSON
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {**data["files"], MANIFEST_TENSORS: data["tensors"]["sha256"]}
    except (KeyError, TypeError, ValueError) as e:
        raise LoramError(f"{MANIFEST_JSON} in {folder} is malformed ({type(e).__name__}: {e})") from e


def _git_blob_id(src: Path | bytes) -> str:
    """The git blob id (sha1 of "blob SIZE\\0" + content) of a file or of bytes."""
    if isinstance(src, bytes):
        return hashlib.sha1(b"blob %d\0" % len(src) + src).hexdigest()
    digest = hashlib.sha1(b"blob %d\0" % src.stat().st_size)
    with open(src, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _stat(path: Path) -> list[int]:
    s = path.stat()  # of the blob the snapshot links to
    return [s.st_size, s.st_mtime_ns, s.st_ino]


def _record_path(folder: Path) -> Path:
    from loram.shared.cache import cache_dir

    return cache_dir() / "hub-verified" / f"{hashlib.sha256(str(folder).encode()).hexdigest()[:32]}.json"


def _evict(path: Path) -> None:
    """Remove a snapshot file and what it links to (the repo's blob, and the cache-wide store entry that
    blob may link to), so the next download fetches it again."""
    chain = [path]
    while chain[-1].is_symlink() and len(chain) < 8:
        chain.append(Path(os.path.normpath(chain[-1].parent / os.readlink(chain[-1]))))
    for link in chain:
        link.unlink(missing_ok=True)


# -- push -------------------------------------------------------------------------------------------

def push_files(repo_id: str, files: dict[str, Path | bytes], *, branch: str | None = None, tag: str | None = None,
               private: bool = False, endpoint: str | None = None, message: str = "Upload with loram") -> PushResult:
    """Make branch `branch` (default main) of `repo_id` hold exactly `files` (path in repo -> local file or
    bytes), creating the repository and the branch when missing; then tag the head with `tag`."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.hf_api import RepoFile

    if not looks_like_repo_id(repo_id):
        raise LoramError(f"--repo-id {repo_id!r} must be a Hub repo id ORG/NAME")
    branch = branch or "main"
    api = HfApi(endpoint=endpoint)
    stage = "create the repository"
    try:
        url = str(api.create_repo(repo_id, private=private, exist_ok=True))
        stage = "read the repository"
        if private and api.repo_info(repo_id).private is False:
            warn(f"{repo_id} already exists and is public: --private applies only to a repository it creates, "
                 "so this push is public; make the repository private on the Hub first if it must not be")
        refs = api.list_repo_refs(repo_id)
        branches = {b.name: b.target_commit for b in refs.branches}
        tags = {t.name: t.target_commit for t in refs.tags}
        if branch in tags and branch not in branches:
            raise LoramError(f"--branch {branch!r} is a tag of {repo_id}, not a branch; choose another --branch")
        if tag is not None and tag in branches:
            raise LoramError(f"--tag {tag!r} is a branch of {repo_id}; choose another --tag (nothing was committed)")
        if branch not in branches:
            stage = f"create branch {branch}"
            api.create_branch(repo_id, branch=branch, exist_ok=True)
            stage = "read the repository"
            branches = {b.name: b.target_commit for b in api.list_repo_refs(repo_id).branches}
        head = branches[branch]
        if tag is not None and tag in tags and tags[tag] != head:
            raise LoramError(f"tag {tag!r} of {repo_id} already names commit {tags[tag][:12]}, not the head of "
                             f"{branch}; tags are never moved, choose a new one")
        stage = "read the repository's files"
        tree = {f.path: f for f in api.list_repo_tree(repo_id, revision=head, recursive=True)
                if isinstance(f, RepoFile)}  # files only, not folders
        remote = set(tree)
        if tag is not None and tag in tags and not _same_content(tree, files):
            raise LoramError(f"tag {tag!r} of {repo_id} already names commit {tags[tag][:12]} (the head of {branch}), "
                             f"which holds other content; tags are never moved, so nothing was committed: "
                             f"choose a new tag")
        operations = [CommitOperationAdd(p, str(src) if isinstance(src, Path) else src) for p, src in sorted(files.items())]
        operations += [CommitOperationDelete(p) for p in sorted(remote - set(files) - _KEEP_ON_HUB)]
        stage = "upload and commit (nothing was committed)"
        commit = _commit(api, repo_id, operations, message, branch, head)
        if tag is not None and tag not in tags:
            made = "the commit was made" if commit != head else "nothing needed committing"
            stage = f"tag commit {commit[:12]} as {tag} ({made})"
            api.create_tag(repo_id, tag=tag, revision=commit)
        elif tag is not None and tags[tag] != commit:  # the content changed between the check and the commit
            raise LoramError(f"committed {commit[:12]} to {repo_id}@{branch}, but tag {tag!r} already names the "
                             f"previous commit {tags[tag][:12]}; tags are never moved, choose a new one")
    except LoramError:
        raise
    except Exception as e:
        if _is_hub_failure(e):
            raise LoramError(f"push to {repo_id}{_at(endpoint)} failed: could not {stage} ({explain(e)})") from e
        raise
    return PushResult(repo_id, branch, commit, commit != head, tag, url)


def _commit(api, repo_id: str, operations: list, message: str, branch: str, head: str) -> str:
    """Commit `operations` onto `head` of `branch`; the new head (`head` itself when nothing changed, which
    the client logs as a warning of its own: our summary says it in one line instead)."""
    import logging

    quiet = [logging.getLogger(f"huggingface_hub.{m}") for m in ("hf_api", "_upload_pipeline")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        return api.create_commit(repo_id, operations, commit_message=message, revision=branch,
                                 parent_commit=head).oid
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)


def _same_content(tree: dict, files: dict[str, Path | bytes]) -> bool:
    """Whether the remote files `tree` (path -> RepoFile; `.gitattributes` aside) are exactly `files`:
    the same paths, sizes and content (an LFS file's sha256, another file's git blob id)."""
    if set(tree) - _KEEP_ON_HUB != set(files) - _KEEP_ON_HUB or not set(files) <= set(tree):
        return False
    if any(tree[name].size != (src.stat().st_size if isinstance(src, Path) else len(src))
           for name, src in files.items()):
        return False  # before hashing anything
    for name, src in files.items():
        remote = tree[name]
        if remote.lfs is not None:
            local = sha256_file(src) if isinstance(src, Path) else hashlib.sha256(src).hexdigest()
            expected = remote.lfs.sha256
        else:
            local = _git_blob_id(src)
            expected = remote.blob_id
        if local != expected:
            return False
    return True


# -- errors -----------------------------------------------------------------------------------------

def _at(endpoint: str | None) -> str:
    """" at ENDPOINT" for a message, without credentials a URL may carry (user:password@, ?token=)."""
    if not endpoint:
        return ""
    import urllib.parse

    url = urllib.parse.urlsplit(endpoint)
    host = url.netloc.rpartition("@")[2]
    return f" at {urllib.parse.urlunsplit((url.scheme, host, url.path, '', ''))}"


def _is_hub_failure(error: BaseException) -> bool:
    """An HTTP, network or transfer failure somewhere in `error`'s chain (huggingface_hub wraps them)."""
    from huggingface_hub.errors import HfHubHTTPError

    seen = error
    while seen is not None:
        if isinstance(seen, HfHubHTTPError | OSError) or type(seen).__module__.split(".")[0] in ("httpx", "httpx2"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def explain(error: BaseException) -> str:
    """One line about a Hub failure: the HTTP status and the server's message, or the error's first line."""
    from huggingface_hub.errors import HfHubHTTPError

    seen = error
    while seen is not None and not isinstance(seen, HfHubHTTPError):
        seen = seen.__cause__ or seen.__context__
    if seen is not None and seen.response is not None:
        message = (seen.server_message or "").strip().splitlines()
        return f"HTTP {seen.response.status_code}" + (f": {message[0]}" if message else "")
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__

