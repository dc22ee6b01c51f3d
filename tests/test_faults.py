"""Fault injection: every damaged artefact and every bad setting is refused at once, with one line.

Each row below is a test of this module (its id in brackets); "... ;" stands for the file's path,
and every damage message ends with the remedy quoted in its row.

| bad input | message it gives |
|---|---|
| SAE folder: sae.safetensors truncated [sae-truncate] | `.../sae.safetensors is damaged: 1000 bytes where N were written (truncated or overwritten); delete FOLDER and rerun what wrote it (a training run rewrites its SAEs from its last checkpoint)` |
| SAE folder: bytes flipped in the weights [sae-flip] | `.../sae.safetensors is damaged: its contents differ from what was written (checksum mismatch); delete FOLDER ...` |
| SAE folder: 2000 bytes zeroed [sae-zero] | same as a flip |
| SAE folder: config.json and sae.safetensors swapped [sae-swap] | `.../config.json is damaged: N bytes where M were written ...` |
| SAE folder: config.json truncated, no checksums (an old folder) [sae-json] | `.../config.json is damaged: not valid JSON (...); delete FOLDER ...` |
| checkpoint: an SAE's weights truncated / flipped / zeroed [ckpt-*] | `.../step_N/tk/sae.safetensors is damaged: ...; delete .../step_N to resume from the checkpoint before it, or delete RUN to train from scratch` |
| checkpoint: 4000 bytes of the Adam state zeroed [ckpt-adam-zero] | `.../step_N/tk.adam.safetensors is damaged: its contents differ ...` |
| checkpoint: two SAEs' weights swapped (same shapes) [ckpt-swap] | `.../step_N/mc/sae.safetensors is damaged: its contents differ ...` |
| checkpoint: 0xFF bytes in the weights [ckpt-ff] | damaged, not "non-finite loss; try a lower learning rate" |
| checkpoint: state.json truncated [ckpt-state-truncate] | `.../state.json is damaged: ... (truncated or overwritten); delete .../step_N ...` |
| checkpoint: state.json invalid, no checksums [ckpt-state-json] | `.../state.json is damaged: not valid JSON (...)` |
| activation cache: second half of activations.bin zeroed [cache-zero] | `.../activations.bin is damaged: its contents differ ...; delete CACHE and rerun to harvest it again` |
| activation cache: truncated / flipped / tokens.npy and activations.bin swapped [cache-*] | `... is damaged: ...` |
| activation cache: damaged after it was verified and stamped [cache-after-stamp] | the write voids the stamp: damaged |
| organism: its last checkpoint truncated / flipped / zeroed [organism] | `.../checkpoints/step_N.pt is damaged: ...; delete FOLDER and rerun train_organism('NAME') to train it again` |
| ViT: model.pt flipped, vit.json truncated [vit] | `.../model.pt is damaged: ...; delete FOLDER and rerun train_vit to pretrain it again` |
| SAELens export: weights truncated [saelens-truncate] | `.../sae_weights.safetensors is damaged: ...; delete FOLDER and export it again` |
| a writer killed between `atomic_dir` and `commit_dir`, or inside an atomic file write [swept] | nothing: its `.NAME.tmpPID` is removed by the next writer of NAME (a running writer's is kept) |
| `TrainConfig(min_lr_frac=-5.0)` [cfg-min_lr_frac] | `TrainConfig.min_lr_frac = -5.0 is invalid: must be a fraction of lr in [0, 1]` |
| `TrainConfig(lr=-0.001)`, `lr=nan`, `lr=inf` [cfg-lr*] | `TrainConfig.lr = -0.001 is invalid: must be a finite number > 0` |
| `TrainConfig(decay_start=1.5)` [cfg-decay_start] | `TrainConfig.decay_start = 1.5 is invalid: must be a fraction of training in [0, 1]` |
| `TrainConfig(warmup_steps=-1)` [cfg-warmup] | `TrainConfig.warmup_steps = -1 is invalid: must be an integer >= 0` |
| `TrainConfig(grad_clip=-1)` [cfg-grad_clip] | `TrainConfig.grad_clip = -1.0 is invalid: must be a finite number >= 0 (0 disables clipping)` |
| `TrainConfig(steps=0)`, `batch_size=0`, `checkpoint_every=0`, `log_every=0` [cfg-*] | `TrainConfig.steps = 0 is invalid: must be an integer >= 1` |
| `TrainConfig(adam_betas=(0.9, 1.0))` [cfg-betas] | `TrainConfig.adam_betas = (0.9, 1.0) is invalid: must be two numbers in [0, 1)` |
| `SAEConfig(stats_decay=1.0)`, `l1_coeff=-1`, `k_aux=0`, `dead_after_tokens=0` [sae-cfg-*] | `SAEConfig.stats_decay = 1.0 is invalid: must be a number in [0, 1)` |
| e2e on windows harvested at blocks.0 while told blocks.1 [e2e-hook] | `SAE 's''s objective splices into 'blocks.1.hook_resid_pre' but its windows were harvested at 'blocks.0.hook_resid_pre': use the cache of 'blocks.1.hook_resid_pre'` |
| `E2E(model, hook, ds_coeff=nan)` [e2e-hook] | `E2E.ds_coeff = nan is invalid: must be a finite number >= 0` |
| `train_saes` continued to fewer steps than its checkpoint [continue-shorter] | `checkpoint ... is at step 20, past train.steps=10: use steps >= 20 to continue it, or another output folder` |
| two `train_cached` of the same SAEs at once [concurrent] | the second prints `waiting for process PID, which is writing .../saes/KEY`, then finds the result (trained once) |
| `book --build-dir` below a regular file [book-build-dir] | `error: [Errno 20] Not a directory: ...` (exit 2) |
| `student-copy --out` a regular file [student-copy-out] | `error: [Errno 17] File exists: ...` (exit 2) |
| `browse --cache` with a zeroed block [browse-damaged-cache] | `error: .../activations.bin is damaged: its contents differ ...; delete CACHE and rerun to harvest it again` |
| `browse --tokens 1000000000000` [browse-too-many-tokens] | `error: cannot harvest 1,000,000,000,000 tokens of 'mixed': corpus 'mixed' (heldout split) holds at most ... tokens (... windows of 64), ...; pass a smaller --tokens` |
| `browse --out` below a regular file [browse-out-unwritable] | `error: [Errno 20] Not a directory: ...` |

Elsewhere, each also a test: `saelib train` with `train.lr=-0.001` (exit 2, nothing written, the corrected
rerun works), a batch larger than the data, a missing `data.cache`, an unwritable `--out`, a truncated
run config.json, a config.json left by a failed start, `train.steps` raised (continues), two runs into
one `--out` (tests/test_cli.py); `book -p kk=3` (did you mean 'k'), `-p k=notanumber`, `-p k=2.5`,
`-p lr=fast` (one line before a kernel starts), `-p steps=4`, a failing chapter keeping the last good
notebook (tests/test_notebooks.py); a damaged cached chapter browser (tests/test_browser.py).
"""

