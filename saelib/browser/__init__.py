"""The feature browser: every feature of an SAE, by its examples, as a static offline site.

``gather`` collects each feature's examples from an activation table, ``pages`` writes the static
site and the notebook view, ``publish`` caches a chapter's browser and publishes it into the book,
``lineage`` a final feature's ancestors across training checkpoints, ``cli`` is ``saelib browse``.
The names below are the browser's public API.
"""

from saelib.browser.gather import FeatureData, TokenIndex, gather_features, logit_effects
from saelib.browser.lineage import Lineage, LineageView, write_lineage
from saelib.browser.pages import BrowserSummary, FeatureView, shown_text, token_text, write_browser
from saelib.browser.publish import BROWSER_DIR_ENV, book_browser, book_lineage

__all__ = ["TokenIndex", "FeatureData", "FeatureView", "BrowserSummary", "gather_features", "write_browser",
           "book_browser", "logit_effects", "token_text", "shown_text", "BROWSER_DIR_ENV",
           "Lineage", "LineageView", "write_lineage", "book_lineage"]
