"""Images and the book's vision transformer: a reader for Fashion-MNIST, and a small ViT with
TransformerLens-style hook names that the book pretrains itself.

No pretrained ViT or CLIP weights can be downloaded on the project's machines, so chapter 5 trains
its own subject model, like the language-model organism of chapter 1:

* ``load_fashion_mnist(split)`` parses the IDX files of the Debian package ``dataset-fashion-mnist``
  (no torchvision), refusing truncated or corrupt files with a message that says what to do; with
  ``source="hf:zalando-datasets/fashion_mnist"`` (the gpu profile's: Colab has no Debian package)
  it reads the hub's parquet copy (``image`` PNG bytes, ``label``) through ``datasets.load_dataset``;
* ``HookedViT`` is a pre-LayerNorm ViT over CLS + patch tokens with hook points named as in
  TransformerLens (``blocks.{i}.hook_resid_post``, ``blocks.{i}.attn.hook_pattern``, ...), so
  ``run_with_cache`` and ``run_with_hooks`` work on it; ``forward`` takes optional deep prompts
  (``saelib.subjects.prompts``), appended after the image tokens so that CLS and patch positions never move;
* ``train_vit(profile)`` pretrains it on Fashion-MNIST into the cache through the shared loop
  ``saelib.core.pretraining.pretrain`` (atomic, exactly resumable states); a finished run returns at once.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import struct
import time
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saelib.core import seeding
from saelib.core.pretraining import PretrainConfig, clear_resume, pretrain, read_record
from saelib.core.storage import (
    atomic_json,
    atomic_save,
    cache_root,
    content_key,
    locked,
    read_json,
    tensor_digest,
    verify,
    write_checksums,
)
from saelib.subjects.image_datasets import (
    HUB_DATASETS,
    class_names,
    clip_resize,
    load_hub_images,
    split_names,
    split_size,
)

__all__ = [
    "CLIP_MODELS",
    "FASHION_CLASSES",
    "FASHION_DIR",
    "FASHION_HUB",
    "FASHION_PROMPT_NAMES",
    "VIT_PROFILES",
    "CLIPTextHead",
    "HookedCLIPVision",
    "HookedViT",
    "IdxFormatError",
    "ViTConfig",
    "accuracy",
    "as_pictures",
    "image_classes",
    "is_fashion",
    "load_fashion_mnist",
    "load_images",
    "load_vision_model",
    "load_vit",
    "predict",
    "pretraining_split",
    "read_idx",
    "sae_training_images",
    "train_vit",
    "vit_dir",
]

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_HUB = "hf:zalando-datasets/fashion_mnist"
"""The hub's Fashion-MNIST (parquet: ``image`` as PNG bytes, ``label``; splits train and test)."""
FASHION_CLASSES = ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                   "bag", "ankle boot")
FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ============================================================================ data

