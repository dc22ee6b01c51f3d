"""Run profiles: the sizes each chapter runs at, defined once for every notebook.

* ``ci``: seconds to a minute per notebook on 2 CPU cores; tiny sizes that still exercise every code
  path and every assertion a chapter makes. Used by the tests.
* ``cpu``: the book's default, what the rendered book shows: the offline models (SmolLM2-135M and
  the book's organism) at sizes that give meaningful figures on a laptop.
* ``cpu-long``: longer runs than ``cpu`` for the studies that need them (chapter 2b's training-length
  and dictionary-size studies; about an hour more on 2 cores). A chapter without its own ``cpu-long``
  entry runs its ``cpu`` values (``BASE``), so ``--profile cpu-long`` builds the whole book.
* ``gpu``: the papers' own settings for Colab or a GPU: online models (gpt2-small) and datasets.
* ``gpu-smoke``: ``gpu``'s model, hook, dataset and revision names and code path at ``ci``'s sizes
  (shorter training where ``SMOKE_SMALLER`` says; ``smoke_values``), for running the gpu path in
  seconds against the tests' stand-in hub.

A notebook's ``parameters`` cell names ``profile`` and every knob of its chapter (``None`` = take
the profile's value), then calls ``resolve(chapter, profile, knob=value, ...)``. Every profile of a
chapter has the same knobs, so a knob set for one profile works for all of them.

``profile = None`` (the cells' default) means ``$SAELIB_PROFILE`` if set, else ``cpu``: tools that
execute a notebook as it is, without injecting parameters (nbval, a plain ``jupyter nbconvert``),
choose the sizes through the environment, e.g. ``SAELIB_PROFILE=ci pytest --nbval-lax notebooks/``.
A profile given explicitly (papermill's ``-p profile ci``, ``python -m saelib.book --profile``) wins.
"""

from __future__ import annotations

import difflib
import html
import os
from typing import Any, Mapping

import torch

from saelib.book import plan
from saelib.core.devices import machine_precision
from saelib.subjects.language_models import checkpoint_schedule

PROFILES = ("ci", "cpu", "cpu-long", "gpu", "gpu-smoke")
BASE = {"cpu-long": "cpu"}
"""A profile a chapter does not define takes the values of its base profile (every chapter defines
the others)."""
PLANNED = ("gpu", "gpu-smoke")
"""Profiles whose ``resolve`` prints the run's plan and refuses one this machine cannot hold
(``saelib.book.plan``)."""
PROFILE_ENV = "SAELIB_PROFILE"
DEFAULT_PROFILE = "cpu"

# What chapters 2 and 2b harvest, shared so that both open one activation cache (same model, hook,
# corpus, token counts, context and precision: one cache key) and chapter 2b never harvests
# SmolLM2's layer 15 again after chapter 2. bfloat16 harvest: 2.7x faster than float32, its rows 1.5%
# from float32's (README, Speed).
HARVEST = {
    "ci": dict(model="smollm2-135m", hook="blocks.15.hook_resid_post", corpus="mixed", n_tokens=20_480,
               eval_tokens=4096, context_size=64, precision="bfloat16"),
    "cpu": dict(model="smollm2-135m", hook="blocks.15.hook_resid_post", corpus="mixed", n_tokens=600_000,
                eval_tokens=16_384, context_size=128, precision="bfloat16"),
    "gpu": dict(model="gpt2-small", hook="blocks.8.hook_resid_pre", corpus="hf:Elriggs/openwebtext-100k",
                n_tokens=8_000_000, eval_tokens=131_072, context_size=128, precision="bfloat16"),
}
"""The harvest of chapters 2 and 2b per profile (``tests/test_notebooks.py`` checks their cache keys agree)."""

_SCALE_CPU = dict(**HARVEST["cpu"], splice_windows=16, expansion=8, k=32, batch_size=2048, lr=1e-3,
                  dead_after_tokens=100_000, zipf_exponent=1.0, length_steps=1472, n_budgets=4,
                  big_expansion=64, big_steps=320, sanity_hook="blocks.5.hook_resid_post",
                  sanity_tokens=200_000, sanity_steps=736, max_overfit=1.10,
                  # The cpu build of 2026-12-02 (61 min cold, beside chapter 4's build and niced test
                  # runs): NMSE / TopK at 3M tokens MC 1.026, FC 1.258, MC + aux_zipf 1.124; CE
                  # increase / TopK MC 0.894. At 64x: TopK 1.75% dead, + aux_k 0.62%, FC floored
                  # 0.01% (4 features), uniform 0.00%, unfloored 48.2%, MC 7.21%, MC + aux_zipf 51.0%.
                  # Not asserted (inconclusive): MC's gap closing (0.024 against the 0.02 tolerance),
                  # FC's "no dead features" (a handful of features either way), the second hook
                  # (MC 1.012 there, a 1% tie).
                  expect_claims={"mc_beats_topk_long": False, "fc_beats_topk_long": False,
                                 "mc_gap_closes": "inconclusive", "fc_gap_closes": False,
                                 "aux_zipf_gap_closes": False, "mc_ce_beats_topk_long": True,
                                 "topk_dies": True, "fc_no_dead_big": "inconclusive",
                                 "fc_uniform_no_dead_big": "inconclusive",
                                 "fc_unfloored_no_dead_big": False, "mc_fewer_dead_big": False,
                                 "aux_k_fewer_dead_big": True, "second_hook_agrees": "inconclusive"})
