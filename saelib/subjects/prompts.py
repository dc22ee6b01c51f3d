"""Prompt-based adaptation of a frozen vision transformer, and the tasks it adapts to.

MaPLe (Khattak et al. 2023, arXiv 2210.03117) adapts CLIP by learning prompt tokens inserted into
the first few blocks of both encoders ("deep" prompts), the backbone frozen. The book's ViT has no
text encoder, so only the vision half exists here: ``DeepPrompts`` holds ``n_tokens`` learnable
tokens per block for the first ``depth`` blocks; block 0 appends its tokens after CLS and the
patches, each later block up to ``depth`` replaces the previous block's prompt outputs with its own
(VPT-deep / MaPLe's vision branch), and deeper blocks carry the last ones along.

Zero-shot, as in the paper, is a classifier nobody trains on the task: CLIP's text classifier
there, here the ViT's own pretraining head read through ``ZeroShotHead`` (a task class that
gathers several pretraining classes scores the logsumexp of their logits; a class of its own, its
logit). ``adapt`` trains the prompts only: the backbone and that head stay bit-identical (asserted),
so every change of accuracy, and of latents, comes from the prompts.

Target tasks (``load_task``), matched in classes, images per class and training steps:
``fashion-upper`` (T-shirt/top, pullover, coat and shirt: the four garments the pretrained ViT
confuses most, in their own domain) and ``fashion-upper-inverted`` (the very same images with
inverted grey levels, white background and dark garments: a domain the ViT never saw, with the
same classes and the same zero-shot head). Few-shot training images never come from the ViT's
pretraining images; test images are the official test set's. A task named "hf:<dataset>" (the
gpu profile's, e.g. EuroSAT) is a hub image-classification dataset read by
``saelib.subjects.image_datasets``; its zero-shot head is CLIP's text classifier over its class
names (``HookedCLIPVision.text_head``), and ``load_tasks`` keeps the same number of classes in
every such task (the smallest task's).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saelib.core import seeding, storage
from saelib.core.pretraining import PretrainConfig, pretrain
from saelib.core.storage import tensor_digest
from saelib.subjects.image_datasets import HUB_DATASETS, class_names, load_hub_images, split_names
from saelib.subjects.vision import FASHION_CLASSES, HookedViT, load_fashion_mnist, pretraining_split

__all__ = [
    "OPTIMIZERS",
    "TASKS",
    "Adapted",
    "DeepPrompts",
    "PromptConfig",
    "TargetTask",
    "ZeroShotHead",
    "adapt",
    "backbone_digest",
    "load_task",
    "load_tasks",
    "task_classes",
]

# The four upper-body garments, which the pretrained ViT confuses with one another most.
UPPER_BODY = (0, 2, 4, 6)
TASKS = {"fashion-upper": UPPER_BODY, "fashion-upper-inverted": UPPER_BODY}
"""Each task's classes, as the Fashion-MNIST classes each gathers (one each here)."""
DESCRIPTIONS = {"fashion-upper": "the four upper-body garments",
                "fashion-upper-inverted": "the same images inverted"}
"""How the chapter's prose names each Fashion-MNIST task."""


class ZeroShotHead(nn.Module):
    """A task classifier read from a pretrained head without training: task class g scores
    logsumexp over the logits of the pretraining classes ``groups[g]`` (the log of their summed
    probabilities, up to a constant shared by every class), which is the logit itself for a class
    of one. Its weights are the pretrained head's own tensors, frozen."""

    def __init__(self, head: nn.Linear, groups: tuple[tuple[int, ...], ...]):
        super().__init__()
        if not groups or any(not g for g in groups):
            raise ValueError(f"every task class needs at least one pretraining class, got {groups}")
        members = sorted(c for g in groups for c in g)
        if len(set(members)) != len(members) or members[-1] >= head.out_features or members[0] < 0:
            raise ValueError(f"groups {groups} must name distinct classes of the head's {head.out_features}")
        self.head = head
        self.groups = tuple(tuple(g) for g in groups)

    @property
    def out_features(self) -> int:
        return len(self.groups)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"  # in cache keys (storage.memoized_call reads the repr)

    def forward(self, features: Tensor) -> Tensor:
        logits = self.head(features)
        return torch.stack([logits[:, list(g)].logsumexp(-1) for g in self.groups], dim=-1)


