"""Model ids from the local Hugging Face cache, without network.

Each test builds a cache folder in the real layout (models--owner--name/{blobs,refs,snapshots},
snapshot files as relative symlinks into blobs/, named by content hash), with the upstream LongCat
DiT fixture as the model, and checks that the id resolves to the snapshot huggingface_hub's own
cache scanner reports, and that a model loaded through it equals the fixture folder's.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from jaxvid.hub import ModelNotCachedError, hub_cache_dir, looks_like_repo_id, resolve_model_path

REPO = "THUDM/CogVideoX-5b"
COMMIT = "8fc5b281006c82b82d34fd2543d2f0ebd4e5ea34"


def write_cached_repo(cache: Path, repo_id: str, files: dict[str, Path | bytes], commit: str = COMMIT,
                      branch: str = "main") -> Path:
    """Lay `files` (path in repo -> source file or bytes) out as huggingface_hub caches a download."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / branch).write_text(commit)  # hub writes the bare hash, no newline
    snap = repo / "snapshots" / commit
    for rel, src in files.items():
        data = src if isinstance(src, bytes) else Path(src).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snap


@pytest.fixture()
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("resolve_model_path opened a network connection")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture()
def dit_files(fixtures_dir) -> dict[str, Path]:
    src = fixtures_dir / "longcat" / "dit_dense" / "transformer"
    return {f"transformer/{p.name}": p for p in sorted(src.iterdir())} | {"model_index.json": b'{"_class_name": "X"}'}


@pytest.fixture()
def clean_env(monkeypatch, tmp_path):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_resolves_snapshot_via_hf_hub_cache(tmp_path, monkeypatch, dit_files, no_network, clean_env):
    from huggingface_hub import scan_cache_dir

    cache = tmp_path / "hubcache"
    snap = write_cached_repo(cache, REPO, dit_files)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    got = resolve_model_path(REPO)
    assert got == snap
    # huggingface_hub's own scanner sees the same snapshot for this id
    info = {r.repo_id: r for r in scan_cache_dir(cache).repos}[REPO]
    assert {rev.snapshot_path for rev in info.revisions} == {snap}
    for rel, src in dit_files.items():
        want = src if isinstance(src, bytes) else src.read_bytes()
        assert (got / rel).read_bytes() == want


def test_resolves_via_hf_home_and_default_home(tmp_path, monkeypatch, dit_files, no_network, clean_env):
    snap = write_cached_repo(tmp_path / "hfhome" / "hub", REPO, dit_files)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    assert hub_cache_dir() == tmp_path / "hfhome" / "hub"
    assert resolve_model_path(REPO) == snap
    monkeypatch.delenv("HF_HOME")
    snap_home = write_cached_repo(tmp_path / "home" / ".cache" / "huggingface" / "hub", REPO, dit_files)
    assert resolve_model_path(REPO) == snap_home


def test_hf_hub_cache_wins_over_hf_home(tmp_path, monkeypatch, dit_files, clean_env):
    snap = write_cached_repo(tmp_path / "a", REPO, dit_files)
    write_cached_repo(tmp_path / "b" / "hub", REPO, dit_files, commit="1" * 40)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "b"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "a"))
    assert resolve_model_path(REPO) == snap


def test_revision_branch_and_commit(tmp_path, dit_files, no_network, clean_env):
    cache = tmp_path / "c"
    main = write_cached_repo(cache, REPO, dit_files)
    other = "0123456789abcdef0123456789abcdef01234567"
    dev = write_cached_repo(cache, REPO, {"model_index.json": b"{}"}, commit=other, branch="dev")
    assert resolve_model_path(REPO, cache_dir=cache) == main
    assert resolve_model_path(REPO, revision="dev", cache_dir=cache) == dev
    assert resolve_model_path(REPO, revision=other, cache_dir=cache) == dev
    with pytest.raises(ModelNotCachedError, match="revision 'v9'"):
        resolve_model_path(REPO, revision="v9", cache_dir=cache)


def test_loads_a_model_through_the_cache(tmp_path, fixtures_dir, dit_files, clean_env):
    from jaxvid.models import load_transformer

    cache = tmp_path / "c"
    write_cached_repo(cache, "meituan-longcat/LongCat-Video", dit_files)
    via_cache = load_transformer(resolve_model_path("meituan-longcat/LongCat-Video", cache_dir=cache) / "transformer")
    direct = load_transformer(fixtures_dir / "longcat" / "dit_dense" / "transformer")
    a = dict(nnx.to_flat_state(nnx.state(via_cache, nnx.Param)))
    for path, v in nnx.to_flat_state(nnx.state(direct, nnx.Param)):
        np.testing.assert_array_equal(np.asarray(a[path].get_value()), np.asarray(v.get_value()), err_msg=str(path))


def test_absent_model_names_the_download_command(tmp_path, monkeypatch, no_network, clean_env):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ModelNotCachedError) as e:
        resolve_model_path(REPO)
    msg = str(e.value)
    assert f"huggingface-cli download {REPO}" in msg and str(tmp_path / "empty") in msg and "THUDM/CogVideoX-5b" in msg


def test_interrupted_download_is_reported(tmp_path, dit_files, clean_env):
    cache = tmp_path / "c"
    snap = write_cached_repo(cache, REPO, dit_files)
    blob = (snap / "transformer" / "config.json").resolve()
    blob.unlink()
    with pytest.raises(ModelNotCachedError, match=r"incomplete .*transformer/config.json.*huggingface-cli download"):
        resolve_model_path(REPO, cache_dir=cache)


def test_local_folder_passes_through(tmp_path, clean_env):
    folder = tmp_path / "THUDM" / "CogVideoX-5b"
    folder.mkdir(parents=True)
    assert resolve_model_path(folder) == folder
    assert resolve_model_path(str(folder)) == folder
    # a relative folder that looks like an id is a folder first (as diffusers does)
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert resolve_model_path(REPO) == Path(REPO)
    finally:
        os.chdir(cwd)


def test_bad_inputs(tmp_path, clean_env):
    f = tmp_path / "file.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        resolve_model_path(f)
    with pytest.raises(FileNotFoundError, match="not a model id"):
        resolve_model_path(str(tmp_path / "missing" / "deep" / "folder"))
    with pytest.raises(TypeError, match="model="):
        resolve_model_path(3)


@pytest.mark.parametrize("s,ok", [("THUDM/CogVideoX-5b", True), ("meituan-longcat/LongCat-Video", True),
                                  ("a/b/c", False), ("/abs/path", False), ("./x/y", False), ("name", False)])
def test_repo_id_shape(s, ok):
    assert looks_like_repo_id(s) is ok


def test_cache_copy_without_symlinks(tmp_path, dit_files, clean_env):
    """Caches copied without symlinks (e.g. on Windows-created drives) hold plain files: still fine."""
    cache = tmp_path / "c"
    snap = write_cached_repo(cache, REPO, dit_files)
    plain = tmp_path / "plain"
    shutil.copytree(cache, plain, symlinks=False)
    got = resolve_model_path(REPO, cache_dir=plain)
    assert got == plain / snap.relative_to(cache) and not (got / "model_index.json").is_symlink()
