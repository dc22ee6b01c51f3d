"""Braun et al.'s local / e2e / e2e+ds objectives (saelib.core.objectives) through the one trainer."""

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from saelib.core.hooks import later_resid_hooks
from saelib.core.objectives import E2E, Local, Reconstruction, token_rows
from saelib.core.sae import SAE, SAEConfig
from saelib.core.training import TrainConfig, initial_saes, train_saes
from saelib.studies.splice import downstream_errors, splice_metrics
from saelib.subjects.activations import WindowTable

HOOK = "blocks.1.hook_resid_pre"
N_LAYERS, D, CTX = 4, 32, 12
CFG = TrainConfig(steps=12, batch_size=8, lr=3e-3, warmup_steps=2, init_tokens=256, log_every=4,
                  checkpoint_every=4)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1234)  # the subject model's own seed; SAEs draw from saelib.core.seeding streams
    cfg = HookedTransformerConfig(n_layers=N_LAYERS, d_model=D, n_heads=4, d_head=8, d_mlp=64, n_ctx=CTX,
                                  d_vocab=50, act_fn="gelu", normalization_type="LN")
    return HookedTransformer(cfg).eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(1, 50, (96, CTX), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def windows(model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter=HOOK)
    return WindowTable(cache[HOOK])


def relu_cfg(**kw):
    return SAEConfig(D, 128, rule="relu", l1_coeff=kw.pop("l1_coeff", 1.0), dead_after_tokens=10_000, **kw)


def identity_sae() -> SAE:
    """x_hat = relu(x) - relu(-x) = x exactly: encoder and decoder [I; -I], no biases, scale 1."""
    sae = SAE(SAEConfig(D, 2 * D, rule="relu", normalize_input=False))
    eye = torch.eye(D)
    with torch.no_grad():
        sae.encoder.copy_(torch.cat([eye, -eye]))
        sae.decoder.copy_(torch.cat([eye, -eye]))
    return sae


def test_e2e_loss_is_the_kl_computed_by_hand(model, tokens, windows):
    sae = initial_saes({"s": relu_cfg(l1_coeff=0.0)}, windows, CFG)["s"]
    batch = windows[torch.arange(8)]
    terms, out = E2E(model, HOOK).loss(sae, batch, {})
    x_hat = out.x_hat.detach().reshape(8, CTX - 1, D)

    def splice(act, hook):
        return torch.cat([act[:, :1], x_hat], 1)

    clean = model(tokens[:8])[:, 1:].log_softmax(-1)
    spliced = model.run_with_hooks(tokens[:8], fwd_hooks=[(HOOK, splice)])[:, 1:].log_softmax(-1)
    by_hand = (clean.exp() * (clean - spliced)).sum(-1).mean()  # KL(clean || spliced) per token
    assert by_hand > 1e-3
    assert terms.kl.item() == pytest.approx(by_hand.item(), rel=1e-4)
    assert terms.total.item() == pytest.approx(by_hand.item(), rel=1e-4)  # no L1 term here


def test_local_and_sparsity_terms_follow_the_paper(windows):
    sae = initial_saes({"s": relu_cfg(l1_coeff=3.0)}, windows, CFG)["s"]
    batch = windows[torch.arange(8)]
    terms, out = Local().loss(sae, batch, {})
    assert sae.input_scale < 0.5  # normalised: the loss must still be in the activations' units
    mse = ((out.x_hat - token_rows(batch)) ** 2).mean()
    l1 = out.codes.to_dense().abs().sum(1).mean()  # ||c||_1 averaged over tokens, SAE units
    raw_l1 = l1 / sae.input_scale  # the codes of the same SAE written without the scaling
    assert terms.total.item() == pytest.approx((mse + 3.0 / D * raw_l1).item(), rel=1e-5)
    assert terms.l1.item() == pytest.approx(l1.item(), rel=1e-5)
    assert token_rows(batch).shape == (8 * (CTX - 1), D)


def test_gradients_reach_the_sae_only(model, windows):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    saes = {"e2e": relu_cfg(), "ds": relu_cfg(seed=1)}
    objectives = {"e2e": E2E(model, HOOK), "ds": E2E(model, HOOK, kl_coeff=0.5, ds_coeff=2.5)}
    start = initial_saes(saes, windows, CFG)
    result = train_saes(saes, windows, CFG, progress=False, objectives=objectives)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None and not p.requires_grad, n
    for name in saes:
        assert not torch.equal(result.saes[name].encoder, start[name].encoder)
    h = result.history
    assert {"kl", "downstream"} <= set(h.columns)
    first, last = h[h.step == h.step.min()].set_index("sae"), h[h.step == h.step.max()].set_index("sae")
    assert last.loc["e2e", "kl"] < 0.5 * first.loc["e2e", "kl"]  # it learns what it is asked to
    assert first.loc["ds", "downstream"] > 0 and last.loc["e2e", "downstream"] == 0  # e2e has no D term


def test_e2e_ds_with_beta_zero_is_e2e(model, windows):
    cfgs = {"a": relu_cfg(), "b": relu_cfg()}
    objectives = {"a": E2E(model, HOOK), "b": E2E(model, HOOK, ds_coeff=0.0, ds_hooks=["blocks.3.hook_resid_pre"])}
    result = train_saes(cfgs, windows, CFG, progress=False, objectives=objectives)
    for p, q in zip(result.saes["a"].parameters(), result.saes["b"].parameters()):
        assert torch.equal(p, q)


def test_downstream_term_reads_exactly_the_later_layers(model, tokens, windows):
    assert later_resid_hooks(model, HOOK) == ["blocks.2.hook_resid_pre", "blocks.3.hook_resid_pre"]
    assert later_resid_hooks(model, "blocks.1.hook_resid_post") == ["blocks.3.hook_resid_pre"]
    objective = E2E(model, HOOK, kl_coeff=0.0, ds_coeff=1.0)
    assert objective.ds_hooks == ["blocks.2.hook_resid_pre", "blocks.3.hook_resid_pre"]
    sae = initial_saes({"s": relu_cfg(l1_coeff=0.0)}, windows, CFG)["s"]
    batch = windows[torch.arange(8)]
    terms, out = objective.loss(sae, batch, {})
    x_hat = out.x_hat.detach().reshape(8, CTX - 1, D)
    _, clean = model.run_with_cache(tokens[:8])
    seen = {}

    def splice(act, hook):
        return torch.cat([act[:, :1], x_hat], 1)

    def keep(act, hook):
        seen[hook.name] = act[:, 1:]

    model.run_with_hooks(tokens[:8], fwd_hooks=[(HOOK, splice)] + [(h, keep) for h in objective.ds_hooks])
    by_hand = sum(((seen[h] - clean[h][:, 1:]) ** 2).mean() for h in objective.ds_hooks) / 2
    assert terms.downstream.item() == pytest.approx(by_hand.item(), rel=1e-4)
    assert terms.total.item() == pytest.approx(by_hand.item(), rel=1e-4)  # kl_coeff 0, no L1


def test_identity_sae_gives_zero_kl_and_no_ce_increase(model, tokens, windows):
    sae = identity_sae()
    batch = windows[torch.arange(8)]
    terms, out = E2E(model, HOOK, ds_coeff=1.0).loss(sae, batch, {})
    assert torch.equal(out.x_hat, token_rows(batch))
    assert terms.kl.item() == pytest.approx(0.0, abs=1e-7) and terms.downstream.item() == pytest.approx(0.0, abs=1e-9)
    r = splice_metrics(model, HOOK, sae, tokens[:16])
    assert r.ce_increase == pytest.approx(0.0, abs=1e-6) and r.kl == pytest.approx(0.0, abs=1e-6)
    errors = downstream_errors(model, HOOK, {"identity": sae}, tokens[:16])
    assert list(errors.hook) == ["blocks.2.hook_resid_pre", "blocks.3.hook_resid_pre", "blocks.3.hook_resid_post"]
    assert (errors.mse < 1e-10).all() and (errors.explained_variance > 1 - 1e-8).all()


def test_killed_e2e_run_resumes_bit_identically(model, windows, tmp_path):
    saes = {"e2e": relu_cfg(), "topk": SAEConfig(D, 128, rule="topk", k=8)}
    objectives = {"e2e": E2E(model, HOOK, ds_coeff=1.0), "topk": E2E(model, HOOK)}
    whole = train_saes(saes, windows, CFG, progress=False, objectives=objectives)
    train_saes(saes, windows, CFG, out_dir=tmp_path, progress=False, stop_at_step=5, objectives=objectives)
    resumed = train_saes(saes, windows, CFG, out_dir=tmp_path, progress=False, objectives=objectives)
    for name in saes:
        for p, q in zip(whole.saes[name].parameters(), resumed.saes[name].parameters()):
            assert torch.equal(p, q)
    assert whole.history.tokens.max() == CFG.steps * CFG.batch_size * (CTX - 1)
    with pytest.raises(ValueError, match="objectives"):  # the same folder under another objective
        train_saes(saes, windows, CFG, out_dir=tmp_path, progress=False,
                   objectives={"e2e": Local(), "topk": E2E(model, HOOK)})


def test_official_parametrisation_trains_e2e_at_unit_norm_and_resumes_bit_identically(model, windows, tmp_path):
    saes = {"e2e": relu_cfg(normalize_input=False, parametrisation="e2e_sae"),
            "local": relu_cfg(normalize_input=False, parametrisation="e2e_sae", seed=1)}
    objectives = {"e2e": E2E(model, HOOK), "local": Local()}
    start = initial_saes(saes, windows, CFG)
    whole = train_saes(saes, windows, CFG, progress=False, objectives=objectives)
    train_saes(saes, windows, CFG, out_dir=tmp_path, progress=False, stop_at_step=5, objectives=objectives)
    resumed = train_saes(saes, windows, CFG, out_dir=tmp_path, progress=False, objectives=objectives)
    for name in saes:
        for (key, p), q in zip(whole.saes[name].state_dict().items(), resumed.saes[name].state_dict().values()):
            assert torch.equal(p, q), (name, key)
        sae = whole.saes[name]
        assert torch.allclose(sae.decoder.norm(dim=1), torch.ones(sae.cfg.d_sae), atol=1e-5)
        assert not torch.equal(sae.decoder, start[name].decoder)  # it trained: the rows moved, at unit norm
        assert float(sae.input_scale) == 1.0  # raw inputs throughout


def test_reconstruction_is_the_default_objective(windows):
    cfgs = {"s": SAEConfig(D, 64, rule="topk", k=4)}
    a = train_saes(cfgs, windows, CFG, progress=False)
    b = train_saes(cfgs, windows, CFG, progress=False, objectives=Reconstruction())
    assert torch.equal(a.saes["s"].decoder, b.saes["s"].decoder)
    assert "kl" not in a.history.columns


def test_bad_input_is_explained(model, windows):
    with pytest.raises(ValueError, match="no later layers"):
        E2E(model, f"blocks.{N_LAYERS - 1}.hook_resid_post")
    with pytest.raises(ValueError, match="residual stream"):
        E2E(model, "blocks.1.hook_mlp_out")
    with pytest.raises(ValueError, match=r"not residual streams after.*valid: \['blocks.2"):
        E2E(model, HOOK, ds_coeff=1.0, ds_hooks=["blocks.1.hook_resid_pre"])
    with pytest.raises(ValueError, match="not residual streams after"):
        E2E(model, HOOK, ds_coeff=1.0, ds_hooks=[])
    last = E2E(model, f"blocks.{N_LAYERS - 1}.hook_resid_pre", ds_coeff=1.0)
    assert last.ds_hooks == [f"blocks.{N_LAYERS - 1}.hook_resid_post"]  # no block input follows
    sae = initial_saes({"s": relu_cfg()}, windows, CFG)["s"]
    with pytest.raises(ValueError, match="WindowTable"):
        E2E(model, HOOK).loss(sae, windows[torch.arange(4)][:, 1:].reshape(-1, D), {})
    wide = WindowTable(torch.randn(16, CTX, 2 * D))
    with pytest.raises(ValueError, match="d_model is 32"):
        train_saes({"w": SAEConfig(2 * D, 64, rule="topk", k=4)}, wide, CFG, progress=False,
                   objectives=E2E(model, HOOK))
    with pytest.raises(ValueError, match="missing"):
        train_saes({"a": relu_cfg(), "b": relu_cfg()}, windows, CFG, progress=False,
                   objectives={"a": Local()})
