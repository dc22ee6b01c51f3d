"""The feature browser: every feature of an SAE, by its examples, as a static offline site.

``site`` gathers each feature's examples and writes the pages; ``cli`` is ``saelib browse``.
The names below are the browser's public API.
"""

from saelib.browser.site import (
    BROWSER_DIR_ENV,
    BrowserSummary,
    FeatureData,
    FeatureView,
    TokenIndex,
    book_browser,
    gather_features,
    logit_effects,
    shown_text,
    token_text,
    write_browser,
)

__all__ = ["TokenIndex", "FeatureData", "FeatureView", "BrowserSummary", "gather_features", "write_browser",
           "book_browser", "logit_effects", "token_text", "shown_text", "BROWSER_DIR_ENV"]
