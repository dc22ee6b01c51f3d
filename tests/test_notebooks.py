"""The book's notebooks: kept without outputs, parameterised by profile, and executed on `ci`.

Each chapter asserts its own key numbers (like d2l's notebooks), so executing it is a regression test
of the results the book states, not just a check that the code runs."""

import html as html_module
import os
import re
import subprocess
import sys

import nbformat
import pytest

from saelib.book import build as book
from saelib.book import profiles

NOTEBOOKS = sorted((book.ROOT / "notebooks").glob("*.ipynb"))


def chapter_of(path):
    chapter = book.chapter_of(path)
    assert chapter, f"{path.name} does not resolve its parameters with saelib.book.profiles.from_parameters"
    return chapter


def test_every_notebook_is_in_the_table_of_contents():
    assert NOTEBOOKS and sorted(book.chapters()) == NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; strip them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_code_fits_the_books_column(path):
    """The rendered check (check_reader_view) in seconds, before any chapter runs."""
    wide = [line for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"
            for line in c.source.splitlines() if len(line) > CODE_WIDTH]
    assert not wide, f"{path.name}: code lines wider than {CODE_WIDTH} characters: {wide}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell_declares_profile_and_every_knob(path):
    params = book.notebook_parameters(path)
    assert params["profile"] is None, "profile = None: $SAELIB_PROFILE if set, else the book's cpu profile"
    assert set(params) == {"profile", *profiles.knobs(chapter_of(path))}
    assert all(v is None for k, v in params.items() if k != "profile"), "knobs default to the profile's value"


def test_profiles_share_knobs_and_reject_unknown_names():
    required = set(profiles.PROFILES) - set(profiles.BASE)
    for chapter, table in profiles.CHAPTERS.items():
        assert required <= set(table) <= set(profiles.PROFILES), chapter
        assert all(set(table[p]) == set(table["cpu"]) for p in table), chapter
    with pytest.raises(ValueError, match=r"unknown profile 'laptop'.*'ci', 'cpu', 'cpu-long', 'gpu'"):
        profiles.resolve("synthetic", "laptop")
    with pytest.raises(ValueError, match=r"unknown parameter 'stepz'.*did you mean 'steps'"):
        profiles.resolve("synthetic", "ci", stepz=3)
    assert profiles.resolve("synthetic", "ci", steps=7, k=None).steps == 7


def test_cpu_long_falls_back_to_cpu_where_a_chapter_has_none():
    assert "cpu-long" not in profiles.CHAPTERS["synthetic"]
    long = profiles.resolve("synthetic", "cpu-long")
    assert long.profile == "cpu-long"
    assert {k: v for k, v in long.items() if k != "profile"} == profiles.CHAPTERS["synthetic"]["cpu"]
    own = profiles.CHAPTERS["allocation_scale"]
    assert profiles.resolve("allocation_scale", "cpu-long").length_steps == own["cpu-long"]["length_steps"]
    assert own["cpu-long"]["length_steps"] > own["cpu"]["length_steps"]


@pytest.mark.parametrize("profile", ["ci", "cpu", "cpu-long", "gpu", "gpu-smoke"])
def test_chapters_02_and_02b_open_one_harvest(profile):
    """Chapter 2b reads chapter 2's activation cache (one key: model, hook, corpus, tokens, context,
    precision), so it never harvests the same layer twice."""
    from saelib.subjects.activations import CacheSpec

    def spec(chapter, split, n):
        v = profiles.values(chapter, profile)
        return CacheSpec(model=v["model"], hook=v["hook"], corpus=v["corpus"], n_tokens=v[n],
                         context_size=v["context_size"], model_dtype=v["precision"], split=split).key()

    for split, n in (("train", "n_tokens"), ("heldout", "eval_tokens")):
        assert spec("allocation", split, n) == spec("allocation_scale", split, n)


