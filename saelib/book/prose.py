"""Numbers in a chapter's prose come from its run: myst-nb's glue, silent in the notebook.

A code cell glues what it measured, ``prose.glue({"mc_ratio": ratio, "fc_trend": trend})``, and the
chapter's markdown cites it where it would otherwise have written the number,
``{glue:text}`mc_ratio:.3f``` (a format spec as in ``format()``; ``:.1%`` for a share, ``:,.0f``
for a count) or, for words, ``{glue:text}`fc_trend```. The HTML is built from the executed notebook,
so the rendered text always states the run's numbers, whatever the profile or machine; a name the
markdown cites but the run did not glue fails the build (warnings are errors there).
``tests/test_prose.py`` fails when a chapter's markdown carries a measured number as literal text.
"""

from __future__ import annotations

import re
from numbers import Number
from typing import Any, Mapping

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def plain(value: Any) -> Any:
    """``value`` as a Python ``bool``, ``int``, ``float`` or ``str``. myst-nb formats a glued value
    from its ``text/plain`` repr, and numpy's (``np.float64(0.5)``) or torch's (``tensor(0.5)``)
    would not parse as a number, so a ``:.3f`` role would fail on them."""
    if hasattr(value, "item"):  # numpy (np.float64 is also a float) and torch scalars, 0-d arrays
        value = value.item()
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Number):
        return float(value)
    raise TypeError(f"only numbers and strings are glued into prose, not {type(value).__name__}")


def glue(values: Mapping[str, Any]) -> None:
    """Glue each value under its name for the chapter's markdown, without showing it in the cell's
    output: it returns nothing, so a cell that ends with it shows nothing either. Names are Python
    identifiers (a role's ``:`` starts its format spec)."""
    from myst_nb import glue as myst_glue

    for name, value in values.items():
        if not NAME.match(name):
            raise ValueError(f"glue name {name!r} is not an identifier")
        myst_glue(name, plain(value), display=False)