import json
import os
import re
import threading
import time
from pathlib import Path

import pytest
import torch

from saelib.core import storage
from saelib.core.checkpoints import CheckpointError, latest_checkpoint, load_sae, save_sae
from saelib.core.sae import SAE, SAEConfig
from saelib.core.saelens_io import export_saelens, load_saelens
from saelib.core.storage import DamagedError
from saelib.core.synthetic import make_synthetic
from saelib.core.training import TrainConfig, train_saes

# ---------------------------------------------------------------------------- the damage


def truncate(path, keep=1000):
    path.write_bytes(path.read_bytes()[:keep])


def flip(path, at=None):
    """Invert 16 bytes in the payload (past any header), in place."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    for i in range(at, min(at + 16, len(data))):
        data[i] ^= 0xFF
    _rewrite(path, data)


def zero(path, n=2000, at=None):
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    data[at:at + n] = bytes(len(data[at:at + n]))
    _rewrite(path, data)


def fill_ff(path, n=4000):
    data = bytearray(path.read_bytes())
    at = len(data) // 2
    data[at:at + n] = b"\xff" * len(data[at:at + n])
    _rewrite(path, data)


def swap(a, b):
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)


def _rewrite(path, data):
    # In place, as a disk fault or a stray write would (the file keeps its inode).
    with open(path, "r+b") as f:
        f.write(bytes(data))


# ---------------------------------------------------------------------------- SAE folders

D, F = 16, 48


@pytest.fixture
def sae_folder(tmp_path):
    sae = SAE(SAEConfig(D, F, rule="topk", k=3))
    return save_sae(sae, tmp_path / "sae")


SAE_FAULTS = {
    "sae-truncate": (lambda f: truncate(f / "sae.safetensors"),
                     r"sae.safetensors is damaged: 1000 bytes where \d+ were written \(truncated or overwritten\)"),
    "sae-flip": (lambda f: flip(f / "sae.safetensors"), r"sae.safetensors is damaged: its contents differ"),
    "sae-zero": (lambda f: zero(f / "sae.safetensors"), r"sae.safetensors is damaged: its contents differ"),
    "sae-swap": (lambda f: swap(f / "config.json", f / "sae.safetensors"), r"config.json is damaged: \d+ bytes"),
}


@pytest.mark.parametrize("fault", sorted(SAE_FAULTS))
def test_damaged_sae_folder_is_refused(sae_folder, fault):
    damage, message = SAE_FAULTS[fault]
    damage(sae_folder)
    with pytest.raises(DamagedError, match=message + r".*; delete .*sae and rerun what wrote it"):
        load_sae(sae_folder)


def test_sae_folder_loads_when_intact(sae_folder):
    assert load_sae(sae_folder).cfg.d_sae == F


def test_sae_json_invalid_without_checksums(sae_folder):
    """[sae-json] A folder from before checksums: its JSON is still parsed into a DamagedError."""
    (sae_folder / storage.CHECKSUMS).unlink()
    truncate(sae_folder / "config.json", 20)
    with pytest.raises(DamagedError, match=r"config.json is damaged: not valid JSON \(.*\); delete"):
        load_sae(sae_folder)


def test_saelens_export_verified(tmp_path):
    """[saelens-truncate]"""
    folder = export_saelens(SAE(SAEConfig(D, F, rule="topk", k=3)), tmp_path / "lens")
    truncate(folder / "sae_weights.safetensors")
    with pytest.raises(DamagedError, match="sae_weights.safetensors is damaged: .*; delete .* and export it again"):
        load_saelens(folder)


# ---------------------------------------------------------------------------- training checkpoints


def _run():
    x = make_synthetic(4096, D, 32, active=3, seed=1).activations
    cfgs = {"tk": SAEConfig(D, F, rule="topk", k=3), "mc": SAEConfig(D, F, rule="mutual_choice", k=3)}
    return x, cfgs, TrainConfig(steps=20, batch_size=256, warmup_steps=2, log_every=5, checkpoint_every=10)


@pytest.fixture
def stopped(tmp_path):
    """A run stopped (as if killed) after its step-10 checkpoint."""
    x, cfgs, cfg = _run()
    train_saes(cfgs, x, cfg, out_dir=tmp_path / "run", progress=False, stop_at_step=10)
    return tmp_path / "run", latest_checkpoint(tmp_path / "run")


CKPT_FAULTS = {
    "ckpt-truncate": (lambda c: truncate(c / "tk" / "sae.safetensors"), r"tk/sae.safetensors is damaged: 1000 bytes"),
    "ckpt-flip": (lambda c: flip(c / "tk" / "sae.safetensors"), r"tk/sae.safetensors is damaged: its contents"),
    "ckpt-zero": (lambda c: zero(c / "tk" / "sae.safetensors", 4000), r"tk/sae.safetensors is damaged: its contents"),
    "ckpt-ff": (lambda c: fill_ff(c / "tk" / "sae.safetensors"), r"tk/sae.safetensors is damaged: its contents"),
    "ckpt-adam-zero": (lambda c: zero(c / "tk.adam.safetensors", 4000), r"tk.adam.safetensors is damaged: its"),
    "ckpt-swap": (lambda c: swap(c / "tk" / "sae.safetensors", c / "mc" / "sae.safetensors"),
                  r"mc/sae.safetensors is damaged: its contents differ"),
    "ckpt-state-truncate": (lambda c: truncate(c / "state.json", 50), r"state.json is damaged: 50 bytes"),
}


@pytest.mark.parametrize("fault", sorted(CKPT_FAULTS))
def test_damaged_checkpoint_is_refused_on_resume(stopped, fault):
    run, ck = stopped
    damage, message = CKPT_FAULTS[fault]
    damage(ck)
    x, cfgs, cfg = _run()
    advice = f"; delete {ck} to resume from the checkpoint before it, or delete {run} to train from scratch"
    with pytest.raises(DamagedError, match=message + ".*" + advice.replace(".", r"\.")):
        train_saes(cfgs, x, cfg, out_dir=run, progress=False)


def test_the_advice_works(stopped):
    """Deleting the damaged checkpoint, as the message says, trains from the one before (here: none)
    to the same weights as a run that was never damaged."""
    run, ck = stopped
    zero(ck / "tk" / "sae.safetensors")
    x, cfgs, cfg = _run()
    with pytest.raises(DamagedError):
        train_saes(cfgs, x, cfg, out_dir=run, progress=False)
    import shutil

    shutil.rmtree(ck)
    resumed = train_saes(cfgs, x, cfg, out_dir=run, progress=False)
    straight = train_saes(cfgs, x, cfg, progress=False)
    assert all(torch.equal(resumed.saes[n].decoder, straight.saes[n].decoder) for n in cfgs)


def test_state_json_invalid_without_checksums(stopped):
    """[ckpt-state-json]"""
    run, ck = stopped
    (ck / storage.CHECKSUMS).unlink()
    (ck / "state.json").write_text('{"step": 10, "train": {')
    x, cfgs, cfg = _run()
    with pytest.raises(DamagedError, match=r"state.json is damaged: not valid JSON \(.*\); delete .*step_00000010"):
        train_saes(cfgs, x, cfg, out_dir=run, progress=False)


# ---------------------------------------------------------------------------- settings


@pytest.mark.parametrize("kwargs, message", [
    (dict(min_lr_frac=-5.0), r"TrainConfig.min_lr_frac = -5.0 is invalid: must be a fraction of lr in \[0, 1\]"),
    (dict(lr=-0.001), r"TrainConfig.lr = -0.001 is invalid: must be a finite number > 0"),
    (dict(lr=float("nan")), r"TrainConfig.lr = nan is invalid: must be a finite number > 0"),
    (dict(lr=float("inf")), r"TrainConfig.lr = inf is invalid"),
    (dict(decay_start=1.5), r"TrainConfig.decay_start = 1.5 is invalid: must be a fraction of training in \[0, 1\]"),
    (dict(warmup_steps=-1), r"TrainConfig.warmup_steps = -1 is invalid: must be an integer >= 0"),
    (dict(grad_clip=-1.0), r"TrainConfig.grad_clip = -1.0 is invalid: must be a finite number >= 0"),
    (dict(steps=0), r"TrainConfig.steps = 0 is invalid: must be an integer >= 1"),
    (dict(steps=2.5), r"TrainConfig.steps = 2.5 is invalid: must be an integer >= 1"),
    (dict(batch_size=0), r"TrainConfig.batch_size = 0 is invalid"),
    (dict(checkpoint_every=0), r"TrainConfig.checkpoint_every = 0 is invalid: must be an integer >= 1"),
    (dict(log_every=0), r"TrainConfig.log_every = 0 is invalid"),
    (dict(adam_betas=(0.9, 1.0)), r"TrainConfig.adam_betas = \(0.9, 1.0\) is invalid: must be two numbers in \[0, 1\)"),
], ids=lambda v: "cfg" if isinstance(v, dict) else None)
def test_bad_train_settings_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match="^" + message):
        TrainConfig(steps=kwargs.pop("steps", 10), **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(stats_decay=1.0), r"SAEConfig.stats_decay = 1.0 is invalid: must be a number in \[0, 1\)"),
    (dict(l1_coeff=-1.0), r"SAEConfig.l1_coeff = -1.0 is invalid: must be a finite number >= 0"),
    (dict(aux_coeff=float("nan")), r"SAEConfig.aux_coeff = nan is invalid"),
    (dict(k_aux=0), r"SAEConfig.k_aux = 0 is invalid: must be an integer >= 1"),
    (dict(dead_after_tokens=0), r"SAEConfig.dead_after_tokens = 0 is invalid"),
    (dict(d_sae=0), r"SAEConfig.d_sae = 0 is invalid: must be an integer >= 1"),
])
def test_bad_sae_settings_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match="^" + message):
        SAEConfig(**{"d_in": D, "d_sae": F, **kwargs})


def test_negative_min_lr_frac_no_longer_trains():
    """The issue's silent case: min_lr_frac=-5 gave negative learning rates and NMSE 1737 with exit 0."""
    with pytest.raises(ValueError, match="min_lr_frac"):
        TrainConfig(steps=10, min_lr_frac=-5.0)


