"""Every benchmark in bench/ runs, through saelib's public API only, and prints what it claims: each
one's ``main`` with tiny arguments (a few seconds each, the organism ones on the `ci` organism)."""

import ast
import importlib
import inspect
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))  # the scripts import each other (bench_peers reads bench_train's data)

import bench_dead  # noqa: E402
import bench_e2e  # noqa: E402
import bench_harvest  # noqa: E402
import bench_peers  # noqa: E402
import bench_train  # noqa: E402

SCRIPTS = sorted(BENCH.glob("bench_*.py"))


@pytest.fixture(scope="module")
def ci_organism():
    from saelib.subjects.language_models import train_organism

    return train_organism("ci", progress=False)  # cached under $SAELIB_CACHE after the first run


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_benchmarks_import_only_public_names(script):
    """No private saelib name (a leading underscore) and, from a module with ``__all__``, only what it lists."""
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "saelib":
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert not alias.name.startswith("_"), f"{script.name} imports {node.module}.{alias.name}"
                listed = getattr(module, "__all__", None)
                submodule = inspect.ismodule(getattr(module, alias.name, None))
                assert listed is None or alias.name in listed or submodule, \
                    f"{script.name}: {alias.name} is not in {node.module}.__all__"


def test_bench_train_prints_every_rule_and_precision_with_the_gemm(capsys):
    result = bench_train.main(["--d", "32", "--d-sae", "128", "--k", "4", "--batch", "256", "--steps", "3",
                               "--dtypes", "float32,bfloat16", "--quality-steps", "4", "--quality-rows", "2048"])
    out = capsys.readouterr().out
    assert "fp32 matmul" in out and "load average" in out and result["matmul_gflops"] > 0
    rows = result["rules"]
    assert sorted((r["rule"], r["dtype"]) for r in rows) == sorted(
        (rule, dt) for rule in ("topk", "mutual_choice", "feature_choice", "relu") for dt in ("float32", "bfloat16"))
    assert all(r["tokens_per_s"] > 0 and r["ranks"] == 1 for r in rows)
    assert all(r["vs_topk"] == 1.0 for r in rows if r["rule"] == "topk")
    for r in rows:  # one printed row per rule and precision
        assert any(line.split()[:3] == [r["rule"], r["dtype"], "1"] for line in out.splitlines())
    # The equal-quality check: bf16's held-out NMSE printed beside fp32's, and near it.
    nmse = result["heldout_nmse"]
    assert set(nmse) == {"float32", "bfloat16"} and "bfloat16 encoder" in out
    assert abs(nmse["bfloat16"] / nmse["float32"] - 1) < 0.02


def test_bench_train_two_ranks(capsys):
    result = bench_train.main(["--d", "32", "--d-sae", "128", "--k", "4", "--batch", "256", "--steps", "2",
                               "--rules", "topk", "--two-ranks"])
    assert [(r["rule"], r["ranks"]) for r in result["rules"]] == [("topk", 1), ("topk", 2)]
    assert all(r["tokens_per_s"] > 0 for r in result["rules"])


def test_bench_peers_round_robin_checks_equal_quality_before_any_ratio(capsys):
    pytest.importorskip("sae_lens")
    pytest.importorskip("sparsify")
    result = bench_peers.main(["--d", "32", "--d-sae", "128", "--k", "4", "--batch", "256", "--steps", "8",
                               "--warmup", "2", "--rows", "4096", "--heldout", "1024", "--rounds", "2"])
    out = capsys.readouterr().out
    rows = result["results"]
    assert [r["library"] for r in rows] == [
        "saelib (float32 encoder)", "saelib (bfloat16 encoder)", "SAELens dense, dec. norm 0.1",
        "SAELens dense, dec. norm 1", "sparsify 1.3, signum", "sparsify 1.3, adam"]
    assert all(r["tokens_per_s"] > 0 and r["end_to_end_tokens_per_s"] > 0 and 0 < r["nmse"] < 2 for r in rows)
    # round-robin: every library ran once per round, and the table shows the median of its rounds
    assert all(len(r["tokens_per_s_rounds"]) == 2 for r in rows)
    assert all(r["tokens_per_s"] == pytest.approx(sum(r["tokens_per_s_rounds"]) / 2) for r in rows)
    assert "load average" in out and out.count("fp32 matmul") == 2 and result["matmul_gflops"] > 0
    assert out.count("equal-quality check:") == len(rows) - 1
    first_ratio = min((out.index(t) for t in ("at equal held-out NMSE", "no speed ratio is claimed") if t in out))
    assert first_ratio > out.rindex("equal-quality check:")  # every check comes first
    for peer in ("SAELens", "sparsify"):  # each peer: a ratio against an equal-quality run, or none claimed
        equal = [r for r in rows if r["library"].startswith(peer) and r["equal_quality"]]
        assert bool(equal) == any(f"/ {peer}" in k for k in result["ratios"]), peer
        assert equal or f"no {peer} run reached" in out
    for name, ratio in result["ratios"].items():
        mine, peer = (next(r for r in rows if r["library"] == n) for n in name.split(" / "))
        assert mine["equal_quality"] and peer["equal_quality"]
        assert ratio == pytest.approx(mine["tokens_per_s"] / peer["tokens_per_s"])


def test_bench_e2e_times_every_objective(ci_organism, capsys):
    rows = bench_e2e.main(["--organism", "ci", "--steps", "2", "--batch", "2", "--context", "16"])
    out = capsys.readouterr().out
    assert [r["objective"] for r in rows] == ["local", "e2e float32", "e2e bfloat16", "e2e+ds bfloat16"]
    assert all(r["tokens_per_s"] > 0 and r["model"] == "organism-ci" for r in rows)
    assert rows[0]["time_vs_local"] == 1.0 and all(r["objective"] in out for r in rows)


def test_bench_harvest_rows_at_each_thread_count(ci_organism, capsys):
    rows = bench_harvest.main(["--skip-smollm2", "--organism", "ci", "--batch", "2", "--context", "16",
                               "--batches", "2", "--threads", "1,2"])
    out = capsys.readouterr().out
    assert len(rows) == 10 and sorted({r["threads"] for r in rows}) == [1, 2]
    assert all(r["tokens_per_s"] > 0 and r["model"] == "organism-ci" for r in rows)
    low = [r for r in rows if "vs_fp32" in r]
    assert len(low) == 2 and all(r["relative_error"] < 0.05 for r in low)
    assert "load average" in out and "fp32's harvest" in out


def test_bench_dead_reports_dead_share_nmse_and_speed_per_rule_and_size(ci_organism, capsys):
    rows = bench_dead.main(["--model", "organism-ci", "--hook", "blocks.0.hook_resid_post", "--tokens", "4096",
                            "--eval-tokens", "1024", "--context", "32", "--runs",
                            "topk:2,feature_choice:2,feature_choice_unfloored:8", "--steps", "8", "--batch", "128",
                            "--k", "2", "--dead-after", "256"])
    out = capsys.readouterr().out
    assert [(r["family"], r["expansion"]) for r in rows] == [("topk", 2), ("feature_choice", 2),
                                                             ("feature_choice_unfloored", 8)]
    assert all(0 <= r["dead_pct"] <= 100 and 0 < r["nmse"] < 2 and r["run_tokens_per_s"] > 0 for r in rows)
    # k * batch = 256 tokens for 8x the width's features: the pure Zipf share starves ranks, the floor does not.
    assert rows[1]["dead_pct"] == 0 and rows[2]["dead_pct"] > 0
    assert "% dead against training tokens, 8x" in out
