"""Push and pull through the loopback Hub (tests/hub_server.py), in LFS and all-inline modes:
revisions and tags, no-op pushes, integrity checks, offline use, and failures."""

import hashlib
import json
from pathlib import Path

import huggingface_hub
import pytest
from conftest import HUB_TOKEN
from huggingface_hub import constants

from loram.shared.errors import LoramError
from loram.shared.hub import check_ref, is_hub_id, pull_repo, push_files, resolve_model

WEIGHTS = bytes(range(256)) * 64  # 16 KiB


def _with_manifest(files: dict[str, bytes]) -> dict[str, bytes]:
    """`files` plus a minimal loram_manifest.json listing their sha256 (what pull verifies against)."""
    tensors = b"manifest-tensors"
    manifest = {"files": {n: hashlib.sha256(d).hexdigest() for n, d in files.items()},
                "tensors": {"file": "loram_manifest.safetensors", "sha256": hashlib.sha256(tensors).hexdigest()}}
    return {**files, "loram_manifest.json": json.dumps(manifest).encode(), "loram_manifest.safetensors": tensors}


def _checkpoint(config: bytes = b"{}") -> dict[str, bytes]:
    return _with_manifest({"config.json": config, "model.safetensors": WEIGHTS, "tokenizer/vocab.json": b"[1, 2]"})


