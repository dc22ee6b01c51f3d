"""The chapter exercises: each check accepts saelib's answer and the book's worked solution, rejects
deliberately wrong versions naming the problem, and reports an unfilled stub; student copies lose
exactly the solution cells."""

import math
import re
import subprocess
import sys

import nbformat
import numpy as np
import pytest
import torch

from saelib.book import build as book
from saelib.book import exercises as ex
from saelib.book.exercises import ch00_synthetic, ch02_allocation
from saelib.book.exercises.student_copy import main as student_copy_main
from saelib.book.exercises.student_copy import student_copy
from saelib.core.allocation import AllocationContext, selection_mask, zipf_capacities, zipf_profile
from saelib.core.losses import nmse
from saelib.core.metrics import zipf_fit
from saelib.studies.splice import splice_metrics

NOTEBOOKS = sorted((book.ROOT / "notebooks").glob("*.ipynb"))
CHECK_CALL = re.compile(r"^assert (check_\w+)\((my_\w+)\)$")


def exercise_cells(path):
    """(stub, solution, check name, function name) for every exercise of a notebook."""
    cells = nbformat.read(path, as_version=4).cells
    found = []
    for i, cell in enumerate(cells):
        if "solution" in cell.metadata.get("tags", []):
            stub, check = cells[i - 1], cells[i + 1]
            match = CHECK_CALL.match(check.source.strip())
            assert "exercise" in stub.metadata.get("tags", []), f"{path.name}: no stub before solution cell {i}"
            assert match, f"{path.name}: cell {i + 1} should be `assert check_...(my_...)`, got {check.source!r}"
            found.append((stub.source, cell.source, match.group(1), match.group(2)))
    return found


EXERCISES = [(p.stem, *e) for p in NOTEBOOKS for e in exercise_cells(p)]


def define(source, name):
    namespace = {"torch": torch, "np": np}
    exec(source, namespace)
    return namespace[name]


def test_every_chapter_ends_with_two_to_four_exercises():
    for path in NOTEBOOKS:
        cells = nbformat.read(path, as_version=4).cells
        headings = [i for i, c in enumerate(cells) if c.cell_type == "markdown" and c.source.startswith("## Exercises")]
        assert len(headings) == 1, f"{path.name}: one '## Exercises' section expected"
        after = cells[headings[0]:]
        solutions = [c for c in after if "solution" in c.metadata.get("tags", [])]
        assert 2 <= len(solutions) <= 4, path.name
        assert all("hide-input" in c.metadata.tags for c in solutions), "solutions render as a collapsed toggle"
        assert not any("solution" in c.metadata.get("tags", []) for c in cells[:headings[0]]), "exercises come last"


@pytest.mark.parametrize("chapter, stub, solution, check, name", EXERCISES, ids=[e[3] for e in EXERCISES])
def test_book_solution_passes_and_the_stub_is_reported(chapter, stub, solution, check, name, capsys):
    checker = getattr(ex, check)
    assert checker(define(solution, name)) is True
    assert "agrees with saelib" in capsys.readouterr().out
    assert checker(define(stub, name)) is False
    assert f"{name} is not implemented yet" in capsys.readouterr().out


def rejects(checker, fn, *fragments, capsys):
    assert checker(fn) is False
    out = capsys.readouterr().out
    for fragment in fragments:
        assert re.search(fragment, out), f"{fragment!r} not in the report:\n{out}"


# --------------------------------------------------------------------------- allocation and NMSE

