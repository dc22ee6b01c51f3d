"""saelib: sparse autoencoders as sparse allocation rules, and the notebooks of the book built on it.

One module per concept: allocation (the rules), sae (the model), losses, training, metrics,
checkpoints, corpora, subject_models, activations, splice, synthetic, seeding (random streams),
progress, plots, claims, profiles, book, browser and browse (feature browser), exercises, cli.
"""

__version__ = "0.1.0"

import warnings

# tqdm.auto (saelib.progress) falls back to text bars where ipywidgets is missing (e.g. papermill); that is fine.
warnings.filterwarnings("ignore", message="IProgress not found")
