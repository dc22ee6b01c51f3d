"""Behavioural probes of a subject model: what it does, measured by intervening on its input.

Chapter 4 relates SAE features to what a model can do at each training checkpoint. The probe here
is in-context learning on repeated random tokens (Olsson et al. 2022): a sequence of random tokens
is unpredictable the first time, and perfectly predictable the second time for a model that copies
from context (an induction head: find the earlier occurrence of the current token, predict what
followed it). The loss drop from the first copy to the second measures that ability alone, since
random tokens carry no n-gram statistics the model could have learnt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saelib.core import seeding

__all__ = ["repeated_sequences", "ICLScore", "icl_score", "mean_loss"]


def repeated_sequences(n_sequences: int, length: int, vocab: int, bos: int, seed: int = 0,
                       exclude: tuple[int, ...] = ()) -> Tensor:
    """[n_sequences, 1 + 2 * length]: BOS, then ``length`` token ids drawn uniformly from
    ``0..vocab-1`` (never BOS or an id in ``exclude``, e.g. EOS), then the same ``length`` ids again.
    Drawn from their own random stream, so the probe is the same at every checkpoint."""
    banned = torch.tensor(sorted({bos, *exclude}), dtype=torch.long)
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[banned[banned < vocab]] = False
    if length < 2 or n_sequences < 1 or allowed.sum() < 2:
        raise ValueError(f"need length >= 2, n_sequences >= 1 and two allowed ids; got length={length}, "
                         f"n_sequences={n_sequences}, {int(allowed.sum())} allowed ids of {vocab}")
    pool = allowed.nonzero().flatten()
    gen = seeding.generator("icl_sequences", seed)
    body = pool[torch.randint(len(pool), (n_sequences, length), generator=gen)]
    return torch.cat([torch.full((n_sequences, 1), bos), body, body], dim=1)


@dataclass
class ICLScore:
    first: float
    """Mean next-token loss (nats) on the first copy, its first token left out (predicted from BOS)."""
    second: float
    """Mean loss on the second copy, its first token left out (nothing yet says the copy began)."""

    @property
    def score(self) -> float:
        """first - second: about 0 for a model that does not use the context, up to the first copy's
        loss for one that copies perfectly."""
        return self.first - self.second


@torch.no_grad()
def _token_losses(model, tokens: Tensor, batch_size: int) -> Tensor:
    """[n, T - 1]: the loss of predicting token t + 1 from tokens up to t."""
    params = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    device = params.device if params is not None else tokens.device
    out = []
    for lo in range(0, len(tokens), batch_size):
        batch = tokens[lo:lo + batch_size].to(device)
        logits = model(batch).float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        out.append(-logp.gather(-1, batch[:, 1:, None].to(logp.device)).squeeze(-1).cpu())
    return torch.cat(out)


def icl_score(model, sequences: Tensor, batch_size: int = 16) -> ICLScore:
    """Losses on the two copies of ``repeated_sequences`` under ``model`` (anything mapping token ids
    [n, T] to logits [n, T, vocab], e.g. a HookedTransformer)."""
    if sequences.ndim != 2 or sequences.shape[1] % 2 != 1 or sequences.shape[1] < 5:
        raise ValueError(f"expected [n, 1 + 2 * length] sequences (BOS + two copies, length >= 2), "
                         f"got shape {tuple(sequences.shape)}")
    length = (sequences.shape[1] - 1) // 2
    if not torch.equal(sequences[:, 1:1 + length], sequences[:, 1 + length:]):
        raise ValueError("the two halves after BOS differ: build the sequences with repeated_sequences")
    losses = _token_losses(model, sequences, batch_size)
    # losses[:, t] predicts token t + 1: the first copy is tokens 1..L, the second L+1..2L.
    first, second = losses[:, 1:length], losses[:, length + 1:]
    return ICLScore(float(first.mean()), float(second.mean()))


@torch.no_grad()
def mean_loss(model, windows: Tensor, batch_size: int = 16) -> float:
    """Mean next-token loss (nats/token) of ``model`` over every predicted position of ``windows``."""
    return float(_token_losses(model, windows, batch_size).mean())
