"""SAE model semantics: gradients, unit-norm decoder, inference mode, input checks."""

import pytest
import torch

from saelib.core import seeding
from saelib.core.allocation import RULES
from saelib.core.losses import sae_loss
from saelib.core.sae import SAE, SAEConfig, decode_sparse, positive_mass

D, F, K = 16, 64, 4


def batch(n=256, seed=0):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 5 + 2


@pytest.mark.parametrize("rule", sorted(RULES))
def test_gradients_equal_dense_autograd_through_kept_entries_only(rule):
    x = batch()
    sae = SAE(SAEConfig(D, F, rule=rule, k=K, l1_coeff=0.01))
    sae.init_from_sample(x)
    with torch.no_grad():
        sae.b_enc[:3] = -1e4  # features 0-2 can never fire
    out = sae(x)
    sae_loss(sae, out).total.backward()

    # Reference: the same loss written densely, with the kept mask applied to z.
    enc, b_enc, dec, b_dec = (p.detach().clone().requires_grad_() for p in (sae.encoder, sae.b_enc, sae.decoder, sae.b_dec))
    xn = x * sae.input_scale
    z = (xn - b_dec) @ enc.T + b_enc
    mask = out.codes.to_dense() != 0
    codes = z * mask
    x_hat = codes @ dec + b_dec
    loss = (x_hat - xn).pow(2).sum() / (xn - xn.mean(0)).pow(2).sum() + 0.01 * codes.abs().sum() / len(x)
    loss.backward()
    for ours, ref in [(sae.encoder, enc), (sae.decoder, dec), (sae.b_enc, b_enc), (sae.b_dec, b_dec)]:
        assert torch.allclose(ours.grad, ref.grad, atol=1e-5, rtol=1e-4)
    assert not mask[:, :3].any()
    assert (sae.encoder.grad[:3] == 0).all(), "a feature that kept no entry got an encoder gradient"
    assert (sae.b_enc.grad[:3] == 0).all()


@pytest.mark.parametrize("decoder_grad", [True, False])
def test_sparse_decode_gradients_equal_the_dense_product(decoder_grad):
    """The sparse decoder's own backward against autograd through a dense codes @ decoder, at a
    density where the sparse kernels run; tokens 3 and 7 (and the last) keep no entry."""
    gen = torch.Generator().manual_seed(4)
    n_tokens, n_features, d = 40, 500, 24
    keep = torch.rand(n_tokens, n_features, generator=gen) < 0.02
    keep[[3, 7, -1]] = False
    rows, cols = keep.nonzero(as_tuple=True)
    values = torch.rand(rows.numel(), generator=gen).requires_grad_()
    decoder = torch.randn(n_features, d, generator=gen).requires_grad_(decoder_grad)
    out = decode_sparse(rows, cols, values, decoder, n_tokens)
    grad = torch.randn(n_tokens, d, generator=gen)
    out.backward(grad)
    ref_values = values.detach().clone().requires_grad_()
    ref_decoder = decoder.detach().clone().requires_grad_(decoder_grad)
    dense = torch.zeros(n_tokens, n_features).index_put((rows, cols), ref_values)
    ref = dense @ ref_decoder
    ref.backward(grad)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(values.grad, ref_values.grad)
    assert (decoder.grad is None) == (not decoder_grad)
    if decoder_grad:
        torch.testing.assert_close(decoder.grad, ref_decoder.grad)
    assert (out[[3, 7, -1]] == 0).all()


def test_positive_mass_equals_the_clamped_row_sums_exactly():
    rows = torch.randn(300, 70)  # 300 rows: chunks of 256 and a remainder of 44
    assert torch.equal(positive_mass(rows), rows.clamp(min=0).sum(1))
    assert torch.equal(positive_mass(rows[:5]), rows[:5].clamp(min=0).sum(1))


def test_output_is_in_input_units_and_scale_is_stored():
    x = batch() * 100
    sae = SAE(SAEConfig(D, F, k=K))
    sae.init_from_sample(x)
    assert torch.isclose(x.mul(sae.input_scale).pow(2).sum(1).mean(), torch.tensor(1.0), atol=1e-4)
    out = sae(x)
    assert torch.allclose(out.x_hat, out.x_hat_norm / sae.input_scale)


def test_b_dec_starts_at_geometric_median():
    x = batch()
    sae = SAE(SAEConfig(D, F, k=K, normalize_input=False))
    sae.init_from_sample(x)
    dist = lambda c: (x - c).norm(dim=1).sum()
    assert dist(sae.b_dec.detach()) <= dist(x.mean(0))
    for _ in range(20):
        probe = sae.b_dec.detach() + 0.05 * torch.randn(D)
        assert dist(sae.b_dec.detach()) <= dist(probe) + 1e-4


