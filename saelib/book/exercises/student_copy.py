"""Student copies of the notebooks: the same notebooks without their exercise solutions.

Solution cells carry the tag ``solution`` (plus ``hide-input``, which Jupyter Book renders as a
collapsed "show code" toggle); ``saelib student-copy notebooks/ --out student/`` (or ``python -m
saelib.book.exercises notebooks/ --out student/``) writes copies of the notebooks without them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["SOLUTION_TAG", "strip_solutions", "student_copy", "main"]

SOLUTION_TAG = "solution"


def strip_solutions(nb) -> int:
    """Remove the cells tagged ``solution`` from a notebook in place; return how many."""
    keep = [c for c in nb.cells if SOLUTION_TAG not in c.get("metadata", {}).get("tags", [])]
    removed = len(nb.cells) - len(keep)
    nb.cells = keep
    return removed


def student_copy(source: Path, out: Path) -> dict[Path, int]:
    """Write every notebook under ``source`` (a folder, or one .ipynb) to ``out`` without its
    solution cells; return {written path: solution cells removed}. Everything else is untouched."""
    import nbformat

    source, out = Path(source), Path(out)
    paths = [source] if source.is_file() else sorted(source.glob("*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"no .ipynb notebooks in {source}")
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        removed = strip_solutions(nb)
        target = out / path.name
        if target.resolve() == path.resolve():
            raise ValueError(f"refusing to overwrite {path} with its student copy: choose another --out")
        nbformat.write(nb, target)
        written[target] = removed
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="saelib student-copy",
        description="Write copies of the book's notebooks with the exercise solutions removed (every "
                    f"cell tagged {SOLUTION_TAG!r}); the exercise stubs and their check cells stay.")
    ap.add_argument("source", type=Path, nargs="?", default=Path("notebooks"),
                    help="a folder of notebooks or one .ipynb (default: notebooks)")
    ap.add_argument("--out", type=Path, required=True, help="folder for the student copies")
    a = ap.parse_args(argv)
    try:
        written = student_copy(a.source, a.out)
    except (OSError, ValueError) as e:  # a missing source, an --out that cannot be written, a bad notebook
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, removed in written.items():
        print(f"{path}: {removed} solution cell(s) removed")
    return 0