def test_topk(capsys):
    assert ex.check_topk(lambda z, k: selection_mask("topk", z, AllocationContext(k=k)))

    def no_positivity(z, k):
        return torch.zeros_like(z, dtype=torch.bool).scatter(1, z.topk(k, dim=1).indices, True)

    def one_too_many(z, k):
        return torch.zeros_like(z, dtype=torch.bool).scatter(1, z.topk(k + 1, dim=1).indices, True) & (z > 0)

    def smallest(z, k):
        return torch.zeros_like(z, dtype=torch.bool).scatter(1, z.topk(k, dim=1, largest=False).indices, True) & (z > 0)

    rejects(ex.check_topk, no_positivity, r"rows 2 and 5 all negative", r"row 2 keeps 4 entries whose "
            r"pre-activations are not positive \(e.g. feature \d+: -[\d.]+\)", r"row 2 keeps 4 entries, expected 0 "
            r"\(none of its entries is positive\)", r"row 7 keeps 4 entries, expected 2 \(only 2 of its "
            r"entries are positive\)", capsys=capsys)
    rejects(ex.check_topk, one_too_many, r"row 0 keeps 5 entries, expected 4 \(k=4\)", capsys=capsys)
    rejects(ex.check_topk, smallest, r"row 0 keeps 0 entries, expected 4", capsys=capsys)


def test_mutual_choice(capsys):
    assert ex.check_mutual_choice(lambda z, k: selection_mask("mutual_choice", z, AllocationContext(k=k)))

    def per_token(z, k):  # TopK, not a batch-level budget
        return selection_mask("topk", z, AllocationContext(k=k))

    def budget_k(z, k):
        keep = torch.zeros(z.numel(), dtype=torch.bool)
        keep[z.flatten().topk(k).indices] = True
        return keep.view_as(z) & (z > 0)

    def no_positivity(z, k):
        keep = torch.zeros(z.numel(), dtype=torch.bool)
        keep[z.flatten().topk(k * len(z)).indices] = True
        return keep.view_as(z)

    rejects(ex.check_mutual_choice, per_token, r"keeps \(token \d+, feature \d+\) \(z = [\d.]+\) but drops the "
            r"larger \(token \d+, feature \d+\)", capsys=capsys)
    rejects(ex.check_mutual_choice, budget_k, r"the batch keeps 4 entries, expected 64 \(k x tokens = 4 x 16\)",
            capsys=capsys)
    rejects(ex.check_mutual_choice, no_positivity, r"k = d_sae = 10", r"the batch keeps \d+ entries whose "
            r"pre-activations are not positive", capsys=capsys)


def test_mutual_choice_accepts_either_side_of_a_tie(capsys):
    z = torch.tensor([[3.0, 2.0, 2.0, 1.0]])  # budget 2: {3, 2} or {3, 2, 2}
    both = torch.tensor([[True, True, True, False]])
    one = torch.tensor([[True, True, False, False]])
    assert not ch00_synthetic._group_problems("the batch", z.flatten(), both.flatten(), 2, "", str, ties_kept=3)
    assert not ch00_synthetic._group_problems("the batch", z.flatten(), one.flatten(), 2, "", str, ties_kept=3)
    assert ch00_synthetic._group_problems("the batch", z.flatten(), both.flatten(), 2, "", str)


def test_nmse(capsys):
    assert ex.check_nmse(nmse)
    rejects(ex.check_nmse, lambda x, x_hat: ((x_hat - x) ** 2).sum() / (x**2).sum(),
            r"wrong on x with mean 5 \(the variance is around the mean", r"got [\d.e-]+, expected [\d.e-]+",
            capsys=capsys)
    rejects(ex.check_nmse, lambda x, x_hat: ((x_hat - x) ** 2).mean(), r"wrong on random x and a noisy", capsys=capsys)


# --------------------------------------------------------------------------- splicing

@torch.no_grad()
def test_next_token_loss(capsys):
    assert ex.check_next_token_loss(
        lambda model, tokens: splice_metrics(model, "blocks.0.hook_resid_post", lambda x: x, tokens).ce_clean)

    def unshifted(model, tokens):
        return -model(tokens).log_softmax(-1).gather(-1, tokens[..., None]).mean().item()

    def in_bits(model, tokens):
        log_probs = model(tokens)[:, :-1].log_softmax(-1)
        return -log_probs.gather(-1, tokens[:, 1:, None]).mean().item() / math.log(2)

    rejects(ex.check_next_token_loss, unshifted, r"wrong on 4 windows of 12 tokens", r"nats/token, expected",
            capsys=capsys)
    rejects(ex.check_next_token_loss, in_bits, r"got [\d.]+ nats/token, expected [\d.]+", capsys=capsys)