class DeepPrompts(nn.Module):
    """Learnable prompt tokens for the first ``depth`` blocks: [depth, n_tokens, d_model]."""

    def __init__(self, d_model: int, n_tokens: int, depth: int, seed: int = 0):
        super().__init__()
        if n_tokens <= 0 or depth <= 0:
            raise ValueError(f"n_tokens and depth must be positive, got {n_tokens}, {depth}")
        gen = seeding.generator("prompt_init", seed)
        self.tokens = nn.Parameter(torch.randn(depth, n_tokens, d_model, generator=gen) * 0.02)

    @property
    def depth(self) -> int:
        return self.tokens.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.tokens.shape[1]

    def insert(self, x: Tensor, layer: int, n_image_tokens: int) -> Tensor:
        """The residual stream entering block ``layer`` with this block's prompts after the
        ``n_image_tokens`` image tokens (appended at block 0, replacing the old ones later)."""
        prompts = self.tokens[layer].expand(len(x), -1, -1)
        expected = n_image_tokens if layer == 0 else n_image_tokens + self.n_tokens
        if x.shape[1] != expected:
            raise ValueError(f"block {layer} expects {expected} tokens before prompting, got {x.shape[1]}")
        return torch.cat([x[:, :n_image_tokens], prompts], dim=1)


OPTIMIZERS: dict[str, dict] = {
    # the book's cpu default: AdamW, a cosine from the peak to 0, no warm-up
    "adamw": {"optimizer": "adamw"},
    # MaPLe's (its configs and Dassl's defaults): SGD, momentum 0.9, weight decay 5e-4, the
    # first epoch at a constant 1e-5, then the cosine. Dassl steps its cosine once per epoch,
    # here every step follows it: the same curve, read at every step rather than per epoch.
    "maple_sgd": {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4,
                  "warmup_epochs": 1, "warmup_lr": 1e-5},
}
"""Named optimizer settings for ``PromptConfig.with_optimizer``."""


@dataclass(frozen=True)
class PromptConfig:
    """How to adapt: prompt size and depth, and the few-shot training schedule."""

    n_tokens: int = 4
    depth: int = 3
    epochs: int = 40
    batch_size: int = 32
    lr: float = 3e-3
    """Peak learning rate (after the warm-up)."""
    seed: int = 0
    optimizer: str = "adamw"
    """``"adamw"`` or ``"sgd"`` (with ``momentum``): ``saelib.core.pretraining.PretrainConfig``'s."""
    momentum: float = 0.9
    weight_decay: float = 0.0
    """Of the prompt tokens (``PretrainConfig.weight_decay``)."""
    warmup_epochs: int = 0
    """Epochs of warm-up before the cosine: at ``warmup_lr``, or a linear ramp where it is 0."""
    warmup_lr: float = 0.0

    def with_optimizer(self, name: str) -> "PromptConfig":
        """This config with the ``OPTIMIZERS`` settings called ``name``."""
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown prompt optimizer {name!r}; valid: {sorted(OPTIMIZERS)}")
        return replace(self, **OPTIMIZERS[name])


@dataclass
class Adapted:
    """Learned prompts for a frozen backbone and head, with the training record."""

    prompts: DeepPrompts
    history: list[dict]
    seconds: float


def backbone_digest(model: nn.Module) -> str:
    """``tensor_digest`` over every parameter and buffer of a model, by name."""
    state = model.state_dict()
    return tensor_digest(*(state[k] for k in sorted(state)))


