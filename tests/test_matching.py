"""Feature matching across checkpoints and the in-context-learning probe: each function is checked
on a case with a known answer, and against a control where the answer must be absent."""

import numpy as np
import pytest
import torch

from saelib.book.exercises import CopyingModel, tiny_model
from saelib.core.sae import SAE, SAEConfig
from saelib.studies import matching
from saelib.subjects.probes import RepeatProbe, icl_score, mean_loss, repeated_sequences


def dictionary(n=64, d=16, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_assignment_recovers_a_known_permutation_exactly():
    a = dictionary()
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    noisy = a[perm] * 3 + 0.05 * dictionary(seed=2)  # permuted, rescaled, slightly moved
    index, cos = matching.assign(a, noisy)
    assert torch.equal(perm[index], torch.arange(64)), "row i of a must map to the row of noisy that holds it"
    assert cos.min() > 0.99
    near, near_cos = matching.max_cosine_match(a, noisy)
    assert torch.equal(near, index) and torch.allclose(near_cos, cos)


def test_assignment_is_one_to_one_where_nearest_neighbours_collide():
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    a = torch.tensor([[1.0, 0.1], [1.0, 0.2]])  # both nearest to b[0]
    near, _ = matching.max_cosine_match(a, b)
    index, cos = matching.assign(a, b)
    assert near.tolist() == [0, 0] and sorted(index.tolist()) == [0, 1]
    index, cos = matching.assign(torch.cat([a, -b]), b)  # more rows than targets
    assert (index == -1).sum() == 2 and torch.isnan(cos[index == -1]).all()


def test_a_feature_matched_to_itself_has_cosine_and_jaccard_one():
    sae = SAE(SAEConfig(16, 64, rule="topk", k=4))
    x = torch.randn(2000, 16)
    fired = matching.firing_matrix(sae, x).dense()
    assert fired.sum(1).max() <= 4 and fired.any()
    _, cos = matching.max_cosine_match(sae.decoder, sae.decoder)
    assert torch.allclose(cos, torch.ones(64))
    j = matching.jaccard(fired, fired)
    assert torch.equal(j[fired.any(0)], torch.ones(int(fired.any(0).sum())))
    assert torch.isnan(j[~fired.any(0)]).all(), "a feature that never fires has nothing to compare"
    other = matching.firing_matrix(SAE(SAEConfig(16, 64, rule="topk", k=4, seed=1)), x)
    assert np.nanmean(matching.jaccard(fired, other).numpy()) < 0.3, "unrelated features overlap by chance only"


def test_jaccard_counts_intersection_over_union_of_paired_columns():
    a = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=torch.bool)
    b = torch.tensor([[1, 1], [0, 1], [0, 0], [0, 1]], dtype=torch.bool)
    j = matching.jaccard(a, b, torch.tensor([0, 1, 0]), torch.tensor([1, 0, -1]))
    assert j[0].item() == pytest.approx(2 / 3) and j[1].item() == 0 and torch.isnan(j[2])
    with pytest.raises(ValueError, match="different tokens"):
        matching.jaccard(a, b[:3])


def test_tracking_follows_a_drifting_dictionary_back_and_births_need_to_stay_matched():
    steps = [0, 10, 100]
    final = dictionary(8, 16)
    middle = final[torch.tensor([3, 2, 1, 0, 7, 6, 5, 4])] + 0.1 * dictionary(8, 16, seed=3)
    first = dictionary(8, 16, seed=4)  # unrelated to the others
    index, cos = matching.track_back([first, middle, final])
    assert index[1].tolist() == [3, 2, 1, 0, 7, 6, 5, 4] and (cos[1] > 0.9).all()
    assert (cos[0].abs() < 0.9).all()
    born = matching.births(torch.stack([cos[0], cos[1], cos[2]]), steps, 0.9)
    assert (born == 10).all()
    sim = np.array([[0.95, 0.2, 0.95], [0.5, 0.95, 0.95], [0.95, 0.95, 0.5]])
    born = matching.births(sim, steps, 0.9)
    assert born[0] == 100 and born[1] == 10 and np.isnan(born[2])


