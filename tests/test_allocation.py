"""The semantics of every allocation rule, pinned."""

import pytest
import torch

from saelib.core.allocation import (
    RULES,
    AllocationContext,
    get_rule,
    row_topk,
    top_n_indices,
    uniform_capacities,
    zipf_capacities,
    zipf_profile,
)

B, F, K = 64, 96, 5
FC_RULES = ("feature_choice", "feature_choice_uniform", "feature_choice_unfloored")


def fc_capacities(rule, n_features, n_tokens, k, exponent=1.0):
    """What each Feature Choice variant's capacities should be, per feature rank."""
    return {"feature_choice": lambda: zipf_capacities(n_features, n_tokens, k, exponent, min_tokens=1),
            "feature_choice_uniform": lambda: uniform_capacities(n_features, n_tokens, k),
            "feature_choice_unfloored": lambda: zipf_capacities(n_features, n_tokens, k, exponent)}[rule]()


def preacts(seed=0, positive=False):
    z = torch.randn(B, F, generator=torch.Generator().manual_seed(seed))
    return z.abs() + 0.01 if positive else z


def kept_mask(rule, z, **ctx):
    kept = RULES[rule].select(z, AllocationContext(k=K, **ctx))
    mask = torch.zeros(B * F, dtype=torch.bool)
    mask[kept] = True
    assert mask.sum() == kept.numel(), "an entry was kept twice"
    rows = kept // F
    assert torch.all(rows[1:] >= rows[:-1]), "kept entries must be grouped by row in ascending order"
    return mask.view(B, F)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_no_nonpositive_entry_is_ever_kept(rule):
    z = preacts(1)
    mask = kept_mask(rule, z)
    assert mask.any()
    assert (z[mask] > 0).all()


def test_topk_keeps_exactly_k_per_row_and_they_are_the_largest():
    z = preacts(positive=True)
    mask = kept_mask("topk", z)
    assert (mask.sum(1) == K).all()
    kth = z.topk(K, dim=1).values[:, -1:]
    assert torch.equal(mask, z >= kth)


