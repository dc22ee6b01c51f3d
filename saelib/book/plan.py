"""What a chapter's ``gpu`` run will cost, printed before it starts, and a refusal when it cannot fit.

``plan(chapter, P)`` counts from a chapter's knobs: the tokens the subject model reads, the activation
cache on disk, the SAE training tokens, peak GPU and CPU memory, and the compute in FLOPs; ``hours``
divides the compute by an assumed sustained throughput of a Colab T4 and an A100. The model's sizes
are its published ones (``SUBJECTS``) or, with ``model=`` a loaded subject model, its own counts
(``counts``): the one estimator, which the pre-flight check prints before a gpu chapter starts and
chapters 3 and 5 show again for the model they loaded. These are
estimates (no gpu profile has run on a GPU yet): FLOPs are 2 per multiply-add, a subject model's
forward pass is 2 x its parameters per token, an SAE step 6 x d_in x d_sae per token for a TopK-style
rule (encoder forward and backward; the sparse decoder is small) and 12 x for a dense ReLU SAE.
``check`` refuses, with the numbers, when this machine's disk (at the cache), GPU or CPU memory is
smaller than the plan; ``announce`` does both and is what ``profiles.resolve`` calls for the gpu
profiles, so the plan is printed by every route into a chapter (the runner, papermill, Colab).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from saelib.core.training import TrainConfig

__all__ = ["SubjectSpec", "SUBJECTS", "GPUS", "Plan", "PlanError", "NoPublishedSizes", "counts", "plan",
           "announce", "machine"]

GB = 1e9


@dataclass(frozen=True)
class SubjectSpec:
    """The sizes of a subject model the plan needs."""

    params: float
    """Parameters (embeddings included: the unembedding costs as much as a layer or more)."""
    d_model: int
    """Width of the residual stream the SAEs read."""
    n_layers: int
    tokens_per_item: int = 1
    """Tokens per item for models that read images (patches + CLS); 1 for language models."""
    item_bytes: int = 0
    """CPU memory of one input image as the chapter holds it (0 for language models)."""


SUBJECTS: dict[str, SubjectSpec] = {
    "gpt2-small": SubjectSpec(124e6, 768, 12),
    "pythia-70m-deduped": SubjectSpec(70e6, 512, 6),
    "smollm2-135m": SubjectSpec(135e6, 576, 30),
    "clip-vit-b-16": SubjectSpec(86e6, 768, 12, tokens_per_item=197, item_bytes=3 * 224 * 224),  # uint8 RGB
}
"""Published sizes of the models the gpu profiles name."""

GPUS: dict[str, dict[str, float]] = {
    # Sustained rates assumed for SAE training and hooked forwards, about a third of the peak
    # tensor-core rate of the dtype (T4: 65 TFLOP/s fp16 peak, no bf16 units; A100: 312 bf16).
    "T4": {"flops": 20e12, "memory": 15 * GB},
    "A100": {"flops": 100e12, "memory": 40 * GB},
}
"""Assumed sustained FLOP/s and usable memory of the two GPUs the README plans for."""


class PlanError(RuntimeError):
    """A run that this machine cannot hold; the message gives the plan's and the machine's numbers."""


class NoPublishedSizes(ValueError):
    """A subject model whose sizes ``SUBJECTS`` does not hold (the book's organisms and ViTs, a
    mistyped hub name): plan from the loaded model (``plan(..., model=)``) instead."""


@dataclass(frozen=True)
class Plan:
    """What one chapter's run costs (see the module docstring for how each number is counted)."""

    chapter: str
    subject_tokens: float
    """Tokens (or patches) the subject model reads: harvest, evaluation and e2e runs."""
    sae_tokens: float
    """Training tokens summed over every SAE the chapter trains."""
    cache_bytes: float
    """Activation caches on disk (fp16/bf16 rows)."""
    gpu_bytes: float
    """Peak GPU memory: the model, the largest SAE with its gradient and Adam moments, one batch."""
    cpu_bytes: float
    """Peak CPU memory: the model as loaded, one batch of rows and evaluation state (the caches are
    memory-mapped, so the page cache, not the process, holds them)."""
    flops: float

    def hours(self, gpu: str) -> float:
        return self.flops / GPUS[gpu]["flops"] / 3600

    def lines(self) -> list[str]:
        fits = {g: "fits" if self.gpu_bytes <= spec["memory"] else "does NOT fit"
                for g, spec in GPUS.items()}
        return [f"plan for {self.chapter} (estimates from FLOPs; see saelib.book.plan):",
                f"  subject-model tokens {self.subject_tokens:,.0f}; SAE training tokens {self.sae_tokens:,.0f}",
                f"  activation cache on disk {self.cache_bytes / GB:.2f} GB; peak GPU memory "
                f"{self.gpu_bytes / GB:.2f} GB; peak CPU memory {self.cpu_bytes / GB:.2f} GB",
                f"  compute {self.flops:.3g} FLOPs: about {self.hours('T4'):.2f} h on a T4 "
                f"({fits['T4']}), {self.hours('A100'):.2f} h on an A100 ({fits['A100']})"]

    def check(self, disk_free: float, gpu_memory: float | None, cpu_memory: float) -> None:
        """Raise ``PlanError`` naming what does not fit (``gpu_memory=None``: no GPU to check)."""
        short = []
        if self.cache_bytes > disk_free:
            short.append(f"the activation caches need {self.cache_bytes / GB:.1f} GB of disk, "
                         f"{disk_free / GB:.1f} GB are free at the cache (set $SAELIB_CACHE elsewhere)")
        if gpu_memory is not None and self.gpu_bytes > gpu_memory:
            short.append(f"the run needs {self.gpu_bytes / GB:.1f} GB of GPU memory, the GPU has "
                         f"{gpu_memory / GB:.1f} GB (lower batch_size or expansion)")
        if self.cpu_bytes > cpu_memory:
            short.append(f"the run needs {self.cpu_bytes / GB:.1f} GB of CPU memory, this machine has "
                         f"{cpu_memory / GB:.1f} GB (lower n_tokens)")
        if short:
            raise PlanError(f"{self.chapter} cannot run here: " + "; ".join(short))


