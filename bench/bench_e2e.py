"""Training speed of Braun et al.'s objectives: tokens/s of one SAE through saelib's trainer.

    python bench/bench_e2e.py [--steps 6 --batch 16 --context 128 --smollm --json out.json]

For each subject model, a ReLU SAE (8 x d_model features) trains for ``--steps`` steps of ``--batch``
windows with each objective (``saelib.core.objectives``): local, e2e and e2e+ds, the e2e ones with the
model's run from the SAE's layer in float32 and under bfloat16 autocast. Each SAE trains alone, so
an e2e step includes its own clean run. Reported: SAE tokens/s (positions 1.. of each window) over
the steps after the first, and the time relative to local. Models:

* the book's organism (``--organism``; by default 'cpu' if trained into the cache, else 'ci') at its
  middle residual stream (chapter 3's subject);
* with ``--smollm``, SmolLM2-135M at blocks.27.hook_resid_pre (3 of its 30 blocks follow): what a
  late-layer e2e SAE on the pretrained model would cost. Memory-hungry: its 49,152-token
  unembedding runs forward and backward for every position, and at the default 16 windows of 128
  tokens the process grew past 19 GB and was killed on the 23 GB project machine; try --batch 4.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from saelib import E2E, Local, SAEConfig, TrainConfig, train_saes
from saelib.subjects.activations import WindowTable, token_windows
from saelib.subjects.language_models import load_subject_model, organism_dir


def measure(model, hook: str, steps: int, batch: int, context: int) -> list[dict]:
    tokens = token_windows(model.tokenizer, "mixed", steps * batch, context)
    _, cache = model.run_with_cache(tokens, names_filter=hook)
    table = WindowTable(cache[hook])
    d = model.cfg.d_model
    sae = {"s": SAEConfig(d, 8 * d, rule="relu", l1_coeff=1.0, encoder_dtype="bfloat16")}
    cfg = TrainConfig(steps=steps, batch_size=batch, warmup_steps=1, log_every=1, init_tokens=4096)
    objectives = {"local": Local(),
                  "e2e float32": E2E(model, hook),
                  "e2e bfloat16": E2E(model, hook, precision="bfloat16"),
                  "e2e+ds bfloat16": E2E(model, hook, kl_coeff=0.5, ds_coeff=2.5, precision="bfloat16")}
    rows = []
    for name, objective in objectives.items():
        t0 = time.perf_counter()
        history = train_saes(sae, table, cfg, progress=False, objectives=objective).history
        wall = time.perf_counter() - t0
        rate = float(history.tokens_per_s.iloc[1:].mean())  # the first step warms up
        rows.append({"model": model.cfg.model_name, "hook": hook, "objective": name,
                     "tokens_per_s": rate, "wall_s": wall})
    local = rows[0]["tokens_per_s"]
    for row in rows:
        row["time_vs_local"] = local / row["tokens_per_s"]
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark with ``argv`` (the command line by default); print the table and return
    its rows."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--smollm", action="store_true", help="also SmolLM2-135M at a late layer")
    ap.add_argument("--organism", choices=["cpu", "ci"],
                    help="the organism profile (default: cpu if trained into the cache, else ci)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    profile = a.organism or ("cpu" if (organism_dir("cpu") / "organism.json").exists() else "ci")
    organism = load_subject_model(f"organism-{profile}")
    hook = f"blocks.{organism.cfg.n_layers // 2}.hook_resid_pre"
    rows = measure(organism, hook, a.steps, a.batch, min(a.context, organism.cfg.n_ctx))
    if a.smollm:
        rows += measure(load_subject_model("smollm2-135m"), "blocks.27.hook_resid_pre", a.steps, a.batch,
                        a.context)
    print(f"{'model':14s} {'hook':26s} {'objective':17s} {'tokens/s':>9s} {'vs local':>9s}")
    for r in rows:
        print(f"{r['model'][:14]:14s} {r['hook']:26s} {r['objective']:17s} {r['tokens_per_s']:9,.0f} "
              f"{r['time_vs_local']:8.1f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