# ---------------------------------------------------------------------------- continue training


def test_continue_to_fewer_steps_than_the_checkpoint_is_refused(tmp_path):
    """[continue-shorter]"""
    x, cfgs, cfg = _run()
    train_saes(cfgs, x, cfg, out_dir=tmp_path, progress=False)
    cfg.steps = 10
    with pytest.raises(CheckpointError, match=r"is at step 20, past train.steps=10: use steps >= 20"):
        train_saes(cfgs, x, cfg, out_dir=tmp_path, progress=False)


def test_continue_training_is_exact(tmp_path):
    """A finished 20-step run continued to 40 steps: steps 21..40 run under the 40-step schedule, the
    history says so, and the result equals one uninterrupted run with that piecewise schedule (a run
    continued and killed half-way, then resumed, gives the same bytes)."""
    x, cfgs, short = _run()
    train_saes(cfgs, x, short, out_dir=tmp_path / "a", progress=False)
    long = TrainConfig(**{**short.__dict__, "steps": 40})
    continued = train_saes(cfgs, x, long, out_dir=tmp_path / "a", progress=False)
    h = continued.history
    assert sorted(h.schedule_steps.unique()) == [20, 40]
    assert (h[h.step <= 20].schedule_steps == 20).all() and (h[h.step > 20].schedule_steps == 40).all()
    for _, row in h[h.sae == "tk"].iterrows():  # each step's lr is its own schedule's
        schedule = short if row.schedule_steps == 20 else long
        assert row.lr == schedule.lr_at(int(row.step) - 1)
    state = json.loads((latest_checkpoint(tmp_path / "a") / "state.json").read_text())
    assert state["schedule"] == [{"from_step": 0, "steps": 20}, {"from_step": 20, "steps": 40}]
    # The same continuation, killed at step 30 and resumed: byte-identical weights.
    train_saes(cfgs, x, short, out_dir=tmp_path / "b", progress=False)
    train_saes(cfgs, x, long, out_dir=tmp_path / "b", progress=False, stop_at_step=30)
    resumed = train_saes(cfgs, x, long, out_dir=tmp_path / "b", progress=False)
    for n in cfgs:
        for key, value in continued.saes[n].state_dict().items():
            assert torch.equal(value, resumed.saes[n].state_dict()[key]), (n, key)
    # And continuing is not starting over: the result differs from a fresh 40-step run.
    fresh = train_saes(cfgs, x, long, progress=False)
    assert not torch.equal(fresh.saes["tk"].decoder, continued.saes["tk"].decoder)


