"""The plan printed before a gpu chapter starts: numbers counted from the knobs, refusals with numbers."""

import pytest

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
