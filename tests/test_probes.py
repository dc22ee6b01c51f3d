"""The probes tell induction from shortcuts: hand-built models with known circuits."""

import pytest
import torch

from saelib.subjects.language_models import _transformer_lens
from saelib.subjects.probes import (
    RepeatProbe,
    icl_score,
    loss_by_position,
    prefix_matching,
    previous_token,
    random_windows,
    repeat_spans,
    repeated_sequences,
)

VOCAB, CTX, SHARP = 256, 48, 40.0


def hand_built(kind: str, offset: int = 0):
    """A two-layer attention-only HookedTransformer with one head per layer, its weights written by
    hand on one-hot slots of the residual stream [token | position | previous token | output]:

    * ``induction``: layer 0 attends to t - 1 and writes that token into the previous-token slot;
      layer 1 attends to the positions whose previous token is the current token and writes their
      token into the output slot (Olsson et al.'s circuit).
    * ``positional``: layer 0 attends to t + 1 - ``offset`` and writes its token into the output
      slot, whatever the tokens are (a copier that a fixed-offset probe cannot tell from induction).
    * ``random``: TransformerLens's random initialisation of the same shape."""
    _, HookedTransformer, HookedTransformerConfig, _ = _transformer_lens()
    tok, pos, prev, out = 0, VOCAB, VOCAB + CTX, 2 * VOCAB + CTX
    d_model, d_head = 3 * VOCAB + CTX, max(VOCAB, CTX)
    cfg = HookedTransformerConfig(n_layers=2, d_model=d_model, n_heads=1, d_head=d_head, n_ctx=CTX, d_vocab=VOCAB,
                                  attn_only=True, normalization_type=None, use_attn_scale=False,
                                  positional_embedding_type="standard", act_fn="relu", seed=0,
                                  init_weights=kind == "random", device="cpu")
    model = HookedTransformer(cfg)
    if kind == "random":
        return model.eval()
    state = {name: torch.zeros_like(w) for name, w in model.state_dict().items()}
    eye_v, eye_p = torch.eye(VOCAB), torch.eye(CTX)
    state["embed.W_E"][:, tok:tok + VOCAB] = eye_v
    state["pos_embed.W_pos"][:, pos:pos + CTX] = eye_p
    state["unembed.W_U"][out:out + VOCAB] = 10 * eye_v
    lag = 1 if kind == "induction" else offset - 1  # layer 0's query p attends to key p - lag
    keys = torch.arange(CTX - lag)
    state["blocks.0.attn.W_Q"][0, pos:pos + CTX, :CTX] = SHARP * eye_p
    state["blocks.0.attn.W_K"][0, pos + keys, keys + lag] = 1.0
    state["blocks.0.attn.W_V"][0, tok:tok + VOCAB, :VOCAB] = eye_v
    state["blocks.0.attn.W_O"][0, :VOCAB, (prev if kind == "induction" else out):][:, :VOCAB] = eye_v
    if kind == "induction":
        state["blocks.1.attn.W_Q"][0, tok:tok + VOCAB, :VOCAB] = SHARP * eye_v
        state["blocks.1.attn.W_K"][0, prev:prev + VOCAB, :VOCAB] = eye_v
        state["blocks.1.attn.W_V"][0, tok:tok + VOCAB, :VOCAB] = eye_v
        state["blocks.1.attn.W_O"][0, :VOCAB, out:out + VOCAB] = eye_v
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="module")
def probes():
    length = 12
    fixed = RepeatProbe.halves(repeated_sequences(32, length, VOCAB, bos=0, seed=0))
    shifted = repeat_spans(random_windows(64, CTX, VOCAB, bos=0, seed=0), length, seed=0)
    return length, fixed, shifted