# ---------------------------------------------------------------------------- locks


def test_a_second_writer_waits_and_names_the_holder(tmp_path, capfd):
    folder = tmp_path / "run"
    order = []

    def second():
        with storage.locked(folder):
            order.append("second")

    with storage.locked(folder):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.3)
        order.append("first done")
    t.join(10)
    assert order == ["first done", "second"]
    assert f"waiting for process {os.getpid()}, which is writing {folder}" in capfd.readouterr().err
    with storage.locked(folder):
        with pytest.raises(BlockingIOError, match=f"being written by process {os.getpid()}"):
            with storage.locked(folder, wait=False):
                pass
    assert not list(tmp_path.iterdir()), "the lock file is removed when released"


# ---------------------------------------------------------------------------- activation caches

H0, H1 = "blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def organism(tmp_path_factory):
    """A 10-step 'ci' organism: enough to harvest from."""
    from saelib.subjects.language_models import load_subject_model, train_organism

    root = tmp_path_factory.mktemp("organism")
    return load_subject_model(train_organism("ci", root, n_steps=10, progress=False)), str(root)


def _cache(organism, folder, **kw):
    from saelib.subjects.activations import CacheSpec, get_or_build_cache

    spec = CacheSpec(**{"model": organism[1], "hook": H0, "n_tokens": 2000, "context_size": 32, "batch_size": 8,
                        **kw})
    return get_or_build_cache(spec, path=folder, model=organism[0], progress=False)