def test_profile_none_reads_saelib_profile_else_cpu(monkeypatch):
    monkeypatch.delenv("SAELIB_PROFILE", raising=False)
    assert profiles.resolve("synthetic").profile == "cpu"
    assert profiles.from_parameters("synthetic", {"profile": None, **dict.fromkeys(profiles.knobs("synthetic"))}
                                    ).steps == profiles.CHAPTERS["synthetic"]["cpu"]["steps"]
    monkeypatch.setenv("SAELIB_PROFILE", "ci")
    assert profiles.resolve("synthetic", None).steps == profiles.CHAPTERS["synthetic"]["ci"]["steps"]
    assert profiles.resolve("synthetic", "gpu").profile == "gpu", "an explicit profile wins over the environment"
    monkeypatch.setenv("SAELIB_PROFILE", "laptop")
    with pytest.raises(ValueError, match=r"unknown profile 'laptop' \(from \$SAELIB_PROFILE\)"):
        profiles.resolve("synthetic")


def test_runner_rejects_an_unknown_notebook_parameter():
    with pytest.raises(ValueError, match=r"has no parameter 'stepz' \(did you mean 'steps'\?\); valid: .*'steps'"):
        book.check_parameters(book.ROOT / "notebooks" / "00_synthetic.ipynb", {"profile": "ci", "stepz": 1})