@pytest.mark.parametrize("n, k", [(4608, 32), (36_864, 32), (4608, 128), (96, 5), (99, 7), (64, 60)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_topk_selects_the_k_largest_values_of_every_row(n, k, dtype):
    """The blocked selection (taken for most shapes here; 99 columns and k 60 of 64 fall back to
    torch.topk) picks k distinct columns whose values are torch.topk's, bfloat16 ties included."""
    gen = torch.Generator().manual_seed(n + k)
    z = torch.randn(48, n, generator=gen).to(dtype)
    if dtype == torch.bfloat16:  # coarse values: many rows tie at their k-th largest
        z = (z * 4).round() / 4
    got = row_topk(z, k)
    assert got.shape == (48, k)
    assert (got.sort(1).values.diff(dim=1) > 0).all(), "a column was picked twice"
    assert torch.equal(z.gather(1, got).sort(1).values, z.topk(k, dim=1).values.sort(1).values)


def test_row_topk_reads_a_transposed_view_as_it_is():
    z = torch.randn(4608, 40, generator=torch.Generator().manual_seed(1)).T
    assert torch.equal(z.gather(1, row_topk(z, 8)).sort(1).values, z.topk(8, dim=1).values.sort(1).values)


def test_mutual_choice_keeps_exactly_k_times_batch_and_they_are_the_largest():
    z = preacts(positive=True)
    mask = kept_mask("mutual_choice", z)
    assert mask.sum() == K * B
    assert z[mask].min() > z[~mask].max()
    assert mask.sum(1).float().std() > 0, "MC should give tokens different numbers of features"


def test_top_n_indices_is_exact_on_large_inputs():
    values = torch.randn(3_000_000, generator=torch.Generator().manual_seed(3))
    n = 40_000
    got = top_n_indices(values, n)
    assert got.numel() == n
    assert torch.equal(got.sort().values, values.topk(n).indices.sort().values)


@pytest.mark.parametrize("rule", FC_RULES)
def test_feature_choice_respects_capacities_and_total_budget(rule):
    z = preacts(positive=True)
    rank = torch.randperm(F, generator=torch.Generator().manual_seed(4))
    mask = kept_mask(rule, z, feature_rank=rank, zipf_exponent=1.0)
    capacity = fc_capacities(rule, F, B, K)[rank]
    per_feature = mask.sum(0)
    assert torch.equal(per_feature, capacity)  # all entries positive, so every slot is filled
    assert mask.sum() == K * B
    # each feature keeps its own largest tokens
    for i in range(F):
        if per_feature[i] and per_feature[i] < B:
            assert z[mask[:, i], i].min() > z[~mask[:, i], i].max()


@pytest.mark.parametrize("rule", FC_RULES)
def test_feature_choice_with_negative_entries_never_exceeds_budget(rule):
    mask = kept_mask(rule, preacts(5))
    assert 0 < mask.sum() <= K * B


@pytest.mark.parametrize("rule", ["feature_choice", "feature_choice_uniform"])
@pytest.mark.parametrize("n_features, n_tokens, k", [(2048, 128, 32), (4096, 64, 8)])
def test_floored_feature_choice_gives_every_feature_with_a_positive_entry_a_token_in_every_batch(
        rule, n_features, n_tokens, k):
    """(a) and (b): whatever rank a feature holds, it keeps its best token in every batch where it has a
    positive pre-activation, so it cannot go silent (the paper's "no dead features"). The second size
    has k * B < F: the floor wins over the budget there."""
    gen = torch.Generator().manual_seed(11)
    for batch in range(4):
        # Sparse positives: most features are positive on a handful of tokens only.
        z = torch.randn(n_tokens, n_features, generator=gen) - 2.2
        rank = torch.randperm(n_features, generator=gen)
        kept = RULES[rule].select(z, AllocationContext(k=k, feature_rank=rank, zipf_exponent=1.0))
        fired = torch.bincount(kept % n_features, minlength=n_features)
        has_positive = (z > 0).any(0)
        assert 0.5 * n_features < has_positive.sum() < n_features  # some features have nothing to keep
        assert (fired[has_positive] >= 1).all(), f"batch {batch}: {(fired[has_positive] == 0).sum()} silent"
        assert torch.equal(fired > 0, has_positive)
        capacity = fc_capacities(rule, n_features, n_tokens, k)
        assert capacity.min() >= 1 and capacity.sum() == max(k * n_tokens, n_features)


def test_unfloored_zipf_leaves_tail_ranks_without_a_token_at_a_large_dictionary():
    """(c), the silent failure mode: at 32x SmolLM2's width (18,432 features), batch 2048, k = 32, the
    pure Zipf share rounds to zero for about a quarter of the ranks; a feature holding such a rank keeps
    nothing however positive its pre-activations are."""
    capacity = zipf_capacities(18_432, 2048, 32, 1.0)
    assert 0.2 < (capacity == 0).float().mean() < 0.3
    assert (zipf_capacities(18_432, 2048, 32, 1.0, min_tokens=1) >= 1).all()
    # The same at a size a test can select over: 4096 features, batch 64, k 16.
    n_features, n_tokens = 4096, 64
    capacity = zipf_capacities(n_features, n_tokens, 16, 1.0)
    starved = capacity == 0
    assert starved.any()
    z = torch.rand(n_tokens, n_features, generator=torch.Generator().manual_seed(2)) + 0.1  # all positive
    kept = RULES["feature_choice_unfloored"].select(z, AllocationContext(k=16, zipf_exponent=1.0))
    fired = torch.bincount(kept % n_features, minlength=n_features)
    assert (fired[starved] == 0).all() and (fired[~starved] > 0).all()


@pytest.mark.parametrize("n_features, n_tokens, k", [(96, 64, 5), (1000, 37, 3), (50, 10, 50), (4096, 64, 8)])
def test_uniform_capacities_are_one_m_summing_to_the_budget_and_at_least_one(n_features, n_tokens, k):
    cap = uniform_capacities(n_features, n_tokens, k)
    assert cap.min() >= 1 and cap.max() - cap.min() <= 1 and cap.max() <= n_tokens
    assert cap.sum() == max(k * n_tokens, n_features)
    assert torch.all(cap[1:] <= cap[:-1]), "the extra tokens go to the first ranks"


@pytest.mark.parametrize("exponent", [0.0, 0.7, 1.0, 2.0])
@pytest.mark.parametrize("n_features, n_tokens, k", [(96, 64, 5), (18_432, 2048, 32), (64, 16, 64)])
def test_floored_zipf_capacities_sum_to_budget_follow_rank_and_never_drop_below_one(
        exponent, n_features, n_tokens, k):
    cap = zipf_capacities(n_features, n_tokens, k, exponent, min_tokens=1)
    assert cap.sum() == k * n_tokens and cap.min() >= 1 and cap.max() <= n_tokens
    assert torch.all(cap[1:] <= cap[:-1] + 1), "capacities must follow rank (up to rounding)"
    # Above the floor it is the Zipf share of what is left: the head keeps its order of magnitude.
    plain = zipf_capacities(n_features, n_tokens, k, exponent)
    assert cap[0] <= plain[0] + 1


@pytest.mark.parametrize("exponent", [0.0, 0.7, 1.0, 2.0])
def test_zipf_capacities_sum_to_budget_and_are_capped(exponent):
    cap = zipf_capacities(F, B, K, exponent)
    assert cap.sum() == K * B
    assert cap.max() <= B and cap.min() >= 0
    assert torch.all(cap[1:] <= cap[:-1] + 1), "capacities must follow rank (up to rounding)"
    prof = zipf_profile(F, K, exponent)
    assert torch.isclose(prof.sum(), torch.tensor(float(K), dtype=torch.float64))
    assert prof.max() <= 1


def test_zipf_profile_is_zipf_where_uncapped():
    prof = zipf_profile(1000, 8, 1.0)
    uncapped = prof < 1
    r = torch.arange(1, 1001, dtype=torch.float64)[uncapped]
    ratio = prof[uncapped] * r
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))