CACHE_FAULTS = {
    "cache-zero": (lambda c: zero(c / "activations.bin", n=10**9), r"activations.bin is damaged: its contents differ"),
    "cache-truncate": (lambda c: truncate(c / "activations.bin"), r"activations.bin is damaged: 1000 bytes where"),
    "cache-flip": (lambda c: flip(c / "activations.bin"), r"activations.bin is damaged: its contents differ"),
    "cache-swap": (lambda c: swap(c / "activations.bin", c / "tokens.npy"), r"activations.bin is damaged: \d+ bytes"),
    "cache-manifest": (lambda c: truncate(c / "manifest.json", 30), r"manifest.json is damaged: 30 bytes"),
}


@pytest.mark.parametrize("fault", sorted(CACHE_FAULTS))
def test_damaged_activation_cache_is_refused(organism, tmp_path, fault):
    from saelib.subjects.activations import open_cache

    folder = _cache(organism, tmp_path / "cache").path
    damage, message = CACHE_FAULTS[fault]
    damage(folder)
    with pytest.raises(DamagedError, match=f"{message}.*; delete {folder} and rerun to harvest it again"):
        open_cache(folder)


def test_cache_is_hashed_once_then_stamped_and_a_later_write_voids_the_stamp(organism, tmp_path, monkeypatch):
    """[cache-after-stamp]"""
    from saelib.subjects.activations import open_cache

    folder = _cache(organism, tmp_path / "cache").path  # opened (so verified and stamped) once
    hashed = []
    real = storage._sha256
    monkeypatch.setattr(storage, "_sha256", lambda p: hashed.append(p.name) or real(p))
    open_cache(folder)
    assert hashed == [], "a stamped cache is not hashed again"
    time.sleep(0.02)  # past the filesystem's timestamp granularity
    zero(folder / "activations.bin", 100)
    with pytest.raises(DamagedError, match="activations.bin is damaged"):
        open_cache(folder)


