"""A local stand-in for the Hugging Face hub: tiny random models and datasets under the real names.

``build(root)`` writes, under ``root`` (use it as ``HF_HOME``):

* ``hub/``: the hub's cache layout (``models--ORG--NAME/refs/REV`` holding a commit hash,
  ``snapshots/COMMIT/FILES``) for ``gpt2`` (a 12-layer GPT2LMHeadModel of width 64 whose position-0 embedding is
  scaled up, the massive first-position norm chapter 1 checks), ``EleutherAI/pythia-70m-deduped``
  (a 3-layer GPTNeoX with ``main`` and the ``stepN`` revisions of ``PYTHIA_STEPS``, each with its own
  weights) and ``openai/clip-vit-base-patch16`` (a CLIPModel: a 12-layer vision tower of width 32 and a small
  text tower), all sharing one
  small byte-level BPE tokenizer trained here; and each dataset of ``DATASETS`` as the parquet files
  of its repository (``datasets--ORG--NAME/snapshots/COMMIT/data/train-00000-of-00001.parquet``).
  The image dataset ``FASHION_MNIST`` (``zalando-datasets/fashion_mnist``) is written in its hub
  layout: config ``fashion_mnist``, ``fashion_mnist/{train,test}-00000-of-00001.parquet`` with an
  ``image`` column (PNG bytes) and a ``label`` class column, ``FASHION_SIZES`` images per split
  (smaller than the real 60,000 / 10,000). The RGB datasets of ``RGB_DATASETS`` (chapter 5's gpu
  ImageNet subset, near and shifted tasks) are written the same way, config ``default``, with
  their real split and column names and the first of their real class names, as small RGB
  images of odd, mixed sizes (40 x 30, 30 x 40, 36 x 36, 50 x 28).
* ``datasets/``: those parquet files prepared by ``datasets``' own parquet builder under the
  dataset's hub name, which is what ``load_dataset(NAME)`` leaves behind after one online load and
  the only thing it reads offline (datasets 5 never resolves a hub dataset from ``hub/`` offline).

Only the files are small: what loads them is the real code (TransformerLens ``from_pretrained``,
transformers, ``datasets.load_dataset``), run with ``HF_HUB_OFFLINE=1`` (``environment(root)``).
These libraries read their cache locations when imported, so the stand-in is used from a fresh
process (a papermill kernel, ``subprocess``) started with that environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from saelib.book import profiles

PYTHIA = "EleutherAI/pythia-70m-deduped"
_DYNAMICS = profiles.values("dynamics", "gpu")
PYTHIA_STEPS = tuple(sorted({*_DYNAMICS["checkpoints"], *_DYNAMICS["probe_checkpoints"]}))
"""Revisions ``stepN`` of the stand-in Pythia: those chapter 4's gpu profile reads (the last, 143000,
is also ``main``)."""
CLIP = "openai/clip-vit-base-patch16"
DATASETS = {"Elriggs/openwebtext-100k": "text"}
"""Parquet-backed datasets the gpu profiles read, with their text column."""
FASHION_MNIST = "zalando-datasets/fashion_mnist"
FASHION_SIZES = {"train": 7000, "test": 2000}
"""Images per split of the stand-in Fashion-MNIST: the ViT's 5,000 held-out images and enough
of each class for gpu-smoke's tasks, far fewer than the real 60,000 / 10,000."""
RGB_DATASETS = {
    # name: (splits with their sizes, class names: the first ones of the real dataset's ClassLabel,
    # extra string columns the real dataset has)
    "clane9/imagenet-100": ({"train": 1700, "validation": 1100},
                            ("bonnet, poke bonnet", "green mamba", "langur", "Doberman, Doberman pinscher",
                             "gyromitra", "Saluki, gazelle hound", "vacuum, vacuum cleaner", "window screen",
                             "cocktail shaker", "garden spider, Aranea diademata"), ()),
    "timm/eurosat-rgb": ({"train": 200, "validation": 200, "test": 1100},
                         ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                          "PermanentCrop", "Residential", "River", "SeaLake"), ("image_id",)),
    "ethz/food101": ({"train": 240, "validation": 1320},
                     ("apple_pie", "baby_back_ribs", "baklava", "beef_carpaccio", "beef_tartare", "beet_salad",
                      "beignets", "bibimbap", "bread_pudding", "breakfast_burrito", "bruschetta",
                      "caesar_salad"), ()),
}
"""Chapter 5's gpu image datasets in the stand-in: splits (images each, classes balanced), class
names, extra columns. Enough images for gpu-smoke's sizes (ci's: 1,500 SAE images, 1,000 held
out, 16 shots and 100 test images per class), far fewer than the real ones."""
RGB_SIZES = ((40, 30), (30, 40), (36, 36), (50, 28))
"""(width, height) of the stand-in RGB images, in turn."""
_WORDS = ("the model reads a token and writes the next one while sparse features fire on words "
          "that matter in context such as names numbers dates places and code").split()


