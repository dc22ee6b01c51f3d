"""The semantics of every allocation rule, pinned."""

import pytest
import torch

from saelib.core.allocation import RULES, AllocationContext, get_rule, top_n_indices, zipf_capacities, zipf_profile

B, F, K = 64, 96, 5


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


def test_feature_choice_respects_capacities_and_total_budget():
    z = preacts(positive=True)
    rank = torch.randperm(F, generator=torch.Generator().manual_seed(4))
    mask = kept_mask("feature_choice", z, feature_rank=rank, zipf_exponent=1.0)
    capacity = zipf_capacities(F, B, K, 1.0)[rank]
    per_feature = mask.sum(0)
    assert (per_feature <= capacity).all()
    assert mask.sum() == K * B  # all entries positive, so every slot is filled
    # each feature keeps its own largest tokens
    for i in range(F):
        if per_feature[i] and per_feature[i] < B:
            assert z[mask[:, i], i].min() > z[~mask[:, i], i].max()


def test_feature_choice_with_negative_entries_never_exceeds_budget():
    mask = kept_mask("feature_choice", preacts(5))
    assert 0 < mask.sum() <= K * B


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
    assert {name: RULES[name].saelens_architecture for name in ("relu", "topk", "mutual_choice", "feature_choice")} \
        == {"relu": "standard", "topk": "topk", "mutual_choice": "jumprelu", "feature_choice": "jumprelu"}