def _subject(chapter: str, name: str) -> SubjectSpec:
    if chapter == "synthetic":  # chapter 0 has no subject model: its planner reads only its knobs
        return SubjectSpec(0.0, 0, 0)
    if name not in SUBJECTS:  # the book's own organisms and ViTs: sizes known once loaded
        raise NoPublishedSizes(f"no published sizes for the {chapter} chapter's model {name!r} (known: "
                         f"{', '.join(sorted(SUBJECTS))}); pass model= a loaded model to plan from its counts")
    return SUBJECTS[name]


def counts(model: Any) -> SubjectSpec:
    """The sizes of a loaded subject model (a TransformerLens model, the book's ViT or a CLIP
    tower): its parameters, ``cfg.d_model``, ``cfg.n_layers`` and, for a vision model, its tokens
    per image (``cfg.n_tokens``: CLS + patches)."""
    cfg = model.cfg
    vision = hasattr(cfg, "image_size")  # images held as float32 at most (hub images: uint8)
    item_bytes = 4 * cfg.image_size ** 2 * getattr(cfg, "channels", 3) if vision else 0
    return SubjectSpec(float(sum(p.numel() for p in model.parameters())), int(cfg.d_model), int(cfg.n_layers),
                       tokens_per_item=int(getattr(cfg, "n_tokens", 1)), item_bytes=item_bytes)


def _build(chapter: str, P: Mapping[str, Any], *, spec: SubjectSpec, harvested: float, evaluated: float,
           saes: list[tuple[float, int, bool]], extra_flops: float = 0.0, caches: int = 1,
           d_in: int | None = None, held_bytes: float = 0.0, backward_bytes: float = 0.0,
           together: int = 1) -> Plan:
    """``saes``: (training tokens, dictionary width, dense) per SAE; ``harvested`` tokens fill
    ``caches`` caches; ``held_bytes`` of evaluation state stay in CPU memory; ``backward_bytes`` of
    the subject model's activations stay on the GPU for a backward pass (e2e); ``together`` SAEs
    train in one step (and share the GPU)."""
    d_in = d_in or spec.d_model
    subject_tokens = harvested + evaluated
    cache = 2.0 * d_in * harvested / caches
    widest = max((w for _, w, _ in saes), default=0)
    sae_state = 16.0 * 2 * d_in * widest * together  # weights, gradients, two Adam moments, fp32, both matrices
    batch = 4.0 * int(P.get("batch_size", 0)) * (widest + 4 * d_in)
    flops = 2 * spec.params * subject_tokens + extra_flops
    flops += sum((12 if dense else 6) * d_in * width * tokens for tokens, width, dense in saes)
    return Plan(chapter, subject_tokens, sum(t for t, _, _ in saes), caches * cache,
                gpu_bytes=4.0 * spec.params + sae_state + batch + backward_bytes,
                cpu_bytes=4.0 * spec.params + held_bytes + batch, flops=flops)


