"""Scale studies: snapshots of one run, batch-allocated reconstruction, the trend verdict, and the
overfitting check catching real memorisation."""

import pandas as pd
import pytest
import torch

from saelib.book.exercises import check_gap_trend
from saelib.core.metrics import evaluate
from saelib.core.sae import SAEConfig
from saelib.core.synthetic import make_synthetic
from saelib.core.training import TrainConfig, train_config_dict, train_saes
from saelib.studies.scaling import (
    batch_allocated,
    cached_table,
    cached_tables,
    doubling_steps,
    first_tokens_at,
    gap_trend,
    ratio_at_equal,
    ratio_trend,
    relative_to,
    seed_agreement,
    study_table,
    trend_verdict,
)

D, F, K = 16, 64, 4
CONFIGS = {"topk": SAEConfig(D, F, rule="topk", k=K),
           "mutual_choice": SAEConfig(D, F, rule="mutual_choice", k=K),
           "feature_choice": SAEConfig(D, F, rule="feature_choice", k=K)}


@pytest.fixture(scope="module")
def data():
    return make_synthetic(20_000, D, 32, active=3, seed=1).activations


def test_doubling_steps_halve_back_from_the_longest_budget():
    assert doubling_steps(3000, 4) == (375, 750, 1500, 3000)
    assert doubling_steps(2944, 5) == (184, 368, 736, 1472, 2944)
    assert doubling_steps(7, 1) == (7,)
    with pytest.raises(ValueError, match="cannot halve 4 steps 3 times"):
        doubling_steps(4, 4)


def test_gap_trend_compares_the_longest_budget_with_the_shortest():
    assert gap_trend([1.12, 1.08, 1.03]) == "closes"       # 12% -> 3%
    assert gap_trend([1.03, 1.05, 1.09]) == "widens"       # 3% -> 9%
    assert gap_trend([1.12, 1.30, 1.11]) == "stays"        # only the ends count
    assert gap_trend([1.08, 0.95]) == "closes"             # crossed TopK
    assert gap_trend([0.95, 0.90]) == "widens"             # a lead that grows is a wider gap
    assert gap_trend([1.12, 1.08], tolerance=0.05) == "stays"
    with pytest.raises(ValueError, match="at least two finite ratios"):
        gap_trend([1.1])
    assert check_gap_trend(gap_trend)


def test_first_tokens_at_reads_the_onset_from_a_history():
    history = pd.DataFrame({"sae": ["topk"] * 4 + ["mc"] * 4, "tokens": [100, 200, 300, 400] * 2,
                            "dead_frac": [0.0, 0.004, 0.012, 0.02, 0, 0, 0, 0.001]})
    assert first_tokens_at(history, "topk", "dead_frac", 0.01) == 300
    assert first_tokens_at(history, "mc", "dead_frac", 0.01) is None
    with pytest.raises(KeyError, match="no SAE 'fc'"):
        first_tokens_at(history, "fc", "dead_frac", 0.01)


def test_snapshots_are_the_weights_at_those_steps_and_survive_a_resume(data, tmp_path):
    cfg = TrainConfig(steps=12, batch_size=256, lr=3e-3, warmup_steps=2, checkpoint_every=4,
                      snapshot_steps=(6, 3, 12))
    assert cfg.snapshot_steps == (3, 6, 12)
    whole = train_saes(CONFIGS, data, cfg, out_dir=tmp_path / "whole", progress=False)
    snaps = whole.snapshots()
    assert sorted(snaps) == [3, 6, 12]
    for name, sae in whole.saes.items():
        assert torch.equal(snaps[12][name].decoder, sae.decoder)
        assert not torch.equal(snaps[6][name].decoder, sae.decoder)
    # Killed at step 5 (after the checkpoint at 4 and the snapshot at 3), then resumed.
    train_saes(CONFIGS, data, cfg, out_dir=tmp_path / "resumed", progress=False, stop_at_step=5)
    resumed = train_saes(CONFIGS, data, cfg, out_dir=tmp_path / "resumed", progress=False)
    for step, saes in resumed.snapshots().items():
        for name, sae in saes.items():
            assert torch.equal(sae.encoder, snaps[step][name].encoder), (step, name)
            assert torch.equal(sae.threshold, snaps[step][name].threshold), (step, name)


def test_snapshot_steps_leave_earlier_cache_keys_alone_and_are_checked():
    assert "snapshot_steps" not in train_config_dict(TrainConfig(steps=10))
    assert train_config_dict(TrainConfig(steps=10, snapshot_steps=(5,)))["snapshot_steps"] == [5]
    with pytest.raises(ValueError, match=r"snapshot_steps \[0, 11\] are outside 1..steps=10"):
        TrainConfig(steps=10, snapshot_steps=(0, 5, 11))


