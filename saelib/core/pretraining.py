"""The one pretraining loop of the models the book trains itself: the organism, the ViT, deep prompts.

The caller passes the model and ``batch_loss``, a closure from row indices to the scalar loss of
that batch (the data stays with the caller); ``pretrain`` owns the rest: AdamW (or SGD with momentum)
with weight-decayed and undecayed parameter groups, a warm-up + cosine learning rate (``PretrainConfig.lr_at``), the
seeded batch order (``PretrainConfig.batch``), gradient clipping, optional bfloat16 autocast,
evaluations at given steps, the history, the progress bar and the resume state.

The contract is the SAE trainer's (``saelib.core.training``): batch ``step`` and its learning rate
are pure functions of the config and the step, so a run stopped at any step (a kill, or
``stop_at_step``) and resumed from its last resume state reproduces the uninterrupted run's weights
bit for bit; every file is written atomically, so a kill at any moment leaves a usable state.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from saelib.core import seeding
from saelib.core.checkpoints import check_same_config
from saelib.core.progress import bar as progress_bar
from saelib.core.storage import atomic_json, atomic_save, read_json
from saelib.core.validate import check

__all__ = ["PretrainConfig", "PretrainResult", "pretrain", "clear_resume", "read_record", "RESUME_FILE"]

RESUME_FILE = "resume.pt"


@dataclass(frozen=True)
class PretrainConfig:
    """How to pretrain: the schedule, the batch order, the optimizer and the records."""

    steps: int
    """Optimizer steps of the whole run."""
    batch_size: int
    lr: float
    """Peak learning rate, reached at the end of the warm-up."""
    stream: str
    """The ``seeding`` purpose of the batch order (``"organism_data_order"``, ...): epoch ``e``
    is a permutation from the sub-stream ``"<stream>:<e>"``."""
    warmup_steps: int = 0
    """Warm-up: step s < warmup_steps has lr * (s + 1) / warmup_steps, or ``warmup_lr``."""
    warmup_lr: float = 0.0
    """Above 0: every warm-up step runs at this constant learning rate instead of the linear ramp
    (Dassl's "constant" warm-up, which MaPLe uses: its first epoch at 1e-5)."""
    final_lr_frac: float = 0.0
    """The cosine decays from lr to final_lr_frac * lr, reached at step ``steps``."""
    float32_cosine: bool = False
    """Evaluate the cosine in float32 (torch) rather than float64 (math): the deep prompts' runs
    were made that way and their cached results stay valid only with it."""
    wrap_epochs: bool = False
    """True: the epochs' permutations are read as one stream, a batch that crosses an epoch's end
    continuing into the next one (every row is seen once per epoch; the organism's order). False:
    ``n_rows // batch_size`` batches per epoch, the remainder left out (the ViT's and the prompts'
    order); a batch larger than the data is the whole epoch."""
    seed: int = 0
    """Seed of the batch order (the model's initial weights are the caller's)."""
    optimizer: str = "adamw"
    """``"adamw"`` or ``"sgd"`` (torch's SGD with ``momentum``, MaPLe's optimizer)."""
    weight_decay: float = 0.0
    """Weight decay of the parameters ``pretrain``'s ``decays`` selects: AdamW's decoupled decay,
    or SGD's L2 term added to the gradient (as torch and Dassl apply it)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's betas (unused by SGD)."""
    momentum: float = 0.9
    """SGD's momentum (unused by AdamW)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm of the trained parameters to this (0 disables)."""
    precision: str = "float32"
    """The forward pass (``batch_loss``): float32, or bfloat16 under torch.autocast (weights,
    gradients and optimizer stay float32)."""
    log_every: int = 10
    """A history row every this many steps, and at the last step."""
    resume_every: int = 100
    """A resume state every this many steps, and where the call stops. The only field a resumed
    run may change: it decides when states are written, never what is computed."""
    unit: str = "rows"
    """What a row is, for the history's ``<unit>_seen`` and ``<unit>_per_s`` (tokens, images)."""
    units_per_row: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))  # JSON round-trips tuples as lists
        for name in ("steps", "batch_size", "log_every", "resume_every", "units_per_row"):
            check(self, name, lambda v: v > 0, "must be positive")
        check(self, "precision", lambda v: v in ("float32", "bfloat16"), "must be 'float32' or 'bfloat16'")
        check(self, "optimizer", lambda v: v in ("adamw", "sgd"), "must be 'adamw' or 'sgd'")
        seeding.derived_seed(self.stream, self.seed)  # refuses an unknown stream now, not at step 0

    def lr_at(self, step: int) -> float:
        """Learning rate of step ``step`` (0-based): linear warm-up, then a cosine to the floor."""
        if step < self.warmup_steps:
            return self.warmup_lr if self.warmup_lr > 0 else self.lr * (step + 1) / self.warmup_steps
        frac = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        # The prompts' old loop took the float32 cosine of pi * step / steps; this angle rounds to
        # the same float32 for every step of every run up to 5,000 steps (checked exhaustively).
        angle = math.pi * min(1.0, frac)
        cosine = torch.cos(torch.tensor(angle)).item() if self.float32_cosine else math.cos(angle)
        return self.lr * (self.final_lr_frac + (1 - self.final_lr_frac) * 0.5 * (1 + cosine))

    def batch(self, step: int, n_rows: int) -> Tensor:
        """Row indices of batch ``step`` out of ``n_rows``: a pure function of (stream, seed, step)."""
        if not self.wrap_epochs:
            epoch, i = divmod(step, max(1, n_rows // self.batch_size))
            return _epoch_permutation(n_rows, self.stream, self.seed, epoch)[
                i * self.batch_size:(i + 1) * self.batch_size]
        epoch, offset = divmod(step * self.batch_size, n_rows)
        parts, need = [], self.batch_size
        while need:
            part = _epoch_permutation(n_rows, self.stream, self.seed, epoch)[offset:offset + need]
            parts.append(part)
            need -= len(part)
            epoch, offset = epoch + 1, 0
        return torch.cat(parts)


@functools.lru_cache(maxsize=2)
def _epoch_permutation(n_rows: int, stream: str, seed: int, epoch: int) -> Tensor:
    # Cached: consecutive batches read one epoch's permutation (callers only index it).
    return torch.randperm(n_rows, generator=seeding.generator(f"{stream}:{epoch}", seed))


@dataclass
class PretrainResult:
    step: int
    """The step the call stopped at (``steps`` when finished)."""
    history: list[dict]
    """Rows in order. Every ``log_every`` steps and at the last: step, loss (that step's),
    mean_loss (the mean over the steps since the previous row), lr (of that step), <unit>_seen,
    <unit>_per_s, elapsed_s. At each evaluation step: step, the evaluation's fields, elapsed_s."""
    elapsed_s: float
    """Seconds spent in training steps (evaluations and saving excluded), over every call."""
    finished: bool


def _default_decays(name: str, param: Tensor) -> bool:
    return param.dim() >= 2


def pretrain(model: nn.Module, batch_loss: Callable[[Tensor], Tensor], n_rows: int, cfg: PretrainConfig, *,
             out_dir: str | Path | None = None, decays: Callable[[str, Tensor], bool] = _default_decays,
             evaluate: Callable[[int], dict] | None = None, eval_steps: Iterable[int] = (),
             stop_at_step: int | None = None, progress: bool = True, desc: str = "pretraining") -> PretrainResult:
    """Train ``model``'s parameters that require gradients on ``n_rows`` rows of data.

    ``batch_loss(idx)`` returns the scalar loss of the rows ``idx`` (``cfg.batch``); the model's
    train/eval mode is the caller's. ``decays(name, param)`` picks the weight-decayed parameters
    (default: matrices). ``evaluate(step)`` runs after step ``step`` for every step in
    ``eval_steps`` (0: before training) and returns the fields of its history row, e.g. a
    validation loss; it may save a snapshot of the weights.

    With ``out_dir``, a resume state (``out_dir/resume.pt``: weights, optimizer, step, history)
    and ``out_dir/history.json`` are written every ``cfg.resume_every`` steps and where the call
    stops; calling again with the same arguments continues from it (a state written under another
    config is refused), a finished state returns at once. ``stop_at_step`` ends the call early
    there, as a kill would. The state stays after the last step until ``clear_resume``, so the
    caller writes its final files first."""
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("pretrain: the model has no parameter that requires a gradient")
    device = params[0][1].device
    groups = [{"params": [p for name, p in params if decays(name, p)], "weight_decay": cfg.weight_decay},
              {"params": [p for name, p in params if not decays(name, p)], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    opt = (torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas) if cfg.optimizer == "adamw"
           else torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum))
    trained = [p for _, p in params]  # the model's order: the clipped norm sums in it
    config = _config_dict(cfg)

    step, history, elapsed = 0, [], 0.0
    losses: list[float] = []  # the steps' losses since the last history row (its mean_loss)
    resume = Path(out_dir) / RESUME_FILE if out_dir is not None else None
    if resume is not None and resume.exists():
        state = torch.load(resume, map_location=device, weights_only=False)
        # A state without a config (written before this loop) is refused like a different one.
        check_same_config(config, state.get("config", {}), what=f"the resume state {resume}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, history, elapsed, losses = state["step"], state["history"], state["elapsed_s"], state["losses"]
    eval_at = set(eval_steps)
    last = cfg.steps if stop_at_step is None else min(cfg.steps, stop_at_step)
    timed_from, elapsed_from = step, elapsed  # the interval of the next row's <unit>_per_s

    def save() -> None:
        atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                     "history": history, "elapsed_s": elapsed, "losses": losses, "config": config}, resume)
        atomic_json(history, Path(out_dir) / "history.json")

    def after_step() -> None:
        # What happens once the model has taken `step` steps; a resume state is written after it.
        if evaluate is not None and step in eval_at:
            history.append({"step": step, **evaluate(step), "elapsed_s": elapsed})
        if resume is not None and step > 0 and (step % cfg.resume_every == 0 or step == last):
            save()

    if step == 0:
        after_step()  # a resumed run did its first step's before its state was written
    bar = progress_bar(total=cfg.steps, initial=step, desc=desc, show=progress)
    while step < last:
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bfloat16"):
            loss = batch_loss(cfg.batch(step, n_rows))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        elapsed += time.perf_counter() - t0
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            seen = step * cfg.batch_size * cfg.units_per_row
            rate = (step - timed_from) * cfg.batch_size * cfg.units_per_row / max(elapsed - elapsed_from, 1e-9)
            history.append({"step": step, "loss": losses[-1], "mean_loss": sum(losses) / len(losses),
                            "lr": cfg.lr_at(step - 1), f"{cfg.unit}_seen": seen, f"{cfg.unit}_per_s": rate,
                            "elapsed_s": elapsed})
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            losses, timed_from, elapsed_from = [], step, elapsed
        after_step()
    bar.close()
    return PretrainResult(step, history, elapsed, step >= cfg.steps)


def read_record(path: Path, identity: dict, what: str) -> dict | None:
    """The record a pretrained model keeps beside its weights (``organism.json``, ``vit.json``):
    None before the first run; refused, naming each differing field, when it was written for
    another ``identity`` (the fields that determine the weights: config, data); ``DamagedError``
    when it cannot be read."""
    if not path.exists():
        return None
    record = read_json(path, f"delete {path.parent} and rerun to train it again")
    check_same_config(identity, {key: record.get(key) for key in identity}, what=what)
    return record


def clear_resume(out_dir: str | Path) -> None:
    """Delete a finished run's resume state (once the caller's final files are written)."""
    (Path(out_dir) / RESUME_FILE).unlink(missing_ok=True)


def _config_dict(cfg: PretrainConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["betas"] = list(d["betas"])
    del d["resume_every"]
    return d