"""Chapter 2b's cpu values, which its cpu-long profile extends."""

_E2E_CPU = dict(model="organism-cpu", hook="blocks.2.hook_resid_pre", corpus="mixed", n_tokens=640_000,
                eval_tokens=32_768, eval_windows=48, context_size=128, expansion=8, normalize_input=True,
                l1_local=(1.0, 2.0, 4.0, 8.0, 16.0), l1_e2e=(0.05, 0.1, 0.2, 0.4, 0.8),
                l1_ds=(1.0, 2.0, 4.0, 8.0, 16.0), official_l1_local=(2.0, 4.0, 8.0),
                official_l1_e2e=(0.1, 0.2, 0.4), kl_coeff_ds=0.5, ds_coeff=2.5, k_sweep=(32,),
                steps=320, n_budgets=5, pair_steps=1280, batch_size=16, lr=1e-3, schedule="linear",
                precision="bfloat16", timing_steps=10, check_trends=True,
                # lr 1e-3 with a linear decay over the last 20%, not the paper's 5e-4 and cosine to 10%:
                # at this length the paper's schedule hurts. ReLU SAEs at lambda 2, 4, 8 (local) and
                # 0.1, 0.2, 0.4 (e2e) trained under it (2026-12-03, 320 steps) sat at 2.08-2.61x
                # (local) and 1.89-2.19x (e2e) the CE increase of this schedule's frontier at equal L0.
                # The cpu build of 2026-12-03 (26 SAEs, 650k tokens each; 44.9 min cold with the
                # trio forked from the sweep): the median L0 ratio at equal CE 0.98x (0.88-1.16),
                # falling from 1.91x at 81k tokens (log change -0.66, floor 0.095); e2e's CE at
                # equal L0 102% of local's; downstream MSE e2e 9.62,
                # e2e+ds 1.65, local 1.47; cross-seed cosine e2e 0.23, local 0.30 (chance 0.21).
                # Not asserted (inconclusive): the runtime ratio, which moves with the machine's
                # load (like for like 2.9x, from cached activations 3.5x in one build and 4.5x in
                # another, against the claim's 2-3.5x), and TopK's CE gap (0.050 vs 0.053, 6%).
                expect_claims={"local_l0_twice": False, "e2e_ce_under_45": False,
                               "ds_downstream": True, "e2e_seed_fragile": True,
                               "e2e_runtime": "inconclusive", "gap_widens": False,
                               "topk_e2e": "inconclusive"})
"""Chapter 3's cpu values, which its cpu-long profile extends."""