def test_positional_copier_passes_the_fixed_offset_probe_only(probes):
    length, fixed, shifted = probes
    copier = hand_built("positional", offset=length)
    assert (shifted.offset != length).float().mean() > 0.8, "the random-offset probe must vary its offsets"
    on_fixed = icl_score(copier, fixed).score
    # Near zero: only the windows whose copy happens to lie exactly `length` tokens on score.
    assert on_fixed > 3.0 and abs(icl_score(copier, shifted).score) < 0.15 * on_fixed
    induction = hand_built("induction")
    assert icl_score(induction, fixed).score > 3.0
    assert icl_score(induction, shifted).score > 3.0


def test_prefix_matching_near_one_for_induction_and_chance_for_random(probes):
    _, fixed, shifted = probes
    induction, chance = prefix_matching(hand_built("induction"), shifted)
    assert induction.shape == (2, 1)
    assert induction[1, 0] > 0.8, "the hand-built induction head attends to the token after the match"
    assert induction[0, 0] < 0.05, "its previous-token head does not"
    randomly, chance = prefix_matching(hand_built("random"), shifted)
    assert randomly.max() < 2 * chance and 0 < chance < 0.1
    prev = previous_token(hand_built("induction"), shifted.tokens)
    assert prev[0, 0] > 0.95 and prev[1, 0] < 0.5


def test_probes_are_seeded_and_checked():
    w = random_windows(8, CTX, VOCAB, bos=0, seed=3)
    assert torch.equal(w, random_windows(8, CTX, VOCAB, bos=0, seed=3)) and (w[:, 1:] != 0).all()
    a, b = repeat_spans(w, 10, seed=1), repeat_spans(w, 10, seed=1)
    assert torch.equal(a.tokens, b.tokens) and (a.second >= a.first + 10).all() and (a.second + 10 <= CTX).all()
    with pytest.raises(ValueError, match="occurrences differ"):
        RepeatProbe(w, a.first, a.second, 10)
    with pytest.raises(ValueError, match="span of|span length"):
        repeat_spans(w, CTX // 2, seed=0)
    curve = loss_by_position(hand_built("induction"), a.tokens)
    assert curve.shape == (CTX - 1,)


def test_steepest_rise_finds_the_jump_within_its_window():
    from saelib.subjects.probes import steepest_rise

    steps = [0, 100, 200, 300, 400, 500]
    jump = steepest_rise(steps, [0.0, 0.1, 0.1, 2.0, 2.1, 2.2], window=100)
    assert (jump.start, jump.end) == (200, 300) and jump.rise == pytest.approx(1.9)
    smooth = steepest_rise(steps, [0.0, 0.4, 0.8, 1.2, 1.6, 2.0], window=100)
    assert smooth.rise == pytest.approx(0.4), "a steady climb has no jump larger than one interval's"
    assert jump.overlaps(steepest_rise(steps, [0, 0, 0, 1, 1, 1], window=100))
    assert not jump.overlaps(smooth.__class__(1.0, 400, 500))


def test_a_verdict_across_thresholds_holds_only_where_every_threshold_agrees():
    from saelib.book import claims

    def holds(margins):
        return claims.verdict(*claims.across(margins))

    assert holds([0.1, 0.3]) is True and holds([-0.1, -0.2]) is False
    assert holds([0.2, -0.1]) == claims.INCONCLUSIVE and holds([0.0]) == claims.INCONCLUSIVE
    claim = claims.Claim("x", "says", "ours", holds=holds([0.2, -0.1]))
    assert claims.table([claim])["holds here"]["x"] == claims.INCONCLUSIVE
    with pytest.raises(ValueError):
        claims.across([])


def test_bootstrap_interval_covers_a_real_difference_and_straddles_none():
    import numpy as np

    from saelib.studies.matching import bootstrap_difference

    rng = np.random.default_rng(0)
    diff, lo, hi = bootstrap_difference(rng.normal(1, 1, 400), rng.normal(0, 1, 400), seed=0)
    assert lo > 0.7 and hi < 1.3 and lo < diff < hi
    _, lo, hi = bootstrap_difference(rng.normal(0, 1, 400), rng.normal(0, 1, 400), seed=0)
    assert lo < 0 < hi
