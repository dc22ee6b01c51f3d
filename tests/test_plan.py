"""The plan printed before a gpu chapter starts: numbers counted from the knobs, refusals with numbers."""

import dataclasses
from types import SimpleNamespace

import nbformat
import pytest
import torch

from saelib.book import build, plan, profiles


def test_every_chapter_has_a_plan_at_every_profile():
    assert set(plan.PLANNERS) == set(profiles.CHAPTERS)
    for chapter in profiles.CHAPTERS:
        gpu, smoke = (plan.plan(chapter, profiles.values(chapter, p)) for p in ("gpu", "gpu-smoke"))
        assert gpu.flops > smoke.flops > 0, chapter
        assert gpu.sae_tokens >= smoke.sae_tokens >= 0 and gpu.cache_bytes >= smoke.cache_bytes >= 0, chapter
        assert gpu.hours("T4") == pytest.approx(gpu.hours("A100") * 5), "T4 at a fifth of the A100's rate"


def test_chapter_2_plan_counts_by_hand():
    P = {**profiles.values("allocation", "gpu"), "n_tokens": 1000, "steps": 10, "batch_size": 8,
         "k_sweep": (16, 64), "l1_sweep": (0.1,), "expansion": 2, "eval_tokens": 100, "splice_windows": 1,
         "context_size": 4}
    p = plan.plan("allocation", P)
    d, width, n_sparse, n_dense = 768, 1536, 3 + 3 * 2, 1
    assert p.cache_bytes == 2 * d * 1000  # fp16 rows of gpt2-small's residual stream
    assert p.sae_tokens == (n_sparse + n_dense) * 10 * 8
    n_saes = n_sparse + n_dense
    subject_tokens = 1000 + 100 + 2 * n_saes * 1 * 4
    assert p.subject_tokens == subject_tokens
    assert p.flops == pytest.approx(2 * 124e6 * subject_tokens + (6 * n_sparse + 12 * n_dense) * d * width * 80)
    sae_state = 16 * 2 * d * width
    assert p.gpu_bytes == pytest.approx(4 * 124e6 + sae_state + 4 * 8 * (width + 4 * d))


def test_check_names_what_does_not_fit():
    p = plan.plan("dynamics", profiles.values("dynamics", "gpu"))  # about 37 GB of caches
    with pytest.raises(plan.PlanError, match=r"^dynamics cannot run here: the activation caches need 36\.9 GB of "
                                             r"disk, 10\.0 GB are free"):
        p.check(disk_free=10e9, gpu_memory=None, cpu_memory=64e9)
    with pytest.raises(plan.PlanError, match=r"needs \d+\.\d GB of GPU memory, the GPU has 0\.1 GB"):
        p.check(disk_free=1e12, gpu_memory=0.1e9, cpu_memory=64e9)
    p.check(disk_free=1e12, gpu_memory=None, cpu_memory=64e9)  # no GPU: nothing to check there


def test_resolve_prints_the_plan_for_gpu_profiles_and_refuses_what_cannot_fit(capsys, monkeypatch):
    profiles.resolve("synthetic", "cpu")
    assert "plan for" not in capsys.readouterr().out
    profiles.resolve("synthetic", "gpu-smoke")
    out = capsys.readouterr().out
    assert out.startswith("plan for synthetic") and "h on a T4" in out and "h on an A100" in out
    monkeypatch.setattr(plan, "machine", lambda: (1e6, None, 64e9))
    with pytest.raises(plan.PlanError, match="allocation cannot run here: the activation caches need 12.3 GB"):
        profiles.resolve("allocation", "gpu")


def test_runner_prints_every_chapters_plan(capsys):
    assert build.main(["--profile", "gpu", "--plan"]) == 0
    out = capsys.readouterr().out
    assert out.count("plan for ") == len(build.chapters())
    e2e = plan.plan("e2e", profiles.values("e2e", "gpu"))
    assert "03_e2e: plan for e2e" in out and f"activation cache on disk {e2e.cache_bytes / 1e9:.2f} GB" in out


class _Loaded(torch.nn.Module):
    """A stand-in for a loaded subject model: parameters and a TransformerLens-style cfg."""

    def __init__(self, d_model: int, n_layers: int, **cfg):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n_layers, d_model, d_model))
        self.cfg = SimpleNamespace(d_model=d_model, n_layers=n_layers, **cfg)