def test_dominant_token_separates_token_level_from_context_level_features():
    tokens = torch.tensor([5, 5, 5, 7, 9, 5, 7, 9])
    fired = torch.zeros(8, 3, dtype=torch.bool)
    fired[[0, 1, 2, 5], 0] = True  # always token 5
    fired[[0, 3, 4, 6], 1] = True  # 5, 7, 9, 7
    token, share = matching.dominant_token(fired, tokens)
    assert token.tolist() == [5, 7, -1] and share[0] == 1 and share[1] == 0.5 and torch.isnan(share[2])


def test_icl_score_is_near_zero_untrained_and_large_for_a_copier():
    seqs = repeated_sequences(16, 12, vocab=50, bos=0, seed=0)
    assert seqs.shape == (16, 25) and torch.equal(seqs[:, 1:13], seqs[:, 13:]) and (seqs[:, 1:] != 0).all()
    assert torch.equal(seqs, repeated_sequences(16, 12, vocab=50, bos=0, seed=0)), "the same probe every time"
    untrained = icl_score(tiny_model(), RepeatProbe.halves(seqs))
    assert abs(untrained.score) < 0.1 and untrained.first > 3, untrained
    wide = repeated_sequences(8, 12, vocab=1000, bos=0, seed=0)  # few repeats inside one copy
    copier = icl_score(CopyingModel(1000), RepeatProbe.halves(wide))
    assert copier.score > 5 and copier.second < 0.1, copier
    assert mean_loss(CopyingModel(1000), wide) == pytest.approx(
        (copier.first * 11 + 2 * np.log(1000) + copier.second * 11) / 24, rel=0.05)
    with pytest.raises(ValueError, match="occurrences differ"):
        RepeatProbe.halves(torch.randint(1, 50, (2, 9)))


def test_directions_of_other_widths_or_zero_norm_are_refused():
    with pytest.raises(ValueError, match="different widths"):
        matching.cosines(dictionary(4, 8), dictionary(4, 9))
    with pytest.raises(ValueError, match="zero norm"):
        matching.assign(torch.zeros(2, 4), dictionary(4, 4))


def test_sparse_firing_gives_the_dense_matrix_back_and_the_same_statistics():
    sae = SAE(SAEConfig(16, 64, rule="topk", k=4))
    x = torch.randn(1500, 16)
    fired = matching.firing_matrix(sae, x, batch_size=256)
    assert isinstance(fired, matching.Firing) and len(fired.rows) <= 4 * len(x)
    dense = fired.dense()
    assert dense.shape == (1500, 64) and dense.sum(1).max() <= 4
    with torch.no_grad():
        codes = sae.eval()(x).codes
    by_hand = torch.zeros(1500, 64, dtype=torch.bool)
    by_hand[codes.rows, codes.cols] = codes.values > 0
    assert torch.equal(dense, by_hand)
    assert torch.equal(fired.counts(), by_hand.sum(0)) and torch.allclose(fired.rate(), by_hand.float().mean(0))
    cols = torch.tensor([5, -1, 5, 0, 63])  # repeated, missing and edge columns
    expect = torch.zeros(1500, 5, dtype=torch.bool)
    for j, c in enumerate(cols.tolist()):
        if c >= 0:
            expect[:, j] = by_hand[:, c]
    assert torch.equal(fired.dense(cols), expect)
    assert torch.equal(fired.take(cols).dense(), expect)
    other = matching.firing_matrix(SAE(SAEConfig(16, 64, rule="topk", k=4, seed=1)), x)
    index_b = torch.randint(-1, 64, (64,), generator=torch.Generator().manual_seed(0))
    sparse_j = matching.jaccard(fired, other, torch.arange(64), index_b, chunk=7)
    dense_j = matching.jaccard(by_hand, other.dense(), torch.arange(64), index_b)
    assert torch.allclose(sparse_j, dense_j, equal_nan=True) and (~sparse_j.isnan()).sum() > 10
    tokens = torch.randint(0, 9, (1500,), generator=torch.Generator().manual_seed(1))
    for got, want in zip(matching.dominant_token(fired, tokens), matching.dominant_token(by_hand, tokens)):
        assert torch.equal(got.nan_to_num(-2), want.nan_to_num(-2))
