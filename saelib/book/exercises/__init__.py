"""Checks for the exercises at the end of each chapter, and the student copies of the notebooks.

Each ``check_*`` function runs a learner's function on random and edge-case inputs (ties, rows with
no positive entry, k equal to the number of features, a batch of one token, ...) and compares it
with saelib's own implementation; ``harness`` says what every check returns and prints. One module
per chapter, in chapter order; the notebooks import every check from this package. The copies of
the notebooks without their solution cells are ``student_copy``'s (``saelib student-copy``).
"""

from saelib.book.exercises.ch00_synthetic import check_mutual_choice, check_nmse, check_topk
from saelib.book.exercises.ch01_subject_models import check_ce_increase, check_next_token_loss, tiny_model
from saelib.book.exercises.ch02_allocation import check_aux_k, check_zipf_capacities, check_zipf_fit
from saelib.book.exercises.ch02b_allocation_scale import check_first_tokens_at, check_gap_trend
from saelib.book.exercises.ch03_e2e import check_e2e_kl, check_max_cosine_within
from saelib.book.exercises.ch04_dynamics import CopyingModel, check_icl_score, check_jaccard, check_max_cosine_match
from saelib.book.exercises.ch05_vision import check_label_entropy, check_masked_reconstruction

__all__ = [
    "check_topk", "check_mutual_choice", "check_nmse",                      # chapter 0
    "check_next_token_loss", "check_ce_increase", "tiny_model",             # chapter 1
    "check_zipf_capacities", "check_aux_k", "check_zipf_fit",               # chapter 2
    "check_gap_trend", "check_first_tokens_at",                             # chapter 2b
    "check_e2e_kl", "check_max_cosine_within",                              # chapter 3
    "check_icl_score", "check_jaccard", "check_max_cosine_match", "CopyingModel",  # chapter 4
    "check_label_entropy", "check_masked_reconstruction",                   # chapter 5
]
