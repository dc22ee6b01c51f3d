"""The repository URL is written once (pyproject.toml) and every Colab entry point agrees with it."""

import shutil
from pathlib import Path

import nbformat

from saelib.book import colab
from saelib.book.build import ROOT, chapters


def test_every_chapter_and_the_config_agree_with_pyproject():
    assert colab.sync() == []
    url = colab.repository_url()
    for path in chapters():
        nb = nbformat.read(path, as_version=4)
        assert colab.colab_link(url, path.name) in nb.cells[0].source
        assert f'"saelib[gpu] @ git+{url}"' in nb.cells[1].source
        assert max(map(len, nb.cells[1].source.splitlines())) <= 90


def test_a_changed_url_is_flagged_then_rewritten_everywhere(tmp_path: Path):
    """Move the repository in a copy: the check names every stale place, --write fixes them all."""
    for name in ("pyproject.toml", "_config.yml", "_toc.yml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks")
    pyproject = tmp_path / "pyproject.toml"
    old = colab.repository_url(tmp_path)
    new = "https://github.com/someone/sae-fork"
    pyproject.write_text(pyproject.read_text().replace(old, new))
    problems = colab.sync(tmp_path)
    n = len(chapters(tmp_path))
    assert len(problems) == 1 + 2 * n  # the config, then each chapter's link and set-up cell
    assert colab.sync(tmp_path, write=True) == problems
    assert colab.sync(tmp_path) == []
    assert f"url: {new}" in (tmp_path / "_config.yml").read_text()
    nb = nbformat.read(tmp_path / "notebooks" / "00_synthetic.ipynb", as_version=4)
    assert "colab.research.google.com/github/someone/sae-fork/blob/main/notebooks/00_synthetic.ipynb" \
        in nb.cells[0].source
    assert old not in nbformat.writes(nb)
