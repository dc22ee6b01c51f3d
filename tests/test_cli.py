"""python -m saelib train: a synthetic run end to end, resume, overrides, config errors, torchrun."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from saelib.cli.train import main
from saelib.core.checkpoints import latest_checkpoint, load_sae
from saelib.core.saelens_io import load_saelens

CONFIG = """
[data]
synthetic = { n_tokens = 8192, d = 16, n_features = 32, active = 3, seed = 2 }

[train]
steps = 12
batch_size = 512
warmup_steps = 2
log_every = 4
checkpoint_every = 4
init_tokens = 4096

[sae.topk]
d_sae = 48
k = 3
aux = "aux_k"
dead_after_tokens = 1000

[sae.mc]
d_sae = 48
rule = "mutual_choice"
k = 3

[export]
saelens = true
model_name = "synthetic"
"""
NAMES = ("topk", "mc")


def _config(folder: Path, text: str = CONFIG) -> str:
    path = folder / "run.toml"
    path.write_text(text)
    return str(path)


def _error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def _weights(out: Path) -> dict:
    return {name: load_sae(out / "saes" / name).state_dict() for name in NAMES}


def _same(a: dict, b: dict, atol: float = 0.0, rtol: float = 0.0) -> None:
    for name in NAMES:
        for key, va in a[name].items():
            vb = b[name][key]
            if key == "threshold":  # features never seen firing keep inf
                va, vb = va.nan_to_num(posinf=0), vb.nan_to_num(posinf=0)
            assert torch.allclose(va, vb, atol=atol, rtol=rtol), (name, key, (va - vb).abs().max())


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("single")
    main([_config(folder), "--out", str(folder / "out"), "--no-progress"])
    return folder / "out"


def test_run_writes_checkpoints_history_and_saelens_export(single):
    assert latest_checkpoint(single).name == "step_00000012"
    history = pd.read_csv(single / "history.csv")
    assert sorted(history["step"].unique()) == [1, 4, 8, 12] and set(history["sae"]) == set(NAMES)
    assert len(pd.read_json(single / "history.jsonl", lines=True)) == len(history)
    saved = json.loads((single / "config.json").read_text())
    assert saved["sae"]["topk"]["d_in"] == 16 and saved["train"]["steps"] == 12
    x = torch.randn(64, 16)
    for name in NAMES:
        exported = load_saelens(single / "saelens" / name)
        assert json.loads((single / "saelens" / name / "cfg.json").read_text())["metadata"]["model_name"] == "synthetic"
        assert torch.allclose(exported.reconstruct(x), load_sae(single / "saes" / name).reconstruct(x), atol=1e-5)
        # Synthetic data has no model to splice into: no SAEBench core evaluation (tests/test_ecosystem.py
        # has a run on a model that writes one).
        assert not (single / "saes" / name / "saebench_core.json").exists()


def test_rerun_resumes_without_extra_steps(single, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(single, out)
    main([_config(tmp_path), "--out", str(out), "--no-progress"])
    assert pd.read_csv(out / "history.csv").equals(pd.read_csv(single / "history.csv"))
    _same(_weights(out), _weights(single))
    # Killed after step 8: the rerun continues from there and lands on the same weights.
    shutil.rmtree(out / "checkpoints" / "step_00000012")
    shutil.rmtree(out / "saes")
    main([_config(tmp_path), "--out", str(out), "--no-progress"])
    assert latest_checkpoint(out).name == "step_00000012"
    _same(_weights(out), _weights(single))


def test_refuses_to_resume_with_another_config(single, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(single, out)
    err = _error(capsys, [_config(tmp_path), "--out", str(out), "--set", "train.lr=1e-3"])
    assert "different configuration" in err and "train.lr" in err
    # export settings may change (e.g. to export a finished run).
    main([_config(tmp_path), "--out", str(out), "--no-progress", "--set", "export.saelens=false"])


def test_set_overrides(tmp_path, capsys):
    main([_config(tmp_path), "--print-config", "--set", "train.lr=1e-3", "--set", "sae.topk.k=4",
          "--set", "train.adam_betas=[0.8, 0.99]", "--set", "sae.new.d_sae=32"])
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["train"]["lr"] == 1e-3 and cfg["sae"]["topk"]["k"] == 4 and cfg["sae"]["mc"]["k"] == 3
    assert cfg["train"]["adam_betas"] == [0.8, 0.99]
    assert cfg["sae"]["new"] == cfg["sae"]["new"] | {"d_in": 16, "d_sae": 32, "rule": "topk"}


@pytest.mark.parametrize("override, message", [
    ("train.lerning_rate=1e-3", "train.lerning_rate: unknown key; did you mean train.lr?"),
    ("sae.topk.kk=3", "sae.topk.kk: unknown key; did you mean sae.topk.k?"),
    ("data.synthetic.nfeatures=3", "data.synthetic.nfeatures: unknown key; did you mean data.synthetic.n_features?"),
    ("trian.steps=3", "trian: unknown section; did you mean train?"),
    ("train.steps=ten", "train.steps: expected int, got str 'ten'"),
    ("train.lr=true", "train.lr: expected float, got bool True"),
    ("train.adam_betas=[0.9]", "train.adam_betas: expected tuple[float, float]"),
    ("sae.topk.k=100", "sae.topk.k: SAEConfig.k = 100 is invalid: must be an integer in 1..d_sae=48"),
    ("train.steps=0", "train.steps: TrainConfig.steps = 0 is invalid: must be an integer >= 1"),
    ("train.min_lr_frac=-5.0", "train.min_lr_frac: TrainConfig.min_lr_frac = -5.0 is invalid: must be a fraction of lr"),
    ("sae.mc.aux=auxk", "sae.mc.aux: SAEConfig.aux = 'auxk' is invalid: unknown aux loss"),
    ("data.model=smollm2-135m", "data: give exactly one of"),
    ("export.saebench_windows=0", "export.saebench_windows: ExportConfig.saebench_windows = 0 is invalid: must be an "
                                  "integer >= 1"),
])
def test_config_errors_name_the_key(tmp_path, capsys, override, message):
    assert message in _error(capsys, [_config(tmp_path), "--print-config", "--set", override])


def test_missing_required_key(tmp_path, capsys):
    err = _error(capsys, [_config(tmp_path, CONFIG.replace("d_sae = 48\nk = 3\naux", "k = 3\naux")), "--print-config"])
    assert "sae.topk: missing required key(s) sae.topk.d_sae" in err


def test_help_config_lists_documented_fields(capsys):
    main(["--help-config"])
    out = capsys.readouterr().out
    for section in ("[data]", "[data.synthetic]", "[train]", "[sae.NAME]", "[export]"):
        assert section in out
    assert "lr: float (default 0.0004)\n      Peak Adam learning rate." in out
    assert "steps: int (required)" in out and "d_in: int (default: the data's width)" in out
    assert "hook: str (required)" in out and "k_aux: int" in out and "saelens: bool (default false)" in out
    assert "saebench: bool (default true)" in out and "saebench_windows: int (default 64)" in out


def test_torchrun_two_ranks_match_one_process(single, tmp_path):
    out = tmp_path / "out"
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
           "-m", "saelib", "train", _config(tmp_path), "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # rank 0 alone reports
    # Same global batches; only the order of float sums differs (tolerance as in test_distributed).
    _same(_weights(out), _weights(single), atol=2e-4, rtol=1e-3)
    assert load_saelens(out / "saelens" / "topk").cfg.k == 3


def _one_line(err: str) -> str:
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_a_bad_setting_fails_before_writing_anything(tmp_path, capsys):
    """A negative lr left config.json behind, and the corrected rerun was refused because of it."""
    out = tmp_path / "out"
    err = _one_line(_error(capsys, [_config(tmp_path), "--out", str(out), "--set", "train.lr=-0.001"]))
    assert err == "error: train.lr: TrainConfig.lr = -0.001 is invalid: must be a finite number > 0"
    assert not out.exists()
    main([_config(tmp_path), "--out", str(out), "--no-progress"])
    assert latest_checkpoint(out).name == "step_00000012"


def test_a_failed_start_does_not_block_a_corrected_rerun(single, tmp_path, capsys):
    """config.json without any checkpoint (a start that failed later, e.g. killed while harvesting) is
    replaced by the next run rather than compared with it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"data": {}, "train": {"lr": -1}, "sae": {}}))
    main([_config(tmp_path), "--out", str(out), "--no-progress"])
    _same(_weights(out), _weights(single))


