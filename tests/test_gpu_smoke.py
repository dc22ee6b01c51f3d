"""The ``gpu-smoke`` profile: ``gpu``'s names and code path at sizes that run in seconds, executed on
the CPU against the stand-in hub (tests/hub_standin.py), offline."""

import subprocess
import sys

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
    return hub_standin.build(tmp_path_factory.mktemp("hf_home"))


def _run_chapter(only: str, hub, tmp_path, *params: str) -> subprocess.CompletedProcess:
    """The runner on gpu-smoke for one chapter, against the stand-in hub (``params``: ``-p KEY=VALUE``)."""
    flags = [arg for p in params for arg in ("-p", p)]
    return subprocess.run([sys.executable, "-m", "saelib.book", "--profile", "gpu-smoke", "--only", only,
                           "--no-html", "--build-dir", str(tmp_path), *flags], cwd=ROOT,
                          env=hub_standin.environment(hub), capture_output=True, text=True, timeout=900)


def test_chapter_0_runs_on_gpu_smoke(hub, tmp_path):
    proc = _run_chapter("00_synthetic", hub, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_chapter_1_runs_on_gpu_smoke(hub, tmp_path):
    """gpt2-small through TransformerLens, held-out windows from the hf: dataset, the ci organism."""
    proc = _run_chapter("01_subject", hub, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_chapter_2_runs_on_gpu_smoke(hub, tmp_path):
    """gpt2-small through TransformerLens, the OpenWebText mirror streamed by `datasets`, every rule."""
    proc = _run_chapter("02_allocation", hub, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_chapter_2b_runs_on_gpu_smoke(hub, tmp_path):
    """Chapter 2's harvest reused (one cache key), the length study, the large dictionary, layer 4."""
    proc = _run_chapter("02b_allocation", hub, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_a_wrong_hub_name_stops_the_chapter_naming_it(hub, tmp_path):
    proc = _run_chapter("01_subject", hub, tmp_path, "pretrained=gpt2-smal")
    assert proc.returncode == 1
    assert "01_subject_models.ipynb failed in cell" in proc.stderr and "unknown subject model 'gpt2-smal'" in proc.stderr


def test_chapter_4_runs_on_gpu_smoke(hub, tmp_path):
    """Pythia through TransformerLens at every checkpoint of the gpu profile (its stepN revisions)."""
    proc = _run_chapter("04_dynamics", hub, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_chapter_5_runs_on_gpu_smoke(hub, tmp_path):
    """The CLIP vision tower from transformers behind the chapter's hooks, prompts and probes."""
    proc = _run_chapter("05_vision", hub, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_chapter_3_runs_on_gpu_smoke(hub, tmp_path):
    """gpt2-small's layer 6 with the gpu profile's every objective and sweep (39 SAEs of 60 x d_model)
    at SMOKE_SMALLER's sizes; its figures say what their log axes leave out."""
    proc = _run_chapter("03_e2e", hub, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
