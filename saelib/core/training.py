"""Train one or more SAEs on the same stream of activations, with checkpoints and exact resume.

The data is a *table* of activations: anything with ``len(table)`` rows and ``table[idx]`` returning
a float tensor [len(idx), d_in] for a LongTensor of row indices (a torch Tensor in memory, or
``saelib.subjects.activations.ActivationCache`` on disk). The trainer shuffles by index with a seeded
permutation per epoch, so batch ``step`` is a pure function of (seed, step): a run resumed from a
checkpoint sees exactly the batches an uninterrupted run would, and reproduces its weights.

Data-parallel (under torchrun, see saelib.core.distributed): each rank reads its own contiguous slice of
every global batch, gradients are summed over ranks (each rank's loss is its share of the global
loss), batch-level rules allocate over the global batch, and rank 0 alone writes checkpoints.
Batches are defined globally, so a run can resume with a different number of ranks.

What each SAE minimises is its *objective* (``saelib.core.objectives``): saelib's reconstruction loss by
default, or one of Braun et al.'s local / e2e / e2e+ds, which read windows of activations
(``saelib.subjects.activations.WindowTable``: a row is a window, ``tokens_per_row`` tokens for the SAE).
SAEs of one run may have different objectives; they see the same batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Protocol

import pandas as pd
import torch
from torch import Tensor

from saelib.core import checkpoints as ckpt
from saelib.core import distributed, seeding, storage
from saelib.core.allocation import get_rule
from saelib.core.losses import dead_weights, zipf_shortfall_weights
from saelib.core.objectives import Objective, Reconstruction, token_rows
from saelib.core.progress import bar as progress_bar
from saelib.core.sae import SAE, SAEConfig
from saelib.core.validate import check, integer, real

SCHEDULES = ("linear", "cosine")


class ActivationTable(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, idx: Tensor) -> Tensor: ...


class NonFiniteError(FloatingPointError):
    """NaN or inf in a batch of activations or in a loss."""


@dataclass
class TrainConfig:
    """How to train (shared by every SAE of one run). Saved with checkpoints and checked on resume."""

    steps: int
    """Optimizer steps; tokens seen = steps * batch_size (* the table's tokens_per_row)."""
    batch_size: int = 4096
    """Rows per step (the global batch when data-parallel): tokens, or windows of a WindowTable."""
    lr: float = 4e-4
    """Peak Adam learning rate."""
    warmup_steps: int = 100
    """Linear warm-up from 0 to lr."""
    decay_start: float = 0.8
    """Fraction of training after which lr decays linearly to min_lr_frac * lr at the last step
    (schedule linear)."""
    schedule: str = "linear"
    """After the warm-up: linear (hold lr, then decay linearly from decay_start) or cosine (Braun et
    al.'s: a half cosine from lr at the end of warm-up to min_lr_frac * lr at the last step;
    decay_start unused). Left out of the saved config when linear, so earlier runs keep their keys."""
    min_lr_frac: float = 0.1
    """Final learning rate as a fraction of lr."""
    grad_clip: float = 1.0
    """Clip the global gradient norm of each SAE to this (0 disables)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam's beta1, beta2."""
    init_tokens: int = 16384
    """Sample (in tokens) used for the input scale and the geometric-median b_dec."""
    log_every: int = 50
    """Record metrics every this many steps (and after the first and the last step)."""
    checkpoint_every: int = 1000
    """Write a checkpoint every this many steps (and at the last step), when out_dir is set."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep."""
    seed: int = 0
    """Seed of the data order."""
    snapshot_steps: tuple[int, ...] = ()
    """Steps after which every SAE is also saved, weights only, to out_dir/snapshots/step_N/NAME
    (never pruned): one long run then gives the SAEs at several training lengths (``snapshots``).
    Left out of the saved config while empty, so runs from before this field keep their keys."""

    def __post_init__(self) -> None:
        self.adam_betas = tuple(self.adam_betas)  # JSON round-trips tuples as lists
        self.snapshot_steps = tuple(sorted({int(s) for s in self.snapshot_steps}))
        for name in ("steps", "batch_size", "init_tokens", "log_every", "checkpoint_every", "keep_checkpoints"):
            check(self, name, integer(1), "must be an integer >= 1")
        check(self, "lr", real(0, low_open=True), "must be a finite number > 0")
        check(self, "warmup_steps", integer(0), "must be an integer >= 0")
        check(self, "decay_start", real(0, 1), "must be a fraction of training in [0, 1]")
        check(self, "schedule", lambda v: v in SCHEDULES, f"unknown schedule; valid: {list(SCHEDULES)}")
        check(self, "min_lr_frac", real(0, 1), "must be a fraction of lr in [0, 1]")
        check(self, "grad_clip", real(0), "must be a finite number >= 0 (0 disables clipping)")
        check(self, "adam_betas", lambda b: len(b) == 2 and all(real(0, 1, high_open=True)(x) for x in b),
              "must be two numbers in [0, 1)")
        check(self, "seed", integer(0), "must be an integer >= 0")
        bad = [s for s in self.snapshot_steps if not 0 < s <= self.steps]
        if bad:
            raise ValueError(f"TrainConfig.snapshot_steps {bad} are outside 1..steps={self.steps}")

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "cosine":
            frac = (step - self.warmup_steps) / max(1, self.steps - 1 - self.warmup_steps)
            return self.lr * (self.min_lr_frac + (1 - self.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))
        start = int(self.decay_start * self.steps)
        if step < start:
            return self.lr
        frac = (step - start) / max(1, self.steps - 1 - start)
        return self.lr * (1 - (1 - self.min_lr_frac) * min(1.0, frac))


@functools.lru_cache(maxsize=2)
def _epoch_permutation(n_rows: int, seed: int, epoch: int) -> Tensor:
    return torch.randperm(n_rows, generator=seeding.generator(f"data_order:{epoch}", seed))


def batch_indices(step: int, batch_size: int, n_rows: int, seed: int) -> Tensor:
    """Row indices of batch ``step``: consecutive slices of a seeded permutation per epoch
    (sorted within the batch, which makes disk reads sequential and changes nothing else)."""
    per_epoch = n_rows // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the data ({n_rows} rows)")
    epoch, i = divmod(step, per_epoch)
    return _epoch_permutation(n_rows, seed, epoch)[i * batch_size:(i + 1) * batch_size].sort().values


@dataclass
class TrainResult:
    saes: dict[str, SAE]
    history: pd.DataFrame
    """One row per (logged step, SAE): step, tokens, sae, lr, loss, nmse, l0, dead_frac, underused_frac
    (features firing at under half their Zipf target density, dead ones included), l1, aux and
    tokens_per_s (that SAE's own training speed)."""
    out_dir: Path | None

    def snapshots(self) -> dict[int, dict[str, SAE]]:
        """{step: {name: SAE}} of the run's ``snapshot_steps`` (in inference mode), read from disk."""
        if self.out_dir is None:
            raise ValueError("snapshots are saved only by runs with an out_dir (train_cached)")
        found = {}
        for folder in sorted((self.out_dir / "snapshots").glob("step_*")):
            found[int(folder.name[5:])] = {name: ckpt.load_sae(folder / name).eval()
                                           for name in self.saes}
        return found


@dataclass(frozen=True)
class Fork:
    """Continue SAEs of another run (the parent) instead of starting at step 0. ``names`` maps each
    SAE of the new run to the parent's SAE it continues (same config, same objective).

    The new run starts from the parent's newest checkpoint before which the two runs are one run:
    the same batches (batch size, data seed), the same Adam and clipping settings and the same
    learning rate at every earlier step (``TrainConfig.lr_at``; e.g. a longer run whose decay starts
    later, forked before the parent's decay). It takes that checkpoint's weights, Adam state,
    history and the snapshots up to there, so it equals the run trained from step 0 under its own
    config, bit for bit, for the cost of the steps after the fork."""

    run_dir: Path
    """The parent run's folder (``TrainResult.out_dir``); it must still hold the checkpoint."""
    names: Mapping[str, str]
    """{SAE of this run: SAE of the parent}."""


# TrainConfig fields that make two runs take the same update from the same state at a step
# (besides the learning rate, compared step by step): batches, Adam, clipping.
_SAME_UPDATE = ("batch_size", "seed", "adam_betas", "grad_clip", "init_tokens")


def fork_point(fork: Fork, saes: Mapping[str, SAEConfig], cfg: TrainConfig,
               objectives: Objective | Mapping[str, Objective] | None = None) -> Path:
    """The parent's checkpoint a run with these SAEs and ``cfg`` forks from (see ``Fork``), or a
    ``CheckpointError`` saying why there is none."""
    what = f"fork of {fork.run_dir}"
    if set(fork.names) != set(saes):
        raise ValueError(f"{what}: Fork.names must name every SAE of the new run: it names "
                         f"{sorted(fork.names)}, the run trains {sorted(saes)}")
    ours = _describe(_objectives_for(saes, objectives))
    found = ckpt.step_checkpoints(fork.run_dir)
    if not found:
        raise ckpt.CheckpointError(f"{what}: no checkpoint there; train the parent run first")
    for step in sorted(found, reverse=True):
        state = storage.read_json(found[step] / "state.json", f"delete {found[step]} or retrain the parent run")
        parent_cfg = TrainConfig(**state["train"])
        if len(state.get("schedule", ())) > 1:
            raise ckpt.CheckpointError(f"{what}: the parent was continued under a second schedule; "
                                       "fork from a run trained under one")
        for new, old in fork.names.items():
            if old not in state["saes"]:
                raise ValueError(f"{what}: the parent has no SAE {old!r}; it has {sorted(state['saes'])}")
            ckpt.check_same_config(saes[new].to_dict(), state["saes"][old], what=f"{what}: SAE {old!r}")
            ckpt.check_same_config(ours[new], state["objectives"].get(old, Reconstruction().config()),
                                   what=f"{what}: the objective of {old!r}")
        ckpt.check_same_config({k: train_config_dict(cfg)[k] for k in _SAME_UPDATE},
                               {k: train_config_dict(parent_cfg)[k] for k in _SAME_UPDATE}, what=what)
        if state.get("init_from"):
            raise ckpt.CheckpointError(f"{what}: the parent started from given weights (init_from); "
                                       "fork only from runs that start at random")
        if step <= cfg.steps and all(cfg.lr_at(t) == parent_cfg.lr_at(t) for t in range(step)):
            missing = [t for t in cfg.snapshot_steps if t <= step and not all(
                (Path(fork.run_dir) / "snapshots" / f"step_{t:08d}" / old).is_dir() for old in fork.names.values())]
            if missing:
                raise ckpt.CheckpointError(f"{what}: this run saves snapshots at steps {missing}, before its "
                                           f"fork at step {step}, and the parent saved none there; give "
                                           "both runs the same snapshot_steps up to the fork")
            return found[step]
    raise ckpt.CheckpointError(f"{what}: at none of the parent's checkpoints (steps {sorted(found)}) "
                               "did the learning rates of every earlier step agree; give the new run the "
                               "parent's warm-up, or keep an earlier checkpoint of the parent")


def _fetch(data: ActivationTable, idx: Tensor, step: int, last_good: Path | None) -> Tensor:
    x = data[idx]
    x = x if isinstance(x, Tensor) else torch.as_tensor(x)
    x = x.float()
    # Collective, so that every rank stops together rather than waiting on a stopped one.
    bad = int(distributed.all_reduce((~torch.isfinite(x)).sum()))
    if bad:
        where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
        raise NonFiniteError(f"step {step}: the batch of activations contains {bad} NaN/inf values; "
                             f"training stopped ({where}). Check the activation source (e.g. an "
                             "fp16 overflow in the model or a corrupt cache).")
    return x


def train_saes(
    saes: Mapping[str, SAEConfig],
    data: ActivationTable,
    cfg: TrainConfig,
    out_dir: str | Path | None = None,
    progress: bool = True,
    stop_at_step: int | None = None,
    device: str | torch.device = "cpu",
    init_from: Mapping[str, SAE] | None = None,
    objectives: Objective | Mapping[str, Objective] | None = None,
    fork: Fork | None = None,
) -> TrainResult:
    """Train several SAEs side by side on one activation stream.

    ``objectives``: what each SAE minimises (one for all, or one per SAE name; default
    ``saelib.core.objectives.Reconstruction``). Part of the checkpoint, so a resume under another
    objective is refused.

    ``init_from`` starts the named SAEs from given weights instead of the random initialisation
    (the others start as usual), e.g. SAE-Track's chain, where the SAE of each model checkpoint
    continues from the previous checkpoint's (see ``initial_saes``).

    With ``out_dir``, checkpoints go to out_dir/checkpoints and the final SAEs to out_dir/saes/NAME;
    calling again with the same arguments resumes from the newest checkpoint (a checkpoint made with
    other configs is refused). ``stop_at_step`` ends the call early after checkpointing that step,
    as a kill would (used to test resume). ``device`` is where the SAEs train; batches are read on
    the CPU and moved there.

    ``cfg.steps`` larger than a finished (or interrupted) run's continues it from its newest
    checkpoint under the new schedule (``TrainConfig.lr_at`` of the new ``steps``) when nothing else
    changed; the history's ``schedule_steps`` column and state.json's ``schedule`` say which steps
    ran under which.

    While it runs, rank 0 holds ``storage.locked(out_dir)``: a second run into the same folder
    waits for the first, then resumes from (or finds) its result instead of training again.

    ``fork`` continues SAEs of a finished or running parent run from its checkpoint (``Fork``)
    instead of step 0; it needs ``out_dir`` (the parent's snapshots are copied there)."""
    if fork is not None and (out_dir is None or init_from):
        raise ValueError("a Fork needs an out_dir and no init_from (it takes the parent's weights)")
    if out_dir is None:
        return _train(saes, data, cfg, None, progress, stop_at_step, device, init_from, objectives, None)
    out_dir = Path(out_dir)
    with storage.locked(out_dir) if distributed.rank() == 0 else contextlib.nullcontext():
        distributed.barrier()  # the other ranks read checkpoints only once rank 0 holds the lock
        return _train(saes, data, cfg, out_dir, progress, stop_at_step, device, init_from, objectives, fork)


def _train(saes, data, cfg, out_dir, progress, stop_at_step, device, init_from, objectives,
           fork) -> TrainResult:
    if not saes:
        raise ValueError("train_saes needs at least one SAE config")
    rank, world = distributed.rank(), distributed.world_size()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of ranks {world}")
    n_rows = len(data)
    d_in = int(data[torch.arange(1)].shape[-1])
    for name, sae_cfg in saes.items():
        if sae_cfg.d_in != d_in:
            raise ValueError(f"SAE {name!r} has d_in={sae_cfg.d_in} but the activations have width {d_in}")
    objectives = _objectives_for(saes, objectives)
    harvested_at = getattr(data, "hook", None)  # a WindowTable records where its windows come from
    for name, objective in objectives.items():
        spliced_at = getattr(objective, "hook", None)
        if harvested_at is not None and spliced_at is not None and spliced_at != harvested_at:
            raise ValueError(f"SAE {name!r}'s objective splices into {spliced_at!r} but its windows were "
                             f"harvested at {harvested_at!r}: use the cache of {spliced_at!r}")
    tokens_per_row = getattr(data, "tokens_per_row", 1)
    models, optims, history, start, schedule = _start_or_resume(saes, data, cfg, out_dir, device, init_from,
                                                                objectives, fork)

    last_step = cfg.steps if stop_at_step is None else min(cfg.steps, stop_at_step)
    last_good = ckpt.latest_checkpoint(out_dir) if out_dir else None
    seconds = {name: 0.0 for name in models}
    tokens_timed = 0
    bar = progress_bar(range(start, last_step), initial=start, total=cfg.steps, show=progress and rank == 0,
               desc="training " + ", ".join(models), unit="step")
    for step in bar:
        idx = batch_indices(step, cfg.batch_size, n_rows, cfg.seed).chunk(world)[rank]
        x = _fetch(data, idx, step, last_good).to(device, non_blocking=True)
        lr = cfg.lr_at(step)
        record = step == 0 or (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
        tokens_timed += cfg.batch_size * tokens_per_row
        shared: dict = {}  # what objectives compute once per batch (e2e: the clean model run)
        for name, sae in models.items():
            t0 = time.perf_counter()
            row = _train_step(sae, optims[name], x, objectives[name], shared, lr, cfg.grad_clip, step, name)
            seconds[name] += time.perf_counter() - t0
            if record:
                row.update(step=step + 1, tokens=(step + 1) * cfg.batch_size * tokens_per_row, sae=name, lr=lr,
                           tokens_per_s=tokens_timed / max(seconds[name], 1e-9), schedule_steps=cfg.steps)
                history.append(row)
        if record:
            bar.set_postfix_str(_postfix(history[-len(models):]), refresh=False)  # tqdm's own rate limit
            tokens_timed, seconds = 0, {name: 0.0 for name in models}
        # Before the checkpoint: a run killed between the two redoes this step on resume.
        if out_dir and rank == 0 and step + 1 in cfg.snapshot_steps:
            for name, sae in models.items():
                ckpt.save_sae(sae, out_dir / "snapshots" / f"step_{step + 1:08d}" / name)
        if out_dir and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 in (cfg.steps, last_step)):
            if rank == 0:
                _write_checkpoint(out_dir, step + 1, models, optims, saes, cfg, history, init_from, objectives,
                                  schedule)
            last_good = out_dir / "checkpoints" / f"step_{step + 1:08d}"
    bar.close()
    if out_dir and last_step == cfg.steps and rank == 0:
        for name, sae in models.items():
            ckpt.save_sae(sae, out_dir / "saes" / name)
    distributed.barrier()
    for sae in models.values():
        sae.eval()
    return TrainResult(models, pd.DataFrame(history), out_dir)


def train_cached(saes: Mapping[str, SAEConfig], data: ActivationTable, cfg: TrainConfig, data_key: object,
                 progress: bool = True, device: str | torch.device = "cpu",
                 init_from: Mapping[str, SAE] | None = None,
                 objectives: Objective | Mapping[str, Objective] | None = None,
                 fork: Fork | None = None) -> TrainResult:
    """``train_saes`` into a cache folder keyed by the configs, ``data_key`` (what identifies the
    activations, e.g. a cache manifest), the digests of any ``init_from`` weights, the objectives
    and a ``fork``'s parent checkpoint: a finished run is reloaded at once, a killed one resumes."""
    key = {"data": data_key, "train": train_config_dict(cfg), "saes": {n: c.to_dict() for n, c in saes.items()}}
    revisions = {n: get_rule(c.rule).revision for n, c in saes.items() if get_rule(c.rule).revision}
    if revisions:  # a rule whose selection changed under its name: never reuse SAEs trained before
        key["rule_revisions"] = revisions
    if init_from:
        key["init_from"] = _init_digests(init_from)
    described = _describe(_objectives_for(saes, objectives))
    if described != _describe(_objectives_for(saes, None)):  # the default keeps existing keys
        key["objectives"] = described
    if fork is not None:  # the parent's folder is itself named by its key
        at = fork_point(fork, saes, cfg, objectives)
        key["fork"] = {"run": at.parent.parent.name, "checkpoint": at.name, "names": dict(sorted(fork.names.items()))}
    return train_saes(saes, data, cfg, out_dir=storage.artifact_dir("saes", key), progress=progress,
                      device=device, init_from=init_from, objectives=objectives, fork=fork)


def _objectives_for(saes: Mapping[str, SAEConfig], objectives) -> dict[str, Objective]:
    if objectives is None or hasattr(objectives, "loss"):
        return {name: objectives or Reconstruction() for name in saes}
    missing, unknown = sorted(set(saes) - set(objectives)), sorted(set(objectives) - set(saes))
    if missing or unknown:
        raise ValueError(f"objectives must name every SAE trained: missing {missing}, not trained {unknown}")
    return dict(objectives)


def _describe(objectives: Mapping[str, Objective]) -> dict[str, dict]:
    return {name: obj.config() for name, obj in sorted(objectives.items())}


def _train_step(sae: SAE, opt: torch.optim.Optimizer, x: Tensor, objective: Objective, shared: dict,
                lr: float, clip: float, step: int, name: str) -> dict:
    terms, out = objective.loss(sae, x, shared)
    if not torch.isfinite(terms.total):
        raise NonFiniteError(f"step {step}: SAE {name!r} has a non-finite loss ({terms.total.item()}); "
                             "try a lower learning rate")
    opt.zero_grad(set_to_none=True)
    terms.total.backward()
    for p in sae.parameters():
        distributed.all_reduce(p.grad)
    sae.remove_parallel_decoder_grad()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), clip)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    sae.normalize_decoder()
    # Loss terms are this rank's shares of the global-batch values: sum them over ranks.
    totals = torch.stack([terms.total, terms.nmse, terms.l1, terms.aux,
                          terms.nmse.new_tensor(out.codes.values.numel())]).detach()
    loss, recon, sparsity, aux, kept = distributed.all_reduce(totals).tolist()
    row = {"loss": loss, "nmse": recon, "l1": sparsity, "aux": aux,
           "l0": kept / (out.codes.shape[0] * distributed.world_size()),
           "dead_frac": dead_weights(sae).mean().item(),
           "underused_frac": (zipf_shortfall_weights(sae) > 0.5).float().mean().item()}
    for extra in ("kl", "downstream"):  # the e2e objectives' terms
        if getattr(terms, extra) is not None:
            row[extra] = distributed.all_reduce(getattr(terms, extra).clone()).item()
    return row


