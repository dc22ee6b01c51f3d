"""The one pretraining loop (saelib.core.pretraining): exact resume, the schedule, the batch order."""

import math

import pytest
import torch
from torch import nn

from saelib.core.checkpoints import CheckpointError
from saelib.core.pretraining import RESUME_FILE, PretrainConfig, _epoch_permutation, clear_resume, pretrain

TIMINGS = ("elapsed_s", "rows_per_s")

X = torch.randn(37, 6, generator=torch.Generator().manual_seed(0))
Y = X @ torch.randn(6, 3, generator=torch.Generator().manual_seed(1))


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))


def cfg(**kw) -> PretrainConfig:
    base = dict(steps=23, batch_size=8, lr=3e-2, stream="data_order", warmup_steps=4, final_lr_frac=0.1,
                wrap_epochs=True, weight_decay=0.1, betas=(0.9, 0.95), grad_clip=0.5, log_every=3,
                resume_every=5)
    return PretrainConfig(**{**base, **kw})


def run(model, out_dir, spec, fail_at=None, **kw):
    """pretrain on the tiny regression, evaluating at a few steps; ``fail_at`` raises inside that
    step, as a kill would (nothing of the step after the last resume state survives)."""
    def loss(idx):
        if fail_at is not None and loss.calls == fail_at:
            raise KeyboardInterrupt("killed")
        loss.calls += 1
        return ((model(X[idx]) - Y[idx]) ** 2).mean()
    loss.calls = 0

    def evaluate(step):
        with torch.no_grad():
            return {"val": ((model(X) - Y) ** 2).mean().item()}
    return pretrain(model, loss, len(X), spec, out_dir=out_dir, evaluate=evaluate, eval_steps=[0, 1, 10, 23],
                    progress=False, **kw)


def untimed(history):
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in history]


def test_a_stopped_or_killed_run_resumes_to_the_same_weights_and_history(tmp_path):
    straight_model = tiny_model()
    straight = run(straight_model, tmp_path / "a", cfg())
    assert straight.finished and straight.step == 23
    assert [r["step"] for r in straight.history] == [0, 1, 3, 6, 9, 10, 12, 15, 18, 21, 23, 23]

    stopped_model = tiny_model()
    part = run(stopped_model, tmp_path / "b", cfg(), stop_at_step=7)
    assert not part.finished and part.step == 7 and (tmp_path / "b" / RESUME_FILE).exists()
    # killed inside step 13: the state of step 10 is the last one written; resume_every may change
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model(), tmp_path / "b", cfg(), fail_at=13 - 7)
    resumed_model = tiny_model()
    resumed = run(resumed_model, tmp_path / "b", cfg(resume_every=4))
    assert resumed.finished
    a, b = straight_model.state_dict(), resumed_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert untimed(resumed.history) == untimed(straight.history)  # each evaluation once, in order

    # a finished state returns at once; clear_resume removes it; another config is refused
    assert run(tiny_model(), tmp_path / "b", cfg()).history == resumed.history
    with pytest.raises(CheckpointError, match="lr: checkpoint has 0.03, this run has 0.01"):
        run(tiny_model(), tmp_path / "b", cfg(lr=1e-2))
    clear_resume(tmp_path / "b")
    assert not (tmp_path / "b" / RESUME_FILE).exists()


def test_history_rows_and_optimizer_groups():
    model = tiny_model()
    out = run(model, None, cfg(log_every=1, steps=6, grad_clip=0.0))
    rows = [r for r in out.history if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["mean_loss"] == r["loss"] and r["rows_seen"] == 8 * r["step"] for r in rows)
    assert [r["lr"] for r in rows] == [cfg(steps=6).lr_at(s) for s in range(6)]
    out = run(tiny_model(), None, cfg(log_every=4, steps=6))
    first = [r for r in out.history if "loss" in r][0]
    assert first["step"] == 4 and first["mean_loss"] != first["loss"]
    with pytest.raises(ValueError, match="unknown random-stream purpose"):
        cfg(stream="no_such_stream")
    with pytest.raises(ValueError, match=r"PretrainConfig.precision = 'float16' is invalid: must be 'float32' or 'bfloat16'"):
        cfg(precision="float16")
    # bfloat16 autocast trains other, finite weights
    half = tiny_model()
    run(half, None, cfg(precision="bfloat16"))
    full = tiny_model()
    run(full, None, cfg())
    assert torch.isfinite(half[0].weight).all() and not torch.equal(half[0].weight, full[0].weight)