def test_unknown_rule_lists_valid_ones():
    with pytest.raises(ValueError, match="valid rules.*mutual_choice"):
        get_rule("batch_topk_typo")


def test_k_larger_than_dictionary_is_refused():
    with pytest.raises(ValueError, match="k must be"):
        zipf_profile(10, 11, 1.0)


def test_registering_a_name_twice_is_refused_and_nothing_is_overwritten():
    from saelib.core.allocation import register

    before = RULES["topk"]
    with pytest.raises(ValueError, match="'topk' is already registered"):
        register("topk", label="x", color="#000000")(lambda z, ctx: z)
    assert RULES["topk"] is before


def test_a_new_rule_is_one_function_and_one_decorator(tmp_path):
    """A rule registered here trains, exports to SAELens and gets its plot colour without any other edit."""
    from saelib.book import plots
    from saelib.core.allocation import register
    from saelib.core.sae import SAE, SAEConfig
    from saelib.core.saelens_io import export_saelens, load_saelens

    @register("top1_test", label="Top-1", color="#123456")
    def top1(z, ctx):
        return torch.arange(len(z)) * z.shape[1] + z.argmax(1)

    try:
        sae = SAE(SAEConfig(d_in=6, d_sae=12, rule="top1_test", k=1))
        out = sae(torch.randn(5, 6))
        assert out.codes.l0_per_token().le(1).all()
        assert plots.color("top1_test") == plots.color("top1_test lr=1e-3") == "#123456"
        assert RULES["top1_test"].saelens_architecture == "topk"
        export_saelens(sae, tmp_path / "exported")
        assert load_saelens(tmp_path / "exported").cfg.rule == "top1_test"
    finally:
        del RULES["top1_test"]


def test_saelens_architecture_follows_each_rules_inference_mode():
    assert {name: RULES[name].saelens_architecture for name in ("relu", "topk", "mutual_choice", *FC_RULES)} \
        == {"relu": "standard", "topk": "topk", "mutual_choice": "jumprelu", **dict.fromkeys(FC_RULES, "jumprelu")}


def test_a_rule_revised_under_its_name_gets_a_new_cache_key(monkeypatch):
    """feature_choice changed its capacities under an unchanged name (revision 1), topk its tie
    picks (revision 1, the blocked selection): SAEs cached before must not load; a rule never
    revised adds nothing to its key."""
    import dataclasses

    from saelib.core import training
    from saelib.core.sae import SAEConfig

    assert RULES["feature_choice"].revision == 1 and RULES["topk"].revision == 1
    assert RULES["relu"].revision == 0
    out_dirs = []
    monkeypatch.setattr(training, "train_saes", lambda *a, out_dir, **kw: out_dirs.append(out_dir))

    def cached(rule):
        cfg = training.TrainConfig(steps=1, batch_size=8)
        training.train_cached({"a": SAEConfig(4, 8, rule=rule, k=2)}, torch.zeros(8, 4), cfg, data_key="d")
        return out_dirs[-1]

    revised = cached("feature_choice")
    monkeypatch.setitem(RULES, "feature_choice", dataclasses.replace(RULES["feature_choice"], revision=0))
    assert cached("feature_choice") != revised
    topk = cached("topk")
    monkeypatch.setitem(RULES, "topk", dataclasses.replace(RULES["topk"], revision=0))
    assert cached("topk") != topk
    relu = cached("relu")
    monkeypatch.setitem(RULES, "relu", dataclasses.replace(RULES["relu"], revision=0))
    assert cached("relu") == relu