class IdxFormatError(ValueError):
    """An IDX file (the MNIST family's format) is truncated, corrupt or not an IDX file at all."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array stored in an IDX file (gzip-compressed or plain).

    Layout: two zero bytes, a type code, the number of dimensions, one big-endian uint32 per
    dimension, then the data. Anything that does not add up raises ``IdxFormatError`` naming the
    file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    fix = ("reinstall the package it came from (for Fashion-MNIST: apt-get install --reinstall "
           "dataset-fashion-mnist)")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:
            raise IdxFormatError(f"{path} is a damaged gzip file ({type(e).__name__}: {e}); {fix}") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_TYPES:
        raise IdxFormatError(f"{path} is not an IDX file (its first bytes are {raw[:4].hex() or 'missing'}, "
                             f"expected 0000 + a type code + the number of dimensions); {fix}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxFormatError(f"{path} is truncated inside its header ({len(raw)} bytes); {fix}")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    need = int(np.prod(shape)) * dtype.itemsize
    have = len(raw) - header
    if have != need:
        what = "truncated" if have < need else "longer than its header says"
        raise IdxFormatError(f"{path} is {what}: its header promises an array of shape {list(shape)} "
                             f"({need:,} bytes of data) but it holds {have:,}; {fix}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None,
                       source: str = "debian") -> tuple[Tensor, Tensor]:
    """Fashion-MNIST images as float32 [n, 1, 28, 28] in [0, 1] and labels (int64, 0-9;
    ``FASHION_CLASSES`` names them). ``split``: "train" (60,000) or "test" (10,000).

    ``source``: "debian" reads the IDX files under ``root`` (default ``FASHION_DIR``);
    "hf:<dataset>" (e.g. ``FASHION_HUB``) a hub dataset with ``image`` and ``label`` columns."""
    if split not in FASHION_FILES:
        raise ValueError(f"unknown split {split!r}; valid: {list(FASHION_FILES)}")
    if source.startswith("hf:"):
        images, labels = _hub_fashion_mnist(source[3:], split)
        return torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1), torch.from_numpy(labels.copy())
    if source != "debian":
        raise ValueError(f"unknown Fashion-MNIST source {source!r}; valid: 'debian' or 'hf:<dataset>' "
                         f"(e.g. {FASHION_HUB!r})")
    root = Path(root) if root is not None else FASHION_DIR
    files = [root / f for f in FASHION_FILES[split]]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST files missing: {missing}. Install the Debian package: "
                                "apt-get install dataset-fashion-mnist (scripts/setup.sh does it)")
    images, labels = (read_idx(f) for f in files)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise IdxFormatError(f"{files[0]} and {files[1]} do not form an image set: shapes "
                             f"{list(images.shape)} and {list(labels.shape)}")
    if labels.max() >= len(FASHION_CLASSES):
        raise IdxFormatError(f"{files[1]} has label {labels.max()}; Fashion-MNIST has 10 classes")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


@functools.lru_cache(maxsize=4)
def _hub_fashion_mnist(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [n, 28, 28] and int64 labels of a hub split, decoded once per process (a
    chapter reads each split several times)."""
    import io

    import datasets
    from PIL import Image

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # the hub's errors are long; the one line a reader needs
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise RuntimeError(f"could not load the Fashion-MNIST dataset {name!r} ({type(e).__name__}: "
                           f"{first}); the gpu profile reads {FASHION_HUB[3:]!r}") from None
    missing = {"image", "label"} - set(ds.column_names)
    if missing:
        raise KeyError(f"dataset {name!r} has no column {sorted(missing)}; its columns are "
                       f"{ds.column_names} (Fashion-MNIST needs 'image' and 'label')")
    ds = ds.cast_column("image", datasets.Image(decode=False))  # PNG bytes, decoded here
    images = np.stack([np.asarray(Image.open(io.BytesIO(im["bytes"])).convert("L")) for im in ds["image"]])
    labels = np.asarray(ds["label"], dtype=np.int64)
    if images.shape[1:] != (28, 28) or labels.min() < 0 or labels.max() >= len(FASHION_CLASSES):
        raise ValueError(f"dataset {name!r} ({split}) is not Fashion-MNIST: images of shape "
                         f"{list(images.shape[1:])}, labels {labels.min()}-{labels.max()}")
    return images, labels


# ============================================================================ the model

class _PatchGrid:
    """Token layout shared by the ViT's and CLIP's configs: CLS + a square grid of patches."""

    image_size: int
    patch_size: int

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_tokens(self) -> int:
        """CLS + patches."""
        return 1 + self.grid ** 2


@dataclass(frozen=True)
class ViTConfig(_PatchGrid):
    """Architecture and pretraining budget of the book's ViT."""

    image_size: int = 28
    patch_size: int = 4
    channels: int = 1
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    d_mlp: int = 256
    n_classes: int = 10
    epochs: float = 4.0
    """Passes over the pretraining images (Fashion-MNIST's 60,000 training images less val_images)."""
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.05
    val_images: int = 5000
    """Held-out training images (never trained on) for the validation accuracy in the history."""
    seed: int = 0
    precision: str = "float32"
    """Pretraining's forward and backward: float32, or bfloat16 under torch.autocast (weights and
    optimizer stay float32; 2.1x faster per step on the project's AVX-512 BF16 CPU). Inference,
    harvests and adaptation always run in float32."""

    def __post_init__(self) -> None:
        if self.precision not in ("float32", "bfloat16"):
            raise ValueError(f"precision must be 'float32' or 'bfloat16', got {self.precision!r}")

    @property
    def steps(self) -> int:
        return math.ceil(self.epochs * (60_000 - self.val_images) / self.batch_size)