CHAPTERS: dict[str, dict[str, dict[str, Any]]] = {
    # Chapter 0: SAEs on synthetic data with a known dictionary.
    "synthetic": {
        # relu's L1 and the step counts were set with the SAEs and the data on independent random
        # streams (saelib.core.seeding): relu at l1 0.02-0.08 kept 30-40 features per token where 4-8 are
        # true and found only 30-67% of the directions; FC and MC need about 3x TopK's steps.
        "ci": dict(n_tokens=100_000, d_model=32, n_features=64, active=4.0, zipf_exponent=0.5,
                   noise=0.01, expansion=2, k=4, l1_coeff=0.15, steps=1200, batch_size=512, lr=3e-3,
                   seed=0, min_recovered=0.6, max_nmse=0.15),
        "cpu": dict(n_tokens=400_000, d_model=64, n_features=256, active=8.0, zipf_exponent=0.5,
                    noise=0.01, expansion=2, k=8, l1_coeff=0.15, steps=6000, batch_size=1024,
                    lr=2e-3, seed=0, min_recovered=0.8, max_nmse=0.2),
        "gpu": dict(n_tokens=4_000_000, d_model=256, n_features=2048, active=16.0, zipf_exponent=0.5,
                    noise=0.01, expansion=2, k=16, l1_coeff=0.15, steps=30_000, batch_size=4096,
                    lr=1e-3, seed=0, min_recovered=0.85, max_nmse=0.2),
    },
    # Chapter 1: the offline shelf, SmolLM2-135M and the book's model organism.
    "subject_models": {
        "ci": dict(corpus="mixed", shelf_max_chars=2_000_000, pretrained="smollm2-135m", organism="ci",
                   eval_windows=8, context_size=64, check_against_transformers=True, max_pretrained_ce=4.5),
        "cpu": dict(corpus="mixed", shelf_max_chars=None, pretrained="smollm2-135m", organism="cpu",
                    eval_windows=48, context_size=128, check_against_transformers=True, max_pretrained_ce=4.0),
        "gpu": dict(corpus="hf:Elriggs/openwebtext-100k", shelf_max_chars=None, pretrained="gpt2-small",
                    organism="cpu", eval_windows=256, context_size=128, check_against_transformers=False,
                    max_pretrained_ce=3.6),
    },
    # Chapter 2: Feature Choice and Mutual Choice against TopK and ReLU on a real residual stream.
    # l1_sweep is on unit-mean-square inputs with decoder-norm-weighted L1: on SmolLM2 layer 15 a
    # 300-step probe gave L0 116 at 0.1, 7 at 0.4 and a collapsed SAE (L0 0.3) at 1.6.
    "allocation": {
        "ci": dict(**HARVEST["ci"], splice_windows=4, expansion=2, k=16, k_sweep=(8, 32),
                   l1_sweep=(0.01, 0.04), steps=80, batch_size=512, lr=2e-3, dead_after_tokens=16_384,
                   zipf_exponent=1.0, max_budget_gap=0.01, max_inference_gap=0.4, check_trends=True,
                   expect_claims={"fc_no_dead": True, "adaptive": True}),
        "cpu": dict(**HARVEST["cpu"], splice_windows=16, expansion=8, k=32,
                    k_sweep=(16, 64), l1_sweep=(0.05, 0.1, 0.2), steps=300, batch_size=2048, lr=1e-3,
                    dead_after_tokens=100_000, zipf_exponent=1.0, max_budget_gap=0.01, max_inference_gap=0.4,
                    check_trends=True,
                    # What the rendered book reports: measured 2026-11-26 and again 2026-12-02 after
                    # issue 30 (bf16 harvest and encoder, FC floored at one token): MC / FC NMSE
                    # 1.075x / 1.116x TopK's, Spearman 0.76. mc_fewer_dead turns on a single feature
                    # at this scale (0.02% vs 0.00%), so it is shown but not asserted.
                    expect_claims={"mc_beats_topk": False, "fc_beats_topk": False, "mc_batch_beats_topk": False,
                                   "topk_beats_relu": True, "fc_no_dead": True, "aux_zipf_helps": True,
                                   "adaptive": True}),
        "gpu": dict(**HARVEST["gpu"], splice_windows=256, expansion=32,
                    k=32, k_sweep=(16, 64, 128), l1_sweep=(0.05, 0.1, 0.2, 0.4), steps=12_000,
                    batch_size=4096, lr=4e-4, dead_after_tokens=5_000_000, zipf_exponent=1.0,
                    max_budget_gap=0.01, max_inference_gap=0.4, check_trends=True, expect_claims=None),
    },
    # Chapter 2b: chapter 2's comparison at increasing training lengths (one run, snapshots at
    # doubling budgets), with a large dictionary for dead features, and at a second hook point.
    # The large dictionary is 64x on cpu: bench/bench_dead.py (2026-12-02, under the shared lock on a
    # loaded machine, load 3-5) measured TopK without aux_k at 64x (36,864 features, bf16 encoder,
    # batch 2048, k 32, dead after 100k tokens) losing 1.78% of its features in 320 steps (655k
    # tokens), past the 1% the comparisons need, and rising about 0.9 points per 100k tokens at the
    # end (0.05% at 328k): 5% is an extrapolation for cpu-long's 4x longer run. The cpu profile's
    # 32x (chapter 2b before issue 30) lost 0.41%. 128x would put F above k * B (73,728 > 65,536), so
    # the floored FC profiles would spend more than k per token there. The length study stops at
    # 3M tokens (1472 steps) to pay for the larger dictionary; cpu-long runs it to 12M.
    "allocation_scale": {
        "ci": dict(**HARVEST["ci"], splice_windows=4, expansion=2, k=16, batch_size=512, lr=2e-3,
                   dead_after_tokens=16_384, zipf_exponent=1.0, length_steps=60, n_budgets=3,
                   big_expansion=4, big_steps=60, sanity_hook="blocks.5.hook_resid_post",
                   sanity_tokens=12_288, sanity_steps=30, max_overfit=1.5,
                   # A minute of training at toy sizes: only the dead-feature premise and aux_k's
                   # effect are recorded (2304 features die fast at batch 512).
                   expect_claims={"topk_dies": True, "fc_no_dead_big": True, "fc_uniform_no_dead_big": True,
                                  "fc_unfloored_no_dead_big": False, "aux_k_fewer_dead_big": True}),
        "cpu": _SCALE_CPU,
        # The same with the longest runs extended: the length study to 12M tokens (two more
        # doublings) and the large dictionary 4x longer (2.6M tokens).
        "cpu-long": {**_SCALE_CPU, "length_steps": 5888, "n_budgets": 6, "big_steps": 1280,
                     "max_overfit": 1.15, "expect_claims": None},
        "gpu": dict(**HARVEST["gpu"], splice_windows=256, expansion=8, k=32, batch_size=4096, lr=4e-4,
                    dead_after_tokens=5_000_000, zipf_exponent=1.0, length_steps=48_000,
                    n_budgets=6, big_expansion=32, big_steps=24_000,
                    sanity_hook="blocks.4.hook_resid_pre", sanity_tokens=2_000_000,
                    sanity_steps=12_000, max_overfit=1.05, expect_claims=None),
    },
    # Chapter 3: SAE_local vs SAE_e2e vs SAE_e2e+ds (Braun et al. 2024), ReLU + L1 and TopK.
    # l1_* are the paper's lambda (phi = lambda / d_in), in the activations' units like all of the
    # objectives' terms (saelib.core.objectives), so they compare with the paper's (GPT-2 layer 6: local
    # 6, e2e 1.5). Probes on the cpu organism's blocks.2.hook_resid_pre (2048 features, 150 steps)
    # gave local L0 251 / 115 at lambda 1.9 / 6.3 and e2e L0 263 / 166 / 89 at 0.016 / 0.05 / 0.16;
    # e2e+ds's downstream term (beta 2.5) outweighs its KL as a local MSE would, so its lambda sweep
    # sits near local's. Each sweep has 5 lambdas, a factor 2 apart, so that local's and e2e's
    # curves share most of their CE range (issue 29: 3 lambdas gave one interpolated reading).
    # official_l1_*: the same objectives with Braun et al.'s own SAE (SAEConfig.parametrisation
    # "e2e_sae": raw inputs, untied encoder, orthogonal decoder, no pre-encoder bias), in the same
    # run, so every budget compares the two parametrisations. n_budgets: SAEs saved at doubling
    # step counts ending at steps (one run, TrainConfig.snapshot_steps). batch_size counts windows
    # (context_size - 1 SAE tokens each). schedule: linear (hold, decay over the last 20%) or
    # cosine (the paper's, to 10%); cpu keeps linear, measured better at its length (_E2E_CPU's
    # comment). cpu-long has not been built: its expect_claims are None until a build records
    # them. pair_steps: the matched local / e2e / e2e+ds trio trained that long in a run of its
    # own, forked from the sweep's last checkpoint before its decay (cpu: 4x the sweep, forked at
    # step 240; 12 min of the cpu build's 45, 15 of 50 when it retrained from step 0).
    "e2e": {
        "ci": dict(model="organism-ci", hook="blocks.1.hook_resid_pre", corpus="mixed", n_tokens=32_768,
                   eval_tokens=8192, eval_windows=16, context_size=64, expansion=4, normalize_input=True,
                   l1_local=(1.0, 2.0, 4.0, 8.0, 16.0), l1_e2e=(0.05, 0.1, 0.2, 0.4, 0.8),
                   l1_ds=(1.0, 2.0, 4.0, 8.0, 16.0), official_l1_local=(2.0, 8.0),
                   official_l1_e2e=(0.1, 0.4), kl_coeff_ds=0.5, ds_coeff=2.5, k_sweep=(8,), steps=40,
                   n_budgets=4, pair_steps=80, batch_size=8, lr=2e-3, schedule="linear", precision="bfloat16",
                   # at ci only the downstream gap is robust (measured at 80 steps: e2e 5.6, e2e+ds
                   # 0.53; at these 40 steps, 2026-12-02: e2e 6.51, e2e+ds 2.03, 3.2x where the claim needs 2x)
                   timing_steps=4, check_trends=True, expect_claims={"ds_downstream": True}),
        "cpu": _E2E_CPU,
        # cpu-long: every SAE of the cpu run 4x as long, and the matched trio 16x (cpu's trio: 4x),
        # so about 4x cpu's time. Not built yet.
        "cpu-long": {**_E2E_CPU, "steps": 1280, "n_budgets": 7, "pair_steps": 5120, "expect_claims": None},
        # gpu: the paper's GPT-2 small layer-6 setting, not executed here. Context 1024, 25,000 steps of
        # 16 windows (409.6M tokens per SAE, from a cache of 16,000 windows read about 25 times: the
        # book trains from harvested activations), lr 5e-4 with warm-up over 5% and the cosine decay
        # to 10%, grad clip 10, dictionary 60 x 768, raw inputs, CE on 500 windows of 1,024 tokens.
        # lambda grids: the official sweep files' (gpt2_local_sweep 1-30; gpt2_e2e_sweep 0.08-2 with
        # layer 6's 1.5 and 5 added; gpt2_e2e_recon_sweep 0.8, 2.5, 5 with layer 6's 1.5 added) and
        # e2e+ds's KL coefficient 0.5 and beta 2.5. float32: bfloat16 was not shown harmless for the
        # e2e model run. The notebook prints the plan (tokens, memory, hours on a T4 and an A100).
        "gpu": dict(model="gpt2-small", hook="blocks.6.hook_resid_pre", corpus="hf:Elriggs/openwebtext-100k",
                    n_tokens=16_384_000, eval_tokens=500_000, eval_windows=500, context_size=1024,
                    expansion=60, normalize_input=False, l1_local=(1.0, 3.0, 6.0, 10.0, 15.0, 20.0, 30.0),
                    l1_e2e=(0.08, 0.2, 0.8, 1.5, 2.0, 5.0), l1_ds=(0.8, 1.5, 2.5, 5.0),
                    official_l1_local=(1.0, 3.0, 6.0, 10.0, 15.0, 20.0, 30.0),
                    official_l1_e2e=(0.08, 0.2, 0.8, 1.5, 2.0, 5.0), kl_coeff_ds=0.5, ds_coeff=2.5,
                    k_sweep=(16, 32, 64), steps=25_000, n_budgets=6, pair_steps=0, batch_size=16, lr=5e-4,
                    schedule="cosine", precision="float32", timing_steps=20, check_trends=True,
                    expect_claims=None),
    },
    # Chapter 4: one SAE per training checkpoint of a model, trained from scratch and SAE-Track style.
    # model: chapter 4's own organism (saelib.subjects.language_models, "induction-*": two
    # attention-only layers, text with repeated spans, so that induction heads form within the
    # budget; chapter 1's organism never learns to copy); control_model: the same organism trained
    # on the text without repeats (None: no control). checkpoints: the SAEs' (the chapter adds the
    # two ends of the induction head's steepest rise); probe_checkpoints:
    # where loss, ICL scores and head scores are measured (every saved one for the organisms).
    # icl_lengths: span lengths of the random-offset ICL probes; jump_window: the steps a phase
    # change may take (steepest_rise); thresholds: the decoder cosines every matching verdict is
    # checked at; match_threshold: the one the per-checkpoint figures show.
    # gpu: Pythia's public checkpoints through TransformerLens; not executed on the project machine.
    "dynamics": {
        "ci": dict(model="organism-induction-ci", control_model=None, hook="blocks.1.hook_resid_post",
                   corpus="mixed", checkpoints=(0, 8, 50, 150, 250),
                   probe_checkpoints=(0, 1, 2, 4, 8, 16, 32, 50, 100, 150, 200, 250),
                   n_tokens=16_384, eval_tokens=4096, context_size=64, loss_windows=16,
                   expansion=4, k=8, steps=100, batch_size=512, lr=3e-3, dead_after_tokens=20_000,
                   icl_sequences=16, icl_lengths=(8, 24), jump_window=100,
                   thresholds=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8), match_threshold=0.5, token_level_share=0.5,
                   n_boot=500,
                   # 250 steps are too few for an induction head; the other claims are noise here.
                   expect_claims={"icl_jump": False}),
        "cpu": dict(model="organism-induction-cpu", control_model="organism-induction-cpu-control",
                    hook="blocks.1.hook_resid_post", corpus="mixed",
                    checkpoints=(0, 128, 600, 1500, 3000, 4500, 6000, 7500, 9000, 12000),
                    probe_checkpoints=tuple(checkpoint_schedule(12000, 40)),
                    n_tokens=200_000, eval_tokens=16_384, context_size=64, loss_windows=64,
                    expansion=8, k=8, steps=600, batch_size=2048, lr=2e-3, dead_after_tokens=200_000,
                    icl_sequences=64, icl_lengths=(8, 24), jump_window=1500,
                    thresholds=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8), match_threshold=0.5, token_level_share=0.5,
                    # The cpu builds of 2026-12-02 (42 min cold beside another build; 12.8 min
                    # quiet, the organisms side by side: same verdicts): ICL jumps
                    # 1.54-2.07 nats within 1500 steps (floor 0.5) while L1H3's prefix matching rises
                    # 0.21 (steps 6000-7500; 5x chance is 0.10); random- vs fixed-offset ICL 4.06 vs
                    # 4.01 nats; the control jumps 0.07. Tracked vs independent agree with 6-10
                    # points to spare at every cosine 0.3-0.8 (about 3 standard errors). The birth
                    # claims change with the threshold and the dead shares (5.1% vs 0.0%) sit on
                    # the 5-point margin: recorded as inconclusive, not asserted.
                    n_boot=2000,
                    expect_claims={"icl_jump": True, "with_induction_head": True,
                                   "not_positional": True, "control_flat": True,
                                   "tracked_agree": True, "early_features": "inconclusive",
                                   "early_chained": "inconclusive", "token_first": "inconclusive",
                                   "tracked_dead_alike": "inconclusive"}),
        "gpu": dict(model="pythia-70m-deduped", control_model=None, hook="blocks.2.hook_resid_post",
                    corpus="hf:Elriggs/openwebtext-100k",
                    checkpoints=(0, 4, 32, 256, 1000, 4000, 16000, 64000, 143000),
                    probe_checkpoints=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 2000, 4000, 8000,
                                       16000, 32000, 64000, 100000, 143000),
                    n_tokens=4_000_000, eval_tokens=131_072, context_size=128, loss_windows=256,
                    expansion=16, k=32, steps=8000, batch_size=4096, lr=4e-4,
                    dead_after_tokens=5_000_000, icl_sequences=128, icl_lengths=(16, 48), jump_window=2000,
                    thresholds=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8), match_threshold=0.5, token_level_share=0.5,
                    n_boot=2000, expect_claims=None),
    },
    # Chapter 5: PatchSAE on the book's ViT, before and after prompt adaptation (Lim et al. 2025).
    # vit: a saelib.subjects.vision.VIT_PROFILES name (pretrained here, cached) or, online, CLIP ViT-B/16.
    # hook: the output of the second-to-last block, as in the paper. tau is in the model's own
    # activation units (the official code's: its SAE reads raw activations). task_test_images is
    # per class. Both tasks adapt with the same shots, epochs and batch: the same prompt steps.
    # images: what the SAE trains on and the model's accuracy and masking curves are measured on:
    # Fashion-MNIST from the Debian package ("debian"), the hub's copy, or a hub RGB dataset
    # ("hf:<name>", saelib.subjects.image_datasets). near_task / shifted_task: the two target
    # tasks (saelib.subjects.prompts: a Fashion-MNIST task name or "hf:<name>", matched in classes).
    "vision": {
        "ci": dict(vit="ci", images="debian", near_task="fashion-upper",
                   shifted_task="fashion-upper-inverted", hook="blocks.1.hook_resid_post", sae_images=1500, eval_images=600,
                   mask_images=400, expansion=8, l1_coeff=0.05, k=8, sae_aux="none", steps=150,
                   batch_size=1024, lr=3e-3, tau=0.2, shots=16, task_test_images=100, prompt_tokens=4,
                   prompt_depth=2, prompt_epochs=8, prompt_batch=16, prompt_lr=3e-2, prompt_optimizer="adamw",
                   prompt_seeds=(0, 1),
                   mask_ks=(1, 2, 5, 10, 50, 100, 256), group_top=10, group_bottom=20,
                   min_model_accuracy=0.5, check_masking=True, expect_claims={"splice_cheap": True}),
        "cpu": dict(vit="cpu", images="debian", near_task="fashion-upper",
                    shifted_task="fashion-upper-inverted", hook="blocks.2.hook_resid_post", sae_images=8000, eval_images=2000,
                    mask_images=2000, expansion=16, l1_coeff=0.05, k=16, sae_aux="none", steps=2000,
                    batch_size=2048, lr=2e-3, tau=0.2, shots=100, task_test_images=1000, prompt_tokens=8,
                    prompt_depth=3, prompt_epochs=30, prompt_batch=32, prompt_lr=3e-2, prompt_optimizer="adamw",
                    prompt_seeds=(0, 1, 2), mask_ks=(1, 2, 5, 10, 50, 100, 500, 1024), group_top=25,
                    group_bottom=50, min_model_accuracy=0.5, check_masking=True,
                    # What the rendered book reports (measured 2026-12-02, three prompt seeds):
                    # asserted where every seed is beyond its floor by a margin; adapts_near
                    # (-2.3 points, floor 2.3) and remaps (+5 points past the floor) are too close.
                    expect_claims={"adapts_near": "inconclusive", "adapts_shifted": True,
                                   "remaps": "inconclusive", "remaps_raw": True,
                                   "shifted_more": True, "shifted_more_raw": True,
                                   "splice_cheap": True}),
        # gpu: CLIP's own zero-shot text classifier (saelib.subjects.vision.CLIPTextHead) on the
        # paper's kind of data, by hub name (parquet, no loading script; what each dataset card
        # says is in saelib.subjects.image_datasets.HUB_DATASETS). ImageNet is replaced by
        # ImageNet-100 (clane9/imagenet-100: ImageNet's own images of 100 classes, with ImageNet's
        # readable class names, which the text head needs; timm/mini-imagenet names its classes by
        # WordNet ids), its validation split held out. Tasks: Food-101 (near: natural photos, one of
        # the paper's evaluation sets; its validation split is the official test set, 250 per class)
        # and EuroSAT (timm/eurosat-rgb, the strongly shifted satellite domain; test split), each
        # a seeded pick of 10 classes (EuroSAT's count), 16 shots and 250 test images per class.
        # Verified from the dataset cards (2026-12): the repos, parquet files, the image and label
        # (ClassLabel) columns, split names and sizes, class names. Not verified (no network here):
        # that none is gated, and that load_dataset reads them as the stand-in hub's copies are
        # read (tests/hub_standin.py). ImageNet-100's train split is about 8 GB of parquet.
        # Activations are held in CPU memory (197 tokens x 768 per image: 4,000 images are
        # 2.4 GB), images as uint8 at 224 x 224 (150 kB each); MaPLe's prompts (depth 9, 2
        # tokens) and optimizer (SGD, momentum 0.9, weight decay 5e-4, a constant 1e-5 first epoch, lr 0.0035, batch 4, 5
        # epochs). Run here only as gpu-smoke (its names and code path at ci's sizes, against
        # stand-in files).
        "gpu": dict(vit="clip-vit-b-16", images="hf:clane9/imagenet-100", near_task="hf:ethz/food101",
                    shifted_task="hf:timm/eurosat-rgb",
                    hook="blocks.10.hook_resid_post", sae_images=4000,
                    eval_images=1000, mask_images=1000, expansion=64, l1_coeff=0.05, k=32, sae_aux="aux_k",
                    steps=20_000, batch_size=4096, lr=4e-4, tau=0.2, shots=16, task_test_images=250,
                    prompt_tokens=2, prompt_depth=9, prompt_epochs=5, prompt_batch=4, prompt_lr=3.5e-3,
                    prompt_optimizer="maple_sgd",
                    prompt_seeds=(0, 1, 2), mask_ks=(1, 2, 5, 10, 50, 100, 500, 1000, 2000, 49152),
                    group_top=50, group_bottom=100,
                    # CLIP's zero-shot over ImageNet-100's names (chance 1%; not measured here)
                    min_model_accuracy=0.3, check_masking=True, expect_claims=None),
    },
}