def _synthetic(P: Mapping[str, Any], spec: SubjectSpec) -> Plan:
    width = int(P["expansion"]) * int(P["n_features"])
    tokens = float(P["steps"]) * int(P["batch_size"])
    saes = [(tokens, width, name == "relu") for name in ("topk", "relu", "fc", "fc_zipf", "mc")]
    return _build("synthetic", P, spec=spec, harvested=0.0, evaluated=0.0, saes=saes, d_in=int(P["d_model"]))


def _subject_models(P: Mapping[str, Any], spec: SubjectSpec) -> Plan:
    evaluated = float(P["eval_windows"]) * int(P["context_size"])
    return _build("subject_models", P, spec=spec, harvested=0.0, evaluated=evaluated, saes=[])


def _language_sae(P: Mapping[str, Any], spec: SubjectSpec) -> tuple[int, float]:
    """Dictionary width and training tokens of one SAE of a language-model chapter."""
    return int(P["expansion"]) * spec.d_model, float(P["steps"]) * int(P["batch_size"])


def _allocation(P: Mapping[str, Any], spec: SubjectSpec) -> Plan:
    width, tokens = _language_sae(P, spec)
    n_sparse = 3 + 3 * len(P["k_sweep"])  # TopK, FC, MC at k and at each swept k
    saes = [(tokens, width, False)] * n_sparse + [(tokens, width, True)] * len(P["l1_sweep"])
    evaluated = float(P["eval_tokens"]) + 2 * len(saes) * int(P["splice_windows"]) * int(P["context_size"])
    return _build("allocation", P, spec=spec, harvested=float(P["n_tokens"]), evaluated=evaluated,
                  saes=saes)


def _allocation_scale(P: Mapping[str, Any], spec: SubjectSpec) -> Plan:
    d = spec.d_model
    batch = int(P["batch_size"])
    length = [(float(P["length_steps"]) * batch, int(P["expansion"]) * d, False)] * 4  # TopK, FC, MC, MC+zipf
    big = [(float(P["big_steps"]) * batch, int(P["big_expansion"]) * d, False)] * 4
    sanity = [(float(P["sanity_steps"]) * batch, int(P["expansion"]) * d, False)] * 2
    harvested = float(P["n_tokens"]) + float(P["sanity_tokens"])
    return _build("allocation_scale", P, spec=spec, harvested=harvested,
                  evaluated=float(P["eval_tokens"]) * 2, saes=length + big + sanity, caches=2)


