import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from saelib.subjects import corpora
from saelib.subjects.corpora import CorpusUnavailable, list_corpora, load_corpus

DATA = {
    "kjv": corpora.KJV_DATA,
    "gcide": corpora.GCIDE_DATA,
    "python-docs": corpora.PYTHON_INFO,
    "linux-docs": corpora.LINUX_DOCS,
}
MARKUP = {
    "kjv": [r"^\s*\d+\s", r"\b\d+:\d+\b"],  # verse numbers / references
    "gcide": [r"<\/?[a-z]+>", r"\\", r"\[\d{4} Webster\]", r"\[WordNet", r"[{}]"],
    "python-docs": [r"[\x00-\x08\x0b-\x1f]", r"\*[Nn]ote\b", r"^File: .*Node:"],
    "linux-docs": [r"^\.\. ", r":[a-z]+:`", r"``", r"^={3,}\s*$", r"SPDX-License"],
}


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELIB_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("name", list(DATA))
def test_shelf_corpus_is_clean_text(name):
    if not DATA[name].exists():
        pytest.skip(f"Debian package for {name} is not installed ({DATA[name]} missing)")
    docs = load_corpus(name, max_chars=30_000)
    text = "\n".join(docs)
    assert sum(map(len, docs)) == 30_000  # the last document is cut to the budget exactly
    assert len(docs) >= 2
    for pat in MARKUP[name]:
        assert not re.search(pat, text, re.M), f"{name}: markup {pat!r} left in the text"
    # Mostly letters and spaces: readable English, not binary or markup soup.
    letters = sum(c.isalpha() or c.isspace() for c in text)
    assert letters / len(text) > 0.8


def test_kjv_starts_at_genesis_and_strips_verse_numbers():
    if not corpora.KJV_DATA.exists():
        pytest.skip("bible-kjv-text is not installed")
    docs = load_corpus("kjv", max_chars=5000)
    assert docs[0].startswith("In the beginning God created the heaven and the earth. And the earth")


def test_full_load_is_cached_and_reused(tmp_path):
    if not corpora.KJV_DATA.exists():
        pytest.skip("bible-kjv-text is not installed")
    docs = load_corpus("kjv")
    assert len(docs) == 1189  # chapters in the KJV
    cached = tmp_path / "cache" / "corpora" / "kjv.json"
    assert json.loads(cached.read_text()) == docs
    cached.write_text(json.dumps(["sentinel document"]))  # a second load must read the cache
    assert load_corpus("kjv") == ["sentinel document"]
    assert load_corpus("kjv", max_chars=5) == ["senti"]


def test_a_budget_beyond_the_corpus_caches_all_of_it_and_a_smaller_one_does_not(tmp_path):
    if not corpora.KJV_DATA.exists():
        pytest.skip("bible-kjv-text is not installed")
    cached = tmp_path / "cache" / "corpora" / "kjv.json"
    part = load_corpus("kjv", max_chars=10_000)
    assert sum(map(len, part)) == 10_000 and not cached.exists()
    whole = load_corpus("kjv", max_chars=10**12)  # more than it holds: the whole corpus, so cached
    assert json.loads(cached.read_text()) == whole and whole[: len(part) - 1] == part[:-1]


def test_windows_beyond_the_corpus_are_refused_before_tokenizing():
    class Tokenizer:  # tokenizing is what the check saves: a call would fail this test
        bos_token_id, eos_token_id = 0, 0

        def __call__(self, *args, **kwargs):
            raise AssertionError("tokenized a corpus that cannot hold the windows")

    from saelib.subjects.activations import token_windows

    with pytest.raises(ValueError, match=r"corpus 'kjv' \(train split\) holds at most [\d,]+ tokens \([\d,]+ windows of 64\), "
                                         r"10,000,000 windows requested"):
        token_windows(Tokenizer(), "kjv", 10_000_000, 64)


def test_mixed_interleaves_all_four_deterministically():
    if not all(p.exists() for p in DATA.values()):
        pytest.skip("mixed needs all four Debian corpus packages")
    a = load_corpus("mixed", max_chars=60_000)
    assert a == load_corpus("mixed", max_chars=60_000)
    assert a[0].startswith("In the beginning")  # kjv first
    assert any(d.startswith("0 adj.") for d in a[:4])  # gcide's first entry is among the first four
    assert any("ACPI" in d for d in a[:4])  # linux-docs' first file likewise


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError) as e:
        load_corpus("shakespeare")
    for n in list_corpora():
        assert n in str(e.value)
    assert "hf:" in str(e.value)


def test_missing_package_names_apt_package(monkeypatch, tmp_path):
    monkeypatch.setattr(corpora, "GCIDE_DATA", tmp_path / "nope.dict.dz")
    with pytest.raises(CorpusUnavailable, match="apt-get install -y dict-gcide"):
        load_corpus("gcide", max_chars=100)


def test_bad_max_chars():
    with pytest.raises(ValueError, match="max_chars"):
        load_corpus("kjv", max_chars=0)


def test_hf_route_streams_a_local_dataset(tmp_path):
    # A local directory goes through datasets.load_dataset(..., streaming=True), the same code
    # path as a hub dataset name.
    d = tmp_path / "tinyds"
    d.mkdir()
    rows = [{"text": f"document number {i}", "id": i} for i in range(5)] + [{"text": "", "id": 5}]
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    docs = load_corpus(f"hf:{d}")
    assert docs == [f"document number {i}" for i in range(5)]  # empty rows dropped
    assert load_corpus(f"hf:{d}", max_chars=20) == ["document number 0", "doc"]
    with pytest.raises(KeyError, match="text_field"):
        load_corpus(f"hf:{d}", text_field="body")