SMOKE_SIZES = frozenset({
    "n_tokens", "eval_tokens", "eval_windows", "loss_windows", "splice_windows", "sanity_tokens",
    "dead_after_tokens", "steps", "length_steps", "big_steps", "sanity_steps", "timing_steps", "n_budgets",
    "batch_size", "context_size", "d_model", "n_features", "shelf_max_chars",
    "organism", "icl_sequences", "icl_lengths", "n_boot", "sae_images", "eval_images", "mask_images",
    "task_test_images", "prompt_epochs", "prompt_seeds", "mask_ks", "group_top", "group_bottom"})
"""The knobs ``gpu-smoke`` takes from ``ci``: amounts of data, steps and widths (and the organism,
named by its size); every other knob, names and hyperparameters, is ``gpu``'s. Expansions stay
``gpu``'s: the stand-in models are narrow, and at ci's expansions gpu's k would not fit (chapter 2's
k 128) or Feature Choice's Zipf capacities would exceed the batch."""
SMOKE_BOUNDS: dict[str, dict[str, Any]] = {
    # the stand-in models are random: a loss near log(vocabulary), no trained structure
    "subject_models": {"max_pretrained_ce": 8.0},
    # the stand-in CLIP is random: its zero-shot text head is at chance, and so is every masking
    # curve (class top-k at k = 10 scored 6.0% against random latents' 18.3% in one run)
    "vision": {"min_model_accuracy": 0.0, "check_masking": False},
    # gpu's hyperparameters at ci's sizes: ci's recovery bounds do not hold (a code-path run)
    "synthetic": {"min_recovered": 0.0, "max_nmse": 1.0},
    # Feature Choice keeps a feature's top tokens among its positive pre-activations: on a random
    # model at ci's sizes many columns have fewer positives than their capacity (28.4 of k = 32 kept
    # in training; its inference threshold keeps 2.6), and at gpu's lr a few steps leave TopK's NMSE
    # rising with k: bounds and trends that only a trained run meets
    "allocation": {"max_budget_gap": 0.2, "max_inference_gap": 1.0, "check_trends": False},
    # at 8 steps on a random model the e2e sweep's L0 is flat to a feature (1651.3, 1651.5 at
    # lambda 2 and 5 in a 16-step run): the trends only a trained run shows
    "e2e": {"check_trends": False},
}
"""Asserted bounds (``min_``/``max_``) and result checks (``check_``) ``gpu-smoke`` relaxes, per chapter."""
SMOKE_SMALLER: dict[str, dict[str, Any]] = {
    # Training lengths (only SMOKE_SIZES) where gpu-smoke runs shorter than ci: a smoke run checks the
    # gpu path (names, loaders, hooks) with its bounds relaxed above, so no result needs ci's steps;
    # ci's steps were most of each smoke run's time. Each stays long enough for every branch a
    # longer run takes: chapter 2's 48 x 512 tokens pass dead_after_tokens (16,384), so features
    # can die; chapter 2b's doubling budgets (3 of 40 steps) keep one at or under sanity_steps.
    "synthetic": {"steps": 300},
    "allocation": {"steps": 48},
    "allocation_scale": {"length_steps": 40, "big_steps": 40, "sanity_steps": 20},
    # not chapter 4: at 40 steps one of the checks it makes on every profile failed (2026-12-02; a
    # message-less assert of its final cell: the last step's self-match, or a second seed beating
    # random directions or chance Jaccard), so its smoke run keeps ci's 100 steps
    "vision": {"steps": 50, "prompt_epochs": 2},
    # chapter 3 trains 39 SAEs of gpu's 60 x d_model latents (3,840 on the stand-in gpt2) and
    # evaluates each at every snapshot: at ci's sizes its smoke run took 445 s
    "e2e": {"steps": 8, "batch_size": 4, "n_tokens": 4096, "eval_tokens": 512, "eval_windows": 2,
            "n_budgets": 2, "timing_steps": 2},
}
"""``SMOKE_SIZES`` that ``gpu-smoke`` shrinks below ``ci``'s, per chapter."""


