"""Dead features against dictionary size: the share of features an SAE loses, its held-out NMSE and its
training speed, per allocation rule and dictionary size, on one activation stream.

    python bench/bench_dead.py --runs feature_choice:8,feature_choice_uniform:8,topk:64 --steps 320

Each ``--runs`` entry is FAMILY:EXPANSION (FAMILY a rule, optionally +aux: ``topk+aux_k``,
``mutual_choice+aux_zipf``). Every size trains its families side by side on identical batches
(``saelib.core.training.train_cached``: a rerun reloads, a killed run resumes) with the bfloat16 encoder
by default. Printed per SAE: % dead at the end of training (not fired in the last ``--dead-after``
tokens, as the trainer's history counts it), held-out NMSE with batch allocation (L0 = k for TopK and
MC; FC at most k, or more where its floor of one token per feature exceeds the budget, which the L0
column shows), training tokens/s of the size's run (all its SAEs together: cold runs only) and the
dead-share curve against training tokens, from which the size where TopK without aux_k would lose 5%
can be read off. Activations are harvested once into ``$SAELIB_CACHE`` under the key chapter 2 and 2b
use for the same settings (rows above 10x the median norm dropped, as there).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import pandas as pd

from saelib.core.metrics import evaluate
from saelib.core.sae import SAEConfig
from saelib.core.training import TrainConfig, train_cached
from saelib.subjects.activations import CacheSpec, drop_norm_outliers, get_or_build_cache
from saelib.subjects.language_models import load_subject_model


def parse_runs(text: str) -> dict[int, list[str]]:
    """'topk:8,feature_choice:8,topk:64' -> {8: ['topk', 'feature_choice'], 64: ['topk']}."""
    sizes: dict[int, list[str]] = {}
    for item in text.split(","):
        family, _, expansion = item.strip().partition(":")
        if not expansion.isdigit():
            raise SystemExit(f"--runs entry {item!r} must be FAMILY:EXPANSION, e.g. topk:64")
        sizes.setdefault(int(expansion), []).append(family)
    return sizes


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--hook", default="blocks.15.hook_resid_post")
    p.add_argument("--corpus", default="mixed")
    p.add_argument("--tokens", type=int, default=600_000, help="training activations harvested")
    p.add_argument("--eval-tokens", type=int, default=16_384)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--precision", default="bfloat16", help="harvest and encoder product")
    p.add_argument("--runs", default="topk:32,feature_choice:32")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=320)
    p.add_argument("--dead-after", type=int, default=100_000)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    lm = load_subject_model(args.model)
    where = dict(model=args.model, hook=args.hook, corpus=args.corpus, context_size=args.context,
                 model_dtype=args.precision)
    train_acts = get_or_build_cache(CacheSpec(n_tokens=args.tokens, **where), model=lm, progress=False)
    held_acts = get_or_build_cache(CacheSpec(n_tokens=args.eval_tokens, split="heldout", **where), model=lm,
                                   progress=False)
    rows = drop_norm_outliers(train_acts, max_ratio=10.0)
    heldout = drop_norm_outliers(held_acts, threshold=rows.threshold)[:]
    d_in = train_acts.d_in
    print(f"activations: {len(rows):,} training rows, {len(heldout):,} held-out ({args.model} {args.hook}, "
          f"{args.precision}), ready after {time.perf_counter() - t0:.0f} s")

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, warmup_steps=max(1, args.steps // 20),
                      log_every=max(1, args.steps // 40), checkpoint_every=max(10, args.steps // 8))
    results, curves = [], []
    for expansion, families in parse_runs(args.runs).items():
        configs = {}
        for family in families:
            rule, _, aux = family.partition("+")
            configs[family] = SAEConfig(d_in, expansion * d_in, rule=rule, k=args.k, aux=aux or "none",
                                        dead_after_tokens=args.dead_after, encoder_dtype=args.precision)
        start = time.perf_counter()
        run = train_cached(configs, rows, cfg, data_key={"activations": train_acts.spec.key(),
                                                         "max_norm": rows.threshold}, progress=False)
        seconds = time.perf_counter() - start
        final = run.history.groupby("sae").last()
        for family, sae in run.saes.items():
            held = evaluate(sae, heldout, batch_size=args.batch, batch_allocation=True)
            results.append({"family": family, "expansion": expansion, "d_sae": expansion * d_in,
                            "tokens": args.steps * args.batch, "dead_pct": 100 * float(final.dead_frac[family]),
                            "nmse": held.nmse, "l0": held.l0, "train_s": seconds,
                            "run_tokens_per_s": args.steps * args.batch / seconds})
        curve = run.history.pivot_table(index="tokens", columns="sae", values="dead_frac")
        curves.append((expansion, 100 * curve))
        done = pd.DataFrame([r for r in results if r["expansion"] == expansion])
        print(f"{expansion}x done ({seconds:.0f} s):\n{done.to_string(index=False, float_format=lambda v: f'{v:.4f}')}",
              flush=True)

    table = pd.DataFrame(results)
    print(f"\n{args.steps} steps x {args.batch} tokens (k {args.k}, dead after {args.dead_after:,} silent tokens, "
          f"{args.precision} encoder); train_s is the whole size's run (all its SAEs), near 0 when cached")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    for expansion, curve in curves:
        print(f"\n% dead against training tokens, {expansion}x:")
        print(curve.iloc[:: max(1, len(curve) // 10)].round(3).to_string())
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
