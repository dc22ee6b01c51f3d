"""The book's notebooks: kept without outputs, parameterised by profile, and executed on `ci`.

Each chapter asserts its own key numbers (like d2l's notebooks), so executing it is a regression test
of the results the book states, not just a check that the code runs."""

import re

import nbformat
import pytest

from saelib import book, profiles

NOTEBOOKS = sorted((book.ROOT / "notebooks").glob("*.ipynb"))


def chapter_of(path):
    source = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells)
    match = re.search(r'from_parameters\("(\w+)"', source)
    assert match, f"{path.name} does not resolve its parameters with saelib.profiles.from_parameters"
    return match.group(1)


def test_every_notebook_is_in_the_table_of_contents():
    assert NOTEBOOKS and sorted(book.chapters()) == NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; strip them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell_declares_profile_and_every_knob(path):
    params = book.notebook_parameters(path)
    assert params["profile"] == "cpu", "the book renders the cpu profile by default"
    assert set(params) == {"profile", *profiles.knobs(chapter_of(path))}
    assert all(v is None for k, v in params.items() if k != "profile"), "knobs default to the profile's value"


def test_profiles_share_knobs_and_reject_unknown_names():
    for chapter, table in profiles.CHAPTERS.items():
        assert set(table) == set(profiles.PROFILES)
        assert all(set(table[p]) == set(table["cpu"]) for p in profiles.PROFILES), chapter
    with pytest.raises(ValueError, match=r"unknown profile 'laptop'.*'ci', 'cpu', 'gpu'"):
        profiles.resolve("synthetic", "laptop")
    with pytest.raises(ValueError, match=r"unknown parameter 'stepz'.*did you mean 'steps'"):
        profiles.resolve("synthetic", "ci", stepz=3)
    assert profiles.resolve("synthetic", "ci", steps=7, k=None).steps == 7


def test_runner_rejects_an_unknown_notebook_parameter():
    with pytest.raises(ValueError, match=r"has no parameter\(s\) \['stepz'\]; valid: .*'steps'"):
        book.check_parameters(book.ROOT / "notebooks" / "00_synthetic.ipynb", {"profile": "ci", "stepz": 1})


def test_runner_names_the_failing_notebook_and_cell(tmp_path):
    params = nbformat.v4.new_code_cell('profile = "cpu"')
    params.metadata["tags"] = ["parameters"]
    cells = [params, nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("assert x == 2, 'x is not 2'")]
    path = tmp_path / "broken.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=cells), path)
    with pytest.raises(book.ChapterFailed, match=r"broken.ipynb failed in cell 3 .*AssertionError: x is not 2"):
        book.execute(path, tmp_path / "out" / "broken.ipynb", "ci")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_on_the_ci_profile(path, tmp_path):
    out = tmp_path / path.name
    book.execute(path, out, "ci")
    executed = nbformat.read(out, as_version=4)
    text = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert "checks passed" in text, f"{path.name} did not reach its final assertion cell"
    figures = book.export_figures(tmp_path, tmp_path / "figures")
    assert len(figures) >= 2 and all(f.read_bytes().startswith(b"\x89PNG") for f in figures)