def smoke_values(chapter: str) -> dict[str, Any]:
    """``gpu-smoke``: ``gpu``'s values with the ``SMOKE_SIZES`` of ``ci`` (shorter where ``SMOKE_SMALLER``
    says) and the ``SMOKE_BOUNDS``."""
    table = CHAPTERS[chapter]
    sizes = {k: v for k, v in table["ci"].items() if k in SMOKE_SIZES}
    smaller = SMOKE_SMALLER.get(chapter, {})
    if not set(smaller) <= SMOKE_SIZES & set(sizes):
        raise ValueError(f"SMOKE_SMALLER[{chapter!r}] names knobs that are not sizes: {set(smaller) - SMOKE_SIZES}")
    return {**table["gpu"], **sizes, **smaller, **SMOKE_BOUNDS.get(chapter, {})}


for _chapter_name in CHAPTERS:
    CHAPTERS[_chapter_name]["gpu-smoke"] = smoke_values(_chapter_name)


class Params(dict):
    """A chapter's resolved parameters; read them as attributes (``P.k``) or keys."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no parameter {name!r}; this chapter has {sorted(self)}") from None

    def _repr_html_(self) -> str:
        """A compact two-column table (knob, value) for notebooks and the rendered book."""
        cell = "<td><code>{}</code></td>".format
        rows = "".join(f"<tr>{cell(html.escape(k))}{cell(html.escape(repr(v)))}</tr>"
                       for k, v in sorted(self.items(), key=lambda kv: kv[0] != "profile"))
        return f'<table class="saelib-params"><tr><th>knob</th><th>value</th></tr>{rows}</table>'


def values(chapter: str, profile: str) -> dict[str, Any]:
    """The knob values ``chapter`` defines for ``profile`` (or for its ``BASE``), without overrides."""
    table = _chapter(chapter)
    return table[profile] if profile in table else table[BASE[profile]]


def knobs(chapter: str) -> list[str]:
    """The knob names of a chapter (the same for every profile)."""
    return sorted(_chapter(chapter)["cpu"])


def default_profile() -> str:
    """``$SAELIB_PROFILE`` if set, else ``cpu``: what ``profile = None`` in a notebook means."""
    return os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE


def resolve(chapter: str, profile: str | None = None, **overrides: Any) -> Params:
    """The parameters of ``chapter`` at ``profile`` (``None``: ``default_profile()``), with
    non-``None`` overrides applied.

    Fails at once, listing the valid names, on an unknown chapter, profile or knob."""
    _chapter(chapter)
    if profile is None:
        profile = default_profile()
    if profile not in PROFILES:
        source = f" (from ${PROFILE_ENV})" if profile == os.environ.get(PROFILE_ENV) else ""
        raise ValueError(f"unknown profile {profile!r}{source}; valid profiles: {list(PROFILES)}")
    params = Params(values(chapter, profile))
    for name, value in overrides.items():
        if name not in params:
            close = difflib.get_close_matches(name, params, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown parameter {name!r} for chapter {chapter!r}{hint}; "
                             f"valid: ['profile'] + {sorted(params)}")
        if value is not None:
            check_type(chapter, name, value)
            params[name] = value
    if "precision" in params and overrides.get("precision") is None:
        params["precision"] = _machine_precision(chapter, profile, params["precision"])
    params["profile"] = profile
    if profile in PLANNED:
        plan.announce(chapter, params)
    return params


def _machine_precision(chapter: str, profile: str, requested: str) -> str:
    """A profile's bfloat16 becomes float32 on a machine without bfloat16 hardware, where it would
    be several times slower than float32 (``saelib.core.devices.native_bfloat16``), and a line says so."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = machine_precision(requested, device)
    if chosen != requested:
        print(f"{chapter} ({profile}): this {device.upper()} has no bfloat16 hardware (AVX-512 BF16 or AMX), "
              f"so the profile's precision={requested!r} runs as {chosen!r}; pass precision={requested!r} "
              "to keep it")
    return chosen


