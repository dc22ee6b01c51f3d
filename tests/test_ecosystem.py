"""An SAE trained on the ci organism's activations, exported for SAELens and loaded by it, evaluated
into SAEBench's core envelope (numbers equal saelib's own metrics on the same rows), and exported for
Neuronpedia (parsing with the field names and types of Neuronpedia's database); the ``saelib export``
command; bad input."""

import copy
import gzip
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from saelib.browser.gather import TokenIndex, gather_features
from saelib.browser.neuronpedia import export_neuronpedia
from saelib.cli import main as saelib_main
from saelib.core.checkpoints import save_sae
from saelib.core.metrics import evaluate
from saelib.core.sae import SAEConfig
from saelib.core.saelens_io import export_saelens, read_saelens, run_metadata
from saelib.core.training import TrainConfig, train_saes
from saelib.studies.saebench import (
    CORE_FILENAME,
    CORE_SCHEMA,
    SchemaError,
    check_core_envelope,
    core_eval,
    core_eval_sweep,
    write_core_eval,
)
from saelib.studies.splice import splice_metrics
from saelib.subjects.activations import harvest, token_windows
from saelib.subjects.language_models import load_subject_model, train_organism

HOOK = "blocks.0.hook_resid_post"
CONTEXT = 32

# Neuronpedia's columns (apps/webapp/prisma/schema.prisma, models Neuron and Activation): the type its
# importer casts each JSON field to; "?" marks a nullable column. Written out here, independently of
# saelib.browser.neuronpedia, so the test checks the export against Neuronpedia rather than itself.
NEURON = {"modelId": "String", "layer": "String", "index": "String", "sourceSetName": "String?",
          "creatorId": "String?", "createdAt": "DateTime", "maxActApprox": "Float?", "hasVector": "Boolean",
          "frac_nonzero": "Float", "freq_hist_data_bar_heights": "Float[]", "freq_hist_data_bar_values": "Float[]",
          "pos_str": "String[]", "pos_values": "Float[]", "neg_str": "String[]", "neg_values": "Float[]"}
NEURON_REQUIRED = {"modelId", "layer", "index"}
ACTIVATION = {"id": "String", "tokens": "String[]", "dataIndex": "String?", "index": "String", "layer": "String",
              "modelId": "String", "dataSource": "String?", "maxValue": "Float", "maxValueTokenIndex": "Int",
              "minValue": "Float", "values": "Float[]", "creatorId": "String", "createdAt": "DateTime",
              "binMin": "Float?", "binMax": "Float?", "binContains": "Float?", "qualifyingTokenIndex": "Int?"}
ACTIVATION_REQUIRED = {"id", "tokens", "index", "layer", "modelId", "maxValue", "maxValueTokenIndex", "minValue",
                       "values", "creatorId"}
SOURCE_REQUIRED = {"id", "modelId", "setName", "creatorId"}