def test_a_loaded_models_counts_replace_the_published_sizes():
    """The chapters' plans: the one estimator, with the model they loaded."""
    assert plan.counts(_Loaded(8, 2)) == plan.SubjectSpec(128.0, 8, 2)
    assert plan.counts(_Loaded(4, 3, n_tokens=5)).tokens_per_item == 5  # a ViT: CLS + patches
    P = {**profiles.values("e2e", "gpu"), "steps": 10, "batch_size": 2, "context_size": 4}
    published, loaded = plan.plan("e2e", P), plan.plan("e2e", P, model=_Loaded(8, 2))
    assert published.sae_tokens == loaded.sae_tokens == 39 * 10 * 2 * 4  # the chapter's 39 SAEs
    assert published.cache_bytes == 2 * 768 * P["n_tokens"] and loaded.cache_bytes == 2 * 8 * P["n_tokens"]
    assert loaded.flops < published.flops
    V = {**profiles.values("vision", "gpu"), "sae_images": 3, "eval_images": 2, "mask_images": 1,
         "mask_ks": (1, 2), "task_test_images": 1, "prompt_seeds": (0,), "shots": 1, "prompt_epochs": 1,
         "steps": 5, "batch_size": 7, "expansion": 2}
    vit = plan.plan("vision", V, model=_Loaded(4, 1, n_tokens=5))
    # the gpu tasks (Food-101, EuroSAT) are matched at EuroSAT's 10 classes
    params, per_image, images = 16, 5, 3 + 2 + 1 * 2 + 2 * 10 * 1 * 2
    assert vit.subject_tokens == images * per_image
    prompt = 2 * 3 * 2 * params * per_image * 1 * 10 * 1 * 1
    assert vit.flops == pytest.approx(2 * params * images * per_image + prompt + 12 * 4 * 8 * 35)
    assert vit.cpu_bytes == pytest.approx(4 * params + 4 * 4 * 5 * (3 + 2 + 1) + 4 * 7 * (8 + 16))
    # the images themselves are held too: the SAE's, statistics' and masking's, and both tasks'
    grey = plan.plan("vision", V, model=_Loaded(4, 1, n_tokens=5, image_size=2, channels=1))
    assert grey.cpu_bytes - vit.cpu_bytes == pytest.approx(4 * 2 * 2 * ((3 + 2 + 1) + 2 * 10 * (1 + 1)))
    # CLIP on the gpu profile: 6,000 images of ImageNet-100 and 2 x 10 x (16 + 250) task images, uint8
    clip = plan.plan("vision", profiles.values("vision", "gpu"))
    without_images = dataclasses.replace(plan.SUBJECTS["clip-vit-b-16"], item_bytes=0)
    assert plan._vision(profiles.values("vision", "gpu"), without_images).cpu_bytes == pytest.approx(
        clip.cpu_bytes - 3 * 224 * 224 * (6000 + 2 * 10 * (16 + 250)))


@pytest.mark.parametrize("notebook", ["03_e2e", "05_vision"])
def test_chapters_show_the_plan_of_the_one_estimator(notebook):
    """No chapter keeps an estimator of its own (FLOP rates, utilisations): they call plan.plan."""
    source = "\n".join(c.source for c in nbformat.read(build.ROOT / "notebooks" / f"{notebook}.ipynb",
                                                        as_version=4).cells if c.cell_type == "code")
    assert "from saelib.book.plan import plan" in source and "plan(" in source and ", model=" in source
    assert not any(word in source for word in ("run_plan", "peak = {", "8.1e12", "19.5e12")), notebook


def test_a_model_without_published_sizes_is_refused_not_planned_at_zero(capsys):
    """The book's own organisms and ViTs have no published sizes: a plan of zero FLOPs would be
    silently wrong, so plan() asks for the loaded model and --plan says so per chapter."""
    P = profiles.values("e2e", "cpu")
    with pytest.raises(plan.NoPublishedSizes, match="no published sizes for the e2e chapter's model 'organism-cpu'"):
        plan.plan("e2e", P)
    # the resolver steps aside, so that the loader names a mistyped model (tests/test_gpu_smoke.py)
    typo = {**profiles.values("subject_models", "gpu"), "pretrained": "gpt2-smal"}
    assert plan.announce("subject_models", typo) is None
    assert "plan skipped: no published sizes for the subject_models chapter's model 'gpt2-smal'" in capsys.readouterr().out
    loaded = plan.plan("e2e", P, model=_Loaded(8, 2))
    assert loaded.flops > 0 and loaded.sae_tokens > 0
    assert plan.plan("synthetic", profiles.values("synthetic", "cpu")).flops > 0  # chapter 0: no model
    assert build.main(["--profile", "cpu", "--plan"]) == 0
    out = capsys.readouterr().out
    for chapter in ("03_e2e", "04_dynamics", "05_vision"):
        assert f"{chapter}: no published sizes" in out
    assert out.count("plan for ") == len(build.chapters()) - 3


def test_chapter_3s_plan_counts_only_the_trios_steps_after_its_fork():
    """cpu's trio (1280 steps) forks from the sweep's checkpoint at step 240 (the last of every 80
    before the decay at 256): the plan counts its 1040 steps; under the cosine it trains from 0."""
    P = profiles.values("e2e", "cpu")
    step_tokens = P["batch_size"] * P["context_size"]
    sweep = 26 * P["steps"] * step_tokens
    assert plan.plan("e2e", P, model=_Loaded(8, 2)).sae_tokens == sweep + 3 * 1040 * step_tokens
    cosine = plan.plan("e2e", {**P, "schedule": "cosine"}, model=_Loaded(8, 2))
    assert cosine.sae_tokens == sweep + 3 * 1280 * step_tokens