def _postfix(rows: list[dict]) -> str:
    return " | ".join(f"{r['sae']}: nmse {r['nmse']:.3f} L0 {r['l0']:.1f} dead {100 * r['dead_frac']:.1f}%"
                      for r in rows[:3])


def _new_optimizer(sae: SAE, cfg: TrainConfig) -> torch.optim.Optimizer:
    # fused: one kernel per step for all parameters instead of ~10 elementwise passes each.
    return torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=cfg.adam_betas, fused=True)


def stepper(sae: SAE, cfg: TrainConfig, objective: Objective | None = None) -> Callable[[Tensor], dict]:
    """``step(x) -> row``: one optimizer step of ``sae`` on the batch ``x`` [rows, d_in], taken exactly
    as ``train_saes`` takes it (its Adam, the learning rate ``cfg.lr_at`` of the step's index,
    gradient clipping, decoder normalisation, gradients all-reduced under torchrun), without the
    batch reads, logging and checkpoints around it; ``row`` holds the step's losses (``loss``,
    ``nmse``, ``l0``, ``dead_frac``, ...). For timing one step at a time (bench/bench_train.py):
    training itself is ``train_saes``'s. ``sae`` starts as given (e.g. from ``initial_saes``) and
    trains in place."""
    sae.train()
    opt = _new_optimizer(sae, cfg)
    objective = objective or Reconstruction()
    index = itertools.count()

    def step(x: Tensor) -> dict:
        i = next(index)
        return _train_step(sae, opt, x, objective, {}, cfg.lr_at(i), cfg.grad_clip, i, "stepper")

    return step


