"""Progress bars: shown where someone is watching (a terminal, Jupyter, Colab), never in the book.

Every loop in saelib that takes long takes its bar from ``bar``. The book's runner sets
``SAELIB_PROGRESS=0`` for the kernels it starts, so executed notebooks, and the HTML rendered from
them, carry results rather than progress streams; the times that matter go into tables instead.
"""

from __future__ import annotations

import os
from typing import Any

from tqdm.auto import tqdm

ENV = "SAELIB_PROGRESS"


def enabled() -> bool:
    """False when the environment turns progress bars off (``SAELIB_PROGRESS=0``)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def bar(iterable: Any = None, *, show: bool = True, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``, disabled unless ``show`` and the environment allow it."""
    return tqdm(iterable, disable=not (show and enabled()), **kwargs)
