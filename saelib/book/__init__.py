"""The book on top of saelib: what the notebooks call besides the library itself.

``build`` (execute the chapters with papermill, render the HTML; ``python -m saelib.book``),
``profiles`` (each chapter's knobs per profile), ``claims`` (the papers' claims as checked
verdicts), ``prose`` (the run's numbers glued into the chapters' text), ``plots`` (every figure's
style) and ``exercises`` (checks for the learners' answers, student copies).
"""
