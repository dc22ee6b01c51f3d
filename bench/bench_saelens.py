"""saelib vs SAELens 6.x: TopK SAE training speed and held-out NMSE on the same activations.

    python bench/bench_saelens.py [--steps 20 --d-sae 4608 --k 32 --batch 4096 --cache DIR --json out.json]

Both train the same size (d_in x d_sae, k) with Adam at the same lr, warm-up and decay point, on the
same batches in the same order (saelib.core.training.batch_indices over one in-memory table), with no
auxiliary loss (SAELens's dead-feature window is set past the run; saelib's aux = "none"), and the
same start for b_dec: the geometric median of the same sample of rows saelib's trainer draws. That
start is saelib's; SAELens 6.54 has no data-dependent b_dec initialisation (it starts b_dec at zero),
so the benchmark sets it, to compare training rather than initialisation.

SAELens runs twice: with its default decoder_init_norm = 0.1 (decoder rows start at norm 0.1) and
with decoder_init_norm = 1.0, the unit-norm start saelib (and Gao et al.) use. Speed ratios are
reported against the SAELens run that reaches saelib's held-out NMSE within --tolerance (5%), and
only after that equal-quality check is printed; with no such run, no ratio is claimed.

The synthetic rows are drawn from their own random stream ("bench_data"), independent of the SAE
initialisation streams: a shared stream would put the true directions into saelib's initial decoder.
Each runs through its own training entry point: saelib.core.training.train_saes, and SAELens's SAETrainer
fed by an in-memory iterator (its TopKTrainingSAE with dense activations: its sparse-activation
variant, --saelens sparse, fails in backward on CPU with torch 2.13, "aten::view" on SparseCPU).

Speed: every batch fetch is timestamped, so a step's time is the gap between consecutive fetches
(fetch included, same for both); tokens/s is the median over the steps after --warmup. The
end-to-end column divides all tokens by the whole call (including set-up such as saelib's
geometric-median b_dec). NMSE: one evaluation function over --heldout rows never trained on.
The data is scaled to unit mean squared norm up front, so both libraries see it in the same units
(SAELens with normalize_activations="none"; saelib's own scale is then ~1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from bench_train import gaussian_plus_sparse, matmul_gflops
from torch import Tensor

from saelib import SAEConfig, TrainConfig, train_saes
from saelib.core.metrics import per_token_error
from saelib.core.sae import geometric_median
from saelib.core.training import batch_indices


class TimedTable:
    """An activation table that timestamps each fetch of a training batch."""

    def __init__(self, x: Tensor, batch: int):
        self.x, self.batch, self.stamps = x, batch, []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, idx: Tensor) -> Tensor:
        if len(idx) == self.batch:
            self.stamps.append(time.perf_counter())
        return self.x[idx]


def load_cache(path: str, n: int) -> Tensor:
    from saelib.subjects.activations import open_cache

    cache = open_cache(path)
    x = cache[torch.arange(min(n, len(cache)))]
    return x / x.pow(2).sum(1).mean().sqrt()


@torch.no_grad()
def heldout_nmse(reconstruct, x: Tensor) -> float:
    """Squared error over the held-out rows relative to their mean squared deviation from the mean."""
    x_hat = torch.cat([reconstruct(chunk) for chunk in x.split(4096)])
    return float(per_token_error(x, x_hat).mean())


def step_stats(stamps: list[float], batch: int, warmup: int) -> float:
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][warmup:]
    return batch / statistics.median(gaps)


def run_saelib(x: Tensor, held: Tensor, a: argparse.Namespace) -> dict:
    table = TimedTable(x, a.batch)
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch, lr=a.lr, warmup_steps=a.lr_warmup, log_every=a.steps)
    t0 = time.perf_counter()
    sae_cfg = SAEConfig(a.d, a.d_sae, rule="topk", k=a.k, encoder_dtype=a.encoder_dtype)
    sae = train_saes({"topk": sae_cfg}, table, cfg, progress=False).saes["topk"]
    wall = time.perf_counter() - t0
    table.stamps.append(t0 + wall)  # the last step ends with the call (train_saes has no later fetch)
    return {"library": f"saelib ({a.encoder_dtype} encoder)", "tokens_per_s": step_stats(table.stamps, a.batch, a.warmup),
            "end_to_end_tokens_per_s": a.steps * a.batch / wall, "nmse": heldout_nmse(sae.reconstruct, held)}


def run_saelens(x: Tensor, held: Tensor, a: argparse.Namespace, sparse: bool, decoder_init_norm: float) -> dict:
    from sae_lens import LoggingConfig, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=a.d, d_sae=a.d_sae, k=a.k, dtype="float32", device="cpu",
                                                use_sparse_activations=sparse, normalize_activations="none",
                                                decoder_init_norm=decoder_init_norm))
    with torch.no_grad():  # saelib's b_dec start (SAELens has none from data), so NMSE compares training
        init = TrainConfig(steps=a.steps)
        sample = torch.randperm(len(x), generator=torch.Generator().manual_seed(init.seed))[:init.init_tokens]
        sae.b_dec.copy_(geometric_median(x[sample.sort().values]))
    table = TimedTable(x, a.batch)

    def batches():
        for step in range(a.steps):
            yield table[batch_indices(step, a.batch, len(x), 0)]
        table.stamps.append(time.perf_counter())  # fit() asks for no batch after the last step

    decay = a.steps - int(0.8 * a.steps)  # saelib's decay_start = 0.8
    trainer = SAETrainer(SAETrainerConfig(
        total_training_samples=a.steps * a.batch, train_batch_size_samples=a.batch, lr=a.lr, lr_end=a.lr / 10,
        lr_warm_up_steps=a.lr_warmup, lr_decay_steps=decay, dead_feature_window=a.steps + 1,
        feature_sampling_window=a.steps + 1, logger=LoggingConfig(log_to_wandb=False)), sae, batches())
    t0 = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - t0
    sae.eval()
    return {"library": f"SAELens {'sparse' if sparse else 'dense'}, dec. norm {decoder_init_norm:g}",
            "tokens_per_s": step_stats(table.stamps, a.batch, a.warmup),
            "end_to_end_tokens_per_s": a.steps * a.batch / wall, "nmse": heldout_nmse(sae, held)}


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark with ``argv`` (the command line by default); print the tables and return
    what ``--json`` writes."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the median step time")
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--lr-warmup", type=int, default=2, help="linear lr warm-up steps (both libraries)")
    p.add_argument("--rows", type=int, default=65536, help="training rows (batches cycle through them)")
    p.add_argument("--heldout", type=int, default=8192)
    p.add_argument("--cache", help="an activation cache directory to use instead of synthetic rows")
    p.add_argument("--saelens", default="dense", help="SAELens variants to run, comma-separated: dense, sparse")
    p.add_argument("--decoder-init-norms", default="0.1,1.0",
                   help="SAELens decoder_init_norm values to run (0.1 is its default, 1.0 saelib's start)")
    p.add_argument("--encoder-dtype", default="float32", help="saelib's encoder product: float32 or bfloat16")
    p.add_argument("--tolerance", type=float, default=0.05, help="equal quality: held-out NMSE within this")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic rows (their own stream)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)

    x = load_cache(a.cache, a.rows + a.heldout) if a.cache else gaussian_plus_sparse(a.rows + a.heldout, a.d, seed=a.seed)
    a.d = x.shape[1]
    train, held = x[:-a.heldout], x[-a.heldout:]
    gflops = matmul_gflops(a.batch, a.d, a.d_sae)
    roofline = gflops * 1e9 / (2 * a.d * a.d_sae)
    rows = [run_saelib(train, held, a)]
    rows += [run_saelens(train, held, a, sparse=v == "sparse", decoder_init_norm=float(norm))
             for v in a.saelens.split(",") if v for norm in a.decoder_init_norms.split(",")]
    print(f"threads {torch.get_num_threads()}  fp32 matmul {gflops:.0f} GFLOP/s  encoder-bound roofline "
          f"{roofline:,.0f} tokens/s  (d={a.d}, d_sae={a.d_sae}, k={a.k}, batch={a.batch}, steps={a.steps}, "
          f"data={'cache ' + a.cache if a.cache else 'synthetic'})")
    ours = rows[0]["nmse"]
    for r in rows[1:]:
        r["nmse_vs_saelib"] = r["nmse"] / ours
        r["equal_quality"] = abs(r["nmse_vs_saelib"] - 1) <= a.tolerance
        print(f"equal-quality check: {r['library']} held-out NMSE {r['nmse']:.4f} = {r['nmse_vs_saelib']:.3f}x "
              f"saelib's {ours:.4f}: {'within' if r['equal_quality'] else 'NOT within'} {a.tolerance:.0%}")
    peers = [r for r in rows[1:] if r["equal_quality"]]
    peer = max(peers, key=lambda r: r["tokens_per_s"]) if peers else None
    print(f"\n{'library':34s} {'tokens/s':>10s} {'end-to-end':>11s} {'of roofline':>12s} {'held-out NMSE':>14s}")
    for r in rows:
        r["roofline_frac"] = r["tokens_per_s"] / roofline
        print(f"{r['library']:34s} {r['tokens_per_s']:10,.0f} {r['end_to_end_tokens_per_s']:11,.0f} "
              f"{100 * r['roofline_frac']:11.0f}% {r['nmse']:14.4f}")
    if peer:
        ratio, e2e = (rows[0][k] / peer[k] for k in ("tokens_per_s", "end_to_end_tokens_per_s"))
        print(f"\nsaelib vs {peer['library']} at equal held-out NMSE: {ratio:.2f}x per step, {e2e:.2f}x end to end")
    else:
        print("\nno SAELens run reached saelib's held-out NMSE within the tolerance: no speed ratio is claimed")
    result = {"matmul_gflops": gflops, "roofline_tokens_per_s": roofline, "args": vars(a), "results": rows}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
