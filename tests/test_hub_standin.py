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
print("RESULT" + json.dumps(out))
'''


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    root = hub_standin.build(tmp_path_factory.mktemp("hf_home"))
    proc = subprocess.run([sys.executable, "-c", PROBE], env=hub_standin.environment(root), capture_output=True,
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
    assert names and names <= {*hub_standin.DATASETS, hub_standin.FASHION_MNIST}, names
