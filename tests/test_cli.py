"""python -m saelib train: a synthetic run end to end, resume, overrides, config errors, torchrun."""

import json
import os
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
