"""The ``gpu-smoke`` profile: ``gpu``'s names and code path at sizes that run in seconds, executed on
the CPU against the stand-in hub (tests/hub_standin.py), offline."""

import shutil
import subprocess
import sys
from pathlib import Path

import hub_standin
import pytest

from saelib.book import profiles
from saelib.book.build import ROOT


@pytest.mark.parametrize("chapter", sorted(profiles.CHAPTERS))
def test_gpu_smoke_differs_from_gpu_in_sizes_only(chapter):
    gpu, smoke = profiles.values(chapter, "gpu"), profiles.values(chapter, "gpu-smoke")
    assert sorted(smoke) == sorted(gpu)
    changed = {k for k in gpu if smoke[k] != gpu[k]}
    bounds = set(profiles.SMOKE_BOUNDS.get(chapter, {}))
    assert changed <= profiles.SMOKE_SIZES | bounds, changed - profiles.SMOKE_SIZES - bounds
    assert all(k.startswith(("min_", "max_", "check_")) for k in bounds)
    # every name (model, hook, dataset, ViT, precision, revisions) is gpu's
    for k, v in gpu.items():
        if isinstance(v, str) and k != "organism":
            assert smoke[k] == v, k


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The stand-in hub, built once for this module, with the `ci` organism already in its saelib cache.

    The organism is no hub model (chapter 1's gpu-smoke run uses it because ``organism`` is one of the
    ``SMOKE_SIZES``): it is trained from the offline Debian text, the same files under any hub. So it
    is trained (or found) once in the tests' own ``$SAELIB_CACHE``, where tests/test_bench.py and the
    `ci` chapters use it, and copied here, instead of a second identical training inside chapter 1's
    smoke run (60% of that run). Only the organism is copied: activations and SAEs of the stand-in
    models stay in the stand-in's own cache."""
    from saelib.subjects.language_models import organism_dir, train_organism

    root = hub_standin.build(tmp_path_factory.mktemp("hf_home"))
    organism = train_organism("ci", progress=False)
    target = Path(hub_standin.environment(root)["SAELIB_CACHE"]) / "organisms" / organism_dir("ci").name
    if not target.exists():
        shutil.copytree(organism, target)
    return root


def _run_chapter(only: str, hub, tmp_path, *params: str) -> subprocess.CompletedProcess:
    """The runner on gpu-smoke for one chapter, against the stand-in hub (``params``: ``-p KEY=VALUE``)."""
    flags = [arg for p in params for arg in ("-p", p)]
    return subprocess.run([sys.executable, "-m", "saelib.book", "--profile", "gpu-smoke", "--only", only,
                           "--no-html", "--build-dir", str(tmp_path), *flags], cwd=ROOT,
                          env=hub_standin.environment(hub), capture_output=True, text=True, timeout=900)


SMOKE_CHAPTERS = {
    "00_synthetic": "gpu's k and learning rate on ci's data sizes, every rule",
    "01_subject": "gpt2-small through TransformerLens, held-out windows from the hf: dataset, the ci organism",
    "02_allocation": "gpt2-small through TransformerLens, the OpenWebText mirror streamed by `datasets`, "
                     "every rule",
    "02b_allocation": "chapter 2's harvest reused (one cache key), the length study, the large dictionary, layer 4",
    "03_e2e": "gpt2-small's layer 6 with every objective and sweep of the gpu profile (39 SAEs of 60 x d_model) "
              "at SMOKE_SMALLER's sizes; log axes that say what they leave out",
    "04_dynamics": "Pythia through TransformerLens at every checkpoint of the gpu profile (its stepN revisions)",
    "05_vision": "the CLIP vision tower from transformers behind the chapter's hooks, prompts and zero-shot "
                 "text heads; ImageNet-100, Food-101 and EuroSAT as RGB images of odd sizes from the hub's "
                 "parquet files, resized and cropped for CLIP",
}
"""The chapters run on gpu-smoke, with what each one's run exercises of the gpu path."""


@pytest.mark.parametrize("chapter", SMOKE_CHAPTERS)
def test_chapter_runs_on_gpu_smoke(chapter, hub, tmp_path):
    proc = _run_chapter(chapter, hub, tmp_path)
    assert proc.returncode == 0, f"{chapter} ({SMOKE_CHAPTERS[chapter]}):\n" + proc.stdout[-2000:] + proc.stderr[-3000:]


def test_a_wrong_hub_name_stops_the_chapter_naming_it(hub, tmp_path):
    proc = _run_chapter("01_subject", hub, tmp_path, "pretrained=gpt2-smal")
    assert proc.returncode == 1
    assert "01_subject_models.ipynb failed in cell" in proc.stderr and "unknown subject model 'gpt2-smal'" in proc.stderr
