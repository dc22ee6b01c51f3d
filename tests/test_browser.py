"""The feature browser: examples against a brute-force dense encode, quantile bins, logit effects,
escaping of hostile token text (Python-rendered and in headless Chromium), and the command."""

import json
import math
import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from saelib.browser import FeatureData, FeatureView, TokenIndex, gather_features, shown_text, token_text, write_browser
from saelib.browser.cli import main
from saelib.core.checkpoints import save_sae
from saelib.core.sae import SAE, SAEConfig
from saelib.subjects.activations import drop_norm_outliers, harvest, open_cache
from saelib.subjects.language_models import _transformer_lens, train_organism, train_tokenizer

HOOK = "blocks.0.hook_resid_post"
HOSTILE = ["<script>alert(1)</script>", "a\"b'c&d<e>&amp;", "\x00\x1b\x7f\u2028"]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    docs = ["The cat sat on the mat, and the dog sat on the log. Café déjà vu: naïve “quotes” — done.\n"] * 40
    tokenizer = train_tokenizer(docs, vocab_size=300)
    tokenizer.add_tokens(HOSTILE)
    folder = tmp_path_factory.mktemp("tok")
    tokenizer.save_pretrained(folder)  # TransformerLens re-opens a tokenizer from its folder
    return PreTrainedTokenizerFast.from_pretrained(folder)


def tiny_model(tok, normalization_type, n_ctx=12):
    _, HookedTransformer, HookedTransformerConfig, _ = _transformer_lens()
    cfg = HookedTransformerConfig(n_layers=1, d_model=32, n_heads=2, d_head=16, d_mlp=64, n_ctx=n_ctx,
                                  d_vocab=len(tok), act_fn="gelu", normalization_type=normalization_type, seed=0)
    return HookedTransformer(cfg, tokenizer=tok).eval()


@pytest.fixture(scope="module")
def setup(tok):
    """A tiny random model on random windows of 12 tokens, each holding every hostile token and a
    lone UTF-8 lead byte (so every context shows them), and a TopK SAE on its residual stream."""
    model = tiny_model(tok, "LN")
    with torch.no_grad():
        model.ln_final.w.copy_(torch.rand(32, generator=torch.Generator().manual_seed(1)) + 0.5)
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(1, 300, (60, 12), generator=gen)
    windows[:, 0] = tok.bos_token_id
    special = [tok.convert_tokens_to_ids(t) for t in HOSTILE] + [tok.convert_tokens_to_ids("â")]  # byte 0xE2
    for i in range(len(windows)):
        windows[i, torch.randperm(11, generator=gen)[:len(special)] + 1] = torch.tensor(special)
    table = harvest(model, [HOOK], windows, progress=False)[HOOK]
    sae = SAE(SAEConfig(d_in=32, d_sae=48, k=4))
    sae.init_from_sample(table)
    tokens = TokenIndex.from_windows(windows)
    data = gather_features({"topk": sae}, table, tokens=tokens, model=model, hook=HOOK, batch_size=100,
                           n_top=5, n_quantiles=3, n_samples=4, progress=False)["topk"]
    return model, windows, table, sae, data, special


def test_top_contexts_are_the_highest_activations(setup):
    _, windows, table, sae, d, _ = setup
    dense = sae.encode(table)  # brute force: every token, every feature
    assert torch.equal(d.count, (dense > 0).sum(0)) and torch.equal(d.hist.sum(1), d.count)
    torch.testing.assert_close(d.max, dense.max(0).values)
    assert d.count.min() > 5, "every feature should have more examples than n_top here"
    for f in range(dense.shape[1]):
        best = dense[:, f].topk(5)
        torch.testing.assert_close(d.top_values[f], best.values)
        # The rows hold those values (ties may pick other rows of the same value than topk does).
        torch.testing.assert_close(dense[d.top_rows[f], f], best.values)
        assert len(set(d.top_rows[f].tolist())) == 5
        for row, ctx in zip(d.top_rows[f].tolist(), d.top_context[f]):
            w, p = divmod(row, 11)  # 11 rows per window: position 0 (BOS) is not a row
            for off, act in zip(range(-d.before, d.after + 1), ctx.tolist()):
                q = p + 1 + off
                if not 1 <= q < 12:
                    assert math.isnan(act), "outside the window and at BOS there is no activation"
                else:
                    assert act == pytest.approx(float(dense[w * 11 + q - 1, f]), abs=1e-6)
            assert d.context_ids(row)[d.before] == int(windows[w, p + 1])