@torch.no_grad()
def test_ce_increase(capsys):
    assert ex.check_ce_increase(lambda model, hook, r, tokens: splice_metrics(model, hook, r, tokens).ce_increase)

    def splice_bos_too(model, hook, reconstruct, tokens):
        clean = model(tokens, return_type="loss")
        spliced = model.run_with_hooks(tokens, return_type="loss",
                                       fwd_hooks=[(hook, lambda act, hook: reconstruct(act))])
        return (spliced - clean).item()

    def spliced_loss(model, hook, reconstruct, tokens):
        return splice_metrics(model, hook, reconstruct, tokens).ce_spliced

    rejects(ex.check_ce_increase, splice_bos_too, r"wrong on halving the activation at blocks.0.hook_resid_post",
            capsys=capsys)
    rejects(ex.check_ce_increase, spliced_loss, r"wrong on the identity \(increase 0\)", capsys=capsys)


# --------------------------------------------------------------------------- chapter 2

def test_zipf_capacities(capsys):
    assert ex.check_zipf_capacities(zipf_capacities)

    def shares(n_features, n_tokens, k, exponent):
        weight = torch.arange(1, n_features + 1, dtype=torch.float64) ** -exponent
        return weight / weight.sum() * k * n_tokens

    def uncapped(n_features, n_tokens, k, exponent):  # largest remainder, but no water-filling
        target = shares(n_features, n_tokens, k, exponent)
        capacity = target.floor()
        capacity[(target - capacity).argsort(descending=True)[:k * n_tokens - int(capacity.sum())]] += 1
        return capacity.long()

    def floored(n_features, n_tokens, k, exponent):  # water-filled, but no largest-remainder rounding
        return (zipf_profile(n_features, k, exponent) * n_tokens).floor().long()

    def rounded_in_order(n_features, n_tokens, k, exponent):  # the right total, the wrong ranks rounded up
        target = zipf_profile(n_features, k, exponent) * n_tokens
        capacity = target.floor()
        capacity[torch.nonzero(capacity < n_tokens).flatten()[:k * n_tokens - int(capacity.sum())]] += 1
        return capacity.long()

    rejects(ex.check_zipf_capacities, uncapped, r"k = n_features = 8", r"rank 0 gets \d+ tokens but the batch has "
            r"only 10: cap it", capsys=capsys)
    rejects(ex.check_zipf_capacities, floored, r"capacities sum to \d+, expected the budget k x n_tokens = 400",
            capsys=capsys)
    rejects(ex.check_zipf_capacities, rounded_in_order, r"round up the ranks with the largest remainders",
            capsys=capsys)


