"""The README, the front door: every Python block runs as written (tests/doc_blocks.py, the runner the site's
pages use too), its `make` commands exist, and its links resolve (its own sections, the site's pages)."""

import re

import pytest
from doc_blocks import README, ROOT, python_blocks, run_python_block

BLOCKS = python_blocks(README)


def test_the_readme_has_examples():
    assert len(BLOCKS) >= 1


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path):
    run_python_block(BLOCKS[index], tmp_path)


def test_readme_commands_name_real_make_targets():
    makefile = (ROOT / "Makefile").read_text()
    for target in re.findall(r"^make (\w[\w-]*)", README.read_text(), flags=re.M):
        assert re.search(rf"^{target}:", makefile, flags=re.M), target


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped (not `-` or `_`), spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_links_resolve():
    """Links to its own sections name a heading; links to files (the site's pages, results) name one that exists."""
    text = README.read_text()
    anchors = {
        github_anchor(h) for h in re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), flags=re.M)
    }
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert not links - anchors, sorted(links - anchors)
    files = {target.split("#")[0] for target in re.findall(r"\]\(([^)#:\s][^)\s]*)\)", text)}
    assert files, "the README links to no page of the site"
    assert all((ROOT / target).exists() for target in files), sorted(t for t in files if not (ROOT / t).exists())