def _is(value, prisma: str) -> bool:
    if prisma.endswith("?") and value is None:
        return True
    base = prisma.rstrip("?")
    if base.endswith("[]"):
        return isinstance(value, list) and all(_is(v, base[:-2]) for v in value)
    return {"String": lambda v: isinstance(v, str), "Boolean": lambda v: isinstance(v, bool),
            "Int": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "Float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            "DateTime": lambda v: isinstance(v, str) and "T" in v}[base](value)


def check_rows(rows: list[dict], columns: dict, required: set) -> None:
    for row in rows:
        assert required <= set(row), f"missing {required - set(row)}"
        assert set(row) <= set(columns), f"not a column: {set(row) - set(columns)}"
        for key, value in row.items():
            assert _is(value, columns[key]), (key, value, columns[key])


def read_jsonl_gz(path) -> list[dict]:
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines()]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The ci organism (60 of its steps, as in test_splice), a TopK SAE on its layer-0 residual stream,
    and 16 held-out windows of 32 tokens."""
    root = tmp_path_factory.mktemp("ecosystem")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAELIB_CACHE", str(root / "cache"))
        organism = train_organism("ci", root / "organism", n_steps=60, progress=False)
        model = load_subject_model(organism)
        train = harvest(model, [HOOK], token_windows(model.tokenizer, "mixed", 96, CONTEXT), progress=False)[HOOK]
        sae = train_saes({"topk": SAEConfig(model.cfg.d_model, 256, rule="topk", k=8)}, train,
                         TrainConfig(steps=60, batch_size=256, lr=2e-3, warmup_steps=5, init_tokens=2048),
                         progress=False).saes["topk"]
        heldout = token_windows(model.tokenizer, "mixed", 16, CONTEXT, split="heldout")
        data = {"model": str(organism), "hook": HOOK, "corpus": "mixed", "context_size": CONTEXT, "exclude_bos": True}
        yield root, model, sae, heldout, data


@pytest.fixture(scope="module")
def envelope(world):
    _, model, sae, heldout, data = world
    return core_eval(sae, model, HOOK, heldout, dataset="mixed", model_name=data["model"],
                     metadata=run_metadata(data))


def test_exported_loaded_by_saelens_evaluated_and_exported_for_neuronpedia(world, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    _, model, sae, heldout, data = world
    rows = harvest(model, [HOOK], heldout, progress=False)[HOOK]
    folder = export_saelens(sae, tmp_path / "topk", run_metadata(data))
    theirs = sae_lens.SAE.load_from_disk(folder)
    with torch.no_grad():
        assert torch.allclose(theirs.decode(theirs.encode(rows)), sae.reconstruct(rows), atol=1e-5)
    assert theirs.cfg.metadata.hook_name == HOOK and theirs.cfg.metadata.model_name == data["model"]
    loaded = read_saelens(folder).sae

    env = core_eval(loaded, model, HOOK, heldout, dataset="mixed", model_name=data["model"],
                    metadata=run_metadata(data))
    check_core_envelope(env)
    m = env["eval_result_metrics"]
    ev, sp = evaluate(sae, rows), splice_metrics(model, HOOK, sae, heldout)
    approx = lambda v: pytest.approx(v, rel=1e-5, abs=1e-6)  # noqa: E731 (loaded vs original: float rounding)
    assert m["model_performance_preservation"]["ce_loss_score"] == approx(sp.fraction_recovered)
    assert m["model_performance_preservation"]["ce_loss_score"] == approx(
        (sp.ce_zero_ablation - sp.ce_spliced) / (sp.ce_zero_ablation - sp.ce_clean))
    assert m["model_performance_preservation"]["ce_loss_with_sae"] == approx(sp.ce_spliced)
    assert m["model_performance_preservation"]["ce_loss_without_sae"] == approx(sp.ce_clean)
    assert m["model_behavior_preservation"]["kl_div_with_sae"] == approx(sp.kl)
    assert m["model_behavior_preservation"]["kl_div_score"] == approx(1 - sp.kl / sp.kl_zero_ablation)
    assert m["reconstruction_quality"]["explained_variance"] == approx(1 - ev.nmse)
    assert m["sparsity"]["l0"] == approx(ev.l0) and m["sparsity"]["l0"] == pytest.approx(8.0)
    assert m["misc_metrics"]["frac_alive"] == approx(ev.alive / 256)
    assert m["token_stats"] == {"total_tokens_eval_reconstruction": sp.n_tokens,
                                "total_tokens_eval_sparsity_variance": ev.n_tokens}
    assert ev.n_tokens == 16 * (CONTEXT - 1) and sp.n_tokens == 16 * (CONTEXT - 1)
    torch.testing.assert_close(torch.tensor([d["feature_density"] for d in env["eval_result_details"]], dtype=torch.float64),
                               ev.density.double(), atol=1e-6, rtol=0)
    # By hand, per token: mse, cosine, L1, norms.
    with torch.no_grad():
        x_hat, codes = sae.reconstruct(rows).double(), sae.encode(rows).double()
    x = rows.double()
    assert m["reconstruction_quality"]["mse"] == approx(float((x - x_hat).pow(2).sum(1).mean()))
    assert m["reconstruction_quality"]["cossim"] == approx(float(torch.cosine_similarity(x, x_hat).mean()))
    assert m["sparsity"]["l1"] == approx(float(codes.abs().sum(1).mean()))
    assert m["shrinkage"]["l2_ratio"] == approx(float((x_hat.norm(dim=1) / x.norm(dim=1)).mean()))
    assert m["shrinkage"]["relative_reconstruction_bias"] == approx(
        float(x_hat.pow(2).sum(1).mean() / (x * x_hat).sum(1).mean()))
    assert 0 < m["model_performance_preservation"]["ce_loss_score"] < 1
    path = write_core_eval(env, folder)
    assert path == folder / CORE_FILENAME
    check_core_envelope(json.loads(path.read_text()))
    assert read_saelens(folder).sae.cfg == sae.cfg  # the evaluation sits beside the SAE, which still loads

    features = gather_features({"topk": loaded}, rows, tokens=TokenIndex.from_windows(heldout), model=model,
                               hook=HOOK, n_top=4, n_quantiles=3, n_samples=2, progress=False)["topk"]
    source = export_neuronpedia(features, model.tokenizer, tmp_path / "np", model_id="organism-ci", hook=HOOK,
                                source_set="saelib-topk", dataset="mixed", features_per_batch=100)
    assert source == tmp_path / "np" / "organism-ci" / "0-saelib-topk"
    neurons = [r for b in range(3) for r in read_jsonl_gz(source / "features" / f"batch-{b}.jsonl.gz")]
    acts = [r for b in range(3) for r in read_jsonl_gz(source / "activations" / f"batch-{b}.jsonl.gz")]
    check_rows(neurons, NEURON, NEURON_REQUIRED)
    check_rows(acts, ACTIVATION, ACTIVATION_REQUIRED)
    assert [n["index"] for n in neurons] == [str(i) for i in range(256)]
    assert len({a["id"] for a in acts}) == len(acts)
    for name in ("release", "model", "sourceset", "source"):
        assert len((source / f"{name}.jsonl").read_text().splitlines()) == 1
    src = json.loads((source / "source.jsonl").read_text())
    assert SOURCE_REQUIRED <= set(src) and src["id"] == "0-saelib-topk" and src["num_tokens_in_prompt"] == CONTEXT
    # The numbers are the browser's: density, max, histogram, top contexts, logit effects.
    f = int(torch.argmax(features.count))
    n = neurons[f]
    assert n["frac_nonzero"] == pytest.approx(float(features.density[f]))
    assert n["maxActApprox"] == pytest.approx(float(features.max[f]))
    assert n["freq_hist_data_bar_heights"] == features.hist[f].tolist()
    assert len(n["pos_str"]) == 10 and n["pos_values"] == pytest.approx(features.promoted_logits[f].tolist())
    top = [a for a in acts if a["index"] == str(f) and a["binMin"] == -1]
    assert [a["values"][a["qualifyingTokenIndex"]] for a in top] == pytest.approx(features.top_values[f].tolist())
    assert top[0]["maxValue"] == pytest.approx(float(features.max[f]))
    first = int(features.top_rows[f, 0])
    assert "".join(top[0]["tokens"]) == model.tokenizer.decode(
        [t for t in features.context_ids(first) if t is not None], clean_up_tokenization_spaces=False)
    samples = [a for a in acts if a["index"] == str(f) and a["binMin"] != -1]
    assert len(samples) == 6 and sum({a["binMin"]: a["binContains"] for a in samples}.values()) == pytest.approx(1)


def test_an_envelope_that_breaks_the_schema_is_named_in_one_line(envelope):
    check_core_envelope(envelope)
    assert set(envelope["eval_result_metrics"]) == set(CORE_SCHEMA["metrics"])

    def broken(edit):
        doc = copy.deepcopy(envelope)
        edit(doc)
        with pytest.raises(SchemaError) as e:
            check_core_envelope(doc)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "missing metric eval_result_metrics.sparsity.l0" in broken(
        lambda d: d["eval_result_metrics"]["sparsity"].pop("l0"))
    assert "missing metric group eval_result_metrics.shrinkage" in broken(
        lambda d: d["eval_result_metrics"].pop("shrinkage"))
    assert "ce_loss_score must be number, got 'high'" in broken(
        lambda d: d["eval_result_metrics"]["model_performance_preservation"].update(ce_loss_score="high"))
    assert "kl_div_score must be number, got nan" in broken(
        lambda d: d["eval_result_metrics"]["model_behavior_preservation"].update(kl_div_score=float("nan")))
    assert "total_tokens_eval_reconstruction must be integer" in broken(
        lambda d: d["eval_result_metrics"]["token_stats"].update(total_tokens_eval_reconstruction=1.5))
    assert "missing required field sae_cfg_dict" in broken(lambda d: d.pop("sae_cfg_dict"))
    assert "eval_type_id must be 'core'" in broken(lambda d: d.update(eval_type_id="sparse_probing"))
    assert "eval_config.context_size must be integer" in broken(lambda d: d["eval_config"].update(context_size="32"))
    assert "missing eval_result_details[3].encoder_norm" in broken(lambda d: d["eval_result_details"][3].pop("encoder_norm"))
    assert "datetime_epoch_millis" in broken(lambda d: d.update(datetime_epoch_millis=-1))
    with pytest.raises(SchemaError):
        write_core_eval({"eval_type_id": "core"}, "/nonexistent-never-written")


def test_dead_features_get_minus_one_where_saebench_writes_it(envelope):
    details = envelope["eval_result_details"]
    dead = [d for d in details if d["feature_density"] == 0]
    assert all(d["consistent_activation_heuristic"] == -1 for d in dead)
    alive = [d for d in details if d["feature_density"] > 0]
    assert all(d["consistent_activation_heuristic"] >= 1 for d in alive)  # fires per window it fires in
    assert all(abs(d["max_decoder_cosine_sim"]) <= 1 + 1e-9 for d in details)


def test_saelib_export_command_writes_all_three(world, tmp_path, capsys):
    root, _, sae, _, data = world
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data": data}))
    save_sae(sae, run / "saes" / "topk")
    out = tmp_path / "out"
    assert saelib_main(["export", "--saelens", str(run), "--saebench", str(run), "--neuronpedia", str(run),
                        "--out", str(out), "--windows", "8"]) == 0
    cfg = json.loads((out / "topk" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == HOOK and cfg["metadata"]["context_size"] == CONTEXT
    assert (out / "topk" / "sparsity.safetensors").exists()
    env = json.loads((out / "topk" / CORE_FILENAME).read_text())
    check_core_envelope(env)
    assert env["eval_config"]["context_size"] == CONTEXT
    assert env["eval_result_metrics"]["token_stats"]["total_tokens_eval_sparsity_variance"] == 8 * (CONTEXT - 1)
    source = out / "neuronpedia" / "organism" / "0-saelib-topk"
    check_rows(read_jsonl_gz(source / "features" / "batch-0.jsonl.gz"), NEURON, NEURON_REQUIRED)
    # The SAELens folder it wrote is an input too.
    assert saelib_main(["export", "--saebench", str(out / "topk"), "--out", str(tmp_path / "again"),
                        "--windows", "4"]) == 0
    assert "wrote" in capsys.readouterr().out


def test_export_evaluates_a_runs_saes_together(world, tmp_path, capsys, monkeypatch):
    import saelib.studies.saebench as saebench
    from saelib.core.sae import SAE

    _, model, sae, _, data = world
    run = tmp_path / "run"
    (run / "saes").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"data": data}))
    saes = {"topk": sae, "untrained": SAE(sae.cfg)}
    for name, each in saes.items():
        save_sae(each, run / "saes" / name)
    harvests = []
    real_harvest = saebench.harvest
    monkeypatch.setattr(saebench, "harvest", lambda *a, **k: harvests.append(1) or real_harvest(*a, **k))
    out = tmp_path / "out"
    assert saelib_main(["export", "--saebench", str(run), "--out", str(out), "--windows", "6"]) == 0
    assert len(harvests) == 1  # one harvest of the held-out windows for both SAEs
    windows = token_windows(model.tokenizer, "mixed", 6, CONTEXT, split="heldout")
    for name, each in saes.items():  # the same numbers as evaluating each SAE alone
        alone = core_eval(each, model, HOOK, windows, dataset="mixed", model_name=data["model"])
        got = json.loads((out / name / CORE_FILENAME).read_text())
        assert saebench.core_summary(got) == pytest.approx(saebench.core_summary(alone), rel=1e-6, abs=1e-9)
    capsys.readouterr()


def test_export_command_bad_input(world, tmp_path, capsys):
    _, _, sae, _, _ = world
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    with pytest.raises(SystemExit) as e:
        saelib_main(["export", "--neuronpedia", str(tmp_path / "notes"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "is not an SAE folder or a `saelib train` run" in err and err.count("\n") == 1
    # A saved SAE with no run above it: the model cannot be told.
    save_sae(sae, tmp_path / "lonely")
    with pytest.raises(SystemExit):
        saelib_main(["export", "--saebench", str(tmp_path / "lonely"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "its metadata has no model_name" in err and "pass --model" in err and err.count("\n") == 1
    # An SAELens folder whose metadata lacks the hook.
    folder = export_saelens(sae, tmp_path / "nohook", {"model_name": "organism-ci"})
    with pytest.raises(SystemExit):
        saelib_main(["export", "--neuronpedia", str(folder), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "has no hook_name" in err and "pass --hook" in err


# ============================================================================ chapter 2's table, SAEBench's names

def test_chapter_2_envelope_is_its_table_under_saebench_names(world, tmp_path):
    """A chapter-2-style run at ci scale (norm outliers dropped by the training threshold, TopK, FC and
    MC side by side, the splice leaving outlier rows as they are): the envelopes written beside the
    SAEs and read back carry the table's L0, 1 - NMSE, CE recovered and alive share."""
    from saelib.core.checkpoints import load_sae
    from saelib.studies.saebench import core_envelopes, core_summary, read_core_eval, write_core_evals
    from saelib.studies.splice import splice_sweep
    from saelib.subjects.activations import CacheSpec, drop_norm_outliers, get_or_build_cache

    root, model, _, _, data = world
    where = dict(model=data["model"], hook=HOOK, corpus="mixed", context_size=CONTEXT)
    train_acts = get_or_build_cache(CacheSpec(n_tokens=3000, **where), root=root / "acts", model=model,
                                    progress=False)
    heldout_acts = get_or_build_cache(CacheSpec(n_tokens=620, split="heldout", **where), root=root / "acts",
                                      model=model, progress=False)
    train_rows = drop_norm_outliers(train_acts, max_ratio=10.0)
    heldout_rows = drop_norm_outliers(heldout_acts, threshold=train_rows.threshold)
    heldout = heldout_rows[:]
    d = model.cfg.d_model
    configs = {f"{rule}_k8": SAEConfig(d, 256, rule=rule, k=8)
               for rule in ("topk", "feature_choice", "mutual_choice")}
    run = train_saes(configs, train_rows, TrainConfig(steps=40, batch_size=256, lr=2e-3, warmup_steps=4,
                                                      init_tokens=2048), out_dir=tmp_path / "run", progress=False)
    saes = run.saes
    # The chapter's table (section 6): evaluate on the held-out rows, splice_sweep on held-out windows.
    evals = {n: evaluate(s, heldout) for n, s in saes.items()}
    windows = torch.from_numpy(heldout_acts.tokens[:8].astype("int64"))
    spliced = splice_sweep(model, HOOK, saes, windows, max_norm=train_rows.threshold)
    table = {n: {"L0": evals[n].l0, "NMSE": evals[n].nmse, "CE recovered": spliced[n].fraction_recovered,
                 "alive": 1 - evals[n].dead_frac} for n in saes}
    # The envelopes: the evaluation computed again inside (no evals passed), written, read back verified.
    files = write_core_evals(core_envelopes(saes, heldout_rows, spliced, heldout_acts.spec), tmp_path / "run" / "saes")
    assert set(files) == set(saes) and all(f == tmp_path / "run" / "saes" / n / CORE_FILENAME for n, f in files.items())
    for name, path in files.items():
        env = read_core_eval(path.parent, load_sae(path.parent))
        m, row = core_summary(env), table[name]
        print(name, {"l0": (m["l0"], row["L0"]), "explained_variance / 1 - NMSE": (m["explained_variance"],
              1 - row["NMSE"]), "ce_loss_score / CE recovered": (m["ce_loss_score"], row["CE recovered"]),
              "frac_alive": (m["frac_alive"], row["alive"])})
        assert m["l0"] == pytest.approx(row["L0"], rel=1e-9)
        assert m["explained_variance"] == pytest.approx(1 - row["NMSE"], rel=1e-9)
        assert m["ce_loss_score"] == pytest.approx(row["CE recovered"], rel=1e-9)
        assert m["frac_alive"] == pytest.approx(row["alive"], rel=1e-9)
        assert env["eval_result_unstructured"]["saelib"]["nmse"] == pytest.approx(row["NMSE"], rel=1e-9)
        tokens = env["eval_result_metrics"]["token_stats"]
        assert tokens == {"total_tokens_eval_reconstruction": 8 * (CONTEXT - 1),
                          "total_tokens_eval_sparsity_variance": len(heldout_rows)}
        assert env["eval_result_unstructured"]["saelib"]["max_norm"] == train_rows.threshold
        assert env["sae_cfg_dict"]["metadata"]["hook_name"] == HOOK
        assert env["eval_config"]["context_size"] == CONTEXT and env["eval_config"]["dataset"] == "mixed"
        assert 0 < m["explained_variance"] < 1 and 0 < m["ce_loss_score"] < 1 and 0 < m["frac_alive"] <= 1
    assert core_summary(read_core_eval(files["topk_k8"].parent))["l0"] == pytest.approx(8.0)
    # Given the chapter's own evaluations, the envelope is that evaluation, to the bit.
    given = core_envelopes(saes, heldout_rows, spliced, heldout_acts.spec, evals=evals)
    assert all(core_summary(given[n])["l0"] == evals[n].l0 and
               core_summary(given[n])["explained_variance"] == 1 - evals[n].nmse for n in saes)
    with pytest.raises(ValueError, match=r"evals\['topk_k8'\] measured 5 rows"):
        core_envelopes(saes, heldout_rows, spliced, heldout_acts.spec,
                       evals={"topk_k8": evaluate(saes["topk_k8"], heldout[:5])})