def test_zipf_capacities_accepts_either_rounding_of_tied_remainders(capsys):
    # s = 0: 16 equal shares of 150 tokens (9.375 each), so any 6 ranks may take the 10th token.
    def last_six(n_features, n_tokens, k, exponent):
        capacity = zipf_capacities(n_features, n_tokens, k, exponent)
        if exponent == 0:
            capacity = torch.full((n_features,), k * n_tokens // n_features)
            capacity[-(k * n_tokens - int(capacity.sum())):] += 1
        return capacity

    assert ex.check_zipf_capacities(last_six)


def test_aux_k(capsys):
    from saelib.core.losses import aux_residual_loss  # the reference runs inside the check, on an SAE
    assert aux_residual_loss is ch02_allocation.aux_residual_loss
    def all_features(z, dead, decoder, residual, k_aux):  # forgets the dead mask
        values, features = z.topk(k_aux, dim=1)
        e_hat = (values.clamp(min=0)[..., None] * decoder[features]).sum(1)
        return ((e_hat - residual) ** 2).sum() / ((residual - residual.mean(0)) ** 2).sum()

    def mse(z, dead, decoder, residual, k_aux):  # the right features, an unnormalised loss
        scores = torch.where(dead, z, float("-inf"))
        values, features = scores.topk(min(k_aux, int(dead.sum())), dim=1)
        return ((values.clamp(min=0)[..., None] * decoder[features]).sum(1) - residual).pow(2).mean()

    def one_feature(z, dead, decoder, residual, k_aux):  # ignores k_aux: one dead feature per token
        values, features = torch.where(dead, z, float("-inf")).topk(1, dim=1)
        e_hat = values.clamp(min=0) * decoder[features[:, 0]]
        return ((e_hat - residual) ** 2).sum() / ((residual - residual.mean(0)) ** 2).sum()

    rejects(ex.check_aux_k, all_features, r"wrong on 32 tokens, 12 of 48 features dead", r"got [\d.e-]+, expected",
            capsys=capsys)
    rejects(ex.check_aux_k, mse, r"wrong on 32 tokens", capsys=capsys)
    rejects(ex.check_aux_k, one_feature, r"one_feature is wrong on 32 tokens, 12 of 48 features dead, k_aux = 4",
            capsys=capsys)


def test_zipf_fit(capsys):
    assert ex.check_zipf_fit(lambda d: (zipf_fit(d).exponent, zipf_fit(d).log10_scale))

    def unsorted(density):
        d = np.asarray(density, dtype=np.float64)
        ranks = np.arange(1, len(d) + 1)
        slope, intercept = np.polyfit(np.log10(ranks[d > 0]), np.log10(d[d > 0]), 1)
        return -slope, intercept

    def natural_log(density):
        d = np.sort(np.asarray(density, dtype=np.float64))[::-1]
        d = d[d > 0]
        slope, intercept = np.polyfit(np.log(np.arange(1, len(d) + 1)), np.log(d), 1)
        return -slope, intercept

    rejects(ex.check_zipf_fit, unsorted, r"wrong on the same densities in random order", r"exponent s = .*, "
            r"expected 1\.2", capsys=capsys)
    rejects(ex.check_zipf_fit, natural_log, r"log10 C = -1\.2\d*, expected -0\.52", capsys=capsys)


# --------------------------------------------------------------------------- training dynamics (chapter 4)

def test_icl_score(capsys):
    from saelib.subjects.probes import RepeatProbe, icl_score

    assert ex.check_icl_score(lambda model, seqs: icl_score(model, RepeatProbe.halves(seqs)).score)

    def reversed_sign(model, seqs):
        return -icl_score(model, RepeatProbe.halves(seqs)).score

    def every_token(model, seqs):  # the unpredictable first token of each copy left in
        n = (seqs.shape[1] - 1) // 2
        with torch.no_grad():
            logp = torch.log_softmax(model(seqs).float()[:, :-1], -1)
        loss = -logp.gather(-1, seqs[:, 1:, None]).squeeze(-1)
        return float(loss[:, :n].mean() - loss[:, n:].mean())

    rejects(ex.check_icl_score, reversed_sign, r"a model that copies", r"that is the second copy minus the "
            r"first", capsys=capsys)
    rejects(ex.check_icl_score, every_token, r"wrong on a model that copies.*\n.*got [\d.]+, expected [\d.]+ = "
            r"first copy", capsys=capsys)


def test_jaccard(capsys):
    from saelib.studies.matching import jaccard

    assert ex.check_jaccard(jaccard)

    def zero_when_silent(a, b):
        return jaccard(a, b).nan_to_num(0.0)

    def overlap_over_a(a, b):
        return (a & b).sum(0) / a.sum(0).clamp(min=1)

    rejects(ex.check_jaccard, zero_when_silent, r"feature 3: got 0\.0000, expected nan \(neither fires", capsys=capsys)
    rejects(ex.check_jaccard, overlap_over_a, r"wrong on random firing", capsys=capsys)


def test_max_cosine_match(capsys):
    from saelib.studies.matching import max_cosine_match

    assert ex.check_max_cosine_match(max_cosine_match)

    def by_absolute_cosine(a, b):
        cos = (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).T
        index = cos.abs().argmax(1)
        return index, cos.abs().max(1).values

    def unnormalised(a, b):
        values, index = (a @ b.T).max(1)
        return index, values

    def wrong_index(a, b):
        index, cos = max_cosine_match(a, b)
        return (index + 1) % len(b), cos

    rejects(ex.check_max_cosine_match, by_absolute_cosine, r"not the largest \|cosine\|", capsys=capsys)
    rejects(ex.check_max_cosine_match, unnormalised, r"row 0: cosine [\d.]+, expected", capsys=capsys)
    rejects(ex.check_max_cosine_match, wrong_index, r"row 0: index \d+ has cosine", capsys=capsys)


# --------------------------------------------------------------------------- student copies

def test_student_copy_removes_every_solution_cell_and_nothing_else(tmp_path, capsys):
    assert student_copy_main([str(book.ROOT / "notebooks"), "--out", str(tmp_path)]) == 0
    for path in NOTEBOOKS:
        original = nbformat.read(path, as_version=4)
        copy = nbformat.read(tmp_path / path.name, as_version=4)
        expected = [c for c in original.cells if "solution" not in c.metadata.get("tags", [])]
        assert len(copy.cells) < len(original.cells)
        assert copy.cells == expected and copy.metadata == original.metadata
        assert not any("solution" in c.metadata.get("tags", []) for c in copy.cells)
    out = capsys.readouterr().out
    assert "00_synthetic.ipynb: 3 solution cell(s) removed" in out


def test_student_copy_refuses_to_overwrite_the_sources(capsys):
    assert student_copy_main([str(book.ROOT / "notebooks"), "--out", str(book.ROOT / "notebooks")]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


def test_a_student_copy_runs_and_its_checks_report_the_stubs(tmp_path):
    """The stubs define functions without raising; the first check cell then fails with the report."""
    student_copy(book.ROOT / "notebooks" / "00_synthetic.ipynb", tmp_path)
    cells = nbformat.read(tmp_path / "00_synthetic.ipynb", as_version=4).cells
    start = next(i for i, c in enumerate(cells) if c.source.startswith("## Exercises"))
    code = [c.source for c in cells[start:] if c.cell_type == "code"]
    script = "import numpy as np, torch\n" + "\n".join(code)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=book.ROOT)
    assert result.returncode != 0 and "AssertionError" in result.stderr
    assert "my_topk is not implemented yet (it raised NotImplementedError)" in result.stdout


def test_e2e_kl(capsys):
    import torch.nn.functional as F

    def kl(clean, spliced):
        p = clean.log_softmax(-1)
        return float((p.exp() * (p - spliced.log_softmax(-1))).sum(-1).mean())

    assert ex.check_e2e_kl(kl)
    rejects(ex.check_e2e_kl, lambda a, b: kl(b, a), r"KL\(spliced \|\| clean\)", capsys=capsys)
    rejects(ex.check_e2e_kl, lambda a, b: kl(a, b) * a.shape[:-1].numel(), r"the sum over positions",
            capsys=capsys)
    rejects(ex.check_e2e_kl, lambda a, b: float(F.mse_loss(a, b)), r"wrong on logits shifted by a constant",
            capsys=capsys)


def test_max_cosine_within(capsys):
    from saelib.studies.matching import cosines, max_cosine_within

    assert ex.check_max_cosine_within(max_cosine_within)
    rejects(ex.check_max_cosine_within, lambda d: cosines(d, d).max(1).values, r"leave it out", capsys=capsys)
    rejects(ex.check_max_cosine_within, lambda d: cosines(d, d).fill_diagonal_(0).abs().max(1).values,
            r"row 0: got 1\.0000, expected -1\.0000", capsys=capsys)
