"""Build the book: execute the chapter notebooks with papermill for a profile, then render the HTML.

    python -m saelib.book                          # every chapter on the cpu profile, then _build/html
    python -m saelib.book --profile ci             # the quick validation run the tests use
    python -m saelib.book --only 02 -p k=16        # one chapter with a changed knob
    python -m saelib.book --list                   # chapters, their knobs and per-profile values

Executed notebooks go to ``_build/executed/<profile>/``; the HTML is built from them (never from
the sources, which stay output-free in git) with warnings treated as errors. Expensive artefacts
(activation caches, subject models, trained SAEs) are cached by saelib under ``$SAELIB_CACHE``,
keyed by their configuration, so a rerun re-executes the notebooks in a fraction of the time.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from saelib.book import plan, profiles
from saelib.browser.publish import BROWSER_DIR_ENV
from saelib.core import progress, storage

ROOT = Path(__file__).resolve().parents[2]


class ChapterFailed(RuntimeError):
    """A notebook raised; the message names the notebook and the failing cell."""


def chapters(root: Path = ROOT) -> list[Path]:
    """Chapter notebooks in table-of-contents order."""
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    files = [entry["file"] for part in toc.get("parts", [{"chapters": toc.get("chapters", [])}])
             for entry in part["chapters"]]
    return [root / f"{f}.ipynb" for f in files if f.startswith("notebooks/")]


def notebook_parameters(path: Path) -> dict[str, Any]:
    """Names and default values of the ``parameters`` cell of a notebook."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{path.name} must have exactly one cell tagged 'parameters', found {len(cells)}")
    out = {}
    for node in ast.parse(cells[0].source).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


def chapter_of(path: Path) -> str | None:
    """The ``saelib.book.profiles`` chapter whose knobs a notebook reads (``from_parameters("NAME", ...)``)."""
    import nbformat

    source = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells)
    found = re.search(r'from_parameters\("(\w+)"', source)
    return found.group(1) if found else None


def check_parameters(path: Path, params: dict[str, Any]) -> None:
    """Refuse, in one line, parameter names the notebook does not declare (papermill would only
    warn; a did-you-mean for a near miss) and knob values of the wrong type, before a kernel starts."""
    valid = notebook_parameters(path)
    for name in sorted(set(params) - set(valid)):
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{path.stem} has no parameter {name!r}{hint}; valid: {sorted(valid)}")
    chapter = chapter_of(path)
    if chapter is not None:
        for name, value in params.items():
            if name != "profile" and value is not None:
                profiles.check_type(chapter, name, value)


def failed_path(out_path: Path) -> Path:
    """Where ``execute`` leaves the executed copy of a notebook that failed (outside the folder the
    HTML is built from, so the last good executed notebook keeps its place)."""
    return out_path.parent / "failed" / out_path.name


