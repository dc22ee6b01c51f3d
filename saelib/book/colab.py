"""The repository URL in one place, and every chapter's Colab entry points written from it.

The URL lives in ``pyproject.toml`` (``[project.urls] Repository``). A chapter's "Open in Colab" link
and its Colab set-up cell cannot read it at run time (the set-up cell runs before saelib is
installed), so this module writes them, and ``_config.yml``'s ``repository.url``, from that one
value; ``tests/test_colab.py`` fails when any of them differs.

    python -m saelib.book.colab            # list what is out of sync (exit 1 if anything is)
    python -m saelib.book.colab --write    # rewrite it from pyproject.toml
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BRANCH = "main"
SETUP_TEMPLATE = """\
# Setup: on Colab, install saelib and the gpu profile's extras; elsewhere nothing happens.
import subprocess
import sys

if "google.colab" in sys.modules:
    url = "saelib[gpu] @ git+{url}"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", url], check=True)"""
_LINK = re.compile(r"\[Open in Colab\]\(https://colab\.research\.google\.com/github/[^)]*\)")
_CONFIG_URL = re.compile(r"^(repository:\n(?:[ \t]+.*\n)*?[ \t]+url:[ \t]*)(\S+)", re.MULTILINE)


def repository_url(root: Path = ROOT) -> str:
    """``[project.urls] Repository`` of ``root/pyproject.toml``: ``https://github.com/OWNER/NAME``."""
    url = tomllib.loads((root / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    if not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url):
        raise ValueError(f"pyproject.toml's Repository URL {url!r} is not https://github.com/OWNER/NAME; "
                         "Colab opens notebooks from GitHub only")
    return url


def colab_link(url: str, notebook: str) -> str:
    """The markdown "Open in Colab" link of ``notebooks/<notebook>`` in the repository at ``url``."""
    path = url.removeprefix("https://github.com/")
    return f"[Open in Colab](https://colab.research.google.com/github/{path}/blob/{BRANCH}/notebooks/{notebook})"


def setup_source(url: str) -> str:
    """The source of a chapter's Colab set-up cell (its first code cell)."""
    return SETUP_TEMPLATE.format(url=url)


def sync_notebook(path: Path, url: str, write: bool = False) -> list[str]:
    """What in ``path`` disagrees with ``url`` (its link, its set-up cell); rewritten if ``write``."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    problems = []
    intro = next(c for c in nb.cells if c.cell_type == "markdown")
    links = _LINK.findall(intro.source)
    want = colab_link(url, path.name)
    if len(links) != 1:
        problems.append(f"{path.name}: first markdown cell has {len(links)} 'Open in Colab' links, wants one")
    elif links[0] != want:
        problems.append(f"{path.name}: link {links[0]} differs from {want}")
        intro.source = intro.source.replace(links[0], want)
    setup = next(c for c in nb.cells if c.cell_type == "code")
    if setup.source != setup_source(url):
        problems.append(f"{path.name}: the Colab set-up cell differs from saelib.book.colab.setup_source")
        setup.source = setup_source(url)
    if write and problems:
        nbformat.write(nb, path)
    return problems


def sync_config(config: Path, url: str, write: bool = False) -> list[str]:
    """``repository.url`` of the Jupyter Book config against ``url``; rewritten if ``write``."""
    text = config.read_text()
    found = _CONFIG_URL.search(text)
    if found is None:
        return [f"{config.name}: no repository.url"]
    if found.group(2) == url:
        return []
    if write:
        config.write_text(text[:found.start(2)] + url + text[found.end(2):])
    return [f"{config.name}: repository.url {found.group(2)} differs from {url}"]


def sync(root: Path = ROOT, write: bool = False) -> list[str]:
    """Every place the URL is written (``_config.yml``, each chapter) against pyproject.toml's."""
    from saelib.book.build import chapters

    url = repository_url(root)
    problems = sync_config(root / "_config.yml", url, write)
    for path in chapters(root):
        problems += sync_notebook(path, url, write)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m saelib.book.colab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite what is out of sync")
    args = parser.parse_args(argv)
    problems = sync(write=args.write)
    for line in problems:
        print(("rewrote: " if args.write else "") + line)
    return 1 if problems and not args.write else 0


if __name__ == "__main__":
    sys.exit(main())