VIT_PROFILES: dict[str, ViTConfig] = {
    # A minute on 2 cores: every code path, accuracy well above chance.
    "ci": ViTConfig(d_model=32, n_layers=3, n_heads=4, d_mlp=128, epochs=0.6, batch_size=128, lr=3e-3,
                    warmup_steps=30),
    # The book's ViT: 7x7 patches of 4x4 pixels + CLS (50 tokens), 4 blocks of width 64. Pretraining
    # with precision="bfloat16" took 291 s against 663 s in float32 on the (shared) project machine,
    # for the same test accuracy (87.66% against 87.67%), but it is another ViT: chapter 5's numbers
    # (adaptation gains, latent groups) change with it, so the book keeps the float32 one it reports.
    "cpu": ViTConfig(d_model=64, n_layers=4, n_heads=4, d_mlp=256, epochs=8.0, batch_size=128, lr=2e-3),
}


class _Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        from transformer_lens.hook_points import HookPoint

        self.n_heads, self.d_head = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.hook_pattern = HookPoint()  # [batch, head, query, key]

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4)
        pattern = self.hook_pattern((q @ k.transpose(-1, -2) / math.sqrt(self.d_head)).softmax(-1))
        return self.out((pattern @ v).transpose(1, 2).reshape(b, t, d))


class _Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        from transformer_lens.hook_points import HookPoint

        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = _Attention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_mlp), nn.GELU(), nn.Linear(cfg.d_mlp, cfg.d_model))
        for name in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post"):
            setattr(self, name, HookPoint())

    def forward(self, x: Tensor) -> Tensor:
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.hook_attn_out(self.attn(self.ln1(x))))
        return self.hook_resid_post(x + self.hook_mlp_out(self.mlp(self.ln2(x))))


