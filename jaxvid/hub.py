"""Model ids from the local Hugging Face cache: `resolve_model_path("THUDM/CogVideoX-5b") -> Path`.

jaxvid never downloads: a model id resolves to a snapshot already in the cache (the folder
`<cache>/models--THUDM--CogVideoX-5b/snapshots/<commit>/`, whose files link to `blobs/`), through
`huggingface_hub` with local files only (what HF_HUB_OFFLINE=1 does, for this call alone). The
cache is found as huggingface_hub finds it, read at call time: HF_HUB_CACHE, else the legacy
HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else
~/.cache/huggingface/hub. An existing local folder passes through unchanged.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["ModelNotCachedError", "hub_cache_dir", "looks_like_repo_id", "resolve_model_path"]

# owner/name as the Hub spells them: letters, digits, '-', '_', '.'; no leading '.' or '-'.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


class ModelNotCachedError(FileNotFoundError):
    """A model id has no (complete) snapshot in the local Hugging Face cache."""


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, from the environment as it is now (see the module docstring)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def looks_like_repo_id(model: str | os.PathLike) -> bool:
    """True for 'owner/name' strings (not absolute, not './...', exactly one '/')."""
    return isinstance(model, str) and bool(_REPO_ID.match(model))


def _download_hint(repo_id: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return (f"download it first with `huggingface-cli download {repo_id}{rev}` "
            f"(`hf download {repo_id}{rev}` with huggingface_hub >= 1.0), or pass a local folder")


def resolve_model_path(
    model: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """A local folder for `model`: an existing folder as it is, or a model id's cached snapshot.

    model: a folder path, or a Hub model id 'owner/name' (e.g. "THUDM/CogVideoX-5b").
    revision: branch, tag or commit of the id (default "main", as `refs/main` in the cache says).
    cache_dir: the hub cache folder (default: hub_cache_dir()).
    Never touches the network. Raises ModelNotCachedError naming the download command when the
    id has no snapshot in the cache or its snapshot links to missing blobs (an interrupted
    download); FileNotFoundError for a path that is neither a folder nor a model id.
    """
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model={model!r}; expected a folder path or a model id like 'THUDM/CogVideoX-5b'")
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"model={str(model)!r} is a file; expected a model folder or a model id")
    if not looks_like_repo_id(model):
        raise FileNotFoundError(f"model={str(model)!r}: no such folder, and not a model id of the form 'owner/name'")
    repo_id = str(model)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else hub_cache_dir()

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError as e:
        raise ModelNotCachedError(
            f"model={repo_id!r}{f' (revision {revision!r})' if revision else ''} is not in the local Hugging Face "
            f"cache {cache} (jaxvid does not download); {_download_hint(repo_id, revision)}"
        ) from e
    broken = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_symlink() and not p.exists())
    if broken:
        raise ModelNotCachedError(
            f"model={repo_id!r}: the cached snapshot {folder} is incomplete ({len(broken)} files link to missing "
            f"blobs, e.g. {broken[:3]}); {_download_hint(repo_id, revision)}"
        )
    log.info("model %s resolved to the cached snapshot %s", repo_id, folder)
    return folder