def check_type(chapter: str, name: str, value: Any) -> None:
    """Refuse a knob value of another type than the chapter's profiles give it (an int where a
    float is expected is fine; a tuple and a list are one sequence), before any cell runs on it."""
    seen = [table[name] for table in _chapter(chapter).values() if table[name] is not None]
    def kind(v: Any) -> type:
        return tuple if isinstance(v, list) else type(v)
    wanted = {kind(v) for v in seen}
    if seen and kind(value) not in wanted and not (kind(value) is int and float in wanted):
        label = {int: "an integer", float: "a number", tuple: "a sequence", str: "a string", bool: "True or False",
                 dict: "a dict"}
        names = sorted(label.get(t, t.__name__) for t in wanted)
        raise ValueError(f"knob {name}={value!r} of chapter {chapter!r} must be {' or '.join(names)}, "
                         f"e.g. {name}={seen[0]!r}")


def from_parameters(chapter: str, namespace: Mapping[str, Any]) -> Params:
    """``resolve`` with ``profile`` and the knobs read from a notebook's parameters cell
    (pass ``globals()``). A knob missing from the cell is a bug in the notebook: say so."""
    missing = [k for k in ["profile", *knobs(chapter)] if k not in namespace]
    if missing:
        raise NameError(f"the parameters cell of this {chapter!r} notebook lacks {missing}")
    return resolve(chapter, namespace["profile"], **{k: namespace[k] for k in knobs(chapter)})


def _chapter(chapter: str) -> dict[str, dict[str, Any]]:
    if chapter not in CHAPTERS:
        raise ValueError(f"unknown chapter {chapter!r}; valid: {sorted(CHAPTERS)}")
    return CHAPTERS[chapter]