class _FinalNorm(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        from transformer_lens.hook_points import HookPoint

        self.ln = nn.LayerNorm(d_model)
        self.hook_normalized = HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        return self.hook_normalized(self.ln(x))


def _hooked_root():
    from transformer_lens import HookedRootModule

    return HookedRootModule


class HookedViT(_hooked_root()):
    """A pre-LayerNorm vision transformer whose hook points carry TransformerLens's names.

    Tokens: position 0 is CLS, positions 1..grid^2 the patches in row-major order; deep prompts,
    when given, follow them. ``forward(images)`` returns class logits from the CLS token;
    ``return_type="features"`` the final-normalised CLS vector (what a linear probe reads)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        from transformer_lens.hook_points import HookPoint

        self.cfg = cfg
        self.patch_embed = nn.Linear(cfg.channels * cfg.patch_size ** 2, cfg.d_model)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.n_tokens, cfg.d_model))
        self.hook_embed, self.hook_pos_embed = HookPoint(), HookPoint()
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        self.ln_final = _FinalNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.n_classes)
        # Fashion-MNIST's pixel mean and std: inputs are standardised inside the model.
        self.register_buffer("pixel_mean", torch.tensor(0.286))
        self.register_buffer("pixel_std", torch.tensor(0.353))
        self._init_weights()
        self.setup()

    def _init_weights(self) -> None:
        gen = seeding.generator("vision_init", self.cfg.seed)
        for name, p in self.named_parameters():
            if p.dim() >= 2 and "embed" not in name and "token" not in name:
                p.data.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif name.endswith("bias"):
                p.data.zero_()
        self.patch_embed.weight.data.copy_(torch.randn(self.patch_embed.weight.shape, generator=gen)
                                           / math.sqrt(self.patch_embed.in_features))
        self.pos_embed.data.copy_(torch.randn(self.pos_embed.shape, generator=gen) * 0.02)
        self.cls_token.data.copy_(torch.randn(self.cls_token.shape, generator=gen) * 0.02)

    def patches(self, images: Tensor) -> Tensor:
        """[batch, grid^2, channels * patch^2] in row-major patch order."""
        c, p = self.cfg.channels, self.cfg.patch_size
        if images.ndim != 4 or images.shape[1:] != (c, self.cfg.image_size, self.cfg.image_size):
            raise ValueError(f"expected images [batch, {c}, {self.cfg.image_size}, {self.cfg.image_size}], "
                             f"got {list(images.shape)}")
        x = (images - self.pixel_mean) / self.pixel_std
        return F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)

    @property
    def device(self) -> torch.device:
        return self.pos_embed.device

    def embed(self, images: Tensor) -> Tensor:
        """The residual stream entering block 0: [batch, 1 + grid^2, d_model]."""
        tokens = self.hook_embed(self.patch_embed(self.patches(images.to(self.device))))
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        return tokens + self.hook_pos_embed(self.pos_embed.expand(len(tokens), -1, -1))

    def run_blocks(self, x: Tensor, start: int = 0, stop: int | None = None, prompts=None) -> Tensor:
        """Blocks ``start`` .. ``stop - 1`` on a residual stream (prompt tokens included if any);
        block i < ``prompts.depth`` first inserts (i = 0) or replaces its own prompt tokens."""
        for i in range(start, self.cfg.n_layers if stop is None else stop):
            if prompts is not None and i < prompts.depth:
                x = prompts.insert(x, i, self.cfg.n_tokens)
            x = self.blocks[i](x)
        return x

    def classify(self, x: Tensor, head: nn.Module | None = None, return_type: str = "logits") -> Tensor:
        """Logits (or features) from a residual stream after the last block."""
        features = self.ln_final(x)[:, 0]
        if return_type == "features":
            return features
        if return_type != "logits":
            raise ValueError(f"return_type must be 'logits' or 'features', got {return_type!r}")
        return (head if head is not None else self.head)(features)

    def forward(self, images: Tensor, prompts=None, head: nn.Module | None = None,
                return_type: str = "logits", stop_at_layer: int | None = None) -> Tensor:
        """Class logits [batch, n_classes] (``head`` replaces the pretraining head, e.g. an adapted
        model's); ``stop_at_layer=L`` returns the residual stream after block L - 1 instead."""
        x = self.run_blocks(self.embed(images), 0, stop_at_layer, prompts)
        return x if stop_at_layer is not None else self.classify(x, head, return_type)


# ============================================================================ pretraining

def vit_dir(profile: str | ViTConfig, root: str | os.PathLike | None = None) -> Path:
    """Where a ViT lives: ``root`` or ``$SAELIB_CACHE/vision/vit-<profile>-streams<V>-<config hash>``."""
    if root is not None:
        return Path(root)
    cfg = VIT_PROFILES[profile] if isinstance(profile, str) else profile
    name = profile if isinstance(profile, str) else "custom"
    return cache_root() / "vision" / f"vit-{name}-streams{seeding.VERSION}-{content_key(asdict(cfg), 10)}"


def pretraining_split(seed: int = 0, val_images: int = 5000, n_images: int = 60_000
                      ) -> tuple[Tensor, Tensor]:
    """Indices into Fashion-MNIST's training set (``n_images`` of them: 60,000; fewer in the test
    suite's stand-in copy) of the ViT's pretraining images and of the ``val_images`` it never
    trains on (a seeded split; the official test set stays untouched)."""
    if not 0 < val_images < n_images:
        raise ValueError(f"val_images={val_images} must be between 0 and the {n_images:,} training images")
    perm = torch.randperm(n_images, generator=seeding.generator("image_splits:vit_val", seed))
    return perm[val_images:].sort().values, perm[:val_images].sort().values


@torch.no_grad()
def predict(model: HookedViT, images: Tensor, prompts=None, head: nn.Module | None = None,
            batch_size: int = 1000) -> Tensor:
    """Predicted classes of ``images``."""
    was = model.training
    model.eval()
    out = torch.cat([model(images[i:i + batch_size], prompts=prompts, head=head).argmax(-1).cpu()
                     for i in range(0, len(images), batch_size)])
    model.train(was)
    return out


def accuracy(model: HookedViT, images: Tensor, labels: Tensor, prompts=None,
             head: nn.Module | None = None, batch_size: int = 1000) -> float:
    """Fraction of ``images`` classified correctly."""
    return float((predict(model, images, prompts, head, batch_size) == labels).float().mean())


def train_vit(profile: str | ViTConfig = "cpu", out_dir: str | os.PathLike | None = None, *,
              resume_every: int = 200, progress: bool = True, stop_at_step: int | None = None,
              **overrides: Any) -> Path:
    """Pretrain the ViT on Fashion-MNIST into ``out_dir`` (default ``vit_dir(profile)``); return it.

    The loop is ``saelib.core.pretraining.pretrain``: AdamW (matrices other than the embeddings
    decayed), warm-up then a cosine to 0, per-epoch permutations of the pretraining images (the
    remainder of each epoch left out), bfloat16 autocast when ``cfg.precision`` says so. Writes
    ``vit.json`` (config, and once finished: accuracies, seconds), ``history.json`` (with the
    held-out accuracy every fifth resume state) and, at the end, ``model.pt``; a resume state
    every ``resume_every`` steps. Every file is written atomically: a killed run resumes from its
    last resume state, a finished one returns at once, and a run resumed from step s reproduces
    the uninterrupted run's weights. ``stop_at_step`` ends early after saving (tests)."""
    name = profile if isinstance(profile, str) else "custom"
    if isinstance(profile, str):
        if profile not in VIT_PROFILES:
            raise ValueError(f"unknown ViT profile {profile!r}; valid: {sorted(VIT_PROFILES)}")
        profile = VIT_PROFILES[profile]
    cfg = replace(profile, **overrides)
    if overrides:
        name = "custom"
    out = Path(out_dir) if out_dir is not None else vit_dir(name if name != "custom" else cfg)
    with locked(out):  # a second build of the same ViT waits here, then finds it finished
        return _train_vit_into(out, name, cfg, resume_every, progress, stop_at_step)


def _train_vit_into(out: Path, name: str, cfg: ViTConfig, resume_every: int, progress: bool,
                    stop_at_step: int | None) -> Path:
    meta = {"profile": name, "config": asdict(cfg)}
    meta_path = out / "vit.json"
    old = read_record(meta_path, {"config": meta["config"]}, what=f"the ViT in {out}")
    if old is not None and old.get("finished"):
        return out
    atomic_json(meta, meta_path)
    images, labels = load_fashion_mnist("train")
    train_idx, val_idx = pretraining_split(cfg.seed, cfg.val_images)
    model = HookedViT(cfg)  # its weights come from its own random stream (vision_init)
    spec = PretrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, stream="vision_data_order",
                          warmup_steps=cfg.warmup_steps, seed=cfg.seed, weight_decay=cfg.weight_decay,
                          precision=cfg.precision, log_every=50, resume_every=resume_every, unit="images")

    def batch_loss(idx: Tensor) -> Tensor:
        rows = train_idx[idx]
        return F.cross_entropy(model(images[rows]), labels[rows])

    def validate(step: int) -> dict:
        return {"val_accuracy": accuracy(model, images[val_idx], labels[val_idx])}

    model.train()
    run = pretrain(model, batch_loss, len(train_idx), spec, out_dir=out,
                   decays=lambda n, p: p.dim() >= 2 and "embed" not in n, evaluate=validate,
                   eval_steps=[*range(5 * resume_every, cfg.steps, 5 * resume_every), cfg.steps],
                   stop_at_step=stop_at_step, progress=progress, desc=f"vit-{name}")
    if not run.finished:
        return out
    model.eval()
    test_x, test_y = load_fashion_mnist("test")
    atomic_save(model.state_dict(), out / "model.pt")
    meta.update(finished=True, train_seconds=run.elapsed_s, steps=cfg.steps,
                val_accuracy=accuracy(model, images[val_idx], labels[val_idx]),
                test_accuracy=accuracy(model, test_x, test_y),
                n_params=sum(p.numel() for p in model.parameters()))
    atomic_json(meta, meta_path)
    clear_resume(out)
    write_checksums(out)  # verified by every load_vit
    return out


def load_vit(profile: str | os.PathLike = "cpu") -> tuple[HookedViT, dict]:
    """A pretrained ViT (eval mode, parameters frozen) and its ``vit.json`` record: ``profile`` is
    a ``VIT_PROFILES`` name (trained first if needed) or a directory written by ``train_vit``."""
    path = Path(profile) if Path(str(profile)).is_dir() else train_vit(str(profile), progress=False)
    meta_path = path / "vit.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"no ViT in {path}: train one with saelib.subjects.vision.train_vit")
    advice = f"delete {path} and rerun train_vit to pretrain it again"
    verify(path, advice, stamp=True)  # hashed once, then stamped
    meta = read_json(meta_path, advice)
    if not meta.get("finished"):
        raise RuntimeError(f"the ViT in {path} has not finished training; call train_vit again to resume")
    model = HookedViT(ViTConfig(**meta["config"]))
    model.load_state_dict(torch.load(path / "model.pt", weights_only=True))
    model.eval()
    model.requires_grad_(False)
    return model, meta


# ============================================================================ CLIP (online)

CLIP_MODELS = {"clip-vit-b-16": "openai/clip-vit-base-patch16"}
"""Hub names of the CLIP vision towers the ``gpu`` profile can load (the paper's is ViT-B/16)."""
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CLIPSpec(_PatchGrid):
    """The fields of ``ViTConfig`` the chapter reads, for a CLIP vision tower."""

    image_size: int
    patch_size: int
    d_model: int
    n_layers: int
    n_classes: int = 10
    seed: int = 0
    val_images: int = 5000
    batch_size: int = 0


class _HookedLayer(nn.Module):
    """A transformers CLIP encoder layer with the residual stream hooked before and after it."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        from transformer_lens.hook_points import HookPoint

        self.layer = layer
        self.hook_resid_pre, self.hook_resid_post = HookPoint(), HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer(self.hook_resid_pre(x), attention_mask=None)
        return self.hook_resid_post(out[0] if isinstance(out, tuple) else out)


class HookedCLIPVision(_hooked_root()):
    """A CLIP vision tower from transformers behind ``HookedViT``'s interface: the same hook names
    for the residual stream (``hook_embed``, ``blocks.{i}.hook_resid_pre`` / ``hook_resid_post``;
    CLIP's attention internals are not hooked), deep prompts after the image tokens, and ``head``
    on the post-LayerNorm CLS token (``load_vision_model`` gives it CLIP's zero-shot text
    classifier, ``CLIPTextHead``; default: a random linear head). Grey images are repeated over
    RGB; images of another size are resized and centre-cropped to CLIP's resolution as
    ``CLIPImageProcessor`` does (``clip_resize``), then normalised; uint8 images are read as /255.
    ``text_head(class_names)`` builds CLIP's zero-shot head for other classes when the model was
    loaded with its text tower (``load_vision_model``)."""

    def __init__(self, vision_model: nn.Module, head: nn.Module | None = None, n_classes: int = 10,
                 text_head: Any = None):
        super().__init__()
        from transformer_lens.hook_points import HookPoint

        # transformers < 5 nests the tower in .vision_model; 5.x's CLIPVisionModel is the tower
        vision_model = getattr(vision_model, "vision_model", vision_model)
        c = vision_model.config
        n_classes = getattr(head, "out_features", n_classes)
        self.cfg = CLIPSpec(image_size=c.image_size, patch_size=c.patch_size, d_model=c.hidden_size,
                            n_layers=c.num_hidden_layers, n_classes=n_classes)
        self.vision = vision_model
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList(_HookedLayer(layer) for layer in vision_model.encoder.layers)
        self.head = head if head is not None else nn.Linear(c.hidden_size, n_classes)
        self.register_buffer("pixel_mean", torch.tensor(_CLIP_MEAN).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(_CLIP_STD).view(1, 3, 1, 1))
        # a plain attribute, not a submodule: the text tower stays out of state_dict (the backbone
        # digest) and on the CPU; only the heads it builds move to the model's device
        object.__setattr__(self, "_text_head", text_head)
        self.setup()

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def text_head(self, class_names: Sequence[str]) -> "CLIPTextHead":
        """CLIP's zero-shot text classifier over ``class_names``, on this model's device."""
        if self._text_head is None:
            raise RuntimeError("this CLIP vision tower was built without its text tower; load it with "
                               "load_vision_model to get zero-shot heads for other classes")
        return self._text_head(tuple(class_names)).to(self.device)

    def embed(self, images: Tensor) -> Tensor:
        x = images.to(self.device)
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images [batch, 1 or 3, H, W], got {list(x.shape)}")
        if x.dtype == torch.uint8:  # the hub loader's images (load_hub_images), as PIL leaves them
            x = x.float() / 255.0
        x = clip_resize(x.expand(-1, 3, -1, -1), self.cfg.image_size)
        x = (x - self.pixel_mean) / self.pixel_std
        return self.hook_embed(self.vision.pre_layrnorm(self.vision.embeddings(x)))

    run_blocks = HookedViT.run_blocks
    forward = HookedViT.forward

    def classify(self, x: Tensor, head: nn.Module | None = None, return_type: str = "logits") -> Tensor:
        features = self.vision.post_layernorm(x[:, 0])
        if return_type == "features":
            return features
        return (head if head is not None else self.head)(features)


class CLIPTextHead(nn.Module):
    """CLIP's zero-shot classifier for some class names, as a head on the vision tower's
    post-LayerNorm CLS token: the visual projection, L2 normalisation, then the cosine with each
    class's normalised text embedding of ``template.format(name)``, times CLIP's logit scale.
    Equal to ``CLIPModel``'s ``logits_per_image`` for those texts (a test checks). Nothing in it
    is trained on the task; its tensors are buffers, so it stays frozen."""

    def __init__(self, visual_projection: Tensor, text_embeddings: Tensor, logit_scale: float,
                 class_names: tuple[str, ...], template: str):
        super().__init__()
        self.register_buffer("visual_projection", visual_projection.detach().clone())
        self.register_buffer("text_embeddings", F.normalize(text_embeddings.detach().float(), dim=-1))
        self.logit_scale = float(logit_scale)
        self.class_names, self.template = tuple(class_names), template

    @property
    def out_features(self) -> int:
        return len(self.class_names)

    def extra_repr(self) -> str:
        return f"classes={self.class_names}, template={self.template!r}, logit_scale={self.logit_scale:g}"

    def forward(self, features: Tensor) -> Tensor:
        image = F.normalize(features @ self.visual_projection.T, dim=-1)
        return self.logit_scale * image @ self.text_embeddings.T

    @classmethod
    def from_clip(cls, clip: nn.Module, tokenizer, class_names: Sequence[str],
                  template: str = "a photo of a {}.") -> "CLIPTextHead":
        """The head of a transformers ``CLIPModel`` and its tokenizer for ``class_names``."""
        texts = [template.format(name) for name in class_names]
        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = clip.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            text = clip.text_projection(out.pooler_output)
        return cls(clip.visual_projection.weight, text, clip.logit_scale.exp().item(), tuple(class_names),
                   template)


FASHION_PROMPT_NAMES = ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                        "bag", "ankle boot")
"""Fashion-MNIST's classes as CLIP's zero-shot prompts name them ("a photo of a {}.")."""


def is_fashion(source: str) -> bool:
    """Whether an ``images`` source is Fashion-MNIST (the Debian files or the hub's copy)."""
    return source in ("debian", FASHION_HUB)


def load_images(source: str, split: str, n: int | None = None, size: int = 224,
                seed: int = 0) -> tuple[Tensor, Tensor]:
    """Images and labels of chapter 5's ``images`` source: Fashion-MNIST (``is_fashion``) as
    ``load_fashion_mnist`` gives it, its first ``n`` if given; any other "hf:<dataset>" through
    ``load_hub_images`` (uint8 RGB at ``size``, a seeded sample of ``n``), its ``split`` "train"
    or "test" read as the dataset's training and held-out splits (``HUB_DATASETS``)."""
    if is_fashion(source):
        x, y = load_fashion_mnist(split, source=source)
        return (x, y) if n is None else (x[:n], y[:n])
    if not source.startswith("hf:"):
        raise ValueError(f"unknown image source {source!r}; valid: 'debian' or 'hf:<dataset>' "
                         f"(e.g. {FASHION_HUB!r} or one of {sorted('hf:' + k for k in HUB_DATASETS)})")
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; valid: 'train' or 'test' (the held-out split)")
    name = source[3:]
    got = load_hub_images(name, split_names(name)[split == "test"], n=n, size=size, seed=seed)
    return got.images, got.labels


def image_classes(source: str) -> tuple[str, ...]:
    """The class names of an ``images`` source: Fashion-MNIST's, or a hub dataset's (readable)."""
    if is_fashion(source):
        return FASHION_CLASSES
    if not source.startswith("hf:"):
        raise ValueError(f"unknown image source {source!r}; valid: 'debian' or 'hf:<dataset>'")
    return class_names(source[3:], split_names(source[3:])[0])


def sae_training_images(source: str, n: int, cfg: Any, size: int = 224) -> tuple[Tensor, str]:
    """The ``n`` training images whose tokens train chapter 5's SAEs, and a digest naming them
    (for the SAE cache key): for Fashion-MNIST a seeded pick of the ViT's pretraining images (by
    their indices), for a hub dataset a seeded sample of its training split (by their pixels)."""
    if not is_fashion(source):
        images, _ = load_images(source, "train", n=n, size=size)
        return images, tensor_digest(images)
    train_x, _ = load_fashion_mnist("train", source=source)
    train_idx, _ = pretraining_split(cfg.seed, cfg.val_images, len(train_x))
    shuffle = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(0))
    pick = train_idx[shuffle[:n]].sort().values
    return train_x[pick], tensor_digest(pick)


def as_pictures(images: Tensor) -> np.ndarray:
    """Images [n, 1 or 3, H, W] (float in [0, 1] or uint8) as the figures draw them: [n, H, W]
    for grey, [n, H, W, 3] in [0, 1] for RGB."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return x[:, 0].numpy() if x.shape[1] == 1 else x.permute(0, 2, 3, 1).numpy()


def load_vision_model(name: str, device: str = "cpu", images: str = "debian",
                      accuracy_images: int = 1000) -> tuple[nn.Module, dict]:
    """The chapter's subject model and its record: a ``VIT_PROFILES`` name or a ``train_vit``
    folder (``load_vit``), or CLIP (``CLIP_MODELS`` key, a hub id, or a local folder saved with
    ``save_pretrained``): its vision tower with, as its head, CLIP's own zero-shot text classifier
    (``CLIPTextHead``, nothing fitted) over the classes of ``images`` (a ``load_images`` source:
    Fashion-MNIST's garments, or a hub dataset's class names), its accuracies measured on those
    images (for a hub dataset on ``accuracy_images`` of each split). CLIP needs the hub (or a
    local copy)."""
    if name in VIT_PROFILES or (Path(name) / "vit.json").exists():
        model, record = load_vit(name)
        return model.to(device), record
    from transformers import AutoTokenizer, CLIPModel

    source = CLIP_MODELS.get(name, name)
    try:
        clip = CLIPModel.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise RuntimeError(f"could not load CLIP {source!r} ({type(e).__name__}: "
                           f"{str(e)[:200]}). Offline, use a ViT trained here: {sorted(VIT_PROFILES)}"
                           ) from e
    t0 = time.perf_counter()
    if not (is_fashion(images) or images.startswith("hf:")):
        raise ValueError(f"unknown image source {images!r}; valid: 'debian' or 'hf:<dataset>'")
    names = FASHION_PROMPT_NAMES if is_fashion(images) else class_names(images[3:])
    text_head = functools.partial(CLIPTextHead.from_clip, clip.eval(), tokenizer)
    model = HookedCLIPVision(clip.vision_model, text_head(names), text_head=text_head)
    model = model.to(device).eval()
    model.requires_grad_(False)
    size = model.cfg.image_size
    if is_fashion(images):
        x, y = load_fashion_mnist("train", source=images)
        _, val_idx = pretraining_split(model.cfg.seed, model.cfg.val_images, len(x))
        val_x, val_y = x[val_idx], y[val_idx]
        test_x, test_y = load_fashion_mnist("test", source=images)
    else:
        train_split, test_split = split_names(images[3:])
        val_x, val_y = load_images(images, "train", size=size, seed=1,
                                   n=min(accuracy_images, split_size(images[3:], train_split)))
        test_x, test_y = load_images(images, "test", size=size, seed=1,
                                     n=min(accuracy_images, split_size(images[3:], test_split)))
    record = {"profile": name, "steps": 0, "train_seconds": time.perf_counter() - t0,
              "n_params": sum(p.numel() for p in model.parameters()),
              "val_accuracy": accuracy(model, val_x, val_y, batch_size=250),
              "test_accuracy": accuracy(model, test_x, test_y, batch_size=250)}
    return model, record