def _commit(*parts: object) -> str:
    return hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()


def _snapshot(hub: Path, kind: str, repo: str, revision: str = "main") -> Path:
    folder = hub / f"{kind}s--{repo.replace('/', '--')}"
    commit = _commit(kind, repo, revision)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / revision).write_text(commit)
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def _documents(n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(40, 120))) + "." for _ in range(n)]


def build(root: Path) -> Path:
    """Write the stand-in hub under ``root`` (idempotent); returns ``root``, the ``HF_HOME``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import (
        CLIPConfig,
        CLIPModel,
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
    )

    from saelib.subjects.language_models import train_tokenizer

    root = Path(root)
    hub = root / "hub"
    if (root / "complete").exists():
        return root
    tokenizer = train_tokenizer(_documents(200, 0), vocab_size=512)
    vocab = len(tokenizer)

    def save(model, kind_repo: str, revision: str = "main", with_tokenizer: bool = True) -> None:
        snap = _snapshot(hub, "model", kind_repo, revision)
        model.save_pretrained(snap)
        if with_tokenizer:
            tokenizer.save_pretrained(snap)

    torch.manual_seed(0)
    # n_ctx: gpt2's own config.json has it and TransformerLens reads it (transformers 5 no longer sets it).
    # 12 layers as the real one (the gpu profiles hook blocks 4, 6 and 8); width 64 so that
    # chapter 2's largest k (128) fits the dictionary at ci's expansion (2)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=64, n_head=2, n_positions=256, n_ctx=256,
                                      vocab_size=vocab, bos_token_id=0, eos_token_id=0))
    with torch.no_grad():
        # The one trained-model trait a chapter asserts (chapter 1: position 0's residual norm is
        # over 10x the others', as in the real gpt2), given by a large position-0 embedding.
        gpt2.transformer.wpe.weight[0] *= 100
    save(gpt2, "gpt2")
    neox = GPTNeoXConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=256, vocab_size=vocab, rotary_pct=0.25, bos_token_id=0,
                         eos_token_id=0)
    for step in PYTHIA_STEPS:
        torch.manual_seed(step)  # each revision its own weights, as a training run's checkpoints
        model = GPTNeoXForCausalLM(neox)
        save(model, PYTHIA, f"step{step}")
        if step == PYTHIA_STEPS[-1]:
            save(model, PYTHIA, "main")
    # CLIP with both towers, as the real checkpoint: chapter 5's zero-shot head is its text classifier
    save(CLIPModel(CLIPConfig(
        vision_config=dict(num_hidden_layers=12, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                           image_size=32, patch_size=16),
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, eos_token_id=2),
        projection_dim=16)), CLIP)
    for i, (name, column) in enumerate(DATASETS.items()):
        data = _snapshot(hub, "dataset", name) / "data"
        data.mkdir(exist_ok=True)
        parquet = data / "train-00000-of-00001.parquet"
        pq.write_table(pa.table({column: _documents(4000, 1 + i)}), parquet)
        _prepare(root, name, "default", {"train": parquet})
    folder = _snapshot(hub, "dataset", FASHION_MNIST) / "fashion_mnist"
    folder.mkdir(exist_ok=True)
    files = {}
    for split, n in FASHION_SIZES.items():
        files[split] = folder / f"{split}-00000-of-00001.parquet"
        _fashion_images(n, seed=len(files)).to_parquet(str(files[split]))
    _prepare(root, FASHION_MNIST, "fashion_mnist", files)
    for i, (name, (splits, classes, extra)) in enumerate(RGB_DATASETS.items()):
        data = _snapshot(hub, "dataset", name) / "data"
        data.mkdir(exist_ok=True)
        files = {}
        for j, (split, n) in enumerate(splits.items()):
            files[split] = data / f"{split}-00000-of-00001.parquet"
            _rgb_images(n, classes, extra, seed=10 * i + j).to_parquet(str(files[split]))
        _prepare(root, name, "default", files)
    (root / "complete").write_text("")
    return root


def _fashion_images(n: int, seed: int):
    """A ``datasets.Dataset`` of ``n`` 28 x 28 greyscale images as the hub's Fashion-MNIST has
    them: ``image`` (an Image feature: PNG bytes) and ``label`` (a ClassLabel of the ten garments).
    Each image is its class's blocky random prototype (the same in both splits) plus noise, so a
    linear probe on a random vision tower can learn the classes, as chapter 5 asserts of the
    real images; a third of them show another class's prototype, so no task is solved outright
    (chapter 5 divides by what zero-shot leaves to learn)."""
    import numpy as np
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    from saelib.subjects.vision import FASHION_CLASSES

    prototypes = np.random.default_rng(0).integers(0, 256, size=(len(FASHION_CLASSES), 7, 7))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(FASHION_CLASSES), size=n)
    shown = np.where(rng.random(n) < 1 / 3, rng.integers(0, len(FASHION_CLASSES), size=n), labels)
    blocks = np.clip(prototypes[shown] + rng.normal(0, 30, size=(n, 7, 7)), 0, 255).astype(np.uint8)
    pixels = blocks.repeat(4, axis=1).repeat(4, axis=2)
    features = Features({"image": Image(), "label": ClassLabel(names=list(FASHION_CLASSES))})
    return Dataset.from_dict({"image": [PILImage.fromarray(p, mode="L") for p in pixels],
                              "label": labels.tolist()}, features=features)


def _rgb_images(n: int, classes: tuple[str, ...], extra: tuple[str, ...], seed: int):
    """A ``datasets.Dataset`` of ``n`` RGB images (an Image feature: PNG bytes) of the sizes
    ``RGB_SIZES`` in turn and a ``label`` ClassLabel over ``classes``, balanced (every class
    ``n // len(classes)`` times or one more). Each image is its class's blocky colour prototype
    plus noise, so the classes can be told apart by a model that learns them."""
    import numpy as np
    from datasets import ClassLabel, Dataset, Features, Image, Value
    from PIL import Image as PILImage

    prototypes = np.random.default_rng(len(classes)).integers(0, 256, size=(len(classes), 6, 6, 3))
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(classes))
    pictures = []
    for i, c in enumerate(labels):
        w, h = RGB_SIZES[i % len(RGB_SIZES)]
        block = np.clip(prototypes[c] + rng.normal(0, 30, size=(6, 6, 3)), 0, 255).astype(np.uint8)
        pictures.append(PILImage.fromarray(block, mode="RGB").resize((w, h), PILImage.NEAREST))
    columns = {"image": pictures, "label": labels.tolist(),
               **{c: [f"{c}-{seed}-{i}" for i in range(n)] for c in extra}}
    features = Features({"image": Image(), "label": ClassLabel(names=list(classes)),
                         **{c: Value("string") for c in extra}})
    return Dataset.from_dict(columns, features=features)


def _prepare(root: Path, name: str, config: str, files: dict[str, Path]) -> None:
    """What the first online ``load_dataset(name)`` prepares from the parquet ``files`` (split ->
    file), where ``load_dataset(name)`` looks for it offline:
    NAMESPACE___NAME/CONFIG/0.0.0/COMMIT/{dataset_info.json, NAME-SPLIT.arrow}. The parquet builder
    writes it under its own names (repo_id= would demand hf:// data files), so the files are moved
    to the hub-loaded dataset's names."""
    from datasets.data_files import DataFilesDict, DataFilesList
    from datasets.packaged_modules.parquet.parquet import Parquet

    scratch = root / "scratch"
    Parquet(cache_dir=str(scratch), dataset_name="standin",
            data_files=DataFilesDict({split: DataFilesList([str(f)], [None]) for split, f in files.items()})
            ).download_and_prepare()
    (prepared,) = scratch.glob("standin/*/0.0.0")
    namespace, short = name.split("/")
    final = root / "datasets" / f"{namespace}___{short}" / config / "0.0.0" / _commit("dataset", name)
    final.mkdir(parents=True)
    for split in files:
        (prepared / f"standin-{split}.arrow").rename(final / f"{short}-{split}.arrow")
    info = json.loads((prepared / "dataset_info.json").read_text())
    info.update(config_name=config, dataset_name=short)
    (final / "dataset_info.json").write_text(json.dumps(info))
    shutil.rmtree(scratch)


def environment(root: Path) -> dict[str, str]:
    """The environment of a process that sees the stand-in hub, offline, with its own saelib cache:
    saelib keys caches by model name, and activations of a stand-in "gpt2-small" must never be
    found by a run on the real one."""
    root = Path(root)
    return {**os.environ, "SAELIB_CACHE": str(root / "saelib"), "HF_HOME": str(root),
            "HF_HUB_CACHE": str(root / "hub"),
            "HF_DATASETS_CACHE": str(root / "datasets"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1"}