@pytest.mark.parametrize("case, message", [
    ("batch", r"^error: train.batch_size: 16384 rows per step but the data has 8192 rows; use batch_size <= 8192$"),
    ("cache", r"^error: data.cache: .*/nowhere is not an activation cache \(no manifest.json\); "),
    ("out", r"^error: cannot write the output folder .*/file/out: \[Errno 20\] Not a directory"),
    ("config-json", r"^error: .*/config.json is damaged: not valid JSON \(.*\); delete .*/out to start over"),
])
def test_expected_failures_are_one_line_and_exit_2(single, tmp_path, capsys, case, message):
    out, args, text = tmp_path / "out", [], CONFIG
    if case == "batch":
        args = ["--set", "train.batch_size=16384"]
    elif case == "cache":
        text = CONFIG.replace(CONFIG.split("\n")[2], f'cache = "{tmp_path / "nowhere"}"')
    elif case == "out":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "out"
    else:
        shutil.copytree(single, out)
        (out / "config.json").write_text((out / "config.json").read_text()[:40])
    err = _one_line(_error(capsys, [_config(tmp_path, text), "--out", str(out), "--no-progress", *args]))
    assert re.match(message, err), err


def test_continue_training_with_more_steps(single, tmp_path):
    """`--set train.steps=20` on a finished 12-step run continues it from step 12 under the 20-step
    schedule (the history says which rows ran under which); its exact test is in test_faults."""
    out = tmp_path / "out"
    shutil.copytree(single, out)
    main([_config(tmp_path), "--out", str(out), "--no-progress", "--set", "train.steps=20"])
    history = pd.read_csv(out / "history.csv")
    assert history.step.max() == 20 and sorted(history.schedule_steps.unique()) == [12, 20]
    state = json.loads((latest_checkpoint(out) / "state.json").read_text())
    assert state["schedule"] == [{"from_step": 0, "steps": 12}, {"from_step": 12, "steps": 20}]
    # Resuming the continued run again trains nothing more and keeps the weights.
    before = _weights(out)
    main([_config(tmp_path), "--out", str(out), "--no-progress", "--set", "train.steps=20"])
    _same(_weights(out), before)


