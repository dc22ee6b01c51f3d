"""Prompt-based adaptation of a frozen vision transformer, and the tasks it adapts to.

MaPLe (Khattak et al. 2023, arXiv 2210.03117) adapts CLIP by learning prompt tokens inserted into
the first few blocks of both encoders ("deep" prompts), the backbone frozen. The book's ViT has no
text encoder, so only the vision half exists here: ``DeepPrompts`` holds ``n_tokens`` learnable
tokens per block for the first ``depth`` blocks; block 0 appends its tokens after CLS and the
patches, each later block up to ``depth`` replaces the previous block's prompt outputs with its own
(VPT-deep / MaPLe's vision branch), and deeper blocks carry the last ones along. In place of CLIP's
text classifier, a new linear head reads the CLS token; it starts at the zero-shot classifier.

Zero-shot accuracy, for a model trained without text, is defined here as a **linear probe on the
frozen base features** (the final-normalised CLS vector): the best a fixed backbone does on the task
with only a new head, trained on the same few-shot images as the prompts. ``adapt`` then trains the
prompts and the head together, every backbone parameter untouched (asserted bit for bit).

Target tasks (``load_task``): ``fashion-groups`` (Fashion-MNIST's classes regrouped into four
kinds of garment: the pretraining domain with new classes) and ``digits`` (scikit-learn's
handwritten digits upscaled to 28x28: a strongly shifted domain). Few-shot training images never
come from the ViT's pretraining images; test images never from the training ones.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saelib.core import seeding, storage
from saelib.core.pretraining import PretrainConfig, pretrain
from saelib.core.storage import tensor_digest
from saelib.subjects.vision import (
    FASHION_CLASSES,
    HookedViT,
    load_digits,
    load_fashion_mnist,
    pretraining_split,
)

__all__ = [
    "TASKS",
    "Adapted",
    "DeepPrompts",
    "PromptConfig",
    "TargetTask",
    "adapt",
    "backbone_digest",
    "load_task",
]

# Fashion-MNIST classes regrouped by the part of the body they go on.
FASHION_GROUPS = {"upper body": (0, 2, 4, 6), "legs / full body": (1, 3), "feet": (5, 7, 9), "bag": (8,)}
TASKS = {"fashion-groups": tuple(FASHION_GROUPS), "digits": tuple(str(d) for d in range(10))}


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


@dataclass(frozen=True)
class PromptConfig:
    """How to adapt: prompt size and depth, and the few-shot training schedule."""

    n_tokens: int = 4
    depth: int = 3
    epochs: int = 40
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0


@dataclass
class Adapted:
    """An adapted model: the frozen backbone's prompts and head, with the training record."""

    prompts: DeepPrompts
    head: nn.Linear
    history: list[dict]
    seconds: float


def backbone_digest(model: nn.Module) -> str:
    """``tensor_digest`` over every parameter and buffer of a model, by name."""
    state = model.state_dict()
    return tensor_digest(*(state[k] for k in sorted(state)))


