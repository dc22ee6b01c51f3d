"""saelib vs SAELens 6.x vs sparsify (EleutherAI): TopK SAE training speed at equal held-out NMSE.

    python bench/bench_peers.py [--steps 200 --rounds 3 --d-sae 4608 --k 32 --batch 4096 --cache DIR --json out.json]

Every library trains the same size (d_in x d_sae, k) on the same batches in the same order
(saelib.core.training.batch_indices over one in-memory table), with no auxiliary loss, for --steps
steps. The runs go round-robin: --rounds rounds, each running every library once, and a library's
tokens/s is the median over its rounds, so a drift in the machine's speed shifts every library
alike. The machine's fp32 GEMM rate at the encoder's shape and its load average are printed before
and after. Speed ratios are printed only against a peer run whose held-out NMSE is within
--tolerance (5%) of saelib's, and only after that equal-quality check; with none, no ratio is claimed.

* saelib: ``train_saes`` with the fp32 encoder product and with the bf16 one (--encoder-dtypes).
* SAELens: its SAETrainer fed by an in-memory iterator (TopKTrainingSAE, dense activations: its
  sparse-activation variant fails in backward on CPU with torch 2.13, "aten::view" on SparseCPU), with
  the same lr, warm-up and decay point as saelib and saelib's b_dec start (the geometric median of
  the same sample; SAELens 6.54 starts b_dec at zero and has no data-dependent option), at its default
  decoder_init_norm 0.1 and at 1.0 (saelib's and Gao et al.'s unit-norm start).
* sparsify (``eai-sparsify`` 1.3): its SparseCoder trained as its Trainer trains one (b_dec at the first
  batch's mean, unit-norm decoder rows after every step, the gradient along each decoder row removed,
  FVU loss), with its documented optimisers and their default learning rates for this d_sae: ``signum``
  (its default: SignSGD under a schedule-free wrapper, momentum 0.95, lr 5e-3 / sqrt(d_sae / 2^14)) and
  ``adam`` (lr 2e-4 / sqrt(d_sae / 2^14), linear warm-up then linear decay to zero). Its Trainer
  itself needs a Hugging Face model to hook, so the loop is the Trainer's step, not its entry point.
  On a CPU it uses its eager sparse decoder (its Triton kernel is GPU-only).

The synthetic rows are drawn from their own random stream ("bench_data"), independent of every SAE
initialisation stream: a shared stream would put the true directions into saelib's initial decoder.
Speed: every batch fetch is timestamped, so a step's time is the gap between consecutive fetches
(fetch included, same for all); tokens/s is the median over the steps after --warmup. The
end-to-end column divides all tokens by the whole call (set-up such as saelib's geometric-median b_dec
included). NMSE: one evaluation function over --heldout rows never trained on. The data is scaled to
unit mean squared norm up front, so all libraries see it in the same units.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
from bench_train import bfloat16_line, gaussian_plus_sparse, matmul_gflops
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


def run_saelib(x: Tensor, held: Tensor, a: argparse.Namespace, encoder_dtype: str) -> dict:
    table = TimedTable(x, a.batch)
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch, lr=a.lr, warmup_steps=a.lr_warmup, log_every=a.steps)
    t0 = time.perf_counter()
    sae_cfg = SAEConfig(a.d, a.d_sae, rule="topk", k=a.k, encoder_dtype=encoder_dtype)
    sae = train_saes({"topk": sae_cfg}, table, cfg, progress=False).saes["topk"]
    wall = time.perf_counter() - t0
    table.stamps.append(t0 + wall)  # the last step ends with the call (train_saes has no later fetch)
    return {"library": f"saelib ({encoder_dtype} encoder)", "tokens_per_s": step_stats(table.stamps, a.batch, a.warmup),
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


def run_sparsify(x: Tensor, held: Tensor, a: argparse.Namespace, optimizer: str) -> dict:
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(a.seed + 1)  # its nn.Linear initialisation: a stream of its own, not the data's
    sae = SparseCoder(a.d, SparseCoderConfig(k=a.k, num_latents=a.d_sae), device="cpu", dtype=torch.float32)
    scale = math.sqrt(a.d_sae / 2 ** 14)
    if optimizer == "signum":
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD

        opt = ScheduleFreeWrapper(SignSGD(sae.parameters(), lr=5e-3 / scale), momentum=0.95)
        opt.train()
        schedule = None
    elif optimizer == "adam":
        opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / scale)
        warm = max(a.lr_warmup, 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: step / warm if step < warm else max(0.0, (a.steps - step) / max(a.steps - warm, 1)))
    else:
        raise ValueError(f"unknown sparsify optimizer {optimizer!r}: signum or adam")
    table = TimedTable(x, a.batch)
    t0 = time.perf_counter()
    for step in range(a.steps):
        batch = table[batch_indices(step, a.batch, len(x), 0)]
        if step == 0:
            sae.b_dec.data = batch.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        sae(batch).fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        if schedule is not None:
            schedule.step()
    sae.set_decoder_norm_to_unit_norm()
    wall = time.perf_counter() - t0
    table.stamps.append(t0 + wall)
    if optimizer == "signum":
        opt.eval()  # schedule-free: evaluate at the averaged weights, as its Trainer saves them

    def reconstruct(rows: Tensor) -> Tensor:
        return sae(rows).sae_out

    return {"library": f"sparsify 1.3, {optimizer}", "tokens_per_s": step_stats(table.stamps, a.batch, a.warmup),
            "end_to_end_tokens_per_s": a.steps * a.batch / wall, "nmse": heldout_nmse(reconstruct, held)}


def machine_line() -> str:
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (f"load average {load}; {os.cpu_count()} CPUs; torch threads {torch.get_num_threads()}; "
            + bfloat16_line())


def _runners(a: argparse.Namespace) -> list:
    runners = [lambda x, h, dt=dt: run_saelib(x, h, a, dt) for dt in a.encoder_dtypes.split(",") if dt]
    runners += [lambda x, h, v=v, n=float(n): run_saelens(x, h, a, sparse=v == "sparse", decoder_init_norm=n)
                for v in a.saelens.split(",") if v for n in a.decoder_init_norms.split(",")]
    runners += [lambda x, h, o=o: run_sparsify(x, h, a, o) for o in a.sparsify.split(",") if o]
    return runners


def _median_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per library: the median over rounds of each number (NMSE varies only by threading)."""
    rows = []
    for runs in zip(*rounds):
        row = dict(runs[0])
        for key in ("tokens_per_s", "end_to_end_tokens_per_s", "nmse"):
            row[key] = statistics.median(r[key] for r in runs)
        row["tokens_per_s_rounds"] = [r["tokens_per_s"] for r in runs]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark with ``argv`` (the command line by default); print the tables and return
    what ``--json`` writes."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=1, help="round-robin rounds: every library once per round")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the median step time")
    p.add_argument("--lr", type=float, default=4e-4, help="saelib's and SAELens's peak lr")
    p.add_argument("--lr-warmup", type=int, default=2, help="linear lr warm-up steps (saelib, SAELens, sparsify adam)")
    p.add_argument("--rows", type=int, default=65536, help="training rows (batches cycle through them)")
    p.add_argument("--heldout", type=int, default=8192)
    p.add_argument("--cache", help="an activation cache directory to use instead of synthetic rows")
    p.add_argument("--encoder-dtypes", default="float32,bfloat16", help="saelib's encoder products to run")
    p.add_argument("--saelens", default="dense", help="SAELens variants to run, comma-separated: dense, sparse")
    p.add_argument("--decoder-init-norms", default="0.1,1.0",
                   help="SAELens decoder_init_norm values to run (0.1 is its default, 1.0 saelib's start)")
    p.add_argument("--sparsify", default="signum,adam", help="sparsify optimisers to run: signum (its default), adam")
    p.add_argument("--tolerance", type=float, default=0.05, help="equal quality: held-out NMSE within this")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic rows (their own stream)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)

    x = load_cache(a.cache, a.rows + a.heldout) if a.cache else gaussian_plus_sparse(a.rows + a.heldout, a.d, seed=a.seed)
    a.d = x.shape[1]
    train, held = x[:-a.heldout], x[-a.heldout:]
    before = machine_line()
    gflops = matmul_gflops(a.batch, a.d, a.d_sae)
    runners = _runners(a)
    rows = _median_rounds([[run(train, held) for run in runners] for _ in range(a.rounds)])
    gflops_after = matmul_gflops(a.batch, a.d, a.d_sae)
    roofline = gflops * 1e9 / (2 * a.d * a.d_sae)
    print(f"before: {before}; fp32 matmul {gflops:.0f} GFLOP/s at the encoder's shape")
    print(f"after:  {machine_line()}; fp32 matmul {gflops_after:.0f} GFLOP/s")
    print(f"encoder-bound roofline {roofline:,.0f} tokens/s (d={a.d}, d_sae={a.d_sae}, k={a.k}, batch={a.batch}, "
          f"steps={a.steps}, rounds={a.rounds}, data={'cache ' + a.cache if a.cache else 'synthetic'})")
    ours = [r for r in rows if r["library"].startswith("saelib")]
    reference = ours[0]["nmse"]
    for r in rows:
        r["nmse_vs_saelib"] = r["nmse"] / reference
        r["equal_quality"] = abs(r["nmse_vs_saelib"] - 1) <= a.tolerance
    for r in rows[1:]:
        print(f"equal-quality check: {r['library']} held-out NMSE {r['nmse']:.4f} = {r['nmse_vs_saelib']:.3f}x "
              f"{ours[0]['library']}'s {reference:.4f}: {'within' if r['equal_quality'] else 'NOT within'} "
              f"{a.tolerance:.0%}")
    print(f"\n{'library':34s} {'tokens/s':>10s} {'end-to-end':>11s} {'of roofline':>12s} {'held-out NMSE':>14s}")
    for r in rows:
        r["roofline_frac"] = r["tokens_per_s"] / roofline
        print(f"{r['library']:34s} {r['tokens_per_s']:10,.0f} {r['end_to_end_tokens_per_s']:11,.0f} "
              f"{100 * r['roofline_frac']:11.0f}% {r['nmse']:14.4f}")
    ratios = {}
    for peer_name in ("SAELens", "sparsify"):
        peers = [r for r in rows if r["library"].startswith(peer_name) and r["equal_quality"]]
        if not peers:
            print(f"\nno {peer_name} run reached saelib's held-out NMSE within the tolerance: no speed ratio is claimed")
            continue
        peer = max(peers, key=lambda r: r["tokens_per_s"])
        for mine in (r for r in ours if r["equal_quality"]):
            ratio, e2e = (mine[k] / peer[k] for k in ("tokens_per_s", "end_to_end_tokens_per_s"))
            ratios[f"{mine['library']} / {peer['library']}"] = ratio
            print(f"\n{mine['library']} vs {peer['library']} at equal held-out NMSE: {ratio:.2f}x per step, "
                  f"{e2e:.2f}x end to end")
    result = {"matmul_gflops": gflops, "matmul_gflops_after": gflops_after, "roofline_tokens_per_s": roofline,
              "machine_before": before, "args": vars(a), "results": rows, "ratios": ratios}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
