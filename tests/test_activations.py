import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from saelib.core.metrics import evaluate
from saelib.core.sae import SAEConfig
from saelib.core.training import TrainConfig, train_saes
from saelib.subjects import activations
from saelib.subjects.activations import (
    CacheMismatchError,
    CacheSpec,
    NonFiniteActivationError,
    WindowTable,
    build_caches,
    drop_norm_outliers,
    get_or_build_cache,
    harvest,
    open_cache,
    token_windows,
)
from saelib.subjects.language_models import load_subject_model, train_organism

H0, H1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A 10-step 'ci' organism (weights barely trained, which is all these tests need)."""
    root = tmp_path_factory.mktemp("act")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAELIB_CACHE", str(root / "cache"))
        org = train_organism("ci", root / "organism", n_steps=10, progress=False)
        yield load_subject_model(org), str(org), root


def spec(env, **kw) -> CacheSpec:
    return CacheSpec(**{"model": env[1], "hook": H0, "n_tokens": 500, "context_size": 32, "batch_size": 4, **kw})


@pytest.fixture(scope="module")
def cache(env):
    return get_or_build_cache(spec(env), progress=False, model=env[0])


def test_harvest_shapes_and_bos_excluded(env):
    model = env[0]
    windows = token_windows(model.tokenizer, "mixed", 6, 32)
    assert windows.shape == (6, 32) and (windows[:, 0] == model.tokenizer.bos_token_id).all()
    acts = harvest(model, [H0, H1], windows, batch_size=4, progress=False)
    assert acts[H0].shape == acts[H1].shape == (6 * 31, model.cfg.d_model)
    with_bos = harvest(model, [H0], windows, batch_size=4, exclude_bos=False, progress=False)[H0]
    assert with_bos.shape == (6 * 32, model.cfg.d_model)
    torch.testing.assert_close(with_bos.view(6, 32, -1)[:, 1:].reshape(-1, model.cfg.d_model), acts[H0])


def test_harvest_stops_early_with_same_values(env, monkeypatch):
    model = env[0]
    windows = token_windows(model.tokenizer, "mixed", 4, 32)
    calls = []
    real = model.run_with_cache

    def spy(*a, **kw):
        calls.append(kw.get("stop_at_layer"))
        return real(*a, **kw)

    monkeypatch.setattr(model, "run_with_cache", spy)
    early = harvest(model, [H0], windows, progress=False)[H0]
    assert calls == [1]
    _, full = real(windows)
    torch.testing.assert_close(early, full[H0][:, 1:].reshape(-1, model.cfg.d_model), rtol=1e-5, atol=1e-5)


def test_cache_equals_direct_run(env, cache):
    model = env[0]
    assert len(cache) == 500 and cache.d_in == model.cfg.d_model
    assert cache.tokens.shape == (17, 32)  # ceil(500 / 31) windows, the last one cut
    assert cache.manifest["stop_at_layer"] == 1 and cache.manifest["harvest_tokens_per_s"] > 0
    _, direct = model.run_with_cache(torch.from_numpy(np.array(cache.tokens)).long())
    rows = torch.tensor([0, 30, 31, 250, 499])
    w, p = cache.locate(rows)
    expected = direct[H0][w, p]
    torch.testing.assert_close(cache[rows], expected, rtol=2e-3, atol=2e-3 * float(expected.abs().max()))
    assert cache[rows].dtype == torch.float32
    torch.testing.assert_close(cache[0:2], cache[torch.tensor([0, 1])])
    assert cache[3].shape == (model.cfg.d_model,)
    assert (p >= 1).all() and list(cache.token_ids(rows)) == [int(cache.tokens[a, b]) for a, b in zip(w, p)]


def test_context_marks_the_row_token(env, cache):
    tok = env[0].tokenizer
    text = cache.context(40, tok, before=5, after=2)
    marked = text.split("«")[1].split("»")[0]
    assert marked == tok.decode([int(cache.token_ids(40))]).replace("\n", "↵")


def test_reopen_is_fast_and_identical(env, cache, monkeypatch):
    monkeypatch.setattr(activations, "load_subject_model", lambda *a, **k: pytest.fail("reloaded the model"))
    t0 = time.perf_counter()
    again = get_or_build_cache(spec(env), progress=False)
    assert time.perf_counter() - t0 < 1.0
    assert again.path == cache.path and again.spec == cache.spec
    idx = torch.arange(len(cache))
    assert torch.equal(again[idx], cache[idx])


def test_mismatched_manifest_is_refused(env, cache):
    with pytest.raises(CacheMismatchError, match=f"hook: cache has '{H0}', requested '{H1}'"):
        get_or_build_cache(spec(env, hook=H1), path=cache.path, progress=False)
    with pytest.raises(CacheMismatchError, match="n_tokens"):
        open_cache(cache.path, expect=spec(env, n_tokens=400))


def test_build_caches_one_pass_several_hooks_and_dtypes(env, cache, tmp_path):
    specs = [spec(env, dtype="float32"), spec(env, hook=H1, dtype="bfloat16"), spec(env, hook=H1, dtype="float32")]
    stale = tmp_path / f".{specs[0].key()}.tmp999999999"  # a harvest killed mid-way (no such process)
    stale.mkdir()
    f32, bf16, f32_h1 = build_caches(specs, root=tmp_path, model=env[0], progress=False)
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted(s.key() for s in specs)
    idx = torch.arange(500)
    assert f32.manifest["hooks_in_pass"] == [H0, H1, H1]
    torch.testing.assert_close(cache[idx], f32[idx], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(bf16[idx], f32_h1[idx], rtol=1e-2, atol=1e-2)
    assert not torch.equal(f32[idx], f32_h1[idx])


def test_nonfinite_activations_raise(env):
    model = env[0]
    windows = token_windows(model.tokenizer, "mixed", 2, 32)
    windows[1, 5] = 7
    saved = model.W_E.data[7].clone()
    model.W_E.data[7] = float("nan")
    try:
        with pytest.raises(NonFiniteActivationError, match="NaN/inf.*window 1"):
            harvest(model, [H0], windows, progress=False)
    finally:
        model.W_E.data[7] = saved


def test_unknown_hook_and_too_long_windows(env):
    model = env[0]
    windows = token_windows(model.tokenizer, "mixed", 2, 32)
    with pytest.raises(ValueError, match="not a hook point.*hook_resid_post"):
        harvest(model, ["blocks.9.hook_resid_post"], windows, progress=False)
    with pytest.raises(ValueError, match="model's context is 64"):
        harvest(model, [H0], token_windows(model.tokenizer, "mixed", 2, 65), progress=False)


def test_failed_build_leaves_nothing(env, tmp_path):
    with pytest.raises(ValueError, match="context_size=128 exceeds the model's context 64"):
        get_or_build_cache(spec(env, context_size=128), root=tmp_path, model=env[0], progress=False)
    model = env[0]
    saved = model.blocks[0].mlp.b_out.data.clone()
    model.blocks[0].mlp.b_out.data[0] = float("inf")
    try:
        with pytest.raises(NonFiniteActivationError):
            get_or_build_cache(spec(env, n_tokens=100), root=tmp_path, model=model, progress=False)
    finally:
        model.blocks[0].mlp.b_out.data.copy_(saved)
    assert list(tmp_path.iterdir()) == []


def test_heldout_windows_are_other_text(env):
    tok = env[0].tokenizer
    train = token_windows(tok, "mixed", 200, 32, seed=1)
    held = token_windows(tok, "mixed", 50, 32, split="heldout")
    assert torch.equal(train, token_windows(tok, "mixed", 200, 32, seed=1))
    shingles = {tuple(r[i:i + 8].tolist()) for r in train[:, 1:] for i in range(0, 24)}
    overlap = sum(tuple(r[i:i + 8].tolist()) in shingles for r in held[:, 1:] for i in range(0, 24))
    assert overlap < 0.02 * 50 * 24  # only boilerplate 8-grams may recur
    with pytest.raises(ValueError, match="split"):
        token_windows(tok, "mixed", 2, 32, split="test")


def test_heldout_cache_holds_heldout_windows(env, cache):
    held = get_or_build_cache(spec(env, split="heldout"), progress=False, model=env[0])
    assert held.spec.split == "heldout" and held.path != cache.path
    assert spec(env).key() == cache.path.name  # a cache lives under its spec's key
    windows = token_windows(env[0].tokenizer, "mixed", held.spec.n_windows, 32, split="heldout")
    assert np.array_equal(held.tokens, windows.numpy())
    with pytest.raises(ValueError, match="split must be"):
        spec(env, split="test")


def test_drop_norm_outliers_keeps_the_typical_rows():
    x = torch.randn(1000, 8)
    x[[3, 500, 999]] *= 100
    kept = drop_norm_outliers(x, max_ratio=10.0)
    assert len(kept) == 997 and not np.isin([3, 500, 999], kept.rows).any()
    assert torch.equal(kept[torch.tensor([0, 3])], x[[0, 4]])  # subset row 3 is table row 4
    assert kept.threshold == pytest.approx(10 * float(x.norm(dim=1).median()), rel=1e-3)
    held = drop_norm_outliers(x[:10], threshold=kept.threshold)  # a held-out table, same cut
    assert held.rows.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]


def test_heldout_reads_on_when_the_first_budget_has_no_heldout_document(env):
    from saelib.subjects.corpora import KJV_DATA

    if not KJV_DATA.exists():
        pytest.skip("kjv corpus (Debian bible-kjv-text) is not installed")
    # KJV chapters are ~4k characters, so the first budget (~23k) holds no 20th chapter.
    assert token_windows(env[0].tokenizer, "kjv", 1, 32, split="heldout").shape == (1, 32)


def test_cache_is_a_training_table(cache):
    result = train_saes({"tk": SAEConfig(cache.d_in, 256, rule="topk", k=8)}, cache,
                        TrainConfig(steps=5, batch_size=100, warmup_steps=1, init_tokens=400, log_every=1),
                        progress=False)
    ev = evaluate(result.saes["tk"], cache, n_tokens=400)
    assert ev.n_tokens == 400 and np.isfinite(ev.nmse) and abs(ev.l0 - 8) < 1e-6


def test_bf16_harvest_is_close_to_fp32_and_its_cache_is_kept_apart(env, cache, tmp_path):
    """A bfloat16 forward pass gives activations within a few percent of float32's; its cache has
    its own key, and a float32 cache directory is refused when bfloat16 is asked for."""
    low = get_or_build_cache(spec(env, model_dtype="bfloat16"), progress=False, model=env[0])
    assert low.path != cache.path and next(env[0].parameters()).dtype == torch.float32  # caller's model untouched
    a, b = cache[torch.arange(len(cache))], low[torch.arange(len(low))]
    rel = float((a - b).norm() / a.norm())
    assert 0 < rel < 0.03, rel  # measured 0.5% on this organism (SmolLM2 layer 15: bench_harvest.py)
    with pytest.raises(CacheMismatchError, match="model_dtype: cache has 'float32', requested 'bfloat16'"):
        open_cache(cache.path, expect=spec(env, model_dtype="bfloat16"))
    with pytest.raises(ValueError, match="model_dtype must be one of"):
        spec(env, model_dtype="float16")


def test_window_table_reads_whole_windows_with_bos(env, cache):
    model = env[0]
    whole = get_or_build_cache(spec(env, exclude_bos=False, n_tokens=640), progress=False, model=model)
    table = WindowTable(whole)
    assert len(table) == 20 and table.tokens_per_row == 31
    batch = table[torch.tensor([3, 7])]
    _, direct = model.run_with_cache(torch.as_tensor(whole.tokens[[3, 7]]).long(), names_filter=H0)
    assert batch.shape == (2, 32, model.cfg.d_model)
    torch.testing.assert_close(batch, direct[H0], atol=2e-2, rtol=2e-3)  # float16 storage
    with pytest.raises(ValueError, match="exclude_bos=False"):
        WindowTable(cache)  # token rows, BOS dropped: not windows
    with pytest.raises(ValueError, match=r"\[windows, ctx, d_in\]"):
        WindowTable(torch.zeros(4, 8))
