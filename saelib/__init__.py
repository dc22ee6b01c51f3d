"""saelib: sparse autoencoders as sparse allocation rules, and the book built on them.

Four layers, each importing only from the ones below it (a contract the tests check):

- ``saelib.core``: the SAE, its allocation rules, losses, objectives, the trainer, metrics and storage;
- ``saelib.subjects``: what SAEs read: corpora, language models, vision models, harvested activations;
- ``saelib.studies``: analyses of SAEs in their models (splicing, matching, scaling, patch statistics);
- ``saelib.browser`` and ``saelib.book`` (the feature browser; the notebooks' runner, profiles,
  claims, plots and exercises), then ``saelib.cli``, the ``saelib`` command.

The names below are the public API for training and evaluating SAEs::

    from saelib import SAEConfig, TrainConfig, train_saes, evaluate
"""

__version__ = "0.1.0"

import os
import warnings

# PyTorch's CPU allocator backs each large tensor with transparent huge pages when this is set
# (read once, at the first allocation of 2 MB or more). An SAE step allocates its 75 MB
# pre-activation matrix afresh, and with 4 KB pages the kernel's zeroing of them cost 6% of a
# TopK step (23k page faults a step, 2k with huge pages; bench/bench_train.py). Set it to 0
# before importing saelib to keep 4 KB pages.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# tqdm.auto (saelib.core.progress) falls back to text bars where ipywidgets is missing (e.g. papermill); that is fine.
warnings.filterwarnings("ignore", message="IProgress not found")

from saelib.core.allocation import RULES, AllocationContext, get_rule, register  # noqa: E402
from saelib.core.checkpoints import CheckpointError, latest_checkpoint, load_sae, save_sae, step_checkpoints  # noqa: E402
from saelib.core.metrics import Evaluation, evaluate  # noqa: E402
from saelib.core.objectives import E2E, Local, Reconstruction  # noqa: E402
from saelib.core.sae import SAE, SAEConfig  # noqa: E402
from saelib.core.saelens_io import export_saelens, load_saelens, read_saelens, run_metadata  # noqa: E402
from saelib.core.storage import DamagedError  # noqa: E402
from saelib.core.synthetic import make_synthetic  # noqa: E402
from saelib.core.training import Fork, TrainConfig, TrainResult, initial_saes, train_cached, train_saes  # noqa: E402

__all__ = [
    "SAE", "SAEConfig", "TrainConfig", "TrainResult", "Fork", "train_saes", "train_cached", "initial_saes",
    "save_sae", "load_sae", "latest_checkpoint", "step_checkpoints", "CheckpointError", "DamagedError",
    "evaluate", "Evaluation", "Reconstruction", "Local", "E2E",
    "RULES", "AllocationContext", "register", "get_rule", "make_synthetic", "export_saelens", "load_saelens",
    "read_saelens", "run_metadata",
]