def adapt(model: HookedViT, images: Tensor, labels: Tensor, head: nn.Module, cfg: PromptConfig, *,
          cache: bool = True, progress: bool = True) -> Adapted:
    """Learn deep prompts on ``images`` with every backbone parameter and ``head`` (the task's
    zero-shot classifier, e.g. a ``ZeroShotHead``) frozen: only the prompt tokens learn.

    Raises if the backbone or the head changed by a bit. With ``cache`` the prompts are stored
    under ``$SAELIB_CACHE/vision_prompts/<hash>``, keyed by the backbone's and the head's weights,
    the data and ``cfg``, and reloaded on the next call."""
    frozen = {"backbone": backbone_digest(model), "head": backbone_digest(head)}
    key = {**frozen, "data": tensor_digest(images, labels), "config": asdict(cfg)}
    folder = storage.artifact_dir("vision_prompts", key)
    prompts = DeepPrompts(model.cfg.d_model, cfg.n_tokens, cfg.depth, cfg.seed).to(model.device)
    if cache and (folder / "adapted.pt").exists():
        storage.verify(folder, f"delete {folder} and rerun to adapt again")
        state = torch.load(folder / "adapted.pt", weights_only=False, map_location=model.device)
        prompts.load_state_dict(state["prompts"])
        return Adapted(prompts.requires_grad_(False), state["history"], state["seconds"])
    per_epoch = max(1, len(images) // cfg.batch_size)
    # The warm-up, then a cosine from lr to 0 over the rest of the run, without clipping.
    # Batches: a seeded permutation per epoch, the remainder left out.
    spec = PretrainConfig(steps=cfg.epochs * per_epoch, batch_size=cfg.batch_size, lr=cfg.lr,
                          stream="prompt_data_order", float32_cosine=True, seed=cfg.seed, grad_clip=0.0,
                          log_every=per_epoch, optimizer=cfg.optimizer, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_epochs * per_epoch,
                          warmup_lr=cfg.warmup_lr)

    def batch_loss(idx: Tensor) -> Tensor:
        logits = model(images[idx], prompts=prompts, head=head)
        return F.cross_entropy(logits, labels[idx].to(logits.device))

    modules = {"backbone": model, "head": head}
    requires = {name: {n: p.requires_grad for n, p in m.named_parameters()} for name, m in modules.items()}
    was_training = {name: m.training for name, m in modules.items()}
    for m in modules.values():
        m.requires_grad_(False)  # gradients flow through their activations only
        m.eval()  # no dropout or batch statistics in this ViT; eval mode for clarity
    try:
        run = pretrain(prompts, batch_loss, len(images), spec, progress=progress, desc="prompts")
    finally:
        for name, m in modules.items():
            for n, p in m.named_parameters():
                p.requires_grad_(requires[name][n])
            m.train(was_training[name])
    changed = [name for name, m in modules.items() if backbone_digest(m) != frozen[name]]
    if changed:
        raise RuntimeError(f"prompt adaptation changed the frozen {' and '.join(changed)}")
    history = [{"epoch": row["step"] // per_epoch, "loss": row["mean_loss"]} for row in run.history]
    prompts.requires_grad_(False)
    if cache:
        tmp = storage.atomic_dir(folder)
        torch.save({"prompts": prompts.state_dict(), "history": history, "seconds": run.elapsed_s},
                   tmp / "adapted.pt")
        (tmp / "key.json").write_text(json.dumps(key, indent=1))
        storage.commit_dir(tmp, folder)
    return Adapted(prompts, history, run.elapsed_s)


# ============================================================================ target tasks

@dataclass
class TargetTask:
    """A classification task to adapt to: few-shot training images, held-out test images, and
    the pretraining classes each task class gathers (its zero-shot head's ``groups``)."""

    name: str
    classes: tuple[str, ...]
    groups: tuple[tuple[int, ...], ...] | None
    """None: the classes are read by the model's text classifier (CLIP's), by name."""
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    description: str = ""
    """How the chapter's prose names the task."""

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def zero_shot_head(self, model: nn.Module) -> nn.Module:
        """The task's classifier, untrained: read from ``model``'s pretraining head, or for a hub
        task CLIP's text classifier over the task's class names."""
        if self.groups is None:
            if not hasattr(model, "text_head"):
                raise ValueError(f"task {self.name!r} needs a zero-shot text classifier (CLIP's); "
                                 f"{type(model).__name__} has none")
            return model.text_head(self.classes)
        return ZeroShotHead(model.head, self.groups)


def _per_class(labels: Tensor, n: int, n_classes: int, purpose: str, seed: int) -> Tensor:
    """``n`` indices per class, drawn with a seeded permutation."""
    perm = torch.randperm(len(labels), generator=seeding.generator(purpose, seed))
    picked = []
    for c in range(n_classes):
        of_class = perm[labels[perm] == c]
        if len(of_class) < n:
            raise ValueError(f"class {c} has only {len(of_class)} images, fewer than {n}")
        picked.append(of_class[:n])
    return torch.cat(picked).sort().values


def load_task(name: str, shots: int, test_per_class: int | None = None, seed: int = 0,
              vit_seed: int = 0, vit_val_images: int = 5000, images: str = "debian") -> TargetTask:
    """A target task with ``shots`` training images and ``test_per_class`` test images per class
    (None: all of the test set's, 1,000 per class).

    Training images come from the ViT's held-out validation images (the split of
    ``saelib.subjects.vision`` for ``vit_seed`` / ``vit_val_images``), never from its pretraining
    images; test images from the official test set. Both tasks draw the same images; the inverted
    one shows them as 1 - grey level. ``images``: the ``load_fashion_mnist`` source."""
    if name not in TASKS:
        raise ValueError(f"unknown target task {name!r}; valid: {list(TASKS)} or 'hf:<dataset>'")
    members = TASKS[name]
    task_of = torch.full((len(FASHION_CLASSES),), -1, dtype=torch.long)
    task_of[list(members)] = torch.arange(len(members))
    x, y = load_fashion_mnist("train", source=images)
    _, val_idx = pretraining_split(vit_seed, vit_val_images, len(x))
    pool_x, pool_y = x[val_idx], task_of[y[val_idx]]
    keep = pool_y >= 0
    pool_x, pool_y = pool_x[keep], pool_y[keep]
    train = _per_class(pool_y, shots, len(members), "image_splits:fashion-upper", seed)
    test_x, test_y = load_fashion_mnist("test", source=images)
    test_y = task_of[test_y]
    keep = test_y >= 0
    test_x, test_y = test_x[keep], test_y[keep]
    if test_per_class is not None:
        test = _per_class(test_y, test_per_class, len(members), "image_splits:fashion-upper-test", seed)
        test_x, test_y = test_x[test], test_y[test]
    train_x, train_y = pool_x[train], pool_y[train]
    if name.endswith("-inverted"):
        train_x, test_x = 1 - train_x, 1 - test_x
    return TargetTask(name, tuple(FASHION_CLASSES[c] for c in members), tuple((c,) for c in members),
                      train_x, train_y, test_x, test_y, DESCRIPTIONS[name])


def task_classes(name: str) -> int | None:
    """Classes of a task without loading it: a Fashion-MNIST task's, or a hub dataset's as its
    card gives it (``HUB_DATASETS``; None for a dataset not listed there)."""
    if name in TASKS:
        return len(TASKS[name])
    return HUB_DATASETS.get(name[3:], {}).get("classes") if name.startswith("hf:") else None


def load_hub_task(name: str, shots: int, test_per_class: int, n_classes: int | None = None,
                  seed: int = 0, size: int = 224) -> TargetTask:
    """A hub dataset ("hf:<dataset>") as a target task: ``shots`` training images per class from
    its training split, ``test_per_class`` from its held-out split (``HUB_DATASETS``), both
    resized for CLIP (``size``); ``n_classes``: a seeded pick of that many of its classes
    (default: all). Its zero-shot head is CLIP's text classifier over the readable class names."""
    if not name.startswith("hf:"):
        raise ValueError(f"a hub task is named 'hf:<dataset>', got {name!r}")
    dataset = name[3:]
    train_split, test_split = split_names(dataset)
    every = len(class_names(dataset, train_split))
    if n_classes is not None and not 0 < n_classes <= every:
        raise ValueError(f"n_classes={n_classes}: {dataset!r} has {every} classes")
    if n_classes is None or n_classes == every:
        keep = tuple(range(every))
    else:
        stream = seeding.generator(f"image_splits:task_classes:{dataset}", seed)
        pick = torch.randperm(every, generator=stream)
        keep = tuple(sorted(pick[:n_classes].tolist()))
    train = load_hub_images(dataset, train_split, per_class=shots, classes=keep, size=size, seed=seed)
    test = load_hub_images(dataset, test_split, per_class=test_per_class, classes=keep, size=size,
                           seed=seed)
    short = dataset.split("/")[-1]
    return TargetTask(short, train.classes, None, train.images, train.labels, test.images, test.labels,
                      f"{len(keep)} classes of {short}")


def load_tasks(names: tuple[str, ...], shots: int, test_per_class: int, *, images: str = "debian",
               size: int = 224, seed: int = 0) -> dict[str, TargetTask]:
    """The chapter's tasks by name, keyed by their names: Fashion-MNIST ones (``load_task`` with
    ``images``) or hub ones ("hf:<dataset>", ``load_hub_task``) matched in class count: each hub
    task keeps a seeded pick of as many classes as the smallest hub task has."""
    hub = [n for n in names if n.startswith("hf:")]
    fewest = min((len(class_names(n[3:], split_names(n[3:])[0])) for n in hub), default=None)
    tasks = {}
    for name in names:
        task = (load_hub_task(name, shots, test_per_class, fewest, seed, size) if name in hub
                else load_task(name, shots, test_per_class, seed, images=images))
        if task.name in tasks:
            raise ValueError(f"two tasks named {task.name!r}: {names}")
        tasks[task.name] = task
    return tasks