def test_a_saved_envelope_is_verified_at_load(envelope, world, tmp_path):
    from saelib.core.storage import DamagedError
    from saelib.studies.saebench import read_core_eval

    _, _, sae, _, _ = world
    path = write_core_eval(envelope, tmp_path / "topk")
    assert read_core_eval(tmp_path / "topk", sae)["eval_id"] == envelope["eval_id"]
    text = path.read_text()
    doc = json.loads(text)
    doc["eval_result_metrics"]["sparsity"]["l0"] += 1  # altered after it was written
    path.write_text(json.dumps(doc))
    with pytest.raises(DamagedError, match="is damaged: its contents differ from what saelib wrote"):
        read_core_eval(tmp_path / "topk")
    path.write_text(text[: len(text) // 2])
    with pytest.raises(DamagedError, match="is damaged: not valid JSON"):
        read_core_eval(tmp_path / "topk")
    path.write_text(text)
    other = SAEConfig(sae.cfg.d_in, 256, rule="topk", k=8)
    from saelib.core.sae import SAE

    with pytest.raises(DamagedError, match="is stale: it evaluates other weights") as e:
        read_core_eval(tmp_path / "topk", SAE(other))
    assert "\n" not in str(e.value)
    with pytest.raises(DamagedError, match="the file is missing"):
        read_core_eval(tmp_path / "nothing")


def test_a_rerun_keeps_only_envelopes_of_the_same_weights_and_settings(world, tmp_path):
    from saelib.core.sae import SAE
    from saelib.studies.saebench import kept_core_evals, still_valid

    _, model, sae, heldout, data = world
    settings = {"eval_tokens": 2048, "splice_windows": 16}
    env = core_eval_sweep({"topk": sae}, model, heldout, data, settings=settings)["topk"]
    write_core_eval(env, tmp_path / "topk")
    assert still_valid(env, sae, settings) and not still_valid(None, sae, settings)
    reordered = dict(reversed(settings.items()))  # the same settings in another order
    assert kept_core_evals({"topk": sae}, tmp_path, reordered)["topk"]["eval_id"] == env["eval_id"]
    assert kept_core_evals({"topk": sae}, tmp_path, {**settings, "splice_windows": 8}) == {}  # other settings
    assert kept_core_evals({"topk": SAE(sae.cfg)}, tmp_path, settings) == {}  # other weights
    assert kept_core_evals({"missing": sae}, tmp_path, settings) == {}
    (tmp_path / "topk" / CORE_FILENAME).write_text("{")  # damaged: evaluated again, not trusted
    assert kept_core_evals({"topk": sae}, tmp_path, settings) == {}


def test_saelib_train_writes_the_envelope_beside_every_sae(world, tmp_path, capsys, monkeypatch):
    from saelib.core.checkpoints import load_sae
    from saelib.studies.saebench import core_eval_sweep, core_summary, read_core_eval

    _, model, _, _, data = world
    config = tmp_path / "run.toml"
    config.write_text(f"""
[data]
model = "{data['model']}"
hook = "{HOOK}"
corpus = "mixed"
n_tokens = 3000
context_size = {CONTEXT}
cache_root = "{tmp_path / 'acts'}"

[train]
steps = 30
batch_size = 256
lr = 2e-3
warmup_steps = 3
init_tokens = 2048

[sae.topk]
d_sae = 256
rule = "topk"
k = 8

[sae.mc]
d_sae = 256
rule = "mutual_choice"
k = 8

[export]
saelens = true
saebench_windows = 6
""")
    out = tmp_path / "out"
    assert saelib_main(["train", str(config), "--out", str(out), "--no-progress"]) in (0, None)
    windows = token_windows(model.tokenizer, "mixed", 6, CONTEXT, split="heldout")
    saes = {n: load_sae(out / "saes" / n) for n in ("topk", "mc")}
    again = core_eval_sweep(saes, model, windows, {"model": data["model"], "hook": HOOK, "corpus": "mixed"})
    for name, sae in saes.items():
        env = read_core_eval(out / "saes" / name, sae)
        assert json.loads((out / "saelens" / name / CORE_FILENAME).read_text()) == env
        assert env["eval_result_metrics"]["token_stats"]["total_tokens_eval_sparsity_variance"] == 6 * (CONTEXT - 1)
        assert env["sae_cfg_dict"]["metadata"]["model_name"] == data["model"]
        assert core_summary(env) == pytest.approx(core_summary(again[name]), rel=1e-6, abs=1e-9)
    # A rerun of the finished run rewrites its SAE folders but keeps their evaluations: neither the
    # model nor the evaluation runs again (both patched to fail), and the envelopes still verify.
    first = {name: read_core_eval(out / "saes" / name) for name in saes}

    def must_not_run(*args, **kwargs):
        raise AssertionError("a rerun with unchanged SAEs evaluated again")

    with monkeypatch.context() as patched:
        patched.setattr("saelib.studies.saebench.core_eval_sweep", must_not_run)
        patched.setattr("saelib.subjects.language_models.load_subject_model", must_not_run)
        assert saelib_main(["train", str(config), "--out", str(out), "--no-progress"]) in (0, None)
    assert "2 of 2 SAEs unchanged" in capsys.readouterr().err
    for name, sae in saes.items():
        kept = read_core_eval(out / "saes" / name, sae)
        assert kept == first[name]
        assert json.loads((out / "saelens" / name / CORE_FILENAME).read_text()) == kept
    # Other evaluation settings (fewer windows) make the rerun evaluate again, with the new count.
    assert saelib_main(["train", str(config), "--out", str(out), "--no-progress",
                        "--set", "export.saebench_windows=5"]) in (0, None)
    redone = read_core_eval(out / "saes" / "topk", saes["topk"])
    assert redone["eval_id"] != first["topk"]["eval_id"]
    assert redone["eval_result_metrics"]["token_stats"]["total_tokens_eval_sparsity_variance"] == 5 * (CONTEXT - 1)
    assert redone["eval_result_unstructured"]["saelib"]["eval_settings"]["saebench_windows"] == 5
    capsys.readouterr()
