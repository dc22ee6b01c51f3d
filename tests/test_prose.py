"""Numbers in the chapters' prose come from their runs (saelib.book.prose): a measured number typed
into a markdown cell goes stale on the next machine or profile, so the scan below fails on any
digit outside a glue role, math, code, a link, a heading's or a list's numbering, or a phrase of
the chapter's allow-list (the papers' numbers, parameters that are constants of the text, citations).
"""

import re

import nbformat
import pytest

from saelib.book import build as book
from saelib.book import claims, prose

NOTEBOOKS = {p.stem: p for p in sorted((book.ROOT / "notebooks").glob("*.ipynb"))}

# Chapters whose prose still quotes one run's numbers as text; each is converted by its own issue.
PENDING: dict[str, str] = {}

# Phrases whose digits are not measurements: model names everywhere, and per chapter the papers'
# numbers, code constants the text explains (thresholds, sizes of an illustration) and citations.
EVERYWHERE = ("SmolLM2-135M", "Ayonrinde 2024", "Gao et al. 2024", "step 0", "position 0")
ALLOWED = {
    "00_synthetic": ("(1) reconstruct", "(2) find", "above 0.9", "0.9 or below", "far below 0.9",
                     "more than 5%", "slope below 0.2", "within 25%", "slope above 0.3",
                     "Exercise 0.1", "Exercise 0.2", "Exercise 0.3", "mean 5", "scores exactly 1",
                     "reconstruction 0"),
    "01_subject_models": ("30 layers", "4-bit GGUF", "(0, 1, 2, 4, ...", "10x the typical norm",
                          "chapter 2", "Exercise 1.1", "Exercise 1.2", "Position 0"),
    "02_allocation": ("Ayonrinde (2024", "chapter 1", "has weight 1", "section 6",
                      "the loss is 0", "Sun et al. 2024",
                      "layer 15 of 30", "layer 8", "Gao et al.'s 10M", "position 1 or 2",
                      "10x the median norm", "48 held-out tokens", "96 features", "budget of 4 per",
                      "98% of tokens", "Table 1", "a 32x dictionary", "(within 1%)", "within 40%",
                      "Exercise 2.1", "Exercise 2.2", "Exercise 2.3", "(from 0)", "from 1",
                      "chapter 0", "Chapter 2", "Section 4", "section 2", "chapter 2b", "section 3"),
    "03_e2e": ("Sharkey (2024", "2-3.5x", "On 2 CPU cores", "15 of its 30 blocks",
               "chapter 1: 4 blocks, 256, trained on 2.5M tokens", "3 blocks after it", "49,152-token",
               "a step of 16 windows outgrew this machine's 23 GB", "positions 1..", "409.6M tokens",
               "500k tokens", "Figure 10", "Figure 1", "Figure 2", "Figure 3", "25 log-spaced",
               "more than 2x", "under 45%", "Table 1", "40% of local's L0", "larger of 10%",
               "Exercise 3.1", "Exercise 3.2"),
    "02b_allocation_scale": ("a 32x dictionary", "GPT-2 small, a 32x dictionary", "last 20%", "2026-11-26",
                             "0.996-1.002", "1.6x", "2.1x", "2.7-3.3x", "towards 1", "by more than 0.02",
                             "at least 1%", "Table 1", "10M in Gao et al.", "10x the median norm",
                             "Below 1", "near 1", "under 0.99", "under 1%", "Exercise 2b.1",
                             "Exercise 2b.2", "crossed 1", "from 1", "chapter 2 section 4",
                             "Chapter 2", "chapter 2", "Section 2", "layer 15"),
    "04_dynamics": ("Xu et al. 2024", "Chapter 1's organism", "chapters 1 and 3", "Aoyama et al. 2025",
                    "its 154 public checkpoints", "Olsson et al. 2022", "near 1 for an induction head",
                    "at least 10 times", "within 0.15 nats", "matched share of 1", "Exercise 4.1",
                    "[n, 1 + 2L]", "Exercise 4.2", "(0/0", "Exercise 4.3"),
    "05_vision": ("ICLR 2025", "ViT-B/16", "depth of 9", "64x dictionary", "28x28", "7x7 grid of 4x4-pixel",
                  "55,000 of Fashion-MNIST's 60,000", "other 5,000", "Khattak et al. 2023", "block 0",
                  "3.4 points", "(68.25% to 64.82%)", "its 10 reference images", "Figure 3",
                  "each latent's 10 reference images", "below 0.5 nats", "above 1.5", "at least 1% of images",
                  "50 / 100 of 49,152", "over 20 random halvings", "Figure 6", "Table 1", "49,152 latents",
                  "| 68.25% |", "| 64.82% |", "about 0.1%", "top 50 / 100", "Exercise 5.1", "Exercise 5.2",
                  # MaPLe's optimizer settings (saelib.subjects.prompts.OPTIMIZERS["maple_sgd"])
                  "momentum 0.9", "weight decay 5e-4", "constant 1e-5"),
}

STRIP = [
    re.compile(r"```.*?```", re.S),                      # fenced code
    re.compile(r"\{glue(?::\w+)?\}`[^`]*`"),             # glue roles: the run's numbers
    re.compile(r"`[^`]*`"),                              # code spans
    re.compile(r"\$\$.*?\$\$", re.S),                    # display math
    re.compile(r"\$[^$]*\$"),                            # inline math
    re.compile(r"\[[^\]]*\]\([^)]*\)"),                  # links: citations and their addresses
    re.compile(r"<[^>]+>"),                              # HTML tags
    re.compile(r"^#+ (?:\d+[a-z]?\. )?", re.M),          # a heading's chapter or section number
    re.compile(r"^ *\d+\. ", re.M),                      # an ordered list's numbering
]
# A number is digits not glued to a word: "GPT-2" and "SmolLM2" name things, "-0.5" and "12-52" count.
NUMBER = re.compile(r"(?<![A-Za-z_\d.])(?<![A-Za-z]-)\d+(?:[.,]\d+)*")