@pytest.mark.parametrize("param, message", [
    ("kk=3", r"^error: 00_synthetic has no parameter 'kk' \(did you mean 'k'\?\); valid: \[.*\]$"),
    ("k=notanumber", r"^error: knob k='notanumber' of chapter 'synthetic' must be an integer, e\.g\. k=4$"),
    ("k=2.5", r"^error: knob k=2\.5 of chapter 'synthetic' must be an integer"),
    ("lr=fast", r"^error: knob lr='fast' of chapter 'synthetic' must be a number"),
])
def test_bad_knobs_fail_in_one_line_before_a_kernel_starts(param, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(book, "execute", lambda *a, **k: pytest.fail("a kernel was started"))
    assert book.main(["--only", "00_synthetic", "-p", param, "--build-dir", str(tmp_path), "--no-html"]) == 2
    assert re.match(message, capsys.readouterr().err.strip())


def test_every_profile_value_has_its_knobs_type():
    for chapter, table in profiles.CHAPTERS.items():
        for values in table.values():
            for name, value in values.items():
                if value is not None:
                    profiles.check_type(chapter, name, value)


def test_derived_knobs_are_valid_for_small_user_values():
    """`-p steps=4` failed on checkpoint_every = steps // 8 = 0, a knob the user never set."""
    from saelib.core.training import TrainConfig

    for cell in nbformat.read(book.ROOT / "notebooks" / "00_synthetic.ipynb", as_version=4).cells:
        if "train_cfg = TrainConfig(" in cell.source:
            code = cell.source[cell.source.index("train_cfg = "):].split("\ndata_key")[0]
            namespace = {"TrainConfig": TrainConfig, "P": profiles.resolve("synthetic", "ci", steps=4)}
            exec(code, namespace)
            assert namespace["train_cfg"].checkpoint_every == 1
            return
    pytest.fail("00_synthetic builds no TrainConfig")


def test_the_runner_estimates_what_is_left_from_this_folders_recorded_times(tmp_path):
    from pathlib import Path

    chapters = [Path(f"{n}.ipynb") for n in ("00_a", "01_b", "02_c")]
    assert book._eta({}, chapters) == "", "a first run has nothing to estimate from"
    book.record_timing(tmp_path, "cpu", "00_a", 60)
    book.record_timing(tmp_path, "cpu", "01_b", 120)
    assert book._eta(book._recorded_timings(tmp_path)["cpu"], chapters) == "", "02_c was never timed here"
    book.record_timing(tmp_path, "cpu", "02_c", 1800)
    previous = book._recorded_timings(tmp_path)["cpu"]
    assert re.fullmatch(r" \(last run here: 1\.0 min; the 3 left: about 33 min, done about \d\d:\d\d\)",
                        book._eta(previous, chapters))
    assert book._eta(previous, chapters[2:]) == " (last run here: 30.0 min)"
    (tmp_path / "timings.json").write_text("{broken")
    assert book._recorded_timings(tmp_path) == {}


def test_a_failing_chapter_keeps_the_last_good_executed_notebook(tmp_path):
    params = nbformat.v4.new_code_cell('profile = "cpu"\nfail = False')
    params.metadata["tags"] = ["parameters"]
    cells = [params, nbformat.v4.new_code_cell("assert not fail, 'told to fail'\nprint('good run')")]
    path = tmp_path / "chapter.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=cells), path)
    out = tmp_path / "out" / "chapter.ipynb"
    book.execute(path, out, "ci")
    good = out.read_bytes()
    with pytest.raises(book.ChapterFailed, match=r"failed in cell 2 .*told to fail[\s\S]*failed/chapter.ipynb; "
                                                 r"the last good run is still .*out/chapter.ipynb"):
        book.execute(path, out, "ci", {"fail": True})
    assert out.read_bytes() == good
    assert "told to fail" in book.failed_path(out).read_text()
    assert sorted(p.name for p in out.parent.iterdir()) == ["chapter.ipynb", "failed"]


def test_runner_names_the_failing_notebook_and_cell(tmp_path):
    params = nbformat.v4.new_code_cell('profile = "cpu"')
    params.metadata["tags"] = ["parameters"]
    cells = [params, nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("assert x == 2, 'x is not 2'")]
    path = tmp_path / "broken.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=cells), path)
    with pytest.raises(book.ChapterFailed, match=r"broken.ipynb failed in cell 3 .*AssertionError: x is not 2"):
        book.execute(path, tmp_path / "out" / "broken.ipynb", "ci")


@pytest.fixture(scope="session")
def ci_executed(tmp_path_factory):
    """One folder of executed ci notebooks, shared so the HTML test renders what the chapter tests ran."""
    return tmp_path_factory.mktemp("executed_ci")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_on_the_ci_profile(path, ci_executed, tmp_path):
    out = ci_executed / path.name
    book.execute(path, out, "ci")
    executed = nbformat.read(out, as_version=4)
    text = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert "checks passed" in text, f"{path.name} did not reach its final assertion cell"
    # Every value the prose cites ({glue:text}`name:fmt`, saelib.book.prose) was glued by the run.
    cited = {m.split(":")[0] for c in executed.cells if c.cell_type == "markdown"
             for m in re.findall(r"\{glue(?::\w+)?\}`([^`]+)`", c.source)}
    glued = {o.metadata["scrapbook"]["name"] for c in executed.cells if c.cell_type == "code"
             for o in c.outputs if "scrapbook" in o.get("metadata", {})}
    assert cited <= glued, f"{path.name}: the prose cites values the run did not glue: {sorted(cited - glued)}"
    figures = [f for f in book.export_figures(ci_executed, tmp_path / "figures") if f.name.startswith(path.stem)]
    assert len(figures) >= 2 and all(f.read_bytes().startswith(b"\x89PNG") for f in figures)


def test_book_renders_to_html_with_figures_and_offline_math(ci_executed):
    """The runner's last step on the ci chapters: jupyter-book with warnings as errors (so a broken
    cross-reference fails), every chapter a page with its figures, MathJax served locally."""
    for path in NOTEBOOKS:  # chapters a -k selection skipped above
        if not (ci_executed / path.name).exists():
            book.execute(path, ci_executed / path.name, "ci")
    index = book.build_html(ci_executed, ci_executed.parent / "_build")
    html = index.parent
    assert index.is_file() and (html / "_static" / "mathjax" / "tex-svg.js").stat().st_size > 1_000_000
    for path in NOTEBOOKS:
        page = (html / "notebooks" / f"{path.stem}.html").read_text()
        figures = re.findall(r'<img alt="[^"]*" src="\.\./(_images/\w+\.png)"', page)
        assert len(figures) >= 2 and all((html / f).is_file() for f in figures), f"{path.stem}: figures missing"
        assert "_static/mathjax/tex-svg.js" in page and "cdn.jsdelivr.net" not in page
        check_reader_view(html, path.stem, page)
        tags = [c.metadata.get("tags", []) for c in nbformat.read(path, as_version=4).cells]
        solutions = sum("solution" in t for t in tags)
        assert solutions > 0 and all("hide-input" in t for t in tags if "solution" in t), path.stem
        hidden = sum("hide-input" in t for t in tags)  # solutions, set-up, parameters and imports
        assert page.count("Show code cell source") == hidden, f"{path.stem}: cells not behind toggles"
        assert page.count("agrees with saelib") == solutions, f"{path.stem}: a check on a solution did not pass"
    # Chapter 2's feature browser is published with the book, and its link from the chapter resolves.
    browser = html / "_static" / "browser" / "02_allocation" / "index.html"
    assert browser.is_file() and "../_static/browser/02_allocation/index.html" in (
        html / "notebooks" / "02_allocation.html").read_text()


def test_nbval_runs_a_committed_chapter_on_the_ci_profile():
    """The teachers' and CI users' route (book/teaching.md): nbval runs a notebook as committed, in its
    own folder, with the profile from $SAELIB_PROFILE. --nbval-lax compares no outputs (the notebooks
    keep none, and timings and progress differ per run); a cell that raises fails.

    One chapter proves the route: what nbval does differently from the papermill runs above is only
    that no parameters are injected, and every chapter's parameters cell is checked to resolve from
    $SAELIB_PROFILE in the same way (test_parameters_cell_declares_profile_and_every_knob,
    test_profile_none_reads_saelib_profile_else_cpu). Running all seven again cost 195 s of the test
    command for no path the papermill runs leave untested."""
    notebook = book.ROOT / "notebooks" / "00_synthetic.ipynb"
    env = {**os.environ, "SAELIB_PROFILE": "ci", "PYTHONPATH": os.pathsep.join(
        [str(book.ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env", "-p", "no:cacheprovider",
           "-q", "-o", "addopts=", str(notebook)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=book.ROOT, env=env)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, f"nbval failed: {summary}\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
    n_cells = sum(c.cell_type == "code" for c in nbformat.read(notebook, as_version=4).cells)
    assert re.search(rf"\b{n_cells} passed\b", summary), f"expected every code cell ({n_cells}) to run: {summary}"


CODE_WIDTH = 90  # characters: the book's text column; wider lines scroll sideways


def check_reader_view(html_root, stem, page):
    """What a reader sees (issue 19): results, not progress streams; code that fits the column;
    blanks, not NaN, where a value does not apply; images that load offline."""
    assert not re.search(r"\d+%\|", page), f"{stem}: a progress bar was rendered"
    for cell in re.findall(r'<div class="cell_input[^"]*">(.*?)</div>\s*</div>', page, re.S):
        text = html_module.unescape(re.sub(r"<[^>]+>", "", cell))
        wide = [line for line in text.split("\n") if len(line) > CODE_WIDTH]
        assert not wide, f"{stem}: code lines wider than {CODE_WIDTH} characters: {wide}"
    nan_cells = re.findall(r"<td[^>]*>\s*(?:nan|NaN|None)\s*</td>", page)
    assert not nan_cells, f"{stem}: table cells show {nan_cells[:3]} instead of a blank"
    for src in re.findall(r'<img [^>]*src="([^"]+)"', page):
        assert not src.startswith(("http:", "https:", "//")), f"{stem}: image from the network: {src}"
        assert (html_root / "notebooks" / src).resolve().is_file(), f"{stem}: missing image {src}"
    assert "# Parameters" not in page, f"{stem}: papermill's injected-parameters cell is shown"
