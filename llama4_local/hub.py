"""The model argument: a local checkpoint directory, or a Hugging Face Hub repo id.

A repo id (`meta-llama/Llama-4-Scout-17B-16E-Instruct`) is fetched with huggingface_hub into its
standard cache, with its progress bars, taking only what the runner reads: config, generation
config, tokenizer and chat template files, and the safetensors weights (never `original/`, the
consolidated `.pth` files, or other weight formats). A complete snapshot already in the cache is
used without touching the network. `--revision`, `HF_TOKEN` and `HF_HUB_OFFLINE=1` are honoured
by huggingface_hub itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import UserError

ALLOW = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
]
IGNORE = ["original/*", "*.pth", "*.bin", "*.pt", "*.gguf"]
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_repo_id(text: str) -> bool:
    return bool(REPO_ID.match(text)) and not text.startswith((".", "~"))


def _complete(snapshot: Path) -> bool:
    """config.json and every weight file the snapshot names are present."""
    if not (snapshot / "config.json").is_file():
        return False
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError):
            return False
        from .checkpoint import plain_file_name

        return all(plain_file_name(s) and (snapshot / s).is_file() for s in shards)
    return any(snapshot.glob("*.safetensors"))


def resolve_model(model: str | Path, revision: str | None = None) -> Path:
    """A local directory as is; a repo id as the path of its (downloaded if need be) snapshot."""
    text = str(model)
    path = Path(text).expanduser()
    if path.exists() or not is_repo_id(text):
        if revision is not None and path.exists():
            raise UserError(f"--revision applies to hub repo ids; {text} is a local directory")
        if not path.exists():
            raise UserError(
                f"model path {path} does not exist; pass a local checkpoint directory or a hub repo id "
                "like meta-llama/Llama-4-Scout-17B-16E-Instruct"
            )
        return path
    return download(text, revision)


def download(repo_id: str, revision: str | None = None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    kw = dict(revision=revision, allow_patterns=ALLOW, ignore_patterns=IGNORE)
    try:
        cached = Path(snapshot_download(repo_id, local_files_only=True, **kw))
        if _complete(cached):
            return cached
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    try:
        snap = Path(snapshot_download(repo_id, **kw))
    except GatedRepoError:
        raise UserError(
            f"{repo_id} is gated: accept its license on https://huggingface.co/{repo_id}, then log in "
            "(hf auth login) or set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"no repo {repo_id} on the Hugging Face Hub (or it is private: log in or set HF_TOKEN); "
            "check the spelling, or pass a local directory"
        ) from None
    except RevisionNotFoundError:
        raise UserError(f"{repo_id} has no revision {revision!r}; check --revision") from None
    except LocalEntryNotFoundError:
        raise UserError(
            f"{repo_id} is not in the local Hugging Face cache and the hub cannot be used "
            "(offline mode or no network); download it on a connected machine or unset HF_HUB_OFFLINE"
        ) from None
    except HfHubHTTPError as e:
        raise UserError(f"the hub refused {repo_id}: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise UserError(f"cannot download {repo_id}: {e}; is there network and disk space?") from None
    if not _complete(snap):
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise UserError(
                f"{repo_id} is only partly in the local Hugging Face cache (offline mode); "
                "unset HF_HUB_OFFLINE to finish the download"
            )
        raise UserError(f"{repo_id} has no config.json and safetensors weights the runner can load")
    return snap