def test_batch_allocated_spends_exactly_k_and_leaves_the_sae_untouched(data):
    run = train_saes({"mutual_choice": CONFIGS["mutual_choice"]}, data,
                     TrainConfig(steps=40, batch_size=256, lr=3e-3, warmup_steps=2), progress=False)
    sae = run.saes["mutual_choice"]
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    x = data[:512].reshape(2, 256, D)  # [windows, positions, d] as a splice hook passes it
    x_hat = batch_allocated(sae)(x)
    assert x_hat.shape == x.shape
    assert all(torch.equal(v, sae.state_dict()[k]) for k, v in before.items())
    assert not sae.training
    twin = sae.__class__(sae.cfg)
    twin.load_state_dict(before)
    out = twin.train()(x.reshape(-1, D))
    assert out.codes.l0_per_token().float().mean().item() == K  # MC keeps exactly k per token
    assert torch.allclose(x_hat.reshape(-1, D), out.x_hat)
    # Batch allocation reconstructs differently from the per-token thresholds of inference.
    assert not torch.allclose(x_hat.reshape(-1, D), sae.reconstruct(x.reshape(-1, D)))


def test_study_table_matches_evaluate_and_its_overfitting_check_catches_memorisation(data):
    """A dictionary as wide as its 64 training rows memorises them: held-out NMSE is 21x (TopK) and
    15x (MC) the NMSE on those rows (measured). With 8,000 rows the two nearly agree (1.09, 1.06)."""
    rows = {}
    for n in (64, 8000):
        cfg = TrainConfig(steps=300, batch_size=64, lr=5e-3, warmup_steps=5, seed=n)
        wide = {"topk": SAEConfig(D, 64, rule="topk", k=K),
                "mutual_choice": SAEConfig(D, 64, rule="mutual_choice", k=K)}
        run = train_saes(wide, data[:n], cfg, progress=False)
        table = study_table({300: run.saes}, data[10_000:12_000], data[:min(n, 2000)], 64, 64)
        rows[n] = relative_to(table, "topk", ["NMSE"]).set_index("sae")
        mc = rows[n].loc["mutual_choice"]
        assert mc.L0 == K and mc.tokens == 300 * 64
        assert rows[n].loc["topk", "NMSE / topk"] == 1.0
        expected = evaluate(run.saes["mutual_choice"], data[10_000:12_000], batch_size=64,
                            batch_allocation=True).nmse
        assert mc.NMSE == pytest.approx(expected)
        assert mc["NMSE / topk"] == pytest.approx(mc.NMSE / rows[n].loc["topk", "NMSE"])
    memorised = rows[64].NMSE / rows[64]["NMSE (trained on)"]
    learned = rows[8000].NMSE / rows[8000]["NMSE (trained on)"]
    assert (memorised > 1.5).all(), memorised.to_dict()
    assert (learned < 1.15).all(), learned.to_dict()