def _read(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_hub_ids():
    assert is_hub_id("org/name") and is_hub_id("Org-1/llama.3_p50")
    assert not is_hub_id("name") and not is_hub_id("/abs/path") and not is_hub_id("a/b/c") and not is_hub_id("../x")
    for bad in ("org/-name", "org/name.git", "org/n\u00e4me", "org/" + "n" * 100):  # the Hub's own rule
        assert not is_hub_id(bad), bad


def test_an_endpoint_is_named_without_its_credentials():
    from loram.shared.hub import _at

    assert _at("http://user:s3cret@127.0.0.1:8000/api?token=hf_x") == " at http://127.0.0.1:8000/api"
    assert _at("https://hub.example.org") == " at https://hub.example.org" and _at(None) == ""


def test_refs_are_checked_before_anything_is_committed(hub):
    first = push_files("org/m", _checkpoint(), tag="v1", endpoint=hub.url)
    commits = len(hub.repos["org/m"].commits)
    with pytest.raises(LoramError, match="--branch 'v1' is a tag of org/m, not a branch; choose another --branch"):
        push_files("org/m", _checkpoint(b'{"v": 2}'), branch="v1", endpoint=hub.url)
    with pytest.raises(LoramError, match="--tag 'main' is a branch of org/m; choose another --tag .nothing was"):
        push_files("org/m", _checkpoint(b'{"v": 2}'), tag="main", endpoint=hub.url)
    assert len(hub.repos["org/m"].commits) == commits and hub.head("org/m") == first.commit
    for bad in ("", "my branch", "refs/heads/x", "v 2", "-x", "a..b", "x/", "/x", "x.lock"):
        with pytest.raises(LoramError, match=f"--tag {bad!r} is not a valid branch or tag name"):
            check_ref("--tag", bad)
    for good in ("v1", "exp/lr-3e-4", "release_2.0", first.commit):
        check_ref("--branch", good)
    with pytest.raises(LoramError, match="--revision '' names nothing; give a branch, tag or commit"):
        pull_repo("org/m", "", endpoint=hub.url)
    from loram.hub_commands import PushConfig as AdapterPush
    from loram.publisher.push import PushConfig as CheckpointPush

    for command in (AdapterPush, CheckpointPush):  # both push commands check before reading their folder
        with pytest.raises(LoramError, match="--tag '' is not a valid branch or tag name"):
            command.resolve(folder="f", repo_id="org/m", tag="")


def test_private_on_an_existing_public_repository_warns(hub, loram_warnings):
    push_files("org/m", _checkpoint(), endpoint=hub.url)
    push_files("org/m", _checkpoint(b'{"v": 2}'), private=True, endpoint=hub.url)
    assert any(m.startswith("org/m already exists and is public: --private applies only to a repository it creates")
               for m in loram_warnings())
    push_files("org/p", _checkpoint(), private=True, endpoint=hub.url)  # created private: nothing to say
    assert hub.repos["org/p"].private and not loram_warnings()


def test_offline_a_snapshot_never_pulled_whole_is_used_with_a_warning(hub, monkeypatch, loram_warnings):
    """Files fetched one by one (as `loram plan` fetches config.json) are all the cache holds of a revision:
    offline, nothing says what is missing, so the pull says so, and does not record the snapshot as whole."""
    push_files("org/a", {"adapter_config.json": b"{}", "adapter_model.safetensors": WEIGHTS}, endpoint=hub.url)
    huggingface_hub.hf_hub_download("org/a", "adapter_config.json", endpoint=hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for _ in range(2):
        pull_repo("org/a", endpoint=hub.url, required="adapter_config.json", kind="peft adapter")
        said = loram_warnings()
        assert len(said) == 1 and said[0].startswith("org/a@main comes from the local Hub cache (HF_HUB_OFFLINE=1), "
                                                     "which never held it whole")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    pull_repo("org/a", endpoint=hub.url)  # whole now
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    pull_repo("org/a", endpoint=hub.url)
    assert not loram_warnings()


def test_a_local_folder_is_recorded_by_its_absolute_path(tmp_path, monkeypatch):
    """A relative folder spelled like ORG/NAME, recorded as typed, would be read back from another working
    directory as a Hub id (or not found): adapters and manifests record the absolute path."""
    folder = tmp_path / "models" / "orig"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    source = resolve_model("models/orig")
    assert source.id == str(folder.resolve()) and source.path == folder.resolve() and source.revision is None
    monkeypatch.chdir(folder)
    assert resolve_model("./").id == str(folder.resolve())
    assert resolve_model(source.id).id == source.id


def test_push_pull_round_trip_and_identical_push_makes_no_commit(hub):
    files = _checkpoint()
    first = push_files("org/m", files, tag="v1", endpoint=hub.url, message="v1")
    assert first.changed and first.commit == hub.head("org/m") == hub.repos["org/m"].tags["v1"]
    assert first.url == f"{hub.url}/org/m" and len(first.commit) == 40
    stored_as_lfs = hub.repos["org/m"].resolve("main").files["model.safetensors"].lfs
    assert stored_as_lfs == (hub.mode == "lfs")

    source = pull_repo("org/m", "v1", endpoint=hub.url)
    assert source.revision == first.commit and source.id == "org/m"
    pulled = _read(source.path)
    assert {k: v for k, v in pulled.items() if k != ".gitattributes"} == files

    commits = len(hub.repos["org/m"].commits)
    again = push_files("org/m", files, tag="v1", endpoint=hub.url, message="again")
    assert not again.changed and again.commit == first.commit and len(hub.repos["org/m"].commits) == commits
    assert "no changes" in again.summary()


def test_revisions_tags_and_branches(hub):
    v1, v2 = _checkpoint(), _with_manifest({"config.json": b'{"v": 2}', "model.safetensors": WEIGHTS[::-1]})
    one = push_files("org/m", v1, tag="v1", endpoint=hub.url)
    two = push_files("org/m", v2, tag="v2", endpoint=hub.url)
    assert two.changed and two.commit != one.commit
    assert set(hub.repos["org/m"].resolve("main").files) == {".gitattributes", *v2}  # tokenizer/ was deleted
    assert {k: v for k, v in _read(pull_repo("org/m", "v1", endpoint=hub.url).path).items()
            if k != ".gitattributes"} == v1
    assert _read(pull_repo("org/m", endpoint=hub.url).path)["config.json"] == b'{"v": 2}'
    assert pull_repo("org/m", one.commit, endpoint=hub.url).revision == one.commit  # a commit sha works too

    commits = len(hub.repos["org/m"].commits)
    with pytest.raises(LoramError, match="tag 'v1' of org/m already names commit .* never moved"):
        push_files("org/m", _checkpoint(b'{"v": 3}'), tag="v1", endpoint=hub.url)
    assert len(hub.repos["org/m"].commits) == commits  # refused before committing

    exp = push_files("org/m", _checkpoint(b'{"exp": 1}'), branch="exp", endpoint=hub.url)
    assert exp.branch == "exp" and hub.head("org/m", "exp") == exp.commit and hub.head("org/m") == two.commit
    assert _read(pull_repo("org/m", "exp", endpoint=hub.url).path)["config.json"] == b'{"exp": 1}'


def test_a_tag_on_the_head_is_checked_before_committing(hub, tmp_path):
    """The tag names main's head, the push differs: refused with main unchanged; identical content: a no-op."""
    files = _checkpoint()
    first = push_files("org/m", files, tag="v1", endpoint=hub.url)
    commits = len(hub.repos["org/m"].commits)
    for other in (_checkpoint(b'{"v": 2}'), {k: v for k, v in files.items() if k != "tokenizer/vocab.json"},
                  {**files, "extra.txt": b"x"}):
        with pytest.raises(LoramError, match="tag 'v1' of org/m already names commit .*nothing was committed") as e:
            push_files("org/m", other, tag="v1", endpoint=hub.url)
        assert "\n" not in str(e.value)
        assert hub.head("org/m") == first.commit and len(hub.repos["org/m"].commits) == commits

    paths = {}  # files given as local paths are compared the same way
    for name, data in files.items():
        paths[name] = tmp_path / "local" / name
        paths[name].parent.mkdir(parents=True, exist_ok=True)
        paths[name].write_bytes(data)
    for same in (files, paths):
        again = push_files("org/m", same, tag="v1", endpoint=hub.url)
        assert not again.changed and again.commit == first.commit and len(hub.repos["org/m"].commits) == commits
    paths["model.safetensors"].write_bytes(WEIGHTS[::-1])  # same size, other content
    with pytest.raises(LoramError, match="nothing was committed"):
        push_files("org/m", paths, tag="v1", endpoint=hub.url)
    assert hub.head("org/m") == first.commit


def test_a_file_tampered_on_the_server_is_refused_evicted_and_refetched(hub):
    files = _checkpoint()
    push_files("org/m", files, endpoint=hub.url)
    hub.tamper("org/m", "model.safetensors")  # same size, other bytes, hashes unchanged
    with pytest.raises(LoramError, match=r"org/m@main: model\.safetensors does not match loram_manifest\.json"):
        pull_repo("org/m", endpoint=hub.url)
    tampered = bytes(b ^ 0xFF for b in WEIGHTS[:8]) + WEIGHTS[8:]
    cached = [p for p in Path(constants.HF_HUB_CACHE).rglob("*") if p.is_file()]
    assert cached and tampered not in {p.read_bytes() for p in cached}  # the bad copy left the cache
    hub.tamper("org/m", "model.safetensors")  # flipping back repairs the server
    assert _read(pull_repo("org/m", endpoint=hub.url).path)["model.safetensors"] == WEIGHTS


def test_a_later_commit_that_changes_a_listed_file_is_refused(hub):
    files = _checkpoint()
    push_files("org/m", files, endpoint=hub.url)
    push_files("org/m", {**files, "config.json": b'{"evil": true}'}, endpoint=hub.url)  # manifest left as is
    with pytest.raises(LoramError, match=r"config\.json does not match loram_manifest\.json"):
        pull_repo("org/m", endpoint=hub.url)


def test_files_without_a_manifest_are_checked_against_the_hub_hashes(hub):
    push_files("org/a", {"adapter_config.json": b"{}", "adapter_model.safetensors": WEIGHTS}, endpoint=hub.url)
    hub.tamper("org/a", "adapter_model.safetensors")
    kind = "LFS sha256" if hub.mode == "lfs" else "git blob id"
    with pytest.raises(LoramError, match=f"adapter_model.safetensors does not match the Hub's {kind}"):
        resolve_model("org/a", endpoint=hub.url, required="adapter_config.json", kind="peft adapter")


def test_offline_a_pulled_revision_comes_from_the_cache(hub, monkeypatch):
    push_files("org/m", _checkpoint(), tag="v1", endpoint=hub.url)
    online = resolve_model("org/m", "v1", endpoint=hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    calls = len(hub.requests)
    offline = resolve_model("org/m", "v1", endpoint=hub.url)
    assert offline == online and len(hub.requests) == calls
    with pytest.raises(LoramError, match="org/m@v2 is not .*in the local Hub cache and HF_HUB_OFFLINE=1"):
        resolve_model("org/m", "v2", endpoint=hub.url)


def test_an_unreachable_hub_serving_a_branch_from_the_cache_is_said(hub, monkeypatch, loram_warnings):
    """The client serves a branch this cache has seen from the cache when the Hub cannot be reached, without a word:
    main had moved on, and a pull at a dead endpoint trained on the old commit silently. Now one warning names the
    cached commit; a commit asked for by its hash, or HF_HUB_OFFLINE=1, is the cache on purpose: no warning."""
    import socket

    monkeypatch.setattr(huggingface_hub.utils._http.time, "sleep", lambda seconds: None)
    push_files("org/m", _checkpoint(), endpoint=hub.url)
    old = pull_repo("org/m", endpoint=hub.url)
    assert not loram_warnings()
    push_files("org/m", _checkpoint(config=b'{"new": 1}'), endpoint=hub.url)  # main moves on
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    stale = pull_repo("org/m", endpoint=dead)
    assert stale == old
    said = loram_warnings()
    assert len(said) == 1 and said[0].startswith(f"could not reach the Hub at {dead} ("), said
    err = said[0]
    assert (f"using org/m@main as this cache last saw it, commit {old.revision[:12]}, which may be older than the "
            "Hub's; check the network or --endpoint, or set HF_HUB_OFFLINE=1") in err
    assert pull_repo("org/m", old.revision, endpoint=dead) == old and not loram_warnings()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert pull_repo("org/m", endpoint=hub.url) == old and not loram_warnings()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert pull_repo("org/m", endpoint=hub.url).revision != old.revision and not loram_warnings()


def test_unknown_repository_revision_and_wrong_kind_are_clear_errors(hub):
    with pytest.raises(LoramError, match=r"Hub repository org/nope not found at http://127\.0\.0\.1"):
        resolve_model("org/nope", endpoint=hub.url)
    push_files("org/m", _checkpoint(), endpoint=hub.url)
    with pytest.raises(LoramError, match="revision 'v9' not found in Hub repository org/m"):
        resolve_model("org/m", "v9", endpoint=hub.url)
    with pytest.raises(LoramError, match="org/m@main is not a peft adapter .no adapter_config.json"):
        resolve_model("org/m", endpoint=hub.url, required="adapter_config.json", kind="peft adapter")
    with pytest.raises(LoramError, match="neither an existing folder nor a Hub repo id"):
        resolve_model("not-a-repo", endpoint=hub.url)


def test_server_errors_are_retried_then_reported_in_one_line(hub, monkeypatch):
    monkeypatch.setattr(huggingface_hub.utils._http.time, "sleep", lambda seconds: None)  # backoff without waiting
    upload = ("PUT", "^/lfs-upload/") if hub.mode == "lfs" else ("POST", "/preupload/")
    hub.fail(*upload, status=500, times=2)  # transient: huggingface_hub retries
    result = push_files("org/m", _checkpoint(), endpoint=hub.url)
    assert result.changed and sum(1 for r in hub.requests if r[2] == 500) == 2

    head = hub.head("org/m")
    hub.fail(*upload, status=500, times=100)  # persistent: retries, then one clear line
    with pytest.raises(LoramError) as error:
        push_files("org/m", _with_manifest({"model.safetensors": WEIGHTS[::-1]}), endpoint=hub.url)
    message = str(error.value)
    assert "\n" not in message and "could not upload and commit (nothing was committed)" in message
    assert "HTTP 500" in message and hub.head("org/m") == head
    assert sum(1 for r in hub.requests if r[2] == 500) == 2 + 6  # 1 try + 5 retries


def test_a_failed_commit_leaves_the_branch_unchanged(hub):
    push_files("org/m", _checkpoint(), endpoint=hub.url)
    head = hub.head("org/m")
    hub.fail("POST", "/commit/main$", status=500, times=1)
    with pytest.raises(LoramError, match=r"push to org/m at .* failed: could not upload and commit .*HTTP 500"):
        push_files("org/m", _checkpoint(b'{"v": 2}'), endpoint=hub.url)
    assert hub.head("org/m") == head


def test_a_wrong_token_is_refused_without_echoing_it(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrongTokenValue987")
    with pytest.raises(LoramError, match="HTTP 401") as error:
        push_files("org/m", _checkpoint(), endpoint=hub.url)
    assert "hf_wrongTokenValue987" not in str(error.value)


def test_a_private_repository_needs_the_token_to_pull(hub, monkeypatch):
    push_files("org/secret", _checkpoint(), private=True, endpoint=hub.url)
    assert hub.repos["org/secret"].private
    assert pull_repo("org/secret", endpoint=hub.url).revision == hub.head("org/secret")
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(Path(constants.HF_HUB_CACHE).parent / "other-cache"))
    with pytest.raises(LoramError, match="Hub repository org/secret not found .*private: set HF_TOKEN"):
        pull_repo("org/secret", endpoint=hub.url)
    Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True, exist_ok=True)
    Path(constants.HF_TOKEN_PATH).write_text(HUB_TOKEN)  # what `hf auth login` stores
    assert pull_repo("org/secret", endpoint=hub.url).revision == hub.head("org/secret")


def test_a_blob_linked_on_to_the_shared_xet_store_is_checked_by_its_etag(tmp_path, isolated_cache):
    """With Xet, blobs/<sha256> links on to blobs/<2 hex>/<xet hash>: the snapshot's own link names the hash."""
    from loram.shared.hub import verify_snapshot

    repo = tmp_path / "hub" / "models--org--m"
    store = tmp_path / "hub" / "blobs" / "ab" / ("ab" + "0" * 62)  # a Xet hash, not the content's sha256
    store.parent.mkdir(parents=True)
    store.write_bytes(WEIGHTS)
    etag = hashlib.sha256(WEIGHTS).hexdigest()
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / etag).symlink_to(Path("..", "..", "blobs", "ab", store.name))
    snapshot = repo / "snapshots" / ("c" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(Path("..", "..", "blobs", etag))
    verify_snapshot(snapshot, "org/m@main")  # passes: content matches the etag

    store.write_bytes(WEIGHTS[::-1])  # the shared store entry is corrupted
    with pytest.raises(LoramError, match="model.safetensors does not match the Hub's LFS sha256"):
        verify_snapshot(snapshot, "org/m@main")
    assert not any(p.exists() or p.is_symlink() for p in (snapshot / "model.safetensors", repo / "blobs" / etag, store))