def test_e2e_refuses_windows_harvested_at_another_hook(organism, tmp_path):
    """[e2e-hook] Same width, other layer: trained without complaint before."""
    from saelib.core.objectives import E2E
    from saelib.subjects.activations import WindowTable

    windows = WindowTable(_cache(organism, tmp_path / "c", exclude_bos=False))
    d = organism[0].cfg.d_model
    with pytest.raises(ValueError, match=r"^E2E.ds_coeff = nan is invalid: must be a finite number >= 0"):
        E2E(organism[0], H1, ds_coeff=float("nan"))
    with pytest.raises(ValueError, match=f"SAE 's''s objective splices into '{H1}' but its windows were "
                                         f"harvested at '{H0}': use the cache of '{H1}'"):
        train_saes({"s": SAEConfig(d, 4 * d, rule="topk", k=4)}, windows, TrainConfig(steps=2, batch_size=4),
                   progress=False, objectives=E2E(organism[0], H1))


# ---------------------------------------------------------------------------- concurrent writers

_CONCURRENT = """
import json, sys, time
sys.path.insert(0, {root!r})
import saelib.core.training as T
from tests.test_faults import _run
steps = []
slow = T._train_step
def step(*a, **k):
    steps.append(1)
    time.sleep(0.01)  # long enough that the two processes overlap
    return slow(*a, **k)
T._train_step = step
x, cfgs, cfg = _run()
result = T.train_cached(cfgs, x, cfg, data_key="concurrent", progress=False)
json.dump({{"steps": len(steps), "decoder": result.saes["tk"].decoder.flatten().tolist(),
           "out": str(result.out_dir)}}, open(sys.argv[1], "w"))
"""


