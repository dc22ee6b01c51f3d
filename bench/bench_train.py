"""Training speed of each allocation rule against this machine's fp32 matmul roofline.

    python bench/bench_train.py [--d 576 --d-sae 4608 --k 32 --batch 4096 --steps 16 --two-ranks --json out.json]
    python bench/bench_train.py --dtypes float32,bfloat16 --quality-steps 200   # the bf16 encoder product

Roofline: a sparse SAE step cannot avoid one dense product, the encoder's forward pass
(2 * batch * d * d_sae FLOPs); everything else touches only the kept entries. The encoder-bound
roofline is that product's time at the matmul throughput measured here, in the same run: the rules
and the GEMM are timed round-robin (one step of each per round, medians over rounds), so the ratios
hold even when a shared machine's speed drifts during the run.

--dtypes times each rule with each encoder precision (SAEConfig.encoder_dtype); the roofline stays
the fp32 product's. --quality-steps then trains TopK in each precision on the same synthetic stream
for that many steps and prints the held-out NMSE of each beside fp32's, so a faster path is only
reported together with what it costs in quality.

--two-ranks also times each rule data-parallel: 2 gloo processes with 1 thread each, each stepping
on half of the same global batch (gradients and statistics all-reduced), against 1 process with
all threads.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from saelib import SAE, SAEConfig, TrainConfig, evaluate, train_saes
from saelib.core import seeding
from saelib.core.devices import native_bfloat16
from saelib.core.training import stepper


def bfloat16_line() -> str:
    """How this machine computes bfloat16 products, for a benchmark's header."""
    return "bfloat16 " + ("in hardware" if native_bfloat16() else "emulated (no AVX-512 BF16 or AMX)")


