"""Independent random streams: every consumer of randomness draws from its own generator.

A generator is derived from a *purpose* (what the randomness is for: ``"sae_init"``,
``"synthetic_data"``, ``"data_order"``, ...) and the user's seed, through a hash. Equal user seeds
therefore never give equal draws for different purposes. Without this, seed 0 for a synthetic data
set and seed 0 for an SAE would draw the same Gaussian matrix, and an SAE whose decoder is as wide as
the true dictionary would start with the true directions as its first rows: an experiment that
starts at its answer.
"""

from __future__ import annotations

import hashlib

import torch

VERSION = 2
"""Part of every cache key (trained SAEs, activation caches, organisms): bump it when a derivation
changes, so artefacts drawn from the old streams are rebuilt rather than silently reused."""

PURPOSES = (
    "sae_init",            # SAE weights (saelib.core.sae)
    "init_sample",         # the rows used for the input scale and the geometric-median b_dec
    "data_order",          # the trainer's per-epoch shuffles of an activation table
    "synthetic_data",      # ground-truth dictionaries and their activations (saelib.core.synthetic)
    "token_windows",       # which corpus windows a harvest reads (saelib.subjects.activations)
    "organism_init",       # the book's model organism's initial weights
    "organism_data_order", # the organism's training batches
    "sampling",            # text generation
    "bench_data",          # benchmark inputs (bench/)
    "browser_samples",     # which examples the feature browser shows from each activation quantile
    "icl_sequences",       # the random token sequences of the in-context-learning probe (saelib.subjects.probes)
    "vision_init",         # the book's ViT's initial weights (saelib.subjects.vision)
    "vision_data_order",   # the ViT's pretraining batches
    "image_splits",        # which images are held out, few-shot training sets (saelib.subjects.vision, prompts)
    "prompt_init",         # deep prompts and adapted heads (saelib.subjects.prompts)
    "prompt_data_order",   # the batches of prompt adaptation and linear probes
    "latent_controls",     # random latents of the masking controls (saelib.studies.patch_analysis)
    "bootstrap",           # resampling for bootstrap intervals (saelib.studies.matching)
)


def derived_seed(purpose: str, seed: int) -> int:
    """A 32-bit seed (numpy's and TransformerLens's limit) that depends on ``purpose`` and ``seed``."""
    if purpose.split(":")[0] not in PURPOSES:
        raise ValueError(f"unknown random-stream purpose {purpose!r}; valid: {list(PURPOSES)} "
                         "(optionally followed by ':<sub-stream>', e.g. 'data_order:3')")
    digest = hashlib.sha256(f"{purpose}/{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def generator(purpose: str, seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` for ``purpose`` (see ``derived_seed``)."""
    return torch.Generator().manual_seed(derived_seed(purpose, seed))