def test_two_concurrent_trainings_of_the_same_saes_train_once(tmp_path):
    """Two book builds on one $SAELIB_CACHE: the second waits for the first (naming it), then finds its
    result; neither crashes, the SAEs are trained once, and both get the numbers of a single run."""
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(_CONCURRENT.format(root=os.getcwd()))
    env = {**os.environ, "SAELIB_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / f"{i}.json")], env=env,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    out = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2)]
    assert sorted(o["steps"] for o in out) == [0, 20 * 2], "one process trains (2 SAEs x 20 steps), the other finds"
    assert out[0]["decoder"] == out[1]["decoder"] and out[0]["out"] == out[1]["out"]
    assert sum("waiting for process" in e for e in errs) == 1
    x, cfgs, cfg = _run()
    single = train_saes(cfgs, x, cfg, progress=False)
    assert single.saes["tk"].decoder.flatten().tolist() == out[0]["decoder"]


# ---------------------------------------------------------------------------- command lines


def _one_line_exit_2(capsys, status, message):
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err and "Traceback" not in err, err
    assert re.match(message, err), err


def test_book_with_an_unwritable_build_dir(tmp_path, capsys):
    """[book-build-dir] `--build-dir` below a regular file."""
    from saelib.book import build

    (tmp_path / "file").write_text("")
    status = build.main(["--only", "00_synthetic", "--profile", "ci", "--build-dir", str(tmp_path / "file" / "b"),
                         "--no-html"])
    _one_line_exit_2(capsys, status, r"^error: \[Errno 20\] Not a directory")


def test_student_copy_into_a_regular_file(tmp_path, capsys):
    """[student-copy-out]"""
    from saelib.book.exercises.student_copy import main

    (tmp_path / "file").write_text("")
    _one_line_exit_2(capsys, main(["notebooks", "--out", str(tmp_path / "file")]), r"^error: \[Errno 17\] File exists")


@pytest.mark.parametrize("case, message", [
    ("damaged-cache", r"^error: .*/activations.bin is damaged: its contents differ .*; delete .* and rerun to "
                      r"harvest it again$"),
    ("too-many-tokens", r"^error: cannot harvest 1,000,000,000,000 tokens of 'mixed': .*; pass a smaller --tokens$"),
    ("out-unwritable", r"^error: \[Errno 20\] Not a directory"),
])
def test_browse_failures_are_one_line(organism, tmp_path, capsys, case, message):
    """[browse-*] `saelib browse` on a damaged --cache, with --tokens 10**12, into an --out below a file."""
    from saelib.browser.cli import main

    cache = _cache(organism, tmp_path / "cache")
    d = organism[0].cfg.d_model
    sae = save_sae(SAE(SAEConfig(d, 4 * d, rule="topk", k=4)), tmp_path / "sae")
    args = [str(sae), "--model", organism[1], "--hook", H0, "--out", str(tmp_path / "site"), "--no-progress",
            "--cache", str(cache.path), "--tokens", "500"]
    if case == "damaged-cache":
        zero(cache.path / "activations.bin")
    elif case == "too-many-tokens":
        args = args[:-4] + ["--tokens", str(10**12)]
    else:
        (tmp_path / "file").write_text("")
        args[args.index("--out") + 1] = str(tmp_path / "file" / "site")
    with pytest.raises(SystemExit) as exc:
        main(args)
    _one_line_exit_2(capsys, exc.value.code, message)


def test_commit_over_an_existing_folder_swaps_it_in_one_step(tmp_path, monkeypatch):
    """No moment without a complete folder: the new one is exchanged with the old (renameat2), whose
    removal comes after; the old folder's files are never seen under the final name half-deleted."""
    final = tmp_path / "entry"
    for version in ("old", "new"):
        tmp = storage.atomic_dir(final)
        (tmp / "payload").write_text(version)
        if version == "new":
            seen = []
            real = storage.shutil.rmtree
            # When the old copy is removed, the final name already holds the complete new folder.
            monkeypatch.setattr(storage.shutil, "rmtree", lambda p, **k: seen.append(
                (final / "payload").read_text()) or real(p, **k))
        storage.commit_dir(tmp, final)
    assert seen == ["new"] and (final / "payload").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]
    storage.verify(final)