def test_learning_rate_schedule():
    c = cfg(steps=100, lr=1.0, warmup_steps=10, final_lr_frac=0.1)
    assert [c.lr_at(s) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]  # linear warm-up to the peak
    assert c.lr_at(10) == 1.0  # the cosine starts at the peak
    assert c.lr_at(55) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down
    assert c.lr_at(100) == pytest.approx(0.1) and c.lr_at(150) == c.lr_at(100)  # the floor, then flat
    lrs = [c.lr_at(s) for s in range(10, 101)]
    assert all(x > y for x, y in zip(lrs, lrs[1:]))
    to_zero = cfg(steps=50, lr=2.0, warmup_steps=0, final_lr_frac=0.0)
    assert to_zero.lr_at(0) == 2.0 and to_zero.lr_at(50) == 0.0
    # the float32 cosine (the prompts' runs) differs from the float64 one by float32 rounding only
    f32 = cfg(steps=50, lr=2.0, warmup_steps=0, final_lr_frac=0.0, float32_cosine=True)
    gaps = [abs(f32.lr_at(s) - to_zero.lr_at(s)) for s in range(51)]
    assert max(gaps) < 1e-6 and max(gaps) > 0
    assert f32.lr_at(7) == 2.0 * 0.5 * (1 + torch.cos(torch.tensor(math.pi * 7 / 50)).item())


def test_sgd_with_momentum_and_a_constant_warm_up_matches_the_update_by_hand():
    # MaPLe's optimizer: torch SGD (momentum, L2 decay added to the gradient), a constant warm-up
    spec = cfg(steps=5, batch_size=37, optimizer="sgd", momentum=0.9, weight_decay=0.1, warmup_steps=2,
               warmup_lr=1e-3, lr=0.05, final_lr_frac=0.0, grad_clip=0.0)
    assert [spec.lr_at(s) for s in (0, 1)] == [1e-3, 1e-3] and spec.lr_at(2) == 0.05
    model = tiny_model()
    run(model, None, spec)
    # by hand: every matrix decays (the default ``decays``), biases do not
    ref = tiny_model()
    buffers = {}
    for step in range(5):
        ref.zero_grad()
        ((ref(X) - Y) ** 2).mean().backward()
        with torch.no_grad():
            for name, p in ref.named_parameters():
                g = p.grad + (0.1 * p if p.dim() >= 2 else 0)
                buffers[name] = g if step == 0 else 0.9 * buffers[name] + g
                p -= spec.lr_at(step) * buffers[name]
    got, want = model.state_dict(), ref.state_dict()
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    with pytest.raises(ValueError, match="optimizer = 'lion' is invalid: must be 'adamw' or 'sgd'"):
        cfg(optimizer="lion")


@pytest.mark.parametrize("wrap", [True, False])
def test_batch_order_is_a_pure_function_of_seed_and_step(wrap):
    c = cfg(batch_size=8, wrap_epochs=wrap)
    first = [c.batch(s, 37) for s in range(30)]
    _epoch_permutation.cache_clear()
    assert all(torch.equal(c.batch(s, 37), first[s]) for s in reversed(range(30)))  # any order, fresh
    assert not torch.equal(cfg(batch_size=8, wrap_epochs=wrap, seed=1).batch(0, 37), first[0])
    assert not torch.equal(cfg(batch_size=8, wrap_epochs=wrap, stream="vision_data_order").batch(0, 37), first[0])
    assert all(len(b) == 8 for b in first)
    if wrap:  # the batches read one row stream in which every epoch is a permutation
        stream = torch.cat(first)  # 240 rows: 6 whole epochs of 37, then 18 rows
        epochs = stream[:6 * 37].view(6, 37)
        assert all(sorted(e.tolist()) == list(range(37)) for e in epochs)
        assert not torch.equal(epochs[0], epochs[1])
    else:  # 4 batches per epoch, each row at most once per epoch, 5 rows left out
        epochs = torch.stack(first[:28]).view(7, 32)
        assert all(len(set(e.tolist())) == 32 for e in epochs)
        assert not torch.equal(epochs[0], epochs[1])
    if not wrap:  # a batch larger than the data is the whole epoch
        big = cfg(batch_size=64, wrap_epochs=False)
        assert sorted(big.batch(0, 37).tolist()) == list(range(37))
        assert not torch.equal(big.batch(0, 37), big.batch(1, 37))