def test_quantile_samples_come_from_their_bins(setup):
    _, _, table, sae, d, _ = setup
    dense = sae.encode(table)
    for f in range(dense.shape[1]):
        ascending = dense[:, f][dense[:, f] > 0].sort().values
        n = len(ascending)
        for q in range(3):
            in_bin = ascending[q * n // 3:(q + 1) * n // 3]
            rows = [r for r in d.sample_rows[f, q].tolist() if r >= 0]
            assert len(rows) == min(4, len(in_bin)) and len(set(rows)) == len(rows)
            assert float(d.quantile_edges[f, q]) == float(in_bin[0])
            for r, v in zip(rows, d.sample_values[f, q].tolist()):
                assert v == pytest.approx(float(dense[r, f]), abs=1e-6)
                assert float(in_bin[0]) <= v <= float(in_bin[-1])


def test_promoted_tokens_are_the_decoder_through_the_unembedding(setup, tok):
    model, _, _, sae, d, _ = setup
    # LayerNorm: the final norm centres the direction and scales it by its weight before W_U.
    centred = sae.decoder - sae.decoder.mean(1, keepdim=True)
    logits = (centred * model.ln_final.w) @ model.W_U
    assert torch.equal(d.promoted, logits.topk(10).indices)
    assert torch.equal(d.suppressed, logits.topk(10, largest=False).indices)
    torch.testing.assert_close(d.promoted_logits, logits.topk(10).values)
    # Without a final norm it is exactly W_dec @ W_U.
    plain = tiny_model(tok, None)
    gathered = gather_features({"s": sae}, setup[2], tokens=TokenIndex.from_windows(setup[1]), model=plain,
                               n_logits=7, progress=False)["s"]
    by_hand = (sae.decoder @ plain.W_U).topk(7)
    assert torch.equal(gathered.promoted, by_hand.indices)
    torch.testing.assert_close(gathered.promoted_logits, by_hand.values)
    not_residual = gather_features({"s": sae}, setup[2], tokens=TokenIndex.from_windows(setup[1]), model=plain,
                                   hook="blocks.0.attn.hook_z", progress=False)["s"]
    assert not_residual.promoted is None and "residual" in not_residual.logit_note


class TokenSpans(HTMLParser):
    """The tags of a page and the text and attributes of every token span, as a browser reads them."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.tokens: list[tuple[str, dict]] = []
        self.open = False
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "span" and "tok" in (attrs.get("class") or "").split():
            self.tokens.append(("", attrs))
            self.open = True

    def handle_endtag(self, tag):
        if tag == "span":
            self.open = False

    def handle_data(self, data):
        if self.open:
            self.tokens[-1] = (self.tokens[-1][0] + data, self.tokens[-1][1])


def expected_tokens(d: FeatureData, f: int, tok) -> list[str]:
    """The token texts a feature's page shows, in page order: top examples, then quantile bins from the highest."""
    examples = list(zip(d.top_rows[f].tolist(), d.top_context[f]))
    for q in reversed(range(d.sample_rows.shape[1])):
        examples += list(zip(d.sample_rows[f, q].tolist(), d.sample_context[f, q]))
    out = []
    for row, ctx in examples:
        if row < 0:
            continue
        for i, (tid, act) in enumerate(zip(d.context_ids(row), ctx.tolist())):
            at_bos = d.tokens.position[row] - d.before + i == 0
            if tid is not None and not (math.isnan(act) and at_bos):
                out.append(shown_text(token_text(tok, tid)))
    return out


def test_token_text_is_escaped_not_injected(setup, tok):
    *_, d, special = setup
    lead_byte = token_text(tok, special[-1])
    assert lead_byte == "\\xe2", "a lone UTF-8 lead byte shows as its byte, not as U+FFFD"
    assert shown_text(HOSTILE[2]) == "\\x00\\x1b\\x7f\\u2028"
    page = TokenSpans(FeatureView(d, 3, tok)._repr_html_())
    assert set(page.tags) <= {"div", "style", "b", "h4", "span", "svg", "rect", "title", "text", "table", "tr", "th", "td"}
    texts = [text for text, _ in page.tokens]
    assert texts == expected_tokens(d, 3, tok)
    for hostile in [*HOSTILE[:2], shown_text(HOSTILE[2]), lead_byte]:
        assert hostile in texts
    assert all("token id" in attrs["title"] for _, attrs in page.tokens)


def chromium_dom(url: str) -> str:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                               "--disable-component-update", "--disable-sync", "--no-first-run",
                               f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", url],
                              capture_output=True, text=True, timeout=120, check=True).stdout