def test_half_written_siblings_of_killed_writers_are_swept_and_a_live_writers_kept(tmp_path):
    """A writer killed between atomic_dir and commit_dir (or inside an atomic file write) leaves
    .NAME.tmpPID behind; the next writer of NAME removes it, but not the one of a running process."""
    import signal
    import subprocess
    import sys

    final = tmp_path / "entry"
    script = ("import sys, time; from pathlib import Path; from saelib.core import storage; "
              "t = storage.atomic_dir(Path(sys.argv[1])); (t / 'half').write_text('x'); "
              "Path(sys.argv[1]).with_name('.entry.json.tmp%d' % __import__('os').getpid()).write_text('{'); "
              "print(t, flush=True); time.sleep(600)")
    writer = subprocess.Popen([sys.executable, "-c", script, str(final)], stdout=subprocess.PIPE, text=True)
    left = Path(writer.stdout.readline().strip())
    assert left.is_dir() and left.name == f".entry.tmp{writer.pid}"
    assert storage.sweep_stale(final) == [] and left.exists(), "a running writer's folder is kept"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    storage.atomic_json({"a": 1}, tmp_path / "entry.json")
    tmp = storage.atomic_dir(final)
    storage.commit_dir(tmp, final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry", "entry.json"]

# ---------------------------------------------------------------------------- models the book trains itself


@pytest.mark.parametrize("damage", ["truncate", "flip", "zero"])
def test_a_damaged_organism_checkpoint_is_refused_at_load(organism, damage):
    """[organism] A finished organism carries checksums; every load verifies them (then stamps them)."""
    import shutil

    from saelib.subjects.language_models import list_checkpoints, load_subject_model

    folder = Path(organism[1]).with_name(f"organism-{damage}")
    shutil.copytree(organism[1], folder)
    (folder / ".verified").unlink(missing_ok=True)
    load_subject_model(str(folder))  # intact: loads (and stamps)
    step = list_checkpoints(folder)[-1]
    {"truncate": truncate, "flip": flip, "zero": zero}[damage](folder / "checkpoints" / f"step_{step:06d}.pt")
    with pytest.raises(DamagedError, match=rf"step_{step:06d}.pt is damaged: .*rerun train_organism\('organism-"):
        load_subject_model(str(folder))


def test_a_damaged_vit_is_refused_at_load(tmp_path):
    """[vit] The same for the ViT's weights and its record."""
    from saelib.subjects.vision import ViTConfig, load_vit, train_vit

    tiny = ViTConfig(d_model=16, n_layers=2, n_heads=2, d_mlp=32, epochs=0.012, batch_size=32, warmup_steps=5)
    import shutil

    folder = train_vit(tiny, tmp_path / "vit", progress=False)
    load_vit(folder)
    other = shutil.copytree(folder, tmp_path / "vit-2")
    flip(folder / "model.pt")
    with pytest.raises(DamagedError, match=r"model.pt is damaged: .*rerun train_vit"):
        load_vit(folder)
    truncate(other / "vit.json", keep=20)
    with pytest.raises(DamagedError, match=r"vit.json is damaged"):
        load_vit(other)
