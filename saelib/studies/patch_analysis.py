"""PatchSAE analyses (Lim et al. 2025, arXiv 2412.05276): an SAE on every token of a ViT, read
per latent, per class and per patch, with the statistics defined as the official code
(dynamical-inference/patchsae) computes them.

* ``harvest_tokens``: the residual stream at a hook for every token ([images, tokens, d]): CLS,
  the patches and, for a prompted model, its prompt tokens after them (the official hook reads the
  whole sequence, so prompt tokens count in the statistics of an adapted model).
* ``latent_stats``: per latent and image, the **token mean** of its code (the official per-image
  activation); from it the frequency (share of images where it is positive), the mean activation
  (over those images), the reference images (the largest token means) and the label entropy (over
  a latent's ``top_n`` reference images, each weighted by its token mean). Class-level counts are
  the binarised codes (tokens with a code above ``tau``) summed over the tokens and then the
  images of a class: a latents x classes count matrix (``class_counts`` sums the per-image counts).
* Codes are in the model's own activation units, as the official SAE (trained on raw activations)
  reports them: saelib's SAE works on inputs scaled by ``input_scale`` (1 / the RMS norm), and a
  code in input units is the normalised code divided by ``input_scale``. ``tau`` is in those units.
* ``latent_stats_of``: the same from images, through the model (one call a chapter can cache).
* ``patch_maps``: one latent's activation on each patch of some images (the segmentation-like masks).
* ``masked_reconstruction`` / ``spliced_accuracy`` / ``masking_curves``: classify with the SAE's
  reconstruction spliced in at the hook, keeping only (or removing) chosen latents.
* ``rank_scores``: what latents are ranked by within a class, the raw count or the class-specific
  count (count / the latent's dataset count); ``group_latents``, ``existing_share`` and
  ``top_turnover`` compare the rankings of a base and an adapted model; ``chance_share`` is what a
  random pick of latents would score on ``existing_share``.
* ``split_half_noise``: how much such a summary moves between two halves of the images, the noise
  floor a comparison of two tasks' summaries is judged against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from saelib.core import seeding
from saelib.core.devices import to_device_of
from saelib.core.hooks import hook_layer
from saelib.core.sae import SAE

__all__ = [
    "GROUPS",
    "RANKINGS",
    "LatentStats",
    "chance_share",
    "class_counts",
    "class_ranks",
    "existing_share",
    "group_latents",
    "group_summary",
    "harvest_tokens",
    "label_entropy",
    "label_std",
    "latent_stats",
    "latent_stats_of",
    "masked_reconstruction",
    "masking_curves",
    "patch_maps",
    "rank_scores",
    "spliced_accuracy",
    "split_half_noise",
    "top_turnover",
]

GROUPS = ("high", "high-to-low", "low-to-high")
RANKINGS = ("count", "specific")
"""What latents are ranked by within a class: the class-level count (the paper's), or the
class-specific count, count / dataset count (which frequent, class-blind latents do not top)."""
MIN_DATASET_SHARE = 1e-4
"""A latent is ranked by its class-specific count only if its dataset count is at least this share
of every latent's counts together (a tenth of the average for 1,024 latents): a latent counted a
few times would otherwise be "specific" to whichever class it happened to fire on."""


@torch.no_grad()
def harvest_tokens(model, images: Tensor, hook: str, prompts=None, batch_size: int = 500) -> Tensor:
    """Activations at ``hook`` for every token of ``images``: [n, 1 + grid^2 (+ prompt tokens), d]."""
    layer = hook_layer(hook)
    if hook not in model.hook_dict:
        raise ValueError(f"{hook!r} is not a hook point of this model; e.g. "
                         f"{[h for h in model.hook_dict if h.endswith('resid_post')]}")
    out = []
    for i in range(0, len(images), batch_size):
        got: list[Tensor] = []

        def keep(act, hook=None, got=got):
            got.append(act.detach().to("cpu", copy=True))

        stop = layer + 1 if layer is not None and layer >= 0 else None
        model.run_with_hooks(to_device_of(images[i:i + batch_size], model), fwd_hooks=[(hook, keep)],
                             prompts=prompts, stop_at_layer=stop)
        out.append(got[0])
    return torch.cat(out)


def label_entropy(class_mass: Tensor) -> Tensor:
    """Entropy (nats) of p_c = class mass / total mass for each latent (row); NaN for a latent
    with no mass. 0 = it fires on one class only; ln C = evenly over all C classes."""
    total = class_mass.sum(1, keepdim=True)
    p = class_mass / total.clamp(min=1e-30)
    h = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(1)
    return torch.where(total.squeeze(1) > 0, h, torch.full_like(h, float("nan")))


def label_std(class_mass: Tensor) -> Tensor:
    """Standard deviation over classes of p_c (as ``label_entropy``); NaN for a silent latent."""
    total = class_mass.sum(1, keepdim=True)
    p = class_mass / total.clamp(min=1e-30)
    return torch.where(total.squeeze(1) > 0, p.std(1), torch.full_like(p[:, 0], float("nan")))


@dataclass
class LatentStats:
    """Statistics of every latent of an SAE over a set of labelled images."""

    image_means: Tensor
    """[N, L] each image's token mean of each latent's code (input units): the official
    per-image activation, from which frequency, mean activation, reference images and label
    entropy are read."""
    labels: Tensor
    """[N] the images' classes."""
    n_classes: int
    class_counts: Tensor
    """[L, C] tokens with a code above tau, summed over each class's images (binarised,
    class-level activation)."""
    image_counts: Tensor
    """[N, L] (int16) each image's tokens with a code above tau: class counts of any subset of the
    images (``class_counts``), e.g. the halves of ``split_half_noise``."""
    tau: float
    """The binarisation threshold, in input units."""
    top_n: int = 10
    """Reference images per latent for the label entropy (the official 10)."""

    @property
    def frequency(self) -> Tensor:
        """[L] share of images whose token-mean code is positive."""
        return (self.image_means > 0).float().mean(0)

    @property
    def mean_activation(self) -> Tensor:
        """[L] mean token-mean code over the images where it is positive (0 if there are none)."""
        fired = (self.image_means > 0).sum(0)
        return self.image_means.sum(0) / fired.clamp(min=1)

    def top_images(self, latent: int, n: int | None = None) -> Tensor:
        """Indices of the ``n`` (default ``top_n``) images with the largest token mean of ``latent``
        (its reference images)."""
        return self.image_means[:, latent].argsort(descending=True, stable=True)[:n or self.top_n]

    @property
    def top_mass(self) -> Tensor:
        """[L, C] each latent's token means over its ``top_n`` reference images, summed by their
        class: what the label entropy weighs. Zero rows for a dataset of fewer than ``top_n`` images."""
        if len(self.image_means) < self.top_n:
            return torch.zeros(self.image_means.shape[1], self.n_classes)
        values, idx = self.image_means.topk(self.top_n, dim=0)  # [top_n, L]
        mass = torch.zeros(self.image_means.shape[1], self.n_classes)
        return mass.scatter_add_(1, self.labels[idx].T.contiguous(), values.T.contiguous())

    @property
    def label_entropy(self) -> Tensor:
        """[L] entropy of the activation-weighted labels of the reference images (NaN: no mass)."""
        return label_entropy(self.top_mass)

    @property
    def label_std(self) -> Tensor:
        return label_std(self.top_mass)

    @property
    def dataset_counts(self) -> Tensor:
        """[L] binarised counts summed over every class (dataset-level activation)."""
        return self.class_counts.sum(1)


def _images_per_chunk(acts: Tensor, sae: SAE, most: int = 250) -> int:
    """Images per chunk so that one chunk's dense codes stay under ~50M numbers (200 MB): all of
    ``most`` for the book's ViT, a few for CLIP's 197 tokens x 49,152 latents."""
    return max(1, min(most, 50_000_000 // (acts.shape[1] * sae.cfg.d_sae)))


@torch.no_grad()
def _codes(sae: SAE, acts: Tensor) -> Tensor:
    """Dense codes [n, tokens, L] of activations [n, tokens, d], in the SAE's normalised units."""
    n, t, d = acts.shape
    return sae.encode(to_device_of(acts.reshape(n * t, d), sae)).reshape(n, t, -1)


@torch.no_grad()
def latent_stats(sae: SAE, acts: Tensor, labels: Tensor, n_classes: int, tau: float,
                 chunk: int | None = None, top_n: int = 10) -> LatentStats:
    """``LatentStats`` of ``sae`` on activations [n_images, tokens, d] with image ``labels``;
    ``tau`` in input units (see the module's docstring)."""
    if acts.ndim != 3 or len(acts) != len(labels):
        raise ValueError(f"expected activations [images, tokens, d] and one label per image, got "
                         f"{list(acts.shape)} and {len(labels)} labels")
    chunk = chunk or _images_per_chunk(acts, sae)
    means, counts = [], []
    for i in range(0, len(acts), chunk):
        codes = _codes(sae, acts[i:i + chunk]) / sae.input_scale  # input units
        means.append(codes.mean(1).cpu())
        counts.append((codes > tau).sum(1).to(torch.int16).cpu())  # at most 32,767 tokens an image
    counts = torch.cat(counts)
    return LatentStats(image_means=torch.cat(means), labels=labels, n_classes=n_classes,
                       class_counts=class_counts(counts, labels, n_classes), image_counts=counts,
                       tau=tau, top_n=top_n)


def latent_stats_of(model, images: Tensor, hook: str, sae: SAE, labels: Tensor, n_classes: int, tau: float,
                    prompts=None) -> LatentStats:
    """``latent_stats`` of ``sae`` on the tokens ``harvest_tokens`` reads from ``model`` (adapted by
    ``prompts``, if given) at ``hook`` on ``images``: one call, so a chapter can cache it whole."""
    return latent_stats(sae, harvest_tokens(model, images, hook, prompts=prompts), labels, n_classes, tau)


def class_counts(image_counts: Tensor, labels: Tensor, n_classes: int) -> Tensor:
    """[L, C] class-level counts: per-image counts [N, L] summed over the images of each class."""
    out = torch.zeros(n_classes, image_counts.shape[1], dtype=torch.float64)
    return out.index_add_(0, labels, image_counts.double()).T.float().contiguous()


@torch.no_grad()
def patch_maps(sae: SAE, acts: Tensor, latent: int, grid: int) -> tuple[Tensor, Tensor]:
    """One latent on some images: (patch activations [n, grid, grid], CLS activations [n])."""
    codes = (_codes(sae, acts)[:, :, latent] / sae.input_scale).cpu()  # input units; prompts dropped
    return codes[:, 1:1 + grid ** 2].reshape(len(acts), grid, grid), codes[:, 0]


# ============================================================================ masking

@torch.no_grad()
def masked_reconstruction(sae: SAE, x: Tensor, keep: Tensor) -> Tensor:
    """The SAE's reconstruction of ``x`` [..., d] from the kept latents only.

    ``keep`` is a boolean mask over latents: [L] for every row, or one mask per leading index of
    ``x`` (e.g. [images, L] for x of [images, tokens, d]). All True gives the plain reconstruction;
    all False leaves b_dec alone (no latent contributes)."""
    if keep.shape[-1] != sae.cfg.d_sae:
        raise ValueError(f"keep has {keep.shape[-1]} entries per mask; the SAE has {sae.cfg.d_sae} latents")
    lead = x.shape[:-1]
    codes = sae.encode(to_device_of(x.reshape(-1, x.shape[-1]), sae)).reshape(*lead, sae.cfg.d_sae)
    return _decode_kept(sae, codes, keep).to(x.device)


def _decode_kept(sae: SAE, codes: Tensor, keep: Tensor) -> Tensor:
    """Reconstruction, in input units, from dense codes [..., L] with only ``keep`` latents."""
    mask = keep.to(codes.device, codes.dtype)
    while mask.ndim < codes.ndim:  # one mask per image: broadcast over its tokens
        mask = mask.unsqueeze(-2)
    x_hat_norm = (codes * mask) @ sae.decoder + sae.b_dec
    return x_hat_norm / sae.input_scale


@torch.no_grad()
def spliced_accuracy(model, layer: int, acts: Tensor, labels: Tensor, sae: SAE | None = None,
                     keep: Tensor | None = None, batch_size: int | None = None) -> float:
    """Accuracy of ``model`` when the residual stream after block ``layer`` (``acts``: CLS and
    patches, harvested without prompts) is replaced by the SAE's reconstruction (``keep``: the
    latents kept, [L] or [images, L]; None: the plain reconstruction). ``sae=None``: the clean
    model, run from the same activations."""
    batch_size = batch_size or (_images_per_chunk(acts, sae) if sae is not None else 250)
    correct = 0
    for i in range(0, len(acts), batch_size):
        x = acts[i:i + batch_size]
        if sae is not None:
            if keep is None:
                x = sae.reconstruct(to_device_of(x, sae))
            else:
                x = masked_reconstruction(sae, x, keep if keep.ndim == 1 else keep[i:i + batch_size])
        logits = model.classify(model.run_blocks(to_device_of(x, model), layer + 1))
        correct += int((logits.argmax(-1).cpu() == labels[i:i + batch_size]).sum())
    return correct / len(acts)


def masking_curves(model, layer: int, sae: SAE, acts: Tensor, labels: Tensor, rank_counts: Tensor,
                   ks: list[int], seed: int = 0, batch_size: int | None = None) -> pd.DataFrame:
    """Accuracy against k for the PatchSAE masking experiment.

    ``rank_counts`` [L, C] are class-level counts from *other* images (the ranking is never made
    on the images it is evaluated on). For each image, "class top-k" are the k latents with the
    most counts for its true class; "dataset top-k" the k with the most counts over all classes;
    "random k" a seeded random draw per k. "on" keeps only those latents, "off" removes them."""
    n_latents = sae.cfg.d_sae
    class_order = torch.argsort(-rank_counts, dim=0, stable=True)  # [L, C]
    dataset_order = torch.argsort(-rank_counts.sum(1), stable=True)
    rows, masks = [], []
    for k in ks:
        k = min(k, n_latents)
        by_class = torch.zeros(rank_counts.shape[1], n_latents, dtype=torch.bool)
        by_class.scatter_(1, class_order[:k].T.contiguous(), True)
        chosen = {"class top-k": by_class[labels],
                  "dataset top-k": torch.zeros(n_latents, dtype=torch.bool).index_fill_(
                      0, dataset_order[:k], True),
                  "random k": torch.zeros(n_latents, dtype=torch.bool).index_fill_(
                      0, torch.randperm(n_latents, generator=seeding.generator(
                          f"latent_controls:{k}", seed))[:k], True)}
        for latents, keep in chosen.items():
            for mode, mask in (("on", keep), ("off", ~keep)):
                rows.append({"k": k, "latents": latents, "mode": mode})
                masks.append(mask)
    # Each image's codes are computed once and decoded under every mask.
    batch_size = batch_size or _images_per_chunk(acts, sae)
    correct = torch.zeros(len(masks), dtype=torch.long)
    with torch.no_grad():
        for i in range(0, len(acts), batch_size):
            codes = to_device_of(_codes(sae, acts[i:i + batch_size]), sae)
            y = labels[i:i + batch_size]
            for j, mask in enumerate(masks):
                x_hat = _decode_kept(sae, codes, mask if mask.ndim == 1 else mask[i:i + batch_size])
                logits = model.classify(model.run_blocks(to_device_of(x_hat, model), layer + 1))
                correct[j] += int((logits.argmax(-1).cpu() == y).sum())
    return pd.DataFrame(rows).assign(accuracy=[c / len(acts) for c in correct.tolist()])


# ============================================================================ grouping

def rank_scores(counts: Tensor, by: str = "count") -> Tensor:
    """[L, C] what latents are ranked by within each class (``RANKINGS``): ``"count"``, the
    class-level counts themselves; ``"specific"``, count / the latent's dataset count (the share of
    its counts that fall on the class), 0 for a latent whose dataset count is under
    ``MIN_DATASET_SHARE`` of all counts. A score of 0 never ranks among a class's top latents."""
    if by == "count":
        return counts
    if by != "specific":
        raise ValueError(f"unknown ranking {by!r}; valid: {list(RANKINGS)}")
    total = counts.sum(1, keepdim=True)
    enough = total >= MIN_DATASET_SHARE * counts.sum()
    return torch.where(enough & (total > 0), counts / total.clamp(min=1e-30), torch.zeros_like(counts))


def class_ranks(counts: Tensor) -> Tensor:
    """[L, C] rank of each latent within each class by count (0 = largest; ties by latent index)."""
    order = torch.argsort(-counts, dim=0, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(0, order, torch.arange(len(counts))[:, None].expand_as(order).contiguous())
    return ranks


def _tops(counts: Tensor, top: int, by: str) -> Tensor:
    """[L, C] True where a latent is among the ``top`` of a class with a positive score."""
    scores = rank_scores(counts, by)
    return (class_ranks(scores) < top) & (scores > 0)


def group_latents(base_counts: Tensor, adapted_counts: Tensor, top: int, bottom: int,
                  by: str = "count") -> pd.DataFrame:
    """(latent, class) pairs grouped by class-level rank before and after adaptation.

    Within each class, latents are ranked by ``rank_scores(counts, by)`` under each model (a
    latent scoring 0 is ranked last). "high": in the top ``top`` for both; "high-to-low": in the
    base's top ``top`` but not in the adapted model's top ``bottom``; "low-to-high": the
    reverse. Returns one row per grouped pair: latent, class, base and adapted rank and count,
    group."""
    if base_counts.shape != adapted_counts.shape:
        raise ValueError(f"count matrices differ in shape: {list(base_counts.shape)} vs "
                         f"{list(adapted_counts.shape)}")
    if not 0 < top <= bottom:
        raise ValueError(f"need 0 < top <= bottom, got top={top}, bottom={bottom}")
    n = len(base_counts)
    ranks = []
    for counts in (base_counts, adapted_counts):
        scores = rank_scores(counts, by)
        r = class_ranks(scores)
        ranks.append(torch.where(scores > 0, r, torch.full_like(r, n)))
    rb, ra = ranks
    groups = {"high": (rb < top) & (ra < top), "high-to-low": (rb < top) & (ra >= bottom),
              "low-to-high": (rb >= bottom) & (ra < top)}
    rows = []
    for group, mask in groups.items():
        for latent, cls in torch.nonzero(mask).tolist():
            rows.append({"latent": latent, "class": cls, "base rank": int(rb[latent, cls]),
                         "adapted rank": int(ra[latent, cls]),
                         "base count": float(base_counts[latent, cls]),
                         "adapted count": float(adapted_counts[latent, cls]), "group": group})
    return pd.DataFrame(rows, columns=["latent", "class", "base rank", "adapted rank", "base count",
                                       "adapted count", "group"])


def existing_share(base_counts: Tensor, adapted_counts: Tensor, top: int, by: str = "count") -> float:
    """Of the latents in the adapted model's top ``top`` of any class, the fraction already in the
    base model's top ``top`` of some class of the same task: concepts re-used rather than new."""
    adapted = _tops(adapted_counts, top, by).any(1)
    return float((adapted & _tops(base_counts, top, by).any(1)).sum() / adapted.sum().clamp(min=1))


def chance_share(base_counts: Tensor, adapted_counts: Tensor, top: int, by: str = "count") -> float:
    """``existing_share`` of a random pick of latents (the random control): the share of the
    latents counted under the adapted model that are in the base model's top of some class."""
    live = adapted_counts.sum(1) > 0
    return float((_tops(base_counts, top, by).any(1) & live).sum() / live.sum().clamp(min=1))


def top_turnover(base_counts: Tensor, adapted_counts: Tensor, top: int,
                 by: str = "count") -> dict[str, float]:
    """How much each class's top ``top`` latents change with adaptation, without the gap between
    the "high" and "low" bounds of ``group_latents``: "new" is the share of the adapted model's
    top (latent, class) pairs that were not in the base model's top for that class, "dropped" the
    share of the base model's top pairs that left it."""
    base, adapted = _tops(base_counts, top, by), _tops(adapted_counts, top, by)
    return {"new": float((adapted & ~base).sum() / adapted.sum().clamp(min=1)),
            "dropped": float((base & ~adapted).sum() / base.sum().clamp(min=1))}


def split_half_noise(measure: Callable[[Tensor, Tensor], float], base: LatentStats, adapted: LatentStats,
                     labels: Tensor, splits: int = 20, seed: int = 0) -> float:
    """The root mean square, over ``splits`` random halvings of the images (within each class, so
    both halves keep the class balance), of ``measure`` on one half minus ``measure`` on the other.

    ``measure(base_counts, adapted_counts)`` is a summary of class-level counts such as
    ``existing_share`` or ``top_turnover``; ``base`` and ``adapted`` are statistics of the same
    images (``labels``) under the two models, and a half keeps its images under both. With noise
    that shrinks as 1/sqrt(images), the result is about twice the standard error of ``measure`` on
    all the images: the noise floor of a comparison with a fixed threshold, and, combined in
    quadrature with another task's, of a comparison of two tasks."""
    if splits < 1:
        raise ValueError(f"need at least one split, got {splits}")
    n_classes = base.class_counts.shape[1]
    gen = seeding.generator("image_splits:split_half_noise", seed)
    diffs = []
    for _ in range(splits):
        first = torch.zeros(len(labels), dtype=torch.bool)
        for c in range(n_classes):
            members = torch.nonzero(labels == c).flatten()
            first[members[torch.randperm(len(members), generator=gen)[:len(members) // 2]]] = True
        halves = [measure(class_counts(base.image_counts[h], labels[h], n_classes),
                          class_counts(adapted.image_counts[h], labels[h], n_classes))
                  for h in (first, ~first)]
        diffs.append(halves[0] - halves[1])
    return float(np.sqrt(np.mean(np.square(diffs))))


def group_summary(groups: pd.DataFrame) -> dict[str, float]:
    """Unique latents and (latent, class) pairs per group, and the share of changed pairs."""
    out: dict[str, float] = {}
    for g in GROUPS:
        part = groups[groups.group == g]
        out[f"{g} latents"] = part.latent.nunique()
        out[f"{g} pairs"] = len(part)
    changed = out["high-to-low pairs"] + out["low-to-high pairs"]
    out["changed share"] = changed / max(1, changed + out["high pairs"])
    return out


def to_numpy(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()