def initial_saes(saes: Mapping[str, SAEConfig], data: ActivationTable, cfg: TrainConfig,
                 device: str | torch.device = "cpu",
                 init_from: Mapping[str, SAE] | None = None) -> dict[str, SAE]:
    """The SAEs exactly as ``train_saes`` starts them (step 0): random weights from each config's
    seed, input scale and geometric-median b_dec from a seeded sample of ``cfg.init_tokens`` rows.
    What "before training" means wherever the book compares a result with its starting point.

    An SAE named in ``init_from`` instead copies that SAE's parameters and running statistics (its
    config must be the same) and keeps only the input scale measured on ``data``: the scale belongs
    to the activations (a model's residual norm grows during training), the learned weights act in
    the normalised units, so they carry over to the new data unchanged."""
    init_from = dict(init_from or {})
    unknown = sorted(set(init_from) - set(saes))
    if unknown:
        raise ValueError(f"init_from names SAEs that are not being trained: {unknown}; training {list(saes)}")
    n_rows = len(data)
    n_init = -(-cfg.init_tokens // getattr(data, "tokens_per_row", 1))  # rows holding init_tokens tokens
    init_idx = torch.randperm(n_rows, generator=seeding.generator("init_sample", cfg.seed))[:n_init]
    sample = token_rows(_fetch(data, init_idx.sort().values, 0, None)).to(device)
    models = {}
    for name, sae_cfg in saes.items():
        models[name] = SAE(sae_cfg).to(device)
        models[name].init_from_sample(sample)
        if name in init_from:
            _copy_weights(init_from[name], models[name], name)
    return models


@torch.no_grad()
def _copy_weights(source: SAE, target: SAE, name: str) -> None:
    ckpt.check_same_config(target.cfg.to_dict(), source.cfg.to_dict(), what=f"init_from[{name!r}]")
    scale = target.input_scale.clone()
    target.load_state_dict({k: v.detach().clone() for k, v in source.state_dict().items()})
    target.input_scale.copy_(scale)


def _init_digests(init_from: Mapping[str, SAE]) -> dict[str, str]:
    """A short hash of each SAE's weights and statistics: what ``init_from`` adds to a cache key."""
    return {name: ckpt.sae_digest(sae) for name, sae in sorted(init_from.items())}


def _start_or_resume(saes, data, cfg, out_dir, device, init_from, objectives, fork):
    latest = ckpt.latest_checkpoint(out_dir) if out_dir else None
    if latest is None and fork is not None:
        return _start_from_fork(saes, cfg, out_dir, device, objectives, fork)
    if latest is None:
        models = initial_saes(saes, data, cfg, device, init_from)
        optims = {name: _new_optimizer(m, cfg) for name, m in models.items()}
        return models, optims, [], 0, [{"from_step": 0, "steps": cfg.steps}]
    advice = (f"delete {latest} to resume from the checkpoint before it, or delete {out_dir} to train "
              "from scratch")
    storage.verify(latest, advice)
    state = storage.read_json(latest / "state.json", advice)
    what = f"checkpoint {latest}"
    saved_train = dict(state["train"])
    schedule = state.get("schedule", [{"from_step": 0, "steps": saved_train["steps"]}])
    if saved_train["steps"] != cfg.steps and {**saved_train, "steps": cfg.steps} == train_config_dict(cfg):
        if cfg.steps < state["step"]:
            raise ckpt.CheckpointError(f"{what} is at step {state['step']}, past train.steps={cfg.steps}: use "
                                       f"steps >= {state['step']} to continue it, or another output folder")
        schedule = [*schedule, {"from_step": state["step"], "steps": cfg.steps}]  # continue training
        saved_train["steps"] = cfg.steps
    ckpt.check_same_config(train_config_dict(cfg), saved_train, what=what)
    ckpt.check_same_config({n: c.to_dict() for n, c in saes.items()}, state["saes"], what=what)
    ckpt.check_same_config({"init_from": _init_digests(init_from or {})},
                           {"init_from": state.get("init_from", {})}, what=what)
    default = _describe(_objectives_for(saes, None))  # checkpoints from before objectives existed
    ckpt.check_same_config({"objectives": _describe(objectives)},
                           {"objectives": state.get("objectives", default)}, what=what)
    models, optims = {}, {}
    for name, sae_cfg in saes.items():
        models[name] = ckpt.load_sae(latest / name, expected=sae_cfg, advice=advice).to(device)
        optims[name] = _new_optimizer(models[name], cfg)
        ckpt.load_optimizer(optims[name], latest / f"{name}.adam.safetensors", advice)
    for sae in models.values():
        sae.train()
    return models, optims, state["history"], state["step"], schedule


def _start_from_fork(saes, cfg, out_dir, device, objectives, fork):
    at = fork_point(fork, saes, cfg, objectives)
    advice = f"delete {at} or retrain the parent run {fork.run_dir}"
    storage.verify(at, advice)
    state = storage.read_json(at / "state.json", advice)
    step = state["step"]
    models, optims = {}, {}
    for new, old in fork.names.items():
        models[new] = ckpt.load_sae(at / old, expected=saes[new], advice=advice).to(device).train()
        optims[new] = _new_optimizer(models[new], cfg)
        ckpt.load_optimizer(optims[new], at / f"{old}.adam.safetensors", advice)
    parent_of = {old: new for new, old in fork.names.items()}
    history = [{**row, "sae": parent_of[row["sae"]]} for row in state["history"] if row["sae"] in parent_of]
    # The parent's snapshots up to the fork are this run's: the same SAEs at the same steps.
    for folder in sorted((Path(fork.run_dir) / "snapshots").glob("step_*")):
        s = int(folder.name[5:])
        if s <= step and s in cfg.snapshot_steps:
            for new, old in fork.names.items():
                ckpt.save_sae(ckpt.load_sae(folder / old, advice=advice), out_dir / "snapshots" / folder.name / new)
    schedule = [{"from_step": 0, "steps": cfg.steps, "forked_from": f"{Path(fork.run_dir).name}/{at.name}"}]
    return models, optims, history, step, schedule


def train_config_dict(cfg: TrainConfig) -> dict:
    """``cfg`` as saved in checkpoints, cache keys and `saelib train`'s config.json."""
    d = dataclasses.asdict(cfg)
    d["adam_betas"] = list(d["adam_betas"])
    d["snapshot_steps"] = list(d["snapshot_steps"])
    if not d["snapshot_steps"]:
        del d["snapshot_steps"]  # so the keys of runs made before the field stay the same
    if d["schedule"] == "linear":
        del d["schedule"]
    return d


def _write_checkpoint(out_dir, step, models, optims, saes, cfg, history, init_from, objectives, schedule) -> Path:
    final = out_dir / "checkpoints" / f"step_{step:08d}"
    tmp = storage.atomic_dir(final)
    for name, sae in models.items():
        ckpt.write_sae(sae, tmp / name)
        ckpt.save_optimizer(optims[name], tmp / f"{name}.adam.safetensors")
    state = {"step": step, "train": train_config_dict(cfg), "saes": {n: c.to_dict() for n, c in saes.items()},
             "init_from": _init_digests(init_from or {}), "objectives": _describe(objectives),
             "history": history}
    if len(schedule) > 1 or "forked_from" in schedule[0]:  # only continued or forked runs
        state["schedule"] = schedule
    (tmp / "state.json").write_text(json.dumps(state))
    storage.commit_dir(tmp, final)
    ckpt.prune_checkpoints(out_dir, cfg.keep_checkpoints)
    storage.atomic_text(pd.DataFrame(history).to_csv(index=False), out_dir / "history.csv")
    return final