def test_pages_render_in_chromium(setup, tok, tmp_path):
    # Not a skip: scripts/setup.sh installs Chromium, so a machine without it is set up wrongly.
    assert os.path.exists(CHROMIUM), ("chromium is not installed, so the rendered pages cannot be checked in a "
                                      "browser: run bash scripts/setup.sh as root (apt-get install chromium)")
    model, windows, table, sae, _, _ = setup
    summary = write_browser({"topk <&>": sae}, model, table, tmp_path / "site", tokens=TokenIndex.from_windows(windows),
                            hook=HOOK, n_top=5, n_quantiles=3, n_samples=4, progress=False)
    d = summary.features["topk <&>"]
    assert summary.index.exists() and summary.bytes > 0 and summary.n_tokens == len(table)
    feature = TokenSpans(chromium_dom(f"file://{tmp_path}/site/topk/feature.html#7"))
    expected = expected_tokens(d, 7, tok)
    assert len(expected) > 50 and [text for text, _ in feature.tokens] == expected
    assert {"script"} & set(feature.tags) and feature.tags.count("script") == 5  # ours: 3 files, init, the chunk
    index = chromium_dom(f"file://{tmp_path}/site/topk/index.html")
    assert index.count('href="feature.html#') == 48 and "48 of 48 features" in index


