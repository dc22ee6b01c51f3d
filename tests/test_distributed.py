"""Data-parallel training (2 gloo ranks on CPU) equals single-process training on the same global batch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from saelib.core.checkpoints import latest_checkpoint, load_sae
from saelib.core.sae import SAEConfig
from saelib.core.synthetic import make_synthetic
from saelib.core.training import TrainConfig, train_saes


def _setup():
    x = make_synthetic(16384, 16, 32, active=3, seed=2).activations
    cfgs = {"topk": SAEConfig(16, 48, rule="topk", k=3, aux="aux_k", dead_after_tokens=1000),
            "mutual_choice": SAEConfig(16, 48, rule="mutual_choice", k=3, aux="aux_zipf", dead_after_tokens=1000),
            "feature_choice": SAEConfig(16, 48, rule="feature_choice", k=3)}
    return x, cfgs, TrainConfig(steps=24, batch_size=512, warmup_steps=4, log_every=4, checkpoint_every=6)


def _worker(rank, world, port, out_dir, stop_at):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, cfgs, cfg = _setup()
        train_saes(cfgs, x, cfg, out_dir=out_dir, progress=False, stop_at_step=stop_at)
        # Every rank ends with identical weights; rank 0 has written them.
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(out_dir, stop_at=None):
    mp.start_processes(_worker, args=(2, _free_port(), out_dir, stop_at), nprocs=2, start_method="spawn")


@pytest.fixture(scope="module")
def single():
    x, cfgs, cfg = _setup()
    return train_saes(cfgs, x, cfg, progress=False)


def _close(a, b, atol=2e-4):
    for key, va in a.state_dict().items():
        vb = b.state_dict()[key]
        if key == "threshold":
            va, vb = va.nan_to_num(posinf=0), vb.nan_to_num(posinf=0)
        assert torch.allclose(va, vb, atol=atol, rtol=1e-3), (key, (va - vb).abs().max())


def test_two_ranks_equal_one_process(tmp_path, single):
    _run_two_ranks(tmp_path)
    for name in ("topk", "mutual_choice", "feature_choice"):
        _close(single.saes[name], load_sae(tmp_path / "saes" / name))


def test_checkpoints_come_from_rank_zero_only_and_resume_with_another_world_size(tmp_path, single):
    _run_two_ranks(tmp_path, stop_at=12)
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"temporary folders left behind: {leftovers}"
    assert latest_checkpoint(tmp_path).name == "step_00000012"
    x, cfgs, cfg = _setup()
    resumed = train_saes(cfgs, x, cfg, out_dir=tmp_path, progress=False)  # now a single process
    for name in cfgs:
        _close(single.saes[name], resumed.saes[name])


def _tied_preacts():
    """bfloat16 pre-activations with heavy ties (8 bits of mantissa), 256 tokens x 96 features."""
    gen = torch.Generator().manual_seed(3)
    return (torch.randn(256, 96, generator=gen).abs() + 0.5).to(torch.bfloat16)


def _select_worker(rank, world, port, out_dir):
    from saelib.core.allocation import RULES, AllocationContext

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        z = _tied_preacts().chunk(world)[rank]  # rank r holds the r-th slice of the global batch
        kept = RULES["mutual_choice"].select(z.contiguous(), AllocationContext(k=3))
        torch.save(kept + rank * z.numel(), out_dir / f"kept{rank}.pt")  # as global flat indices
    finally:
        dist.destroy_process_group()


def test_two_ranks_select_exactly_what_one_process_selects_under_bf16_ties(tmp_path):
    """Mutual Choice keeps exactly k * B entries over both ranks, the same ones as one process: ties at
    the global threshold are broken by global position on every rank."""
    from saelib.core.allocation import RULES, AllocationContext

    z = _tied_preacts()
    single = RULES["mutual_choice"].select(z, AllocationContext(k=3))
    threshold = z.flatten()[single].min()
    tied = int((z == threshold).sum())
    assert tied > int((z.flatten()[single] == threshold).sum()) > 0, "the test needs ties cut at the threshold"
    mp.start_processes(_select_worker, args=(2, _free_port(), tmp_path), nprocs=2, start_method="spawn")
    both = torch.cat([torch.load(tmp_path / f"kept{r}.pt") for r in range(2)])
    assert both.numel() == 3 * 256
    assert torch.equal(both, single)