def gemm_operands(batch: int, d: int, d_sae: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs and a preallocated output for the encoder-shaped product (so page faults of a fresh
    75 MB output do not count against the machine), warmed up twice."""
    a, w, out = torch.randn(batch, d), torch.randn(d_sae, d), torch.empty(batch, d_sae)
    for _ in range(2):
        torch.mm(a, w.T, out=out)
    return a, w, out


def gemm_seconds(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> float:
    t0 = time.perf_counter()
    torch.mm(a, w.T, out=out)
    return time.perf_counter() - t0


def matmul_gflops(batch: int, d: int, d_sae: int, repeats: int = 10) -> float:
    """fp32 GEMM throughput at the encoder's shape: the median of `repeats` products."""
    operands = gemm_operands(batch, d, d_sae)
    return 2 * batch * d * d_sae / statistics.median(gemm_seconds(*operands) for _ in range(repeats)) / 1e9


def step_seconds(cfgs: list[SAEConfig], x: torch.Tensor, steps: int, init: torch.Tensor | None = None,
                 gemm_shape: tuple[int, int, int] | None = None) -> tuple[list[float], float | None]:
    """Median step time of each config, and the median time of one fp32 GEMM of `gemm_shape`
    (batch, d, d_sae). Timed round-robin, one step of each per round, so a drift in the machine's
    speed during the run shifts every rule and the roofline alike."""
    runs = []
    for cfg in cfgs:
        sae = SAE(cfg)
        sae.init_from_sample((x if init is None else init)[:4096])
        step = stepper(sae, TrainConfig(steps=steps + 2, batch_size=len(x)))
        for _ in range(2):  # warm-up: allocator caches, thresholds, first Adam state
            step(x)
        runs.append(step)
    operands = gemm_operands(*gemm_shape) if gemm_shape else None
    times: list[list[float]] = [[] for _ in cfgs]
    gemm: list[float] = []
    for _ in range(steps):
        for step, t in zip(runs, times):
            t0 = time.perf_counter()
            step(x)
            t.append(time.perf_counter() - t0)
        if operands:
            gemm.append(gemm_seconds(*operands))
    return [statistics.median(t) for t in times], statistics.median(gemm) if gemm else None


def gaussian_plus_sparse(n: int, d: int, n_features: int = 4096, active: float = 32, seed: int = 0) -> torch.Tensor:
    """Residual-stream-like rows: a shared offset, anisotropic Gaussian noise, and a sparse
    non-negative sum of unit directions with Zipf-like frequencies (built in chunks to bound memory).
    Drawn from the "bench_data" stream, independent of any SAE's initialisation."""
    gen = seeding.generator("bench_data", seed)
    directions = torch.randn(n_features, d, generator=gen)
    directions /= directions.norm(dim=1, keepdim=True)
    prob = 1.0 / torch.arange(1, n_features + 1) ** 0.5
    prob *= active / prob.sum()
    offset, spread = torch.randn(d, generator=gen), torch.linspace(0.05, 0.5, d)
    chunks = []
    for start in range(0, n, 4096):
        m = min(4096, n - start)
        fires = torch.rand(m, n_features, generator=gen) < prob
        codes = fires * -torch.log(torch.rand(m, n_features, generator=gen).clamp(min=1e-12))
        chunks.append(offset + spread * torch.randn(m, d, generator=gen) + codes @ directions)
    x = torch.cat(chunks)
    return x / x.pow(2).sum(1).mean().sqrt()


def quality_by_dtype(dtypes: list[str], d: int, d_sae: int, k: int, batch: int, steps: int,
                     rows: int = 65536) -> dict[str, float]:
    """Held-out NMSE of TopK SAEs that differ only in encoder precision, trained side by side on the
    same batches of synthetic rows (``rows`` training, rows / 8 held out)."""
    x = gaussian_plus_sparse(rows + rows // 8, d)
    cfgs = {dt: SAEConfig(d, d_sae, rule="topk", k=k, encoder_dtype=dt) for dt in dtypes}
    run = train_saes(cfgs, x[:rows], TrainConfig(steps=steps, batch_size=batch, lr=4e-4, log_every=steps),
                     progress=False)
    return {dt: evaluate(sae, x[rows:]).nmse for dt, sae in run.saes.items()}


def activation_like(batch: int, d: int) -> torch.Tensor:
    """A shared offset plus anisotropic noise, as in a residual stream."""
    gen = seeding.generator("bench_data", 0)
    return torch.randn(batch, d, generator=gen) * torch.linspace(0.2, 3, d) + torch.randn(d, generator=gen)


def _rank_worker(rank: int, port: int, cfgs: list[dict], batch: int, steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        x = activation_like(batch, cfgs[0]["d_in"])
        # Same initialisation on both ranks (as train_saes does), then each steps on its half.
        secs, _ = step_seconds([SAEConfig(**c) for c in cfgs], x.chunk(2)[rank], steps, init=x)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(secs, f)
    finally:
        dist.destroy_process_group()


def two_rank_step_seconds(cfgs: list[SAEConfig], batch: int, steps: int) -> list[float]:
    """Step time of each config with the global batch split over 2 gloo ranks of 1 thread each."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "secs.json")
        mp.start_processes(_rank_worker, args=(port, [c.to_dict() for c in cfgs], batch, steps, out),
                           nprocs=2, start_method="spawn")
        with open(out) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark with ``argv`` (the command line by default); print the table and return
    what ``--json`` writes."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=16, help="timed rounds")
    p.add_argument("--rules", default="topk,mutual_choice,feature_choice,relu")
    p.add_argument("--dtypes", default="float32", help="encoder precisions to time: float32, bfloat16")
    p.add_argument("--quality-steps", type=int, default=0,
                   help="train TopK this many steps per precision and compare held-out NMSE (0: skip)")
    p.add_argument("--quality-rows", type=int, default=65536, help="training rows of --quality-steps")
    p.add_argument("--two-ranks", action="store_true", help="also time 2 data-parallel ranks of 1 thread")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)

    load_before = os.getloadavg()
    x = activation_like(a.batch, a.d)
    dtypes = a.dtypes.split(",")
    cfgs = [SAEConfig(a.d, a.d_sae, rule=rule, k=a.k, l1_coeff=1e-3 if rule == "relu" else 0.0, encoder_dtype=dt)
            for dt in dtypes for rule in a.rules.split(",")]
    secs, gemm_s = step_seconds(cfgs, x, a.steps, gemm_shape=(a.batch, a.d, a.d_sae))
    flops = 2 * a.batch * a.d * a.d_sae
    gflops, roofline = flops / gemm_s / 1e9, a.batch / gemm_s
    rows = [{"rule": cfg.rule, "dtype": cfg.encoder_dtype, "ranks": 1, "step_s": s_, "tokens_per_s": a.batch / s_}
            for cfg, s_ in zip(cfgs, secs)]
    if a.two_ranks:
        for cfg, secs in zip(cfgs, two_rank_step_seconds(cfgs, a.batch, a.steps)):
            rows.append({"rule": cfg.rule, "dtype": cfg.encoder_dtype, "ranks": 2, "step_s": secs,
                         "tokens_per_s": a.batch / secs})
    topk = {r["dtype"]: r["step_s"] for r in rows if r["rule"] == "topk" and r["ranks"] == 1}
    print(f"threads {torch.get_num_threads()}  fp32 matmul {gflops:.1f} GFLOP/s  "
          f"encoder-bound roofline {roofline:,.0f} tokens/s  (d={a.d}, d_sae={a.d_sae}, k={a.k}, batch={a.batch})")
    print("load average (1, 5, 15 min) before: " + ", ".join(f"{v:.2f}" for v in load_before)
          + "; after: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())
          + "; " + bfloat16_line())
    print(f"{'rule':16s} {'encoder':>8s} {'ranks':>5s} {'step ms':>8s} {'tokens/s':>10s} {'of roofline':>12s} "
          f"{'vs topk step':>13s}")
    for r in rows:
        r["roofline_frac"] = r["tokens_per_s"] / roofline
        r["vs_topk"] = r["step_s"] / topk[r["dtype"]] if r["dtype"] in topk else None
        vs = f"{r['vs_topk']:.2f}x" if r["vs_topk"] else "-"
        print(f"{r['rule']:16s} {r['dtype']:>8s} {r['ranks']:5d} {1000 * r['step_s']:8.0f} {r['tokens_per_s']:10,.0f} "
              f"{100 * r['roofline_frac']:11.0f}% {vs:>13s}")
    quality = (quality_by_dtype(dtypes, a.d, a.d_sae, a.k, a.batch, a.quality_steps, a.quality_rows)
               if a.quality_steps else {})
    for dt, nmse in quality.items():
        print(f"held-out NMSE after {a.quality_steps} TopK steps, {dt} encoder: {nmse:.4f} "
              f"({nmse / quality[dtypes[0]]:.4f}x {dtypes[0]}'s)")
    result = {"matmul_gflops": gflops, "roofline_tokens_per_s": roofline, "load_average_before": load_before,
              "args": vars(a), "rules": rows, "heldout_nmse": quality}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