def execute(path: Path, out_path: Path, profile: str, params: dict[str, Any] | None = None) -> float:
    """Run one notebook with papermill into a temporary file, moved to ``out_path`` when every cell
    ran; return seconds taken. On an error the last good ``out_path`` stays, the failed run goes to
    ``failed_path(out_path)``, and ChapterFailed names the cell."""
    import papermill

    params = {"profile": profile, **(params or {})}
    check_parameters(path, params)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.stem}.tmp{os.getpid()}.ipynb")
    # The kernel inherits this environment. No progress bar may end up in the saved outputs or the
    # rendered pages: saelib's bars honour SAELIB_PROGRESS=0 (saelib.core.progress), other libraries'
    # (transformers' GGUF loading, the hub) TQDM_DISABLE and HF_HUB_DISABLE_PROGRESS_BARS; the
    # terminal shows papermill's cell bar instead. PyTorch's OpenMP threads spin while waiting
    # unless told otherwise; on a shared 2-core machine that costs 10x or more. Chapters publish
    # their feature browsers beside the executed notebooks (build_html serves them).
    kernel_env = {progress.ENV: "0", "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                  "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                  BROWSER_DIR_ENV: str(out_path.parent.resolve() / "_browser")}
    saved = {k: os.environ.get(k) for k in kernel_env}
    os.environ.update(kernel_env)
    t0 = time.perf_counter()
    try:
        papermill.execute_notebook(str(path), str(tmp), parameters=params, kernel_name="python3",
                                   language="python", cwd=str(path.parent),
                                   progress_bar=sys.stderr.isatty())
    except papermill.PapermillExecutionError as e:
        failed = failed_path(out_path)
        failed.parent.mkdir(exist_ok=True)
        os.replace(tmp, failed)
        kept = f"; the last good run is still {out_path}" if out_path.exists() else ""
        raise ChapterFailed(f"{path.name} failed in cell {e.cell_index} (execution count {e.exec_count}): "
                            f"{e.ename}: {e.evalue}\nthe executed notebook with the traceback: {failed}{kept}"
                            ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    hide_injected_parameters(tmp)
    os.replace(tmp, out_path)
    failed_path(out_path).unlink(missing_ok=True)  # this chapter runs again
    return time.perf_counter() - t0


def hide_injected_parameters(path: Path) -> None:
    """Tag papermill's injected-parameters cell ``remove-cell``: the rendered page shows the chapter's
    resolved parameters as a table (``saelib.book.profiles.Params``), not the injected assignments."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        tags = cell.metadata.setdefault("tags", [])
        if "injected-parameters" in tags and "remove-cell" not in tags:
            tags.append("remove-cell")
    nbformat.write(nb, path)


def mathjax_script() -> Path:
    """MathJax 3 as one self-contained file (SVG output, no web fonts) from the `django-static-mathjax`
    wheel, so the book renders its formulas offline instead of fetching MathJax from a CDN."""
    import importlib.util

    spec = importlib.util.find_spec("mathjax")
    script = Path(spec.submodule_search_locations[0]) / "static/mathjax/es5/tex-svg.js" if spec else None
    if script is None or not script.is_file():
        raise RuntimeError("MathJax is missing: pip install django-static-mathjax==3.2.2.1 "
                           "(in requirements.txt; it ships the MathJax 3 scripts the book serves)")
    return script


def build_html(executed: Path, build_dir: Path, root: Path = ROOT) -> Path:
    """Render the book from executed notebooks (copied beside the prose into a staging tree)."""
    stage = build_dir / "src"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml", "book", "_static"):
        src = root / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, stage / name)
    (stage / "notebooks").mkdir()
    for nb in executed.glob("*.ipynb"):
        shutil.copy(nb, stage / "notebooks" / nb.name)
    (stage / "_static" / "mathjax").mkdir(parents=True)
    shutil.copy(mathjax_script(), stage / "_static" / "mathjax" / "tex-svg.js")
    if (executed / "_browser").is_dir():  # feature browsers the chapters wrote (saelib.browser)
        shutil.copytree(executed / "_browser", stage / "_static" / "browser")
    # jupyter-book writes <path-output>/_build/html: the default build_dir (ROOT/_build) gets
    # _build/html, any other build_dir gets <build_dir>/_build/html.
    out_root = build_dir.parent if build_dir.name == "_build" else build_dir
    cmd = [str(Path(sys.executable).with_name("jupyter-book")), "build", str(stage), "--path-output",
           str(out_root), "-W", "-n", "--keep-going"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"jupyter-book build failed (warnings are errors):\n{result.stdout[-4000:]}"
                           f"\n{result.stderr[-4000:]}")
    return out_root / "_build" / "html" / "index.html"


def export_figures(executed: Path, out: Path) -> list[Path]:
    """Write every PNG figure of the executed notebooks to out/<chapter>-figNN.png (for the README
    gallery and for readers who want the images without the HTML)."""
    import base64

    import nbformat

    tmp = storage.atomic_dir(out)  # the folder is replaced whole: never a mix of two builds' figures
    written = []
    for nb_path in sorted(executed.glob("*.ipynb")):
        nb = nbformat.read(nb_path, as_version=4)
        pngs = [o["data"]["image/png"] for c in nb.cells if c.cell_type == "code"
                for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
        for i, png in enumerate(pngs, 1):
            name = f"{nb_path.stem}-fig{i:02d}.png"
            (tmp / name).write_bytes(base64.b64decode(png))
            written.append(out / name)
    storage.commit_dir(tmp, out)
    return written


def _recorded_timings(build_dir: Path) -> dict[str, dict[str, float]]:
    path = build_dir / "timings.json"
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        return {}  # an estimate only: a broken record is rewritten by the next recorded chapter


def _eta(previous: dict[str, float], remaining: list[Path]) -> str:
    """' (last run here: 3.1 min; these N chapters: about M min, done about HH:MM)' from the times
    this build folder recorded for the profile; empty where a chapter has none (a first run)."""
    if not remaining or any(nb.stem not in previous for nb in remaining):
        return ""
    left = sum(previous[nb.stem] for nb in remaining)
    done_at = time.strftime("%H:%M", time.localtime(time.time() + left))
    rest = f"; the {len(remaining)} left: about {left / 60:.0f} min, done about {done_at}" if len(remaining) > 1 else ""
    return f" (last run here: {previous[remaining[0].stem] / 60:.1f} min{rest})"


def record_timing(build_dir: Path, profile: str, chapter: str, seconds: float) -> None:
    path = build_dir / "timings.json"
    with storage.locked(path):  # builds sharing a build folder add their times, none is lost
        timings = json.loads(path.read_text()) if path.exists() else {}
        timings.setdefault(profile, {})[chapter] = round(seconds, 1)
        storage.atomic_text(json.dumps(timings, indent=1, sort_keys=True), path)


def _parse_param(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a bare string such as a model name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m saelib.book", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="cpu", choices=profiles.PROFILES)
    ap.add_argument("--only", nargs="+", metavar="CHAPTER", help="chapters whose file name contains this")
    ap.add_argument("-p", "--param", action="append", type=_parse_param, default=[], metavar="KEY=VALUE",
                    help="set a notebook parameter (repeatable)")
    ap.add_argument("--build-dir", type=Path, default=ROOT / "_build")
    ap.add_argument("--no-html", action="store_true", help="execute only; skip the HTML build")
    ap.add_argument("--list", action="store_true", help="list chapters and their knobs, then exit")
    ap.add_argument("--timings", action="store_true", help="print the recorded chapter times, then exit")
    ap.add_argument("--plan", action="store_true",
                    help="print each chapter's plan (tokens, disk, memory, T4/A100 hours), then exit")
    a = ap.parse_args(argv)
    notebooks = chapters()
    if a.timings:
        path = a.build_dir / "timings.json"
        timings = json.loads(path.read_text()) if path.exists() else {}
        print("| chapter | " + " | ".join(timings) + " |\n|---|" + "---|" * len(timings))
        for nb in notebooks:
            print(f"| {nb.stem} | " + " | ".join(f"{t[nb.stem]:.0f} s" if nb.stem in t else "-"
                                                 for t in timings.values()) + " |")
        return 0
    if a.list:
        for nb in notebooks:
            print(f"{nb.stem}: {notebook_parameters(nb)}")
        for name in profiles.CHAPTERS:
            print(f"\n[{name}]")
            for knob in profiles.knobs(name):
                print(f"  {knob:28s}" + "  ".join(f"{p}={profiles.values(name, p)[knob]!r}"
                                                 for p in profiles.PROFILES))
        return 0
    if a.only:
        notebooks = [nb for nb in notebooks if any(s in nb.stem for s in a.only)]
        if not notebooks:
            ap.error(f"--only {a.only} matches no chapter; chapters: {[nb.stem for nb in chapters()]}")
    params = dict(a.param)
    if a.plan:
        return _print_plans(notebooks, a.profile, params)
    if a.profile != "gpu":  # the offline profiles must never wait on a hub
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        for nb in notebooks:  # fail before running anything
            check_parameters(nb, {"profile": a.profile, **params})
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return _build_book(a, notebooks, params)
    except OSError as e:  # an unwritable --build-dir, a full disk: the system's one-line reason
        print(f"error: {e}", file=sys.stderr)
        return 2


def _print_plans(notebooks: list[Path], profile: str, params: dict[str, Any]) -> int:
    """The plans of ``notebooks`` at ``profile``, each with whether this machine can hold it."""
    for nb in notebooks:
        chapter = chapter_of(nb)
        P = {**profiles.values(chapter, profile), **{k: v for k, v in params.items() if k in profiles.knobs(chapter)}}
        try:
            p = plan.plan(chapter, P)
        except plan.NoPublishedSizes as e:  # the book's own models: the chapter plans once loaded
            print(f"{nb.stem}: {e}")
            continue
        print(f"{nb.stem}: " + "\n".join(p.lines()))
        try:
            p.check(*plan.machine())
            print("  this machine can hold it")
        except plan.PlanError as e:
            print(f"  {e}")
    return 0


def _build_book(a: argparse.Namespace, notebooks: list[Path], params: dict[str, Any]) -> int:
    executed = a.build_dir / "executed" / a.profile
    previous = _recorded_timings(a.build_dir).get(a.profile, {})
    total = 0.0
    for i, nb in enumerate(notebooks, 1):
        print(f"[{i}/{len(notebooks)}] {nb.stem} ({a.profile}) ...{_eta(previous, notebooks[i - 1:])}", flush=True)
        try:
            seconds = execute(nb, executed / nb.name, a.profile, params)
        except ChapterFailed as e:
            print(f"FAILED: {e}", file=sys.stderr)
            return 1
        total += seconds
        record_timing(a.build_dir, a.profile, nb.stem, seconds)
        print(f"      done in {seconds:.1f} s", flush=True)
    if a.no_html or a.only:
        print(f"executed {len(notebooks)} notebook(s) in {total:.0f} s into {executed}")
        return 0
    export_figures(executed, a.build_dir / "figures" / a.profile)
    t0 = time.perf_counter()
    index = build_html(executed, a.build_dir)
    print(f"executed {len(notebooks)} notebooks in {total:.0f} s; HTML in {time.perf_counter() - t0:.0f} s: "
          f"{index}")
    return 0
