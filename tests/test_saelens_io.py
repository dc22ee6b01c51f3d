"""The SAELens-layout export round-trips, through saelib and through SAELens itself; folders SAELens
writes load into saelib; SAELens's metadata and sparsity file are filled from the run."""

import json
import warnings

import pytest
import torch
from safetensors import safe_open

from saelib.core.checkpoints import CheckpointError, save_sae
from saelib.core.sae import SAEConfig
from saelib.core.saelens_io import SAELENS_METADATA_KEYS, export_saelens, load_saelens, read_saelens, run_metadata
from saelib.core.training import TrainConfig, train_saes

RUN_DATA = {"model": "organism-ci", "hook": "blocks.0.hook_resid_post", "corpus": "mixed", "context_size": 12,
            "exclude_bos": True}


@pytest.fixture(scope="module")
def trained():
    x = torch.randn(4096, 24, generator=torch.Generator().manual_seed(0)) * 3 + 1
    cfgs = {r: SAEConfig(24, 64, rule=r, k=4, l1_coeff=1e-3) for r in ("topk", "relu", "mutual_choice", "feature_choice")}
    return x, train_saes(cfgs, x, TrainConfig(steps=30, batch_size=512, warmup_steps=5), progress=False).saes


@pytest.mark.parametrize("rule", ["topk", "relu", "mutual_choice", "feature_choice"])
def test_export_round_trips_through_saelib(trained, rule, tmp_path):
    x, saes = trained
    sae = saes[rule]
    loaded = load_saelens(export_saelens(sae, tmp_path / rule, {"model_name": "m", "hook_name": "h"}))
    assert loaded.cfg == sae.cfg
    assert torch.allclose(loaded.reconstruct(x[:256]), sae.reconstruct(x[:256]), atol=1e-4)


@pytest.mark.parametrize("rule", ["topk", "relu", "mutual_choice"])
def test_round_trip_through_saelens_and_back(trained, rule, tmp_path):
    """saelib -> SAELens folder -> sae_lens.SAE.load_from_disk -> the same reconstructions -> SAELens's
    own save_model -> saelib again, with the same SAE and metadata."""
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is in requirements.txt; install it")
    x, saes = trained
    sae = saes[rule]
    theirs = sae_lens.SAE.load_from_disk(export_saelens(sae, tmp_path / rule, run_metadata(RUN_DATA)))
    with torch.no_grad():
        ours = sae.reconstruct(x[:256])
        got = theirs.decode(theirs.encode(x[:256]))
    assert torch.allclose(got, ours, atol=1e-5), (got - ours).abs().max()
    assert theirs.cfg.metadata.hook_name == RUN_DATA["hook"] and theirs.cfg.metadata.context_size == 12
    assert theirs.cfg.metadata.prepend_bos is True and theirs.cfg.metadata.seqpos_slice == [1, None]
    theirs.save_model(tmp_path / "resaved")
    back = read_saelens(tmp_path / "resaved")
    assert back.sae.cfg == sae.cfg and back.metadata["model_name"] == "organism-ci"
    assert torch.allclose(back.sae.reconstruct(x[:256]), ours, atol=1e-5)