def _e2e(P: Mapping[str, Any], spec: SubjectSpec) -> Plan:
    width = int(P["expansion"]) * spec.d_model
    tokens = float(P["steps"]) * int(P["batch_size"]) * int(P["context_size"])
    # the chapter's sweeps, each with a second seed at its middle lambda, the official SAE's two
    # sweeps and TopK local and e2e at each k
    n_local = len(P["l1_local"]) + 1 + len(P["official_l1_local"]) + len(P["k_sweep"])
    n_e2e = len(P["l1_e2e"]) + 1 + len(P["l1_ds"]) + 1 + len(P["official_l1_e2e"]) + len(P["k_sweep"])
    # and the matched local / e2e / e2e+ds trio trained pair_steps long in a run of its own, which
    # under the linear schedule forks from the sweep's last checkpoint before its decay
    pair_steps = int(P["pair_steps"])
    if pair_steps and P.get("schedule", "linear") == "linear":
        every = max(1, int(P["steps"]) // 4)  # the chapter's checkpoint_every
        pair_steps -= int(TrainConfig(steps=int(P["steps"])).decay_start * int(P["steps"])) // every * every
    pair = float(pair_steps) * int(P["batch_size"]) * int(P["context_size"])
    saes = [(tokens, width, True)] * (n_local + n_e2e) + [(pair, width, True)] * (3 if pair else 0)
    # an e2e step runs the model clean and spliced, and back-propagates through the spliced run
    e2e_model = (n_e2e * tokens + 2 * pair) * 2 * spec.params * 4
    evaluated = float(P["eval_tokens"]) + len(saes) * int(P["eval_windows"]) * int(P["context_size"])
    # what a backward pass through the spliced run keeps: about 34 x d_model bytes per token and layer
    # in half precision (Korthikanti et al. 2022, without the attention-score term)
    window_tokens = int(P["batch_size"]) * int(P["context_size"])
    return _build("e2e", P, spec=spec, harvested=float(P["n_tokens"]), evaluated=evaluated,
                  saes=saes, extra_flops=e2e_model, backward_bytes=34.0 * spec.d_model * window_tokens * spec.n_layers,
                  together=n_local + n_e2e)  # chapter 3 trains its sweep in one run, all SAEs on one device


def _dynamics(P: Mapping[str, Any], spec: SubjectSpec) -> Plan:
    width, tokens = _language_sae(P, spec)
    n_ckpt = len(P["checkpoints"])
    saes = [(tokens, width, False)] * (2 * n_ckpt)  # independent and tracked per checkpoint
    probed = len(P["probe_checkpoints"]) * (int(P["loss_windows"]) * int(P["context_size"])
                                            + 2 * int(P["icl_sequences"]) * sum(map(int, P["icl_lengths"])))
    # one held-out matching.Firing per SAE compared: k (row, feature) int64 pairs per token
    firing = float(P["eval_tokens"]) * int(P["k"]) * 16
    return _build("dynamics", P, spec=spec, harvested=n_ckpt * float(P["n_tokens"]),
                  evaluated=probed + n_ckpt * float(P["eval_tokens"]), saes=saes, caches=n_ckpt,
                  held_bytes=2 * firing)


def _vision(P: Mapping[str, Any], spec: SubjectSpec) -> Plan:
    per_image = spec.tokens_per_item
    width = int(P["expansion"]) * spec.d_model
    tokens = float(P["steps"]) * int(P["batch_size"])
    from saelib.subjects.prompts import task_classes

    images = float(P["sae_images"]) + float(P["eval_images"]) + float(P["mask_images"]) * len(P["mask_ks"])
    # the two tasks are matched in classes (the smaller task's count; 10 for a dataset of unknown size)
    classes = min(task_classes(P["near_task"]) or 10, task_classes(P["shifted_task"]) or 10)
    # each task's test images read by the base model and every adapted one
    images += 2 * classes * float(P["task_test_images"]) * (1 + len(P["prompt_seeds"]))
    # prompt adaptation: forward and backward (3 forwards) per shot image and epoch, both tasks, each seed
    prompt_flops = (2 * 3 * 2 * spec.params * per_image * float(P["shots"]) * classes * int(P["prompt_epochs"])
                    * len(P["prompt_seeds"]))
    # the SAE's training, statistics and masking activations stay in CPU memory (float32), and so
    # do those images and both tasks' training and test images
    held_images = (float(P["sae_images"]) + float(P["eval_images"]) + float(P["mask_images"]))
    task_images = 2 * classes * (float(P["shots"]) + float(P["task_test_images"]))
    held = 4.0 * spec.d_model * per_image * held_images + spec.item_bytes * (held_images + task_images)
    return _build("vision", P, spec=spec, harvested=float(P["sae_images"]) * per_image,
                  evaluated=(images - float(P["sae_images"])) * per_image, saes=[(tokens, width, True)],
                  extra_flops=prompt_flops, held_bytes=held)


PLANNERS: dict[str, Callable[[Mapping[str, Any], SubjectSpec], Plan]] = {
    "synthetic": _synthetic, "subject_models": _subject_models, "allocation": _allocation,
    "allocation_scale": _allocation_scale, "e2e": _e2e, "dynamics": _dynamics, "vision": _vision,
}
MODEL_KNOB = {"subject_models": "pretrained", "vision": "vit"}
"""The knob naming a chapter's subject model where it is not ``model`` (chapter 0 has none)."""


def plan(chapter: str, P: Mapping[str, Any], model: Any = None) -> Plan:
    """The plan of ``chapter`` at the resolved parameters ``P``, with the subject model's
    published sizes (``SUBJECTS``, by its knob's name) or, given ``model`` (a loaded subject
    model), its own ``counts``."""
    if chapter not in PLANNERS:
        raise ValueError(f"no plan for chapter {chapter!r}; chapters: {sorted(PLANNERS)}")
    spec = counts(model) if model is not None else _subject(chapter, str(P.get(MODEL_KNOB.get(chapter, "model"), "")))
    return PLANNERS[chapter](P, spec)


def machine() -> tuple[float, float | None, float]:
    """Free disk at the cache, total GPU memory (``None`` without CUDA) and total CPU memory, bytes."""
    import torch

    from saelib.core.storage import cache_root

    root = cache_root()
    while not root.exists():
        root = root.parent
    gpu = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    cpu = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return float(shutil.disk_usage(root).free), gpu, float(cpu)


def announce(chapter: str, P: Mapping[str, Any]) -> Plan | None:
    """Print the plan and refuse (``PlanError``) when this machine cannot hold it. A model without
    published sizes gets no plan here (``None``, with a line saying so): its loader, not the
    planner, says whether the name exists, and the chapter can plan from the loaded model."""
    try:
        p = plan(chapter, P)
    except NoPublishedSizes as e:
        print(f"plan skipped: {e}")
        return None
    print("\n".join(p.lines()))
    p.check(*machine())
    return p