def test_two_concurrent_runs_into_one_folder(single, tmp_path):
    """They crashed one another in prune_checkpoints; now the second waits for the first and finds
    its result: both exit 0 with the weights of a single run."""
    out = tmp_path / "out"
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    # Each step slowed down (0.2 s), so that the two runs overlap however their start-up times differ.
    slow = ("import sys, time; import saelib.core.training as T; step = T._train_step; "
            "T._train_step = lambda *a, **k: time.sleep(0.2) or step(*a, **k); "
            "from saelib.cli.train import main; main(sys.argv[1:])")
    cmd = [sys.executable, "-c", slow, _config(tmp_path), "--out", str(out), "--no-progress"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    assert sum("waiting for process" in r[1] for r in results) == 1
    _same(_weights(out), _weights(single))
    # Timings differ; the losses agree to float rounding (the runs here use one thread, `single`
    # the test process's thread count, which changes the order of float sums).
    columns = lambda h: h.drop(columns="tokens_per_s")  # noqa: E731
    pd.testing.assert_frame_equal(columns(pd.read_csv(out / "history.csv")),
                                  columns(pd.read_csv(single / "history.csv")), check_exact=False, rtol=1e-5)


def test_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    """The disk fills while a checkpoint is written: the system's reason, no traceback, exit 2."""
    import errno

    from saelib.core import storage

    def full(tmp, final):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    monkeypatch.setattr(storage, "commit_dir", full)
    err = _one_line(_error(capsys, [_config(tmp_path), "--out", str(tmp_path / "out"), "--no-progress"]))
    assert err.startswith("error: [Errno 28] No space left on device")