def adapt(model: HookedViT, images: Tensor, labels: Tensor, n_classes: int, cfg: PromptConfig,
          head_init: nn.Linear | None = None, *, cache: bool = True, progress: bool = True) -> Adapted:
    """Learn deep prompts and a new head on ``images`` with every backbone parameter frozen.

    ``head_init`` (e.g. the zero-shot linear probe) is where the head starts. With ``cache`` the
    result is stored under ``$SAELIB_CACHE/vision_prompts/<hash>``, keyed by the backbone's
    weights, the data, the head's start and ``cfg``, and reloaded on the next call."""
    key = {"backbone": backbone_digest(model), "data": tensor_digest(images, labels), "n_classes": n_classes,
           "head_init": tensor_digest(*head_init.state_dict().values()) if head_init is not None else None,
           "config": asdict(cfg)}
    folder = storage.artifact_dir("vision_prompts", key)
    prompts = DeepPrompts(model.cfg.d_model, cfg.n_tokens, cfg.depth, cfg.seed).to(model.device)
    head = nn.Linear(model.cfg.d_model, n_classes).to(model.device)
    if head_init is not None:
        head.load_state_dict(head_init.state_dict())
    if cache and (folder / "adapted.pt").exists():
        storage.verify(folder, f"delete {folder} and rerun to adapt again")
        state = torch.load(folder / "adapted.pt", weights_only=False, map_location=model.device)
        prompts.load_state_dict(state["prompts"])
        head.load_state_dict(state["head"])
        return Adapted(prompts.requires_grad_(False), head.requires_grad_(False), state["history"],
                       state["seconds"])
    per_epoch = max(1, len(images) // cfg.batch_size)
    # A cosine from lr to 0 over the run, without warm-up or clipping; the cosine in float32, as
    # the cached runs had it. Batches: a seeded permutation per epoch, the remainder left out.
    spec = PretrainConfig(steps=cfg.epochs * per_epoch, batch_size=cfg.batch_size, lr=cfg.lr,
                          stream="prompt_data_order", float32_cosine=True, seed=cfg.seed, grad_clip=0.0,
                          log_every=per_epoch)

    def batch_loss(idx: Tensor) -> Tensor:
        logits = model(images[idx], prompts=prompts, head=head)
        return F.cross_entropy(logits, labels[idx].to(logits.device))

    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)  # gradients flow through the backbone's activations only
    was_training = model.training
    model.eval()  # no dropout or batch statistics in this ViT; eval mode for clarity
    try:
        run = pretrain(nn.ModuleDict({"prompts": prompts, "head": head}), batch_loss, len(images), spec,
                       progress=progress, desc="prompts")
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(requires[n])
        model.train(was_training)
    history = [{"epoch": row["step"] // per_epoch, "loss": row["mean_loss"]} for row in run.history]
    seconds = run.elapsed_s
    prompts.requires_grad_(False)
    head.requires_grad_(False)
    if cache:
        tmp = storage.atomic_dir(folder)
        torch.save({"prompts": prompts.state_dict(), "head": head.state_dict(), "history": history,
                    "seconds": seconds}, tmp / "adapted.pt")
        (tmp / "key.json").write_text(json.dumps(key, indent=1))
        storage.commit_dir(tmp, folder)
    return Adapted(prompts, head, history, seconds)


# ============================================================================ target tasks

@dataclass
class TargetTask:
    """A classification task to adapt to: few-shot training images and held-out test images."""

    name: str
    classes: tuple[str, ...]
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor

    @property
    def n_classes(self) -> int:
        return len(self.classes)


def _few_shot(labels: Tensor, shots: int, n_classes: int, purpose: str, seed: int) -> Tensor:
    """``shots`` indices per class, drawn with a seeded permutation."""
    perm = torch.randperm(len(labels), generator=seeding.generator(purpose, seed))
    picked = []
    for c in range(n_classes):
        of_class = perm[labels[perm] == c]
        if len(of_class) < shots:
            raise ValueError(f"class {c} has only {len(of_class)} images, fewer than shots={shots}")
        picked.append(of_class[:shots])
    return torch.cat(picked).sort().values


def load_task(name: str, shots: int, test_images: int | None = None, seed: int = 0,
              vit_seed: int = 0, vit_val_images: int = 5000) -> TargetTask:
    """A target task with ``shots`` training images per class and up to ``test_images`` test images.

    ``fashion-groups``: training images come from the ViT's held-out validation images (the split
    of ``saelib.subjects.vision`` for ``vit_seed`` / ``vit_val_images``), never from its pretraining images;
    test images from the official test set. ``digits``: a seeded split of the 1,797 digits, the
    training shots first, every other image a test image."""
    if name == "fashion-groups":
        group_of = torch.empty(len(FASHION_CLASSES), dtype=torch.long)
        for g, members in enumerate(FASHION_GROUPS.values()):
            group_of[list(members)] = g
        x, y = load_fashion_mnist("train")
        _, val_idx = pretraining_split(vit_seed, vit_val_images)
        pool_x, pool_y = x[val_idx], group_of[y[val_idx]]
        train = _few_shot(pool_y, shots, len(FASHION_GROUPS), "image_splits:fashion-groups", seed)
        test_x, test_y = load_fashion_mnist("test")
        test_y = group_of[test_y]
        train_x, train_y = pool_x[train], pool_y[train]
    elif name == "digits":
        x, y = load_digits()
        train = _few_shot(y, shots, 10, "image_splits:digits", seed)
        rest = torch.ones(len(y), dtype=torch.bool)
        rest[train] = False
        train_x, train_y, test_x, test_y = x[train], y[train], x[rest], y[rest]
    else:
        raise ValueError(f"unknown target task {name!r}; valid: {list(TASKS)}")
    if test_images is not None and test_images < len(test_y):
        keep = torch.randperm(len(test_y), generator=seeding.generator(f"image_splits:{name}-test", seed))
        keep = keep[:test_images].sort().values
        test_x, test_y = test_x[keep], test_y[keep]
    return TargetTask(name, TASKS[name], train_x, train_y, test_x, test_y)
