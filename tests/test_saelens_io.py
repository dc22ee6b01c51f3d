"""The SAELens-layout export round-trips, through saelib and through SAELens itself."""

import pytest
import torch

from saelib.core.sae import SAEConfig
from saelib.core.saelens_io import export_saelens, load_saelens
from saelib.core.training import TrainConfig, train_saes


@pytest.fixture(scope="module")
def trained():
    x = torch.randn(4096, 24, generator=torch.Generator().manual_seed(0)) * 3 + 1
    cfgs = {r: SAEConfig(24, 64, rule=r, k=4, l1_coeff=1e-3) for r in ("topk", "relu", "mutual_choice", "feature_choice")}
    return x, train_saes(cfgs, x, TrainConfig(steps=30, batch_size=512, warmup_steps=5), progress=False).saes


@pytest.mark.parametrize("rule", ["topk", "relu", "mutual_choice", "feature_choice"])
def test_export_round_trips_through_saelib(trained, rule, tmp_path):
    x, saes = trained
    sae = saes[rule]
    loaded = load_saelens(export_saelens(sae, tmp_path / rule, model_name="m", hook_name="h"))
    assert loaded.cfg == sae.cfg
    assert torch.allclose(loaded.reconstruct(x[:256]), sae.reconstruct(x[:256]), atol=1e-4)


@pytest.mark.parametrize("rule", ["topk", "relu", "mutual_choice"])
def test_saelens_reads_the_export_and_computes_the_same_reconstruction(trained, rule, tmp_path):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is in requirements.txt; install it")
    x, saes = trained
    sae = saes[rule]
    theirs = sae_lens.SAE.load_from_disk(export_saelens(sae, tmp_path / rule))
    with torch.no_grad():
        ours = sae.reconstruct(x[:256])
        got = theirs.decode(theirs.encode(x[:256]))
    assert torch.allclose(got, ours, atol=1e-4), (got - ours).abs().max()


def test_a_corrupt_export_gives_a_clear_error(trained, tmp_path):
    from saelib.core.storage import DamagedError

    folder = export_saelens(trained[1]["topk"], tmp_path / "sae")
    (folder / "sae_weights.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(DamagedError, match="sae_weights.safetensors is damaged"):
        load_saelens(folder)