@pytest.fixture(scope="module")
def organism(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAELIB_CACHE", str(root / "cache"))
        org = train_organism("ci", root / "organism", n_steps=1, tokenizer_chars=100_000, d_vocab=512, val_windows=2,
                             n_even_checkpoints=1, batch_size=2, progress=False)
        yield org, root


def test_command_writes_a_browser_for_a_saved_sae(organism, capsys, monkeypatch):
    org, root = organism
    monkeypatch.setenv("SAELIB_CACHE", str(root / "cache"))
    run = root / "run"
    sae_dir = save_sae(SAE(SAEConfig(d_in=128, d_sae=64, k=4)), run / "saes" / "tiny")
    (run / "config.json").write_text(json.dumps({"data": {"model": str(org), "hook": HOOK, "corpus": "mixed"}}))
    main([str(sae_dir), "--out", str(root / "site"), "--tokens", "400", "--context-size", "32", "--no-progress"])
    assert "wrote" in capsys.readouterr().out
    assert (root / "site" / "index.html").exists() and (root / "site" / "tiny" / "feature.html").exists()
    meta = (root / "site" / "tiny" / "data" / "index.js").read_text()
    assert '"n_tokens":400' in meta and '"n_features":64' in meta

    # A subset of the cache's rows (chapter 2 drops norm outliers) still maps rows to their tokens.
    cache = open_cache(next((root / "cache" / "activations").iterdir()))
    subset = drop_norm_outliers(cache, threshold=float(cache[:].norm(dim=1).quantile(0.9)))
    d = gather_features({"tiny": SAE(SAEConfig(d_in=128, d_sae=64, k=4))}, subset, progress=False)["tiny"]
    fired = d.top_rows[:, 0] >= 0
    centre = [d.context_ids(r)[d.before] for r in d.top_rows[fired, 0].tolist()]
    assert centre == cache.token_ids(subset.rows[d.top_rows[fired, 0].numpy()]).tolist()
    assert torch.isnan(d.top_context).any(), "dropped rows show as unscanned"


def test_command_errors_say_what_to_do(organism, capsys, monkeypatch, tmp_path):
    org, root = organism
    monkeypatch.setenv("SAELIB_CACHE", str(root / "cache"))

    def error(argv):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        return capsys.readouterr().err

    assert "save_sae" in error([str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    lone = save_sae(SAE(SAEConfig(d_in=128, d_sae=64, k=4)), tmp_path / "lone")
    assert "--model MODEL --hook HOOK" in error([str(lone), "--out", str(tmp_path / "o")])
    message = error([str(lone), "--out", str(tmp_path / "o"), "--model", str(org), "--hook", "blocks.7.hook_resid_post"])
    assert "not a hook point" in message and "--hook" in message and "blocks.{0..1}.hook_resid_post" in message
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "SAE_DIR" in capsys.readouterr().out


def test_a_dead_feature_and_no_model_are_said_plainly(setup, tok, tmp_path):
    _, windows, table, sae, _, _ = setup
    dead = SAE(sae.cfg)
    dead.load_state_dict(sae.state_dict())
    with torch.no_grad():
        dead.b_enc[0] = -1e3  # feature 0 never reaches a positive pre-activation
    summary = write_browser({"dead": dead}, None, table, tmp_path / "site", tokens=TokenIndex.from_windows(windows),
                            tokenizer=tok, progress=False)
    d = summary.features["dead"]
    assert d.count[0] == 0 and (d.top_rows[0] == -1).all() and d.promoted is None
    page = FeatureView(d, 0, tok)._repr_html_()
    assert "did not fire on the 660 scanned tokens" in page and "no model given" in page
    chunk = (tmp_path / "site" / "dead" / "data" / "f0.js").read_text()
    assert chunk.startswith('SAEB.put("f0",[{"h":[],"t":[],"q":[],"p":[],"s":[]},')
    with pytest.raises(ValueError, match="tokenizer"):
        write_browser({"dead": dead}, None, table, tmp_path / "x", tokens=TokenIndex.from_windows(windows))


def test_book_browser_is_cached_whole_and_verified(setup, tok, tmp_path, monkeypatch):
    """The chapter's browser cache entry (site, shown.pt, summary.json) is committed in one piece and
    checksummed: a rerun publishes it without gathering again, a damaged one is refused by name."""
    from saelib.browser import publish
    from saelib.core.storage import DamagedError

    model, windows, table, sae, _, _ = setup
    monkeypatch.setenv("SAELIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(publish.BROWSER_DIR_ENV, str(tmp_path / "published"))
    args = ("test", {"topk": sae}, model, table, {"run": "x"})
    kwargs = dict(show="topk", tokens=TokenIndex.from_windows(windows), hook=HOOK, n_top=5, n_quantiles=3,
                  n_samples=4, progress=False)
    index, summary, shown = publish.book_browser(*args, **kwargs)
    assert index.exists() and shown.count.shape == (48,) and summary["n_tokens"] == table.shape[0]
    monkeypatch.setattr(publish, "write_browser", lambda *a, **k: pytest.fail("gathered again"))
    again = publish.book_browser(*args, **kwargs)
    assert again[1] == summary and torch.equal(again[2].count, shown.count)
    cached = next((tmp_path / "cache" / "browsers").iterdir())
    (cached / "summary.json").write_text("{")
    with pytest.raises(DamagedError, match=r"summary.json is damaged: .*; delete .* and rerun the chapter"):
        publish.book_browser(*args, **kwargs)


def test_lineage_shows_each_checkpoints_ancestor_with_cosine_density_and_contexts(setup, tok, tmp_path):
    from saelib.browser import Lineage, LineageView, book_lineage

    model, windows, table, sae, data, _ = setup
    other = SAE(SAEConfig(d_in=32, d_sae=48, k=4, seed=5))
    other.init_from_sample(table)
    early = gather_features({"early": other}, table, tokens=TokenIndex.from_windows(windows), batch_size=100,
                            n_top=5, progress=False)["early"]
    # Final feature 0 descends from feature 7 at step 10, final feature 1 has no ancestor there.
    ancestor = torch.tensor([[7, -1] + [3] * 46, list(range(48))])
    cosine = torch.tensor([[0.8, float("nan")] + [0.1] * 46, [1.0] * 48])
    lineage = Lineage([10, 20], ancestor, cosine, {10: early, 20: data}, born=torch.tensor([10.0] + [20.0] * 47))
    assert lineage.row(0, 0) == {"step": 10, "ancestor": 7, "cosine": pytest.approx(0.8),
                                 "density": pytest.approx(float(early.density[7]))}
    page = LineageView(lineage, 0, tok)._repr_html_()
    assert page.count("<tr>") == 3 and "born at step 10" in page and "0.80" in page
    assert int(early.top_rows[7][0]) >= 0 and page.count('class="ctx"') >= 2, "contexts at both checkpoints"
    assert "(no match)" in LineageView(lineage, 1, tok)._repr_html_()
    with pytest.raises(ValueError, match="no gathered features"):
        Lineage([10, 30], ancestor, cosine, {10: early, 20: data})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAELIB_BROWSER_DIR", str(tmp_path))
        index = book_lineage("04_dynamics", lineage, tok, features=[0, 1])
    assert index == tmp_path / "04_dynamics" / "lineage" / "index.html"
    assert 'href="feature_0.html"' in index.read_text() and (index.parent / "feature_1.html").exists()
