"""The traces of the two mechanisms behind dead features (saelib.studies.dead_features), on
pre-activations built by hand: an identity encoder with no biases makes z equal the input."""

import math

import pytest
import torch

from saelib.core.sae import SAE, SAEConfig
from saelib.studies.dead_features import dead_feature_traces

# token 0 is large on features 0 and 1, token 1 only slightly positive on feature 3
X = torch.tensor([[5.0, 4.0, 0.0, 0.0],
                  [0.0, 0.0, 0.0, 1.0]])


def identity_sae(rule: str, aux: str = "none", dead=(2, 3)) -> SAE:
    sae = SAE(SAEConfig(4, 4, rule=rule, k=1, aux=aux, k_aux=1, normalize_input=False,
                        dead_after_tokens=100))
    with torch.no_grad():
        sae.encoder.copy_(torch.eye(4))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.tokens_since_fired[list(dead)] = 100
    return sae


def test_mutual_choice_starves_a_feature_that_topk_would_keep():
    traces = dead_feature_traces(identity_sae("mutual_choice"), X)
    # MC keeps the batch's 2 largest entries (5 and 4, both token 0's): feature 3, token 1's best, loses
    assert traces == {"dead": 2.0, "positive_anywhere": 0.5, "topk_would_keep": 0.5, "kept_by_rule": 0.0,
                      "aux_slots_to_dead": pytest.approx(math.nan, nan_ok=True)}
    topk = dead_feature_traces(identity_sae("topk"), X)
    assert topk["topk_would_keep"] == topk["kept_by_rule"] == 0.5  # TopK keeps what a per-token top-k keeps


def test_aux_zipf_gives_slots_to_the_living_where_aux_k_gives_them_to_the_dead():
    for aux, share in (("aux_k", 1.0), ("aux_zipf", 0.5)):
        sae = identity_sae("topk", aux)
        # feature 0 above its Zipf target, feature 1 alive but far below it
        sae.density.copy_(torch.tensor([0.5, 1e-4, 0.0, 0.0]))
        # aux_zipf: token 0's one slot goes to live feature 1 (4 x ~1), token 1's to dead feature 3;
        # aux_k: only token 1 has a positive dead feature
        assert dead_feature_traces(sae, X)["aux_slots_to_dead"] == share, aux


def test_no_dead_features_no_shares():
    traces = dead_feature_traces(identity_sae("mutual_choice", dead=()), X)
    assert traces["dead"] == 0 and all(math.isnan(traces[k]) for k in ("positive_anywhere", "topk_would_keep"))
