"""The ``saelib`` command: one entry point for the book, training and teaching tools.

    saelib book --profile ci            # = python -m saelib.book --profile ci
    saelib train configs/example.toml   # = python -m saelib train configs/example.toml
    saelib student-copy notebooks --out student/
    saelib browse runs/example/saes/topk --out browser/   # = python -m saelib browse ...
    saelib export --saelens runs/example --saebench runs/example --neuronpedia runs/example --out exported/

Each subcommand passes the rest of the command line to that module's own ``main``, so
``saelib <command> --help`` shows the module's options and the ``python -m`` forms stay equivalent.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "book": ("saelib.book.build", "execute the chapter notebooks for a profile and render the book"),
    "train": ("saelib.cli.train", "train SAEs from a TOML config (resumable; torchrun for data parallel)"),
    "student-copy": ("saelib.book.exercises.student_copy", "write the notebooks without their exercise solutions"),
    "browse": ("saelib.browser.cli", "write a static feature browser for a saved SAE"),
    "export": ("saelib.cli.export", "write saved SAEs for SAELens, SAEBench (core eval) and Neuronpedia"),
}


def usage() -> str:
    lines = ["usage: saelib <command> [options]   (saelib <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:14s}{text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand; return its exit status (0 when it returns None)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"saelib: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return module.main(rest) or 0