def test_every_saelens_metadata_key_and_the_sparsity_file(trained, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.loading.pretrained_sae_loaders import LLM_METADATA_KEYS

    sae = trained[1]["topk"]
    assert LLM_METADATA_KEYS <= set(SAELENS_METADATA_KEYS), "a key SAELens's loaders read is not written"
    folder = export_saelens(sae, tmp_path / "sae", run_metadata(RUN_DATA))
    meta = json.loads((folder / "cfg.json").read_text())["metadata"]
    assert set(SAELENS_METADATA_KEYS) <= set(meta)
    assert meta["dataset_path"] == "mixed" and meta["sae_lens_training_version"] is None  # not trained by SAELens
    with safe_open(str(folder / "sparsity.safetensors"), "pt") as f:  # how SAELens's loaders read it
        sparsity = f.get_tensor("sparsity")
    torch.testing.assert_close(sparsity, torch.log10(sae.density + 1e-10))
    # An Evaluation's density replaces the running statistics; a dead feature reads -10.
    density = torch.zeros(64)
    density[:3] = torch.tensor([0.5, 0.01, 1e-4])
    got = read_saelens(export_saelens(sae, tmp_path / "eval", density=density)).log_sparsity
    torch.testing.assert_close(got[:4], torch.tensor([0.5, 0.01, 1e-4, 1e-10]).log10())
    with pytest.raises(ValueError, match="one entry per feature"):
        export_saelens(sae, tmp_path / "bad", density=torch.zeros(3))
    with pytest.raises(ValueError, match="unknown SAELens metadata keys \\['hook'\\]"):
        export_saelens(sae, tmp_path / "bad", {"hook": "x"})
    assert sae_lens.SAE.load_from_disk(folder).cfg.metadata.context_size == 12


def test_saelens_preflight_accepts_a_run_export_and_refuses_one_without_metadata(trained, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    from datasets import Dataset
    from sae_lens.training.activations_store import ActivationsStore
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=24, n_heads=2, d_head=12, n_ctx=12,
                                                          d_vocab=50, act_fn="gelu"))
        dataset = Dataset.from_dict({"input_ids": [list(range(1, 13))] * 8})
        sae = trained[1]["topk"]
        ready = sae_lens.SAE.load_from_disk(export_saelens(sae, tmp_path / "run", run_metadata(RUN_DATA)))
        store = ActivationsStore.from_sae(model, ready, dataset=dataset, streaming=False, store_batch_size_prompts=2,
                                          train_batch_size_tokens=8, n_batches_in_buffer=2, total_tokens=100)
        assert store.context_size == 12 and store.prepend_bos and store.hook_name == RUN_DATA["hook"]
        bare = sae_lens.SAE.load_from_disk(export_saelens(sae, tmp_path / "bare"))
        with pytest.raises(ValueError, match="hook_name is required"):
            ActivationsStore.from_sae(model, bare, dataset=dataset, streaming=False)


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu", "standard_no_b_dec_input"])
def test_a_folder_written_by_saelens_loads_into_saelib(architecture, tmp_path):
    pytest.importorskip("sae_lens")
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(model_name="gpt2", hook_name="blocks.3.hook_resid_post", context_size=128, prepend_bos=True)
    kw = dict(d_in=16, d_sae=40, metadata=meta)
    theirs = {"standard": lambda: StandardSAE(StandardSAEConfig(**kw)),
              "standard_no_b_dec_input": lambda: StandardSAE(StandardSAEConfig(**kw, apply_b_dec_to_input=False)),
              "topk": lambda: TopKSAE(TopKSAEConfig(**kw, k=5)),
              "jumprelu": lambda: JumpReLUSAE(JumpReLUSAEConfig(**kw))}[architecture]()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        if hasattr(theirs, "threshold"):
            theirs.threshold.copy_(theirs.threshold.abs() * 0.3)  # jumps above zero, some features firing
    theirs.save_model(tmp_path / "sl")
    x = torch.randn(200, 16, generator=gen)
    folder = read_saelens(tmp_path / "sl")
    with torch.no_grad():
        want = theirs.decode(theirs.encode(x))
    assert torch.allclose(folder.sae.reconstruct(x), want, atol=1e-5), (folder.sae.reconstruct(x) - want).abs().max()
    assert (folder.sae(x).codes.l0_per_token() > 0).any()
    assert folder.require("model_name", "hook_name") == ["gpt2", "blocks.3.hook_resid_post"]
    assert folder.log_sparsity is None  # save_model writes no sparsity file
    with pytest.raises(CheckpointError, match="no metadata.dataset_path"):
        folder.require("hook_name", "dataset_path")


def test_a_corrupt_export_gives_a_clear_error(trained, tmp_path):
    from saelib.core.storage import DamagedError

    folder = export_saelens(trained[1]["topk"], tmp_path / "sae")
    (folder / "sae_weights.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(DamagedError, match="sae_weights.safetensors is damaged"):
        load_saelens(folder)


def test_a_folder_that_is_not_an_saelens_sae_is_named(trained, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not an SAELens SAE folder \\(no cfg.json\\): it is an SAE folder$"):
        read_saelens(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="it is a saelib SAE \\(config.json\\); load it with load_sae"):
        read_saelens(save_sae(trained[1]["topk"], tmp_path / "ours"))
    with pytest.raises(CheckpointError, match="does not exist"):
        read_saelens(tmp_path / "nowhere")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "cfg.json").write_text('{"architecture": "standard"}')
    with pytest.raises(CheckpointError, match="not an SAELens config: it lacks d_in, d_sae"):
        read_saelens(tmp_path / "other")
    folder = export_saelens(trained[1]["topk"], tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["metadata"]["saelib"]
    cfg["d_sae"] = 65
    (folder / "cfg.json").write_text(json.dumps(cfg))
    (folder / "checksums.json").unlink()  # a hand-edited folder, as a foreign one: nothing to verify against
    with pytest.raises(CheckpointError, match="does not match cfg.json's d_in=24, d_sae=65"):
        read_saelens(folder)


def test_an_sae_without_pre_encoder_bias_exports_as_saelens_computes_it(trained, tmp_path):
    x, _ = trained
    cfg = SAEConfig(24, 64, rule="relu", l1_coeff=1e-3, normalize_input=False, parametrisation="e2e_sae")
    sae = train_saes({"s": cfg}, x, TrainConfig(steps=10, batch_size=512, warmup_steps=2), progress=False).saes["s"]
    folder = export_saelens(sae, tmp_path / "official")
    assert json.loads((folder / "cfg.json").read_text())["apply_b_dec_to_input"] is False
    loaded = load_saelens(folder)
    assert loaded.cfg == sae.cfg and torch.allclose(loaded.reconstruct(x[:256]), sae.reconstruct(x[:256]), atol=1e-5)
    sae_lens = pytest.importorskip("sae_lens")
    theirs = sae_lens.SAE.load_from_disk(folder)
    with torch.no_grad():
        assert torch.allclose(theirs.decode(theirs.encode(x[:256])), sae.reconstruct(x[:256]), atol=1e-5)
