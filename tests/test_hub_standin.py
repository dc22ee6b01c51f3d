"""saelib's hub loaders against the stand-in hub (tests/hub_standin.py), offline: the real loading
code (TransformerLens ``from_pretrained`` with ``checkpoint_value``, transformers' CLIP,
``datasets.load_dataset``) on tiny random files under the gpu profiles' names, and the messages a
wrong name, revision or column gives. One fresh process does every load (the libraries read their
cache locations when imported)."""

import json
import subprocess
import sys

import hub_standin
import pytest

from saelib.book import profiles

PROBE = r'''
import json, sys
import torch
from saelib.subjects.corpora import load_corpus
from saelib.subjects.language_models import load_subject_model
from saelib.subjects.vision import FASHION_HUB, load_fashion_mnist, load_vision_model

out = {}
def failure(fn):
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None

gpt2 = load_subject_model("gpt2-small")
out["gpt2"] = [gpt2.cfg.n_layers, gpt2.cfg.d_model, gpt2.cfg.n_ctx, list(gpt2(gpt2.to_tokens("the model")).shape)]
steps = {s: load_subject_model("pythia-70m-deduped", checkpoint=s) for s in (0, 1000)}
out["pythia"] = [steps[0].cfg.n_layers, steps[0].checkpoint_step, steps[1000].checkpoint_step,
                 bool(torch.equal(steps[0].W_E, steps[1000].W_E))]
x, y = load_fashion_mnist("test", source=FASHION_HUB)
clip, record = load_vision_model("clip-vit-b-16", images=FASHION_HUB)
out["clip"] = [clip.cfg.n_layers, clip.cfg.d_model, "blocks.10.hook_resid_post" in clip.hook_dict,
               type(clip.head).__name__, clip.head.class_names[0], list(clip(x[:2]).shape)]
out["fashion"] = [list(x.shape), str(x.dtype), float(x.min()), float(x.max()), int(y.max()),
                  len(load_fashion_mnist("train", source=FASHION_HUB)[1])]
docs = load_corpus("hf:Elriggs/openwebtext-100k", max_chars=2000)
out["corpus"] = [len(docs), docs[0][:20]]
out["wrong_name"] = failure(lambda: load_subject_model("gpt2-smal"))
out["missing_model"] = failure(lambda: load_subject_model("pythia-160m"))
out["wrong_revision"] = failure(lambda: load_subject_model("pythia-70m-deduped", checkpoint=3000))
out["wrong_column"] = failure(lambda: load_corpus("hf:Elriggs/openwebtext-100k", text_field="content"))
out["wrong_images"] = failure(lambda: load_fashion_mnist("test", source=FASHION_HUB + "x"))
out["not_images"] = failure(lambda: load_fashion_mnist("train", source="hf:Elriggs/openwebtext-100k"))
out["wrong_dataset"] = failure(lambda: load_corpus("hf:Skylion007/openwebtext", max_chars=100))

# chapter 5's gpu images: hub RGB datasets of odd sizes, resized and cropped for the stand-in CLIP (32)
from datasets import ClassLabel, Dataset, Features, Image, Value
from PIL import Image as PILImage
from saelib.subjects.image_datasets import load_hub_images
from saelib.subjects.prompts import load_tasks
got = load_hub_images("timm/eurosat-rgb", "test", per_class=3, size=32)
out["eurosat"] = [list(got.images.shape), str(got.images.dtype), torch.bincount(got.labels).tolist(),
                  list(got.classes), list(got.raw_classes[:2]), int(got.images.min()), int(got.images.max()),
                  bool(torch.equal(got.images, load_hub_images("timm/eurosat-rgb", "test", per_class=3,
                                                               size=32).images))]
tasks = load_tasks(("hf:ethz/food101", "hf:timm/eurosat-rgb"), 16, 100, size=32)
out["tasks"] = {k: [t.n_classes, list(t.train_images.shape), list(t.test_images.shape),
                    sorted(set(torch.bincount(t.test_labels).tolist())), t.classes[0], t.groups]
                for k, t in tasks.items()}
clip_in, record_in = load_vision_model("clip-vit-b-16", images="hf:clane9/imagenet-100", accuracy_images=50)
head = tasks["eurosat-rgb"].zero_shot_head(clip_in)
out["hub_clip"] = [list(clip_in.head.class_names[:2]), head.class_names[0],
                   list(clip_in(tasks["eurosat-rgb"].test_images[:2], head=head).shape),
                   0 <= record_in["test_accuracy"] <= 1]
def local(name, columns, features):
    folder = Path(sys.argv[1]) / name
    folder.mkdir()
    Dataset.from_dict(columns, features=Features(features)).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    return str(folder)
from pathlib import Path
pictures = [PILImage.new("RGB", (20 + i, 14), (10 * i, 0, 0)) for i in range(6)]
other = local("img-labels", {"img": pictures, "labels": [0, 1, 2, 0, 1, 2]},
              {"img": Image(), "labels": ClassLabel(names=["CamelCase", "snake_case", "plain"])})
o = load_hub_images(other, "train", n=4, size=8)
out["other_columns"] = [list(o.images.shape), list(o.classes), len(set(o.indices.tolist()))]
no_label = local("no-class-label", {"img": pictures, "labels": list(range(6))}, {"img": Image(), "labels": Value("int64")})
out["no_label"] = failure(lambda: load_hub_images(no_label, "train"))
out["wrong_split"] = failure(lambda: load_hub_images("timm/eurosat-rgb", "tset"))
out["not_rgb"] = failure(lambda: load_hub_images("Elriggs/openwebtext-100k", "train"))
out["wrong_hub_images"] = failure(lambda: load_hub_images("timm/eurosat", "train"))
out["too_few"] = failure(lambda: load_hub_images("timm/eurosat-rgb", "train", per_class=500))
print("RESULT" + json.dumps(out))
'''


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    root = hub_standin.build(tmp_path_factory.mktemp("hf_home"))
    proc = subprocess.run([sys.executable, "-c", PROBE, str(root)], env=hub_standin.environment(root),
                          capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def test_gpt2_loads_through_transformer_lens(loaded):
    assert loaded["gpt2"][:3] == [12, 64, 256] and loaded["gpt2"][3][:2] == [1, 3]


def test_pythia_revisions_are_its_checkpoints(loaded):
    n_layers, first, second, same = loaded["pythia"]
    assert (n_layers, first, second) == (3, 0, 1000) and not same  # step0 and step1000 differ


def test_clip_loads_with_its_hooks_and_its_zero_shot_text_head(loaded):
    assert loaded["clip"] == [12, 32, True, "CLIPTextHead", "T-shirt", [2, 10]]


def test_fashion_mnist_loads_from_the_hub_layout(loaded):
    """The gpu profile's images: the hub's parquet (PNG bytes, labels) through load_dataset."""
    shape, dtype, low, high, top_label, n_train = loaded["fashion"]
    assert shape == [hub_standin.FASHION_SIZES["test"], 1, 28, 28] and dtype == "torch.float32"
    assert 0 <= low < high <= 1 and top_label == 9 and n_train == hub_standin.FASHION_SIZES["train"]


def test_the_gpu_profiles_dataset_streams(loaded):
    n, head = loaded["corpus"]
    assert n >= 1 and head


def test_wrong_names_revisions_and_columns_fail_clearly(loaded):
    assert "unknown subject model 'gpt2-smal'" in loaded["wrong_name"]
    assert "could not fetch 'pythia-160m'" in loaded["missing_model"]
    assert "could not fetch 'pythia-70m-deduped' at checkpoint 3000 (revision 'step3000')" in loaded["wrong_revision"]
    assert "has no field 'content'" in loaded["wrong_column"] and "['text']" in loaded["wrong_column"]
    assert "Skylion007/openwebtext" in loaded["wrong_dataset"]
    wrong = loaded["wrong_images"]  # one line, naming the name asked for and the right one
    assert "\n" not in wrong and wrong.startswith("RuntimeError: could not load the Fashion-MNIST dataset "
                                                  "'zalando-datasets/fashion_mnistx'")
    assert "the gpu profile reads 'zalando-datasets/fashion_mnist'" in wrong
    assert "has no column ['image', 'label']" in loaded["not_images"]


def test_the_gpu_profiles_name_only_what_the_standin_serves():
    """Every hf: dataset of a gpu profile is parquet-backed and in the stand-in (no script datasets)."""
    names = {v[3:].split(":")[0] for chapter in profiles.CHAPTERS.values() for v in chapter["gpu"].values()
             if isinstance(v, str) and v.startswith("hf:")}
    assert names and names <= {*hub_standin.DATASETS, hub_standin.FASHION_MNIST, *hub_standin.RGB_DATASETS}, names


def test_hub_rgb_images_load_resized_with_readable_class_names(loaded):
    """EuroSAT's stand-in (images 40 x 30, 30 x 40, 36 x 36, 50 x 28): uint8 RGB at CLIP's size,
    the per-class pick balanced and the same on a second call, names split from CamelCase."""
    shape, dtype, counts, classes, raw, low, high, same = loaded["eurosat"]
    assert shape == [30, 3, 32, 32] and dtype == "torch.uint8" and counts == [3] * 10 and same
    assert classes[:3] == ["annual crop", "forest", "herbaceous vegetation"] and classes[-1] == "sea lake"
    assert raw == ["AnnualCrop", "Forest"] and 0 <= low < high <= 255


def test_hub_tasks_are_matched_in_classes_and_read_by_clips_text_head(loaded):
    """Food-101's stand-in has 12 classes, EuroSAT's 10: both tasks keep 10, 16 shots and 100
    test images per class; the zero-shot head is CLIP's text classifier over the task's names."""
    food, eurosat = loaded["tasks"]["food101"], loaded["tasks"]["eurosat-rgb"]
    assert food[:4] == eurosat[:4] == [10, [160, 3, 32, 32], [1000, 3, 32, 32], [100]]
    assert food[5] is None and eurosat[5] is None and eurosat[4] == "annual crop"
    model_classes, head_first, logits, accuracy_ok = loaded["hub_clip"]
    assert model_classes == ["bonnet", "green mamba"] and head_first == "annual crop"
    assert logits == [2, 10] and accuracy_ok


def test_hub_image_columns_are_found_by_their_features(loaded):
    """A dataset whose columns are called img and labels loads like one with image and label."""
    assert loaded["other_columns"] == [[4, 3, 8, 8], ["camel case", "snake case", "plain"], 4]


def test_wrong_image_splits_columns_and_names_fail_in_one_line(loaded):
    for key in ("no_label", "wrong_split", "not_rgb", "wrong_hub_images", "too_few"):
        assert "\n" not in loaded[key], key
    assert "has no ClassLabel label column; its columns are img (Image), labels (Value)" in loaded["no_label"]
    assert loaded["wrong_split"].startswith("ValueError: dataset 'timm/eurosat-rgb' has no split 'tset'")
    assert "'train', 'validation', 'test'" in loaded["wrong_split"]
    assert "has no image column; its columns are text (Value)" in loaded["not_rgb"]
    assert loaded["wrong_hub_images"].startswith("RuntimeError: could not load the image dataset 'timm/eurosat'")
    assert "has 20 images of class 'AnnualCrop', fewer than the 500 asked for" in loaded["too_few"]
