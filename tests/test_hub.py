"""Model arguments that are hub repo ids, resolved offline against a cache laid out like huggingface_hub's."""

import hashlib
import json
import os

import pytest

from llama4_local.errors import UserError
from llama4_local.hub import is_repo_id, resolve_model
from tests.cli_util import run_cli
from tests.test_bad_input import assert_user_error

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(root, repo_id, ckpt, commit=COMMIT, drop=()):
    """huggingface_hub's layout: blobs by hash, snapshots/<commit>/ of symlinks, refs/main."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    blobs, snap = repo / "blobs", repo / "snapshots" / commit
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in ckpt.iterdir():
        if f.name in drop:
            continue
        data = f.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    # Files the runner never reads, which a full download would also hold.
    (snap / "original").mkdir()
    (snap / "original" / "consolidated.00.pth").write_bytes(b"not for us")
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch, maverick_ckpt):
    cache = tmp_path / "hub"
    snap = fake_hub_cache(cache, "acme/tiny-llama4", maverick_ckpt)
    index = json.loads((maverick_ckpt / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    fake_hub_cache(cache, "acme/incomplete", maverick_ckpt, drop=(shard,))
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return snap, env


def test_repo_ids_and_paths():
    assert is_repo_id("meta-llama/Llama-4-Scout-17B-16E-Instruct")
    for not_id in ("./scout", "/models/scout", "~/scout", "scout", "a/b/c"):
        assert not is_repo_id(not_id)


def test_cached_snapshot_resolves_offline(hub):
    snap, _ = hub
    assert resolve_model("acme/tiny-llama4") == snap


def test_prompt_with_a_repo_id_offline(hub, maverick_ckpt):
    _, env = hub
    args = ["prompt", "hi", "--raw", "--temperature", "0", "-n", "4", "--device", "cpu", "--json"]
    local = run_cli(*args, "-m", maverick_ckpt)
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "cli", *args, "-m", "acme/tiny-llama4"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["token_ids"] == json.loads(local.stdout)["token_ids"]


def test_missing_and_incomplete_repos_offline(hub):
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        resolve_model("acme/never-downloaded")
    with pytest.raises(UserError, match="only partly in the local Hugging Face cache"):
        resolve_model("acme/incomplete")  # a shard is missing: the cache cannot serve it
    with pytest.raises(UserError, match="does not exist"):
        resolve_model("./no/such/dir")


def test_cli_repo_errors_are_one_line(hub):
    import subprocess
    import sys

    _, env = hub
    r = subprocess.run(
        [sys.executable, "-m", "cli", "prompt", "hi", "-m", "acme/never-downloaded"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )
    assert_user_error(r, "acme/never-downloaded", "HF_HUB_OFFLINE")


def test_revision_on_a_local_directory_is_an_error(maverick_ckpt):
    assert_user_error(run_cli("prompt", "hi", "-m", maverick_ckpt, "--revision", "main"), "--revision")


@pytest.mark.parametrize(
    "error,words",
    [
        ("GatedRepoError", ["gated", "HF_TOKEN"]),
        ("RepositoryNotFoundError", ["no repo", "HF_TOKEN"]),
        ("RevisionNotFoundError", ["--revision"]),
    ],
)
def test_hub_errors_say_what_to_do(monkeypatch, error, words):
    import huggingface_hub
    import huggingface_hub.errors as errors

    class FakeResponse:
        status_code = 403
        headers = {}
        request = None
        url = "https://huggingface.co/api/models/acme/x"

    def fake(repo_id, **kw):
        if kw.get("local_files_only"):
            raise errors.LocalEntryNotFoundError("not cached")
        raise getattr(errors, error)(f"{error} for {repo_id}", response=FakeResponse())

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with pytest.raises(UserError) as e:
        resolve_model("acme/x", revision="v9" if error == "RevisionNotFoundError" else None)
    for w in words:
        assert w in str(e.value)
