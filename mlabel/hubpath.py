"""Hub model paths (``hf://owner/name[@revision]``) and their files in the local Hugging Face cache:
what every model path may name, kept apart from :mod:`mlabel.hub` (push, pull, the card) so
that resolving a path needs nothing but ``huggingface_hub``."""
from __future__ import annotations

import re
from pathlib import Path

from .errors import UserError

__all__ = ["HUB_PREFIX", "MODEL_FILES", "check_repo_id", "hub_module", "parse_hub_path", "snapshot"]

HUB_PREFIX = "hf://"
# the Hub's rule for an owner and a name: letters, digits, '-', '_', '.', no '--' or '..' inside
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
REPO_ID = re.compile(rf"^{_PART}/{_PART}$")
MODEL_FILES = ("model.safetensors", "mlabel.json")


def check_repo_id(repo_id: str) -> str:
    if not REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise UserError(f"{repo_id!r} is not a Hub repository id: give OWNER/NAME (letters, digits, '-', '_', '.'), "
                        "e.g. alice/scenes-resnet50")
    return repo_id


def parse_hub_path(path: str) -> tuple[str, str | None]:
    """``hf://owner/name[@revision]`` -> (repo id, revision or None)."""
    repo, _, revision = path[len(HUB_PREFIX):].partition("@")
    return check_repo_id(repo), revision or None


def hub_module():
    """``huggingface_hub``, or the extra to install."""
    try:
        import huggingface_hub
    except ImportError:
        raise UserError("the Hub needs the huggingface_hub package: pip install 'mlabel[hub]'") from None
    return huggingface_hub


def snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The model files of ``repo_id`` in the local Hugging Face cache, fetched when missing (the
    cache only under ``HF_HUB_OFFLINE=1``); the folder ``huggingface_hub`` returns."""
    hub = hub_module()
    check_repo_id(repo_id)
    try:
        folder = hub.snapshot_download(repo_id, revision=revision, allow_patterns=[*MODEL_FILES, "README.md"])
    except Exception as err:  # noqa: BLE001 - huggingface_hub's many error types: said in one line
        raise UserError(f"hf://{repo_id}{'@' + revision if revision else ''}: could not be read "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); check the name, "
                        "the network, or HF_HUB_OFFLINE=1 with the files in the cache") from None
    return Path(folder)