def test_cached_table_computes_once_per_key(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return pd.DataFrame({"tokens": [100, 200], "NMSE": [0.123456789012345, 0.1]})

    first = cached_table(tmp_path, "length", {"eval_tokens": 16}, compute)
    again = cached_table(tmp_path, "length", {"eval_tokens": 16}, compute)
    assert len(calls) == 1
    pd.testing.assert_frame_equal(first, again)  # floats survive the CSV round trip exactly
    cached_table(tmp_path, "length", {"eval_tokens": 32}, compute)
    assert len(calls) == 2
    assert not list((tmp_path / "tables").glob(".*tmp*"))


def test_cached_tables_compute_together_and_again_when_one_is_missing(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"points": pd.DataFrame({"L0": [8.5, 4.25]}), "agreement": pd.DataFrame({"cosine": [0.3]})}

    first = cached_tables(tmp_path, ("points", "agreement"), {"windows": 8}, compute)
    again = cached_tables(tmp_path, ("points", "agreement"), {"windows": 8}, compute)
    assert len(calls) == 1 and set(again) == {"points", "agreement"}
    pd.testing.assert_frame_equal(first["points"], again["points"])
    next((tmp_path / "tables").glob("agreement-*.csv")).unlink()  # one table lost: both recomputed
    cached_tables(tmp_path, ("points", "agreement"), {"windows": 8}, compute)
    assert len(calls) == 2


def test_the_exercise_checks_name_what_a_wrong_answer_got_wrong(capsys):
    from saelib.book.exercises import check_first_tokens_at

    assert check_first_tokens_at(first_tokens_at)

    def strictly_above(history, sae, column, level):  # ">" instead of ">="
        rows = history[(history.sae == sae) & (history[column] > level)]
        return None if rows.empty else int(rows.tokens.iloc[0])

    assert not check_first_tokens_at(strictly_above)
    out = capsys.readouterr().out
    assert "SAE 'topk', dead_frac >= 0.01: got 4000, expected 3000" in out

    def signed(ratios, tolerance=0.02):  # compares signed gaps: a growing lead reads as closing
        change = (ratios[-1] - 1) - (ratios[0] - 1)
        return "closes" if change < -tolerance else "widens" if change > tolerance else "stays"

    assert not check_gap_trend(signed)
    out = capsys.readouterr().out
    assert "ratios [0.95, 0.92, 0.9]: got 'closes', expected 'widens'" in out


def test_share_difference_floor_is_two_standard_errors_of_a_difference_of_shares():
    from saelib.studies.scaling import share_difference_floor

    assert share_difference_floor(0.0, 0.0, 1000) == 0.0
    assert abs(share_difference_floor(0.04, 0.06, 10_000) - 2 * (2 * 0.05 * 0.95 / 10_000) ** 0.5) < 1e-12
    assert share_difference_floor(0.05, 0.05, 100) > share_difference_floor(0.05, 0.05, 10_000)
    with pytest.raises(ValueError, match="shares must be in"):
        share_difference_floor(5.0, 0.1, 100)  # a percentage passed as a share


def _frontier(objective, tokens, ces, scale, slope=1.0):
    """A family on a power-law frontier: L0 = scale * CE ** -slope."""
    return pd.DataFrame({"objective": objective, "tokens": tokens, "CE increase": ces,
                         "L0": [scale * c ** -slope for c in ces]})


def test_ratio_trend_reads_the_ratio_across_the_whole_shared_range():
    ces_local, ces_e2e = [0.02, 0.05, 0.1, 0.2, 0.4], [0.03, 0.06, 0.12, 0.3, 0.6]
    points = pd.concat([
        # budget 1000: local needs exactly 1.5x e2e's L0 everywhere
        _frontier("local", 1000, ces_local, 150), _frontier("e2e", 1000, ces_e2e, 100),
        # budget 2000: the ratio 3 * CE ** 0.5 moves along the frontier (about 0.52 to 1.90)
        _frontier("local", 2000, ces_local, 300, slope=0.5), _frontier("e2e", 2000, ces_e2e, 100),
        # budget 4000: the sweeps share no CE range
        _frontier("local", 4000, [0.01, 0.02], 100), _frontier("e2e", 4000, [0.1, 0.2], 100)])
    table = ratio_trend(points, "local", "e2e").set_index("tokens")
    assert table.loc[1000, ["median", "min", "max"]].tolist() == pytest.approx([1.5, 1.5, 1.5])
    assert table.loc[1000, ["CE increase from", "CE increase to"]].tolist() == pytest.approx([0.03, 0.4])
    assert table.loc[2000, "min"] == pytest.approx(3 * 0.03 ** 0.5)  # the ends of the shared range
    assert table.loc[2000, "max"] == pytest.approx(3 * 0.4 ** 0.5)
    assert table.loc[2000, "median"] == pytest.approx(3 * (0.03 * 0.4) ** 0.25, rel=1e-6)  # the log-middle
    assert table.loc[4000, ["median", "min", "max"]].isna().all()
    assert (table[["n local", "n e2e"]].loc[1000] == 5).all()
    grid, ratio = ratio_at_equal([0.1], [10], [0.1, 0.2], [5, 4])  # one point is no frontier
    assert grid.size == ratio.size == 0


@pytest.mark.parametrize("medians, word", [
    ([1.2, 1.5, 2.0], "rising"),
    ([2.0, 1.5, 1.2], "falling"),
    ([1.0, 1.03, 0.98], "flat"),
    ([1.0, 2.0, 1.08], "inconclusive"),     # up, then down again: no trend
    ([1.66, 1.20, 1.44], "inconclusive"),  # the stand-in: 20k, 80k, 161k tokens
    ([1.0, float("nan"), 1.5], "inconclusive"),
])
def test_trend_verdict_names_rising_flat_falling_and_inconclusive(medians, word):
    found, change, floor = trend_verdict(medians)
    assert found == word
    if word in ("rising", "falling"):
        assert abs(change) > floor and (change > 0) == (word == "rising")


def test_seed_agreement_is_one_for_the_same_directions_and_low_for_random_ones():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(200, 64, generator=gen)
    assert seed_agreement(a, a[torch.randperm(200, generator=gen)]) == pytest.approx(1.0)
    assert seed_agreement(a, torch.randn(400, 64, generator=gen)) < 0.5