@pytest.mark.parametrize("rule", ["mutual_choice", "feature_choice", "feature_choice_uniform", "feature_choice_unfloored"])
def test_batch_rules_encode_a_single_token_deterministically_at_inference(rule):
    x = batch(1024)
    sae = SAE(SAEConfig(D, F, rule=rule, k=K))
    sae.init_from_sample(x)
    sae.train()
    for i in range(5):
        sae(batch(1024, seed=i))  # training forwards track the inference thresholds
    assert torch.isfinite(sae.threshold).any()
    alone = torch.stack([sae.encode(x[i:i + 1])[0] for i in range(8)])
    together = sae.encode(x[:8])
    # Same support exactly; values equal up to the float rounding of a 1-row vs 8-row matmul.
    assert torch.equal(alone != 0, together != 0), "a token's code must not depend on its batch at inference"
    assert torch.allclose(alone, together, atol=1e-5)
    l0 = (sae.encode(x) != 0).sum(1).float().mean()
    assert 0.5 * K < l0 < 2 * K, f"inference L0 {l0} far from the training budget {K}"


@pytest.mark.parametrize("kwargs, message", [
    (dict(k=0), "SAEConfig.k = 0 is invalid: must be an integer in 1..d_sae=64"),
    (dict(k=65), "k = 65 is invalid: must be an integer in 1..d_sae=64"),
    (dict(rule="topK"), "valid rules"),
    (dict(aux="auxk"), "valid: \\['none', 'aux_k', 'aux_zipf'\\]"),
])
def test_bad_configs_are_refused_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SAEConfig(D, F, **kwargs)


def test_wrong_activation_width_is_refused():
    sae = SAE(SAEConfig(D, F, k=K))
    with pytest.raises(ValueError, match=f"shape \\[tokens, {D}\\].*hook point"):
        sae(torch.randn(4, D + 1))


# ----------------------------------------------------------------------------- the official parametrisation
def official_cfg(**kw):
    return SAEConfig(D, F, rule="relu", l1_coeff=kw.pop("l1_coeff", 0.0), normalize_input=False,
                     parametrisation="e2e_sae", **kw)


def test_e2e_sae_forward_is_the_official_formulas_by_hand():
    """ApolloResearch/e2e_sae's SAE: c = ReLU(W_e x + b_e), x_hat = c D_n + b_d, D_n the decoder with
    each dictionary element normalised, on raw x (no scale, no pre-encoder bias)."""
    sae = SAE(official_cfg())
    with torch.no_grad():  # move every parameter off its initial value, the dictionary off unit norm too
        for p in sae.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    w_e, b_e, w_d, b_d = (t.detach().clone() for t in (sae.encoder, sae.b_enc, sae.decoder, sae.b_dec))
    sae.normalize_decoder()  # the official forward normalises the dictionary; saelib keeps it normalised
    x = batch()
    c = torch.relu(x @ w_e.T + b_e)
    dictionary = w_d / w_d.norm(dim=1, keepdim=True)
    out = sae(x)
    assert torch.allclose(out.codes.to_dense(), c, atol=1e-5)
    assert torch.allclose(out.x_hat, c @ dictionary + b_d, atol=1e-4)
    sae.init_from_sample(x)  # data-independent: neither a scale nor a geometric-median b_dec
    assert float(sae.input_scale) == 1.0 and torch.equal(sae.b_dec, b_d)


def test_e2e_sae_initialisation_is_the_official_one():
    sae = SAE(official_cfg())
    dec = sae.decoder.detach()
    assert torch.allclose(dec.norm(dim=1), torch.ones(F), atol=1e-6)
    # orthogonal init: the dictionary is the row-normalised [d_sae, d_in] matrix with orthonormal columns
    q = torch.nn.init.orthogonal_(torch.empty(F, D), generator=seeding.generator("sae_init", 0))
    assert torch.allclose(q.T @ q, torch.eye(D), atol=1e-5)
    assert torch.equal(dec, q / q.norm(dim=1, keepdim=True))
    assert not torch.allclose(sae.encoder, sae.decoder)  # untied
    assert sae.encoder.abs().max() <= D ** -0.5 and sae.b_enc.abs().max() <= D ** -0.5
    assert sae.b_dec.abs().max() <= F ** -0.5 and sae.b_enc.abs().min() >= 0 and (sae.b_enc != 0).all()
    assert torch.equal(SAE(official_cfg()).encoder, sae.encoder)  # seeded
    assert "parametrisation" not in SAEConfig(D, F).to_dict()  # earlier runs' keys unchanged
    assert SAEConfig.from_dict(official_cfg().to_dict()) == official_cfg()


def test_e2e_sae_needs_raw_inputs():
    with pytest.raises(ValueError, match="normalize_input=False"):
        SAEConfig(D, F, parametrisation="e2e_sae")
    with pytest.raises(ValueError, match="valid: \\['saelib', 'e2e_sae'\\]"):
        SAEConfig(D, F, parametrisation="official")
