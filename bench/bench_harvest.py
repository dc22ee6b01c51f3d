"""Activation-harvest speed: tokens/s of saelib.subjects.activations at a middle layer vs the full model.

    python bench/bench_harvest.py [--batch 16 --context 128 --batches 4 --json out.json]

Rows per model (tokens = windows x context, BOS included, as the model processes them):
* harvest (stop_at_layer): ``harvest`` at the middle hook, which stops after that block;
* harvest (full model): the same hook with the forward pass run to the end (no stop_at_layer);
* full forward (logits): ``model(tokens)``, the cost of a splice-evaluation pass;
* cache build: ``get_or_build_cache`` into a temporary directory (harvest + float16 memmap writes);
* harvest bfloat16 (stop_at_layer): the same harvest with the model's weights in bfloat16
  (``CacheSpec.model_dtype``), with its speed ratio and the relative error of its activations
  against the float32 harvest of the same windows (||a_bf16 - a_fp32|| / ||a_fp32||), over all rows
  and over the rows under 10x the median norm (chapter 2 drops the massive-activation rest).

SmolLM2-135M (30 layers) is read at blocks.15.hook_resid_post (stop_at_layer=16); the organism is
``--organism`` ('cpu': 4 layers, blocks.1.hook_resid_post; 'ci': 2 layers, blocks.0.hook_resid_post;
by default 'cpu' if it has been trained into the cache, else 'ci', from the cache or trained into a
temporary directory).

Each row runs at every ``--threads`` count. On a machine whose cores are shared with other busy
processes, OpenMP's default spin-waiting makes 2 threads up to ~50x slower than 1; run with
``OMP_WAIT_POLICY=PASSIVE`` (printed below) to avoid that.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from saelib.core.hooks import stop_layer
from saelib.subjects.activations import CacheSpec, at_precision, get_or_build_cache, harvest, token_windows
from saelib.subjects.language_models import load_subject_model, organism_dir, train_organism


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def drain(model, hook: str, windows: torch.Tensor, batch: int, stop: bool) -> None:
    if stop:
        harvest(model, [hook], windows, batch, progress=False)
        return
    with torch.no_grad():
        for lo in range(0, len(windows), batch):
            model.run_with_cache(windows[lo:lo + batch], names_filter=[hook])


def full_forward(model, windows: torch.Tensor, batch: int) -> None:
    with torch.no_grad():
        for lo in range(0, len(windows), batch):
            model(windows[lo:lo + batch])


def bench_model(name: str, hook: str, a: argparse.Namespace) -> list[dict]:
    model = load_subject_model(name)
    ctx = min(a.context, model.cfg.n_ctx)
    windows = token_windows(model.tokenizer, "mixed", a.batch * a.batches, ctx)
    full_forward(model, windows[: a.batch], a.batch)  # warm-up
    low = at_precision(model, "bfloat16")
    full_forward(low, windows[: a.batch], a.batch)
    n = windows.numel()
    label = model.cfg.model_name if Path(name).is_dir() else name
    base = {"model": label, "hook": hook, "batch": a.batch, "context": ctx, "tokens": n}
    rows = []
    for threads in a.threads:
        torch.set_num_threads(threads)
        row = {**base, "threads": threads}
        rows += [
            {**row, "what": f"harvest (stop_at_layer={stop_layer(model, [hook])})",
             "tokens_per_s": n / seconds(lambda: drain(model, hook, windows, a.batch, True))},
            {**row, "what": "harvest (full model)",
             "tokens_per_s": n / seconds(lambda: drain(model, hook, windows, a.batch, False))},
            {**row, "what": "full forward (logits)",
             "tokens_per_s": n / seconds(lambda: full_forward(model, windows, a.batch))},
        ]
        with tempfile.TemporaryDirectory() as tmp:
            spec = CacheSpec(name, hook, n_tokens=len(windows) * (ctx - 1), context_size=ctx, batch_size=a.batch)
            cache = get_or_build_cache(spec, root=tmp, model=model, progress=False)
            rows.append({**row, "what": "cache build (float16)",
                         "tokens_per_s": cache.manifest["harvest_tokens_per_s"]})
        # fp32 and bf16 harvests timed alternately (drift on a shared machine hits both alike).
        fp32, bf16, acts = [], [], {}
        for _ in range(2):
            for model_, times, key in ((model, fp32, "fp32"), (low, bf16, "bf16")):
                t0 = time.perf_counter()
                acts[key] = harvest(model_, [hook], windows, a.batch, progress=False)[hook]
                times.append(time.perf_counter() - t0)
        ref, low_acts = acts["fp32"], acts["bf16"]
        rel = float((low_acts - ref).norm() / ref.norm())
        # Massive-activation rows (a few tokens at 10-100x the median norm) dominate that error;
        # chapter 2 drops rows above 10x the median norm, so report the rest on their own too.
        typical = ref.norm(dim=1) < 10 * ref.norm(dim=1).median()
        rel_typical = float((low_acts[typical] - ref[typical]).norm() / ref[typical].norm())
        rows.append({**row, "what": "harvest bfloat16 (stop_at_layer)", "tokens_per_s": n / min(bf16),
                     "vs_fp32": min(fp32) / min(bf16), "relative_error": rel,
                     "relative_error_typical_rows": rel_typical})
    return rows


def finished(organism: Path) -> bool:
    meta = organism / "organism.json"
    return meta.exists() and bool(json.loads(meta.read_text()).get("finished"))


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark with ``argv`` (the command line by default); print the table and return
    its rows."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batches", type=int, default=4, help="batches timed per row")
    p.add_argument("--threads", type=lambda v: [int(t) for t in v.split(",")], default=[1, 2],
                   help="comma-separated torch thread counts")
    p.add_argument("--skip-smollm2", action="store_true")
    p.add_argument("--organism", choices=["cpu", "ci"],
                   help="the organism profile (default: cpu if trained into the cache, else ci)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)

    load_before = os.getloadavg()[0]
    rows: list[dict] = []
    if not a.skip_smollm2:
        rows += bench_model("smollm2-135m", "blocks.15.hook_resid_post", a)
    profile = a.organism or ("cpu" if finished(organism_dir("cpu")) else "ci")
    hook = "blocks.1.hook_resid_post" if profile == "cpu" else "blocks.0.hook_resid_post"
    if finished(organism_dir(profile)):
        rows += bench_model(f"organism-{profile}", hook, a)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rows += bench_model(str(train_organism(profile, tmp, progress=False)), hook, a)

    print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, cores={os.cpu_count()}, "
          f"load average before: {load_before:.2f}, now: {os.getloadavg()[0]:.2f}")
    print(f"{'model':<16} {'hook':<26} {'batch':>5} {'ctx':>4} {'thr':>3} {'what':<32} {'tokens/s':>10}")
    for r in rows:
        extra = (f"  {r['vs_fp32']:.2f}x fp32's harvest, relative error {r['relative_error']:.2%} "
                 f"({r['relative_error_typical_rows']:.2%} on rows under 10x the median norm)"
                 if "vs_fp32" in r else "")
        print(f"{r['model']:<16} {r['hook']:<26} {r['batch']:>5} {r['context']:>4} {r['threads']:>3} {r['what']:<32} "
              f"{r['tokens_per_s']:>10,.0f}{extra}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
