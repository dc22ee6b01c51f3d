import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from saelib.core.sae import SAEConfig
from saelib.core.training import TrainConfig, train_saes
from saelib.studies.splice import splice_metrics, splice_sweep
from saelib.subjects.activations import harvest, token_windows
from saelib.subjects.language_models import load_subject_model, train_organism

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A briefly trained 'ci' organism (60 of its 250 steps): trained enough that a lossy reconstruction
    of its layer-0 residual hurts its predictions (after 10 steps a splice could lower the loss by chance)."""
    root = tmp_path_factory.mktemp("splice")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAELIB_CACHE", str(root / "cache"))
        yield load_subject_model(train_organism("ci", root / "organism", n_steps=60, progress=False))


@pytest.fixture(scope="module")
def heldout(model):
    return token_windows(model.tokenizer, "mixed", 12, 64, split="heldout")


@pytest.fixture(scope="module")
def clean(model, heldout):
    return splice_metrics(model, HOOK, lambda x: x, heldout)


def test_identity_reproduces_the_clean_run(model, heldout, clean):
    assert clean.ce_spliced == pytest.approx(clean.ce_clean, abs=1e-6)
    assert clean.kl == pytest.approx(0.0, abs=1e-6) and clean.ce_increase == pytest.approx(0.0, abs=1e-6)
    assert clean.n_tokens == 12 * 63
    with_bos = splice_metrics(model, HOOK, lambda x: x, heldout, exclude_bos=False, batch_size=5)
    assert with_bos.ce_spliced == pytest.approx(clean.ce_clean, abs=1e-6)
    assert with_bos.ce_clean == pytest.approx(clean.ce_clean, abs=1e-6)  # batching does not matter


def test_zero_reconstruction_is_zero_ablation(model, heldout, clean):
    zero = splice_metrics(model, HOOK, torch.zeros_like, heldout)
    assert zero.ce_spliced == pytest.approx(zero.ce_zero_ablation, abs=1e-6)
    assert zero.ce_zero_ablation > clean.ce_clean + 0.05 and zero.fraction_recovered == pytest.approx(0.0, abs=1e-6)
    assert zero.kl == pytest.approx(zero.kl_zero_ablation, abs=1e-6) and zero.kl_zero_ablation > 0
    assert clean.kl_zero_ablation == pytest.approx(zero.kl_zero_ablation, abs=1e-6)


def test_trained_sae_lies_between_clean_and_zero(model, heldout):
    train = harvest(model, [HOOK], token_windows(model.tokenizer, "mixed", 64, 64), progress=False)[HOOK]
    sae = train_saes({"tk": SAEConfig(model.cfg.d_model, 512, rule="topk", k=16)}, train,
                     TrainConfig(steps=60, batch_size=256, lr=2e-3, warmup_steps=5, init_tokens=2048),
                     progress=False).saes["tk"]
    r = splice_metrics(model, HOOK, sae, heldout)
    assert r.ce_clean < r.ce_spliced < r.ce_zero_ablation and r.kl > 0
    assert 0 < r.fraction_recovered < 1
    via_callable = splice_metrics(model, HOOK, sae.reconstruct, heldout)
    assert via_callable.ce_spliced == pytest.approx(r.ce_spliced, abs=1e-6)
    # A sweep shares the clean and zero runs but gives each SAE the numbers it gets on its own.
    sweep = splice_sweep(model, HOOK, {"sae": sae, "zero": torch.zeros_like, "identity": lambda x: x}, heldout)
    assert sweep["sae"] == r
    assert sweep["zero"].ce_spliced == pytest.approx(r.ce_zero_ablation, abs=1e-6)
    assert sweep["identity"].ce_increase == pytest.approx(0.0, abs=1e-6)


def test_positions_above_max_norm_keep_their_activation(model, heldout, clean):
    zero = splice_metrics(model, HOOK, torch.zeros_like, heldout[:4], max_norm=0.0)  # every position is "above"
    assert zero.ce_spliced == pytest.approx(clean_of(model, heldout[:4]), abs=1e-6)
    none = splice_metrics(model, HOOK, torch.zeros_like, heldout[:4], max_norm=float("inf"))
    assert none.ce_spliced == pytest.approx(none.ce_zero_ablation, abs=1e-6)


def clean_of(model, windows):
    return splice_metrics(model, HOOK, lambda x: x, windows).ce_clean


def test_bad_inputs_are_explained(model, heldout):
    with pytest.raises(ValueError, match="reconstruct returned shape"):
        splice_metrics(model, HOOK, lambda x: x[..., :3], heldout[:2])
    with pytest.raises(TypeError, match="SAE or a callable"):
        splice_metrics(model, HOOK, 3, heldout[:2])
    with pytest.raises(ValueError, match="not a hook point"):
        splice_metrics(model, "blocks.7.hook_resid_post", lambda x: x, heldout[:2])
