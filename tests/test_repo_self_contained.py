"""The suite and the notebooks need nothing beside the repo, and leave nothing in it (issue 16, items 16-17).

A plain clone has no ../shared: fixtures ship in tests/fixtures, measured reference numbers in
bench/results/reference, the architecture contract in docs/DESIGN.md.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import FIXTURES_ROOT, REPO_ROOT

# Folders the tests and notebooks open by name (tests/fixtures/<group>/<case>).
_FIXTURE_FOLDERS = [
    "cogvideox/tiny_2b_sincos/transformer", "cogvideox/tiny_5b_rope/transformer", "cogvideox/vae_tiny/vae",
    "cogvideox/pipeline_t2v_2b_ddim", "cogvideox/t5_tiny/text_encoder", "longcat/dit_dense/transformer",
    "longcat/lora_one", "radial",
]


def test_fixtures_resolve_inside_the_repo():
    assert FIXTURES_ROOT.resolve().is_relative_to(REPO_ROOT)
    for folder in _FIXTURE_FOLDERS:
        assert (FIXTURES_ROOT / folder).is_dir(), folder
    for group in ("cogvideox", "longcat", "radial"):
        assert (FIXTURES_ROOT / group / "README.md").is_file(), group
    assert (REPO_ROOT / "bench" / "results" / "reference" / "README.md").is_file()
    assert (REPO_ROOT / "docs" / "DESIGN.md").is_file()


def test_no_test_or_notebook_reads_outside_the_repo():
    sources = [*sorted((REPO_ROOT / "tests").glob("*.py")), *sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))]
    outside = re.compile(r"\.\./shared|REPO(_ROOT)?\.parent|parents\[2\]")
    hits = [p.name for p in sources if p.name != Path(__file__).name and outside.search(p.read_text())]
    assert not hits, f"read from beside the repo: {hits}"
    for nb in sorted((REPO_ROOT / "notebooks").glob("*.ipynb")):
        code = "".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"])
        assert '"shared"' not in code, nb.name


def test_readme_links_point_into_the_repo():
    readme = (REPO_ROOT / "README.md").read_text()
    assert "../shared" not in readme
    assert "docs/DESIGN.md" in readme


@pytest.mark.skipif(shutil.which("git") is None or not (REPO_ROOT / ".git").exists(), reason="needs a git checkout")
@pytest.mark.parametrize("name", ["out.mp4", "panda.mp4", "t2v.gif", "LongCat-Video-jaxvid/dit/config.json"])
def test_readme_outputs_are_git_ignored(name):
    result = subprocess.run(["git", "check-ignore", "-q", name], cwd=REPO_ROOT, check=False)
    assert result.returncode == 0, f"{name} (written by a README command) is not in .gitignore"