def prose_of(stem: str) -> str:
    """The chapter's markdown cells with what may carry digits (roles, math, code, links) removed."""
    text = "\n\n".join(c.source for c in nbformat.read(NOTEBOOKS[stem], as_version=4).cells
                       if c.cell_type == "markdown")
    for pattern in STRIP:
        text = pattern.sub(" ", text)
    return text


def phrase_pattern(phrase: str) -> re.Pattern:
    """An allowed phrase as it may be wrapped over lines, in any case."""
    return re.compile(r"\s+".join(map(re.escape, phrase.split())), re.I)


def unglued_numbers(text: str, allowed: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """The numbers left in stripped prose once the allowed phrases are taken out, each with the
    words around it (so a failure says where)."""
    for phrase in (*EVERYWHERE, *allowed):
        text = re.sub(phrase_pattern(phrase), " ", text)
    return [(m.group(0), " ".join(text[max(0, m.start() - 30):m.end() + 30].split()))
            for m in NUMBER.finditer(text)]


def chapters():
    return [pytest.param(stem, marks=pytest.mark.skip(reason=PENDING[stem])) if stem in PENDING else stem
            for stem in NOTEBOOKS]


@pytest.mark.parametrize("stem", chapters())
def test_chapter_prose_has_no_unglued_measured_number(stem):
    found = unglued_numbers(prose_of(stem), ALLOWED.get(stem, ()))
    assert not found, (f"{stem}: numbers typed into the prose; glue them from the run "
                       f"(saelib.book.prose) or, for a constant, add the phrase to ALLOWED: {found}")


@pytest.mark.parametrize("stem", [s for s in NOTEBOOKS if s not in PENDING])
def test_allow_list_names_only_phrases_the_chapter_has(stem):
    text = prose_of(stem)
    stale = [p for p in ALLOWED.get(stem, ()) if not phrase_pattern(p).search(text)]
    assert not stale, f"{stem}: allowed phrases no longer in the prose (drop them): {stale}"


def test_every_chapter_is_scanned_or_pending():
    assert set(PENDING) <= set(NOTEBOOKS) and set(ALLOWED) <= set(NOTEBOOKS)
    assert set(NOTEBOOKS) == set(ALLOWED) | set(PENDING), "a new chapter needs an ALLOWED entry"


def test_scan_catches_a_typed_number_and_ignores_glue_math_code_links_and_headings():
    text = ("## 4. Dead features\n\n80.7% of the 610 live final features, {glue:text}`share:.1%` of "
            "the {glue:text}`n_live:,d` live ones; $k = 32$, `k_aux = 256`, "
            "[Gao et al. 2024](https://arxiv.org/abs/2406.04093), GPT-2 small at -0.5.\n"
            "1. **Training length.**")
    for pattern in STRIP:
        text = pattern.sub(" ", text)
    found = unglued_numbers(text)
    assert [number for number, _ in found] == ["80.7", "610", "0.5"], found


def test_glue_stores_plain_values_that_myst_nb_formats(tmp_path):
    """Through a real kernel: prose.glue leaves no visible output, and myst-nb reads each value back
    and formats it as a role would (numpy scalars included)."""
    import nbclient
    from myst_nb.core.variables import format_plain_text
    from myst_nb.ext.glue import extract_glue_data_cell

    cell = nbformat.v4.new_code_cell(
        "import numpy as np, torch\nfrom saelib.book import prose\n"
        "prose.glue({'share': np.float64(0.8073), 'n': np.int64(610), 'loss': torch.tensor(3.96),"
        " 'trend': 'closes', 'holds': np.bool_(True)})")  # last in its cell, no semicolon
    nb = nbclient.NotebookClient(nbformat.v4.new_notebook(cells=[cell]), kernel_name="python3").execute()
    glued = {key: out.data["text/plain"] for key, out in extract_glue_data_cell(nb.cells[0])}
    assert nb.cells[0].outputs == [], "a glued value (or glue's return value) showed in the cell's output"
    assert format_plain_text(glued["share"], ".1%") == "80.7%"
    assert format_plain_text(glued["n"], ",d") == "610"
    assert format_plain_text(glued["loss"], ".2f") == "3.96"
    assert format_plain_text(glued["trend"], "s") == "closes"
    assert format_plain_text(glued["holds"], "") == "True"


def test_glue_refuses_names_a_role_cannot_cite_and_values_it_cannot_format():
    with pytest.raises(ValueError, match="not an identifier"):
        prose.glue({"mc:ratio": 1.0})
    with pytest.raises(TypeError, match="only numbers and strings"):
        prose.plain([1, 2])


def test_claim_words_follow_the_verdicts():
    table = claims.table([claims.Claim("mc_beats_topk", "MC beats TopK", "ratio 1.08", False),
                          claims.Claim("adaptive", "MC adapts", "Spearman 0.75", True)])
    assert claims.words(table, {"mc_beats_topk": ("beats", "does not beat"),
                                "adaptive": ("holds", "does not hold")}) == {
        "mc_beats_topk": "does not beat", "adaptive": "holds"}
    with pytest.raises(KeyError, match="no such claims"):
        claims.words(table, {"fc_no_dead": ("a", "b")})
