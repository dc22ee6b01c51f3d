"""The sparse autoencoder: one model for every variant, which differ by their allocation rule.

    z     = W_enc (s x - b_dec) + b_enc          pre-activations; s scales x to unit mean squared norm
    codes = allocation_rule(z)                   a sparse subset of the positive entries of z
    x_hat = (W_dec^T codes + b_dec) / s          reconstruction, in the input's own units

``parametrisation="e2e_sae"`` is the SAE of Braun et al.'s code (ApolloResearch/e2e_sae,
``models/sparsifiers.py``) instead: no pre-encoder bias (z = W_enc x + b_enc), raw inputs (s = 1),
an untied encoder and both biases at nn.Linear's default initialisation, and an orthogonal decoder
whose rows (the dictionary) are normalised. The official code normalises the dictionary inside its
forward and lets the stored weights drift; here the rows are kept at unit norm as for every SAE
(below), which gives the same forward and, at unit norm, the same gradient direction.

Memory layout: ``encoder`` and ``decoder`` are both [d_sae, d_in], so row i of each belongs to
feature i (the SAELens export transposes the encoder). Decoder rows have unit norm: the trainer
projects out the gradient component parallel to each row before the Adam step and renormalises the
rows after it (Adam's update is not exactly tangent, so the projection alone would drift).

Sparse compute: the codes have k nonzeros per token on average, so decoding is a weighted sum of
k decoder rows per token (``embedding_bag`` with per-sample weights) instead of a dense matmul, and
the encoder's weight gradient touches only the kept entries (``_KeptPreacts``). The one dense
product left per step is the encoder's forward pass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saelib.core import distributed, seeding
from saelib.core.allocation import AllocationContext, get_rule, threshold_select
from saelib.core.devices import module_device, native_bfloat16, to_device_of
from saelib.core.validate import check, integer, real

# Above this fraction of kept entries the dense kernels are faster than the sparse ones
# (a ReLU SAE early in training keeps about half of all entries).
SPARSE_MAX_DENSITY = 0.05
AUX_LOSSES = ("none", "aux_k", "aux_zipf")
PARAMETRISATIONS = ("saelib", "e2e_sae")
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""The precisions saelib computes in (an SAE's encoder product, a harvest's forward pass)."""


@dataclass
class SAEConfig:
    """Everything that defines an SAE. Saved beside every checkpoint and checked on resume."""

    d_in: int
    """Width of the activations (the model's d_model at the hook)."""
    d_sae: int
    """Number of dictionary features."""
    rule: str = "topk"
    """Allocation rule: relu, topk, mutual_choice, feature_choice (or its capacity variants
    feature_choice_uniform and feature_choice_unfloored); see saelib.core.allocation."""
    k: int = 32
    """Active features per token: exact for topk, the batch average for feature/mutual choice.
    Unused by relu, whose sparsity is set by l1_coeff."""
    l1_coeff: float = 0.0
    """Weight of the L1 penalty on codes (relu). Decoder rows are unit norm, so weighting the
    penalty by decoder norms would change nothing."""
    aux: str = "none"
    """Auxiliary loss: none, aux_k (dead features regress the residual, Gao et al.) or aux_zipf
    (dead and under-utilised features, weighted by their shortfall from the Zipf target)."""
    aux_coeff: float = 1 / 32
    """Weight alpha of the auxiliary loss."""
    k_aux: int = 256
    """Features each token may use in the auxiliary reconstruction."""
    dead_after_tokens: int = 1_000_000
    """A feature that has not fired for this many training tokens counts as dead (Gao et al. use
    10M tokens at much larger token budgets than this book's)."""
    zipf_exponent: float = 1.0
    """Exponent s of the Zipf profile (density of rank r proportional to (r + 1) ** -s) used for
    Feature Choice capacities and the aux_zipf target."""
    stats_decay: float = 0.99
    """Per-step decay of the running averages (firing density, FC demand, inference thresholds)."""
    normalize_input: bool = True
    """Scale activations to unit mean squared norm (the scale is stored; outputs are unscaled)."""
    seed: int = 0
    """Seed of the weight initialisation (its own random stream, see saelib.core.seeding)."""
    encoder_dtype: str = "float32"
    """Precision of the encoder's dense product, the one dense GEMM of a step: float32, or bfloat16
    (twice as fast on CPUs with AVX-512 BF16 and on GPUs). Weights, gradients, the optimizer and the
    decoder stay float32; with bfloat16 the rule selects from bfloat16 pre-activations and the kept
    values carry bfloat16's ~3 significant digits. A device without bfloat16 hardware emulates the
    product at float32's speed (``saelib.core.devices.native_bfloat16``)."""
    parametrisation: str = "saelib"
    """saelib: tied initialisation (encoder = decoder), b_enc 0, b_dec at the inputs' geometric median
    and subtracted before encoding. e2e_sae: Braun et al.'s official SAE: untied encoder, orthogonal
    decoder, nn.Linear's default biases, no pre-encoder bias, raw inputs (needs normalize_input=False).
    Left out of the saved config when saelib, so the keys of earlier runs stay the same."""

    def __post_init__(self) -> None:
        rule = get_rule(self.rule)
        check(self, "d_in", integer(1), "must be an integer >= 1")
        check(self, "d_sae", integer(1), "must be an integer >= 1")
        if not rule.l1_penalty:
            check(self, "k", integer(1, self.d_sae), f"must be an integer in 1..d_sae={self.d_sae}")
        check(self, "aux", lambda v: v in AUX_LOSSES, f"unknown aux loss; valid: {list(AUX_LOSSES)}")
        check(self, "l1_coeff", real(0), "must be a finite number >= 0")
        check(self, "aux_coeff", real(0), "must be a finite number >= 0")
        check(self, "k_aux", integer(1), "must be an integer >= 1")
        check(self, "dead_after_tokens", integer(1), "must be an integer >= 1")
        check(self, "zipf_exponent", real(0), "must be a finite number >= 0")
        check(self, "stats_decay", real(0, 1, high_open=True), "must be a number in [0, 1)")
        check(self, "normalize_input", lambda v: isinstance(v, bool), "must be true or false")
        check(self, "seed", integer(0), "must be an integer >= 0")
        check(self, "encoder_dtype", lambda v: v in PRECISIONS, f"unknown encoder_dtype; valid: {list(PRECISIONS)}")
        check(self, "parametrisation", lambda v: v in PARAMETRISATIONS,
              f"unknown parametrisation; valid: {list(PARAMETRISATIONS)}")
        if self.parametrisation == "e2e_sae" and self.normalize_input:
            raise ValueError("SAEConfig.parametrisation='e2e_sae' reads raw inputs, as the official SAE does: "
                             "set normalize_input=False")

    @property
    def pre_encoder_bias(self) -> bool:
        """Whether b_dec is subtracted from the input before encoding (saelib's parametrisation)."""
        return self.parametrisation == "saelib"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["parametrisation"] == "saelib":
            del d["parametrisation"]  # so the keys and checkpoints of runs before the field stay the same
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SAEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown SAEConfig fields {unknown}; valid fields: {sorted(known)}")
        return cls(**d)


@dataclass
class SparseCodes:
    """The kept entries of the code matrix, grouped by token (row) in ascending order."""

    rows: Tensor
    cols: Tensor
    values: Tensor
    shape: tuple[int, int]

    def l0_per_token(self) -> Tensor:
        return torch.bincount(self.rows, minlength=self.shape[0])

    def fire_counts(self) -> Tensor:
        return torch.bincount(self.cols, minlength=self.shape[1])

    def to_dense(self) -> Tensor:
        dense = self.values.new_zeros(self.shape)
        return dense.index_put((self.rows, self.cols), self.values)


@dataclass
class SAEOutput:
    x_hat: Tensor
    """Reconstruction in the input's units."""
    codes: SparseCodes
    x_norm: Tensor = field(repr=False)
    """Input scaled to unit mean squared norm (the units the losses are computed in)."""
    x_hat_norm: Tensor = field(repr=False)
    preacts: Tensor = field(repr=False)
    """Pre-activations z (no gradient); kept for the auxiliary losses."""
    preact_bias: Tensor = field(repr=False)
    """b_enc - W_enc b_dec (b_enc without a pre-encoder bias), with gradient: what kept_values needs to
    gather more entries of z."""


class _KeptPreacts(torch.autograd.Function):
    """values = z[rows, cols] where z = x_norm @ encoder.T + bias, with a gradient that only
    touches the kept entries: grad encoder[i] = sum over kept (t, i) of g * x_norm[t]."""

    @staticmethod
    def forward(ctx, encoder, bias, x_norm, preacts, rows, cols):  # type: ignore[override]
        ctx.save_for_backward(x_norm, rows, cols)
        ctx.n_features = preacts.shape[1]
        return preacts[rows, cols].float()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x_norm, rows, cols = ctx.saved_tensors
        grad = grad.float()
        n_tokens, n_features = x_norm.shape[0], ctx.n_features
        grad_bias = grad.new_zeros(n_features).index_add_(0, cols, grad)
        if rows.numel() > SPARSE_MAX_DENSITY * n_tokens * n_features:
            dense = grad.new_zeros(n_tokens, n_features).index_put_((rows, cols), grad)
            grad_encoder = dense.T @ x_norm
        else:
            order = torch.argsort(cols)
            offsets = torch.searchsorted(cols[order], torch.arange(n_features, device=cols.device))
            grad_encoder = F.embedding_bag(rows[order], x_norm, offsets, mode="sum",
                                           per_sample_weights=grad[order])
        return grad_encoder, grad_bias, None, None, None, None


def positive_mass(rows: Tensor, chunk: int = 256) -> Tensor:
    """Sum of the positive entries of each row: rows.clamp(min=0).sum(1), bit for bit, but through a
    small reused buffer; a fresh full-size clamped copy (75 MB per step) costs twice the sum itself."""
    out = rows.new_empty(rows.shape[0], dtype=torch.float32)
    buf = rows.new_empty(min(chunk, rows.shape[0]), rows.shape[1])
    for start in range(0, rows.shape[0], chunk):
        part = buf[: min(chunk, rows.shape[0] - start)]
        torch.clamp(rows[start:start + chunk], min=0, out=part)
        torch.sum(part, 1, dtype=torch.float32, out=out[start:start + chunk])
    return out


class _SparseDecode(torch.autograd.Function):
    """x_hat[t] = sum over kept (t, i) of values * decoder[i] (rows sorted ascending), with a
    backward that reads only the kept entries. The decoder's gradient, grad decoder[i] = sum over
    kept (t, i) of values * grad[t], is the same bag sum with tokens and features swapped, about 2x
    faster on a CPU than embedding_bag's own weight gradient (which sorts and scatters)."""

    @staticmethod
    def forward(ctx, values, decoder, rows, cols, n_tokens):  # type: ignore[override]
        offsets = torch.searchsorted(rows, torch.arange(n_tokens, device=rows.device))
        ctx.save_for_backward(values, decoder, rows, cols, offsets)
        return F.embedding_bag(cols, decoder, offsets, mode="sum", per_sample_weights=values)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        values, decoder, rows, cols, offsets = ctx.saved_tensors
        grad, grad_values, grad_decoder = grad.contiguous(), None, None
        if ctx.needs_input_grad[0]:  # <grad[t], decoder[i]> per kept entry: embedding_bag's own kernel
            grad_values = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad, decoder, cols, offsets, rows, 0, -1)
        if ctx.needs_input_grad[1]:
            order = torch.argsort(cols)
            by_feature = torch.searchsorted(cols[order], torch.arange(decoder.shape[0], device=cols.device))
            grad_decoder = F.embedding_bag(rows[order], grad, by_feature, mode="sum",
                                           per_sample_weights=values[order])
        return grad_values, grad_decoder, None, None, None


def decode_sparse(rows: Tensor, cols: Tensor, values: Tensor, decoder: Tensor, n_tokens: int) -> Tensor:
    """sum over kept (t, i) of values * decoder[i], per token t (rows sorted ascending)."""
    if rows.numel() > SPARSE_MAX_DENSITY * n_tokens * decoder.shape[0]:
        dense = values.new_zeros(n_tokens, decoder.shape[0]).index_put((rows, cols), values)
        return dense @ decoder
    return _SparseDecode.apply(values, decoder, rows, cols, n_tokens)


def geometric_median(x: Tensor, iters: int = 50, eps: float = 1e-8) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to the rows."""
    median = x.mean(0)
    for _ in range(iters):
        weights = 1.0 / (x - median).norm(dim=1).clamp(min=eps)
        updated = (weights[:, None] * x).sum(0) / weights.sum()
        if (updated - median).norm() < 1e-6 * median.norm().clamp(min=eps):
            return updated
        median = updated
    return median


def _e2e_sae_init(d_in: int, d_sae: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(decoder, encoder, b_enc, b_dec) as the official SAE starts: an orthogonal [d_sae, d_in] decoder
    (orthonormal columns when d_sae > d_in) whose rows are then the normalised dictionary; encoder
    and biases as nn.Linear initialises them, uniform in +-1/sqrt(fan_in) (kaiming_uniform with
    a = sqrt(5) gives exactly that bound for the weight)."""
    decoder = nn.init.orthogonal_(torch.empty(d_sae, d_in), generator=gen)
    decoder /= decoder.norm(dim=1, keepdim=True)

    def uniform(*shape: int, fan_in: int) -> Tensor:
        return (torch.rand(*shape, generator=gen) * 2 - 1) / fan_in ** 0.5

    return decoder, uniform(d_sae, d_in, fan_in=d_in), uniform(d_sae, fan_in=d_in), uniform(d_in, fan_in=d_sae)


class SAE(nn.Module):
    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        self.rule = get_rule(cfg.rule)
        gen = seeding.generator("sae_init", cfg.seed)
        if cfg.parametrisation == "saelib":
            decoder = torch.randn(cfg.d_sae, cfg.d_in, generator=gen)
            decoder /= decoder.norm(dim=1, keepdim=True)
            # Tied initialisation (Gao et al.): each feature starts by reading its own direction.
            encoder, b_enc, b_dec = decoder.clone(), torch.zeros(cfg.d_sae), torch.zeros(cfg.d_in)
        else:
            decoder, encoder, b_enc, b_dec = _e2e_sae_init(cfg.d_in, cfg.d_sae, gen)
        self.decoder = nn.Parameter(decoder)
        self.encoder = nn.Parameter(encoder)
        self.b_enc = nn.Parameter(b_enc)
        self.b_dec = nn.Parameter(b_dec)
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("density", torch.zeros(cfg.d_sae))
        """Running firing frequency per token of each feature (decayed per step)."""
        self.register_buffer("demand", torch.zeros(cfg.d_sae))
        """Running positive pre-activation mass per token: how much the data asks for a feature.
        Feature Choice ranks features by it (ranking by firing density would freeze the initial
        order, since FC caps how often a feature may fire)."""
        self.register_buffer("tokens_since_fired", torch.zeros(cfg.d_sae, dtype=torch.long))
        self.register_buffer("threshold", torch.full((cfg.d_sae,), float("inf")))
        """Inference thresholds of batch-level rules (inf = never observed firing)."""

    @property
    def device(self) -> torch.device:
        """Where the SAE's parameters are: the device its input must be on."""
        return module_device(self)

    # ----------------------------------------------------------------------------- set-up
    @torch.no_grad()
    def init_from_sample(self, x: Tensor) -> None:
        """Set the input scale and put b_dec at the geometric median of a sample of activations
        (saelib's parametrisation; the e2e_sae initialisation does not depend on the data)."""
        self._check_input(x)
        if not self.cfg.pre_encoder_bias:
            return
        if self.cfg.normalize_input:
            self.input_scale.fill_(float(x.pow(2).sum(1).mean().rsqrt()))
        self.b_dec.copy_(geometric_median(x * self.input_scale))

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.cfg.d_in:
            raise ValueError(
                f"expected activations of shape [tokens, {self.cfg.d_in}], got {list(x.shape)}; "
                "is this the hook point (and model) the SAE was built for?")

    # ----------------------------------------------------------------------------- forward
    def feature_rank(self) -> Tensor:
        """Rank of each feature by demand (0 = most demanded; ties by index)."""
        order = torch.argsort(-self.demand, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order), device=order.device)
        return rank

    def preactivations(self, x_norm: Tensor) -> tuple[Tensor, Tensor]:
        """(z without gradient, in ``cfg.encoder_dtype``; effective bias b_enc - W_enc b_dec, or b_enc
        without a pre-encoder bias, with gradient, float32)."""
        bias = self.b_enc - self.encoder @ self.b_dec if self.cfg.pre_encoder_bias else self.b_enc
        with torch.no_grad():
            dtype = PRECISIONS[self.cfg.encoder_dtype]
            # Without bfloat16 hardware the same product is faster emulated: operands rounded to
            # bfloat16, multiplied and accumulated in float32, the result rounded (as the hardware does).
            emulate = dtype == torch.bfloat16 and not native_bfloat16(x_norm.device)
            encoder, x_in, b = (t.to(dtype).float() if emulate else t.to(dtype)
                                for t in (self.encoder, x_norm, bias))
            if self.rule.feature_major:
                z = torch.addmm(b[:, None], encoder, x_in.T).T
            else:
                z = torch.addmm(b, x_in, encoder.T)
        return (z.to(dtype) if emulate else z), bias

    def kept_values(self, x_norm: Tensor, z: Tensor, bias: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        """z[rows, cols] with the sparse gradient to the encoder and preact_bias."""
        return _KeptPreacts.apply(self.encoder, bias, x_norm, z, rows, cols)

    def forward(self, x: Tensor) -> SAEOutput:
        """Encode and decode a batch [tokens, d_in]. In training mode, batch-level rules allocate
        over the batch and the running statistics are updated; in eval mode they encode each token
        by the tracked thresholds, so a single token encodes deterministically."""
        self._check_input(x)
        x_norm = x * self.input_scale
        z, bias = self.preactivations(x_norm)
        if self.training or self.rule.inference_threshold == "none":
            ctx = AllocationContext(k=self.cfg.k, zipf_exponent=self.cfg.zipf_exponent,
                                    feature_rank=self.feature_rank() if self.rule.feature_major else None)
            kept = self.rule.select(z, ctx)
        else:
            kept = threshold_select(z, self.threshold)
        rows, cols = kept // self.cfg.d_sae, kept % self.cfg.d_sae
        values = self.kept_values(x_norm, z, bias, rows, cols)
        x_hat_norm = decode_sparse(rows, cols, values, self.decoder, x.shape[0]) + self.b_dec
        codes = SparseCodes(rows, cols, values, (x.shape[0], self.cfg.d_sae))
        if self.training:
            self._update_statistics(codes, z)
        return SAEOutput(x_hat_norm / self.input_scale, codes, x_norm, x_hat_norm, z, bias)

    @torch.no_grad()
    def _update_statistics(self, codes: SparseCodes, z: Tensor) -> None:
        """Running statistics over the (global) batch; identical on every data-parallel rank."""
        decay = self.cfg.stats_decay
        n_tokens = codes.shape[0] * distributed.world_size()
        fired = distributed.all_reduce(codes.fire_counts())
        self.density.mul_(decay).add_(fired / n_tokens, alpha=1 - decay)
        self.tokens_since_fired.add_(n_tokens).masked_fill_(fired > 0, 0)
        if self.rule.feature_major:
            mass = distributed.all_reduce(positive_mass(z.t()))
            self.demand.mul_(decay).add_(mass / n_tokens, alpha=1 - decay)
        if self.rule.inference_threshold == "none":
            return
        # Smallest kept value per feature (inf where a feature kept nothing).
        smallest = torch.full_like(self.threshold, float("inf")).scatter_reduce(
            0, codes.cols, codes.values.detach(), reduce="amin")
        if self.rule.inference_threshold == "global":
            smallest = smallest.min().expand_as(smallest).clone()
        distributed.all_reduce(smallest, "min")
        seen = torch.isfinite(smallest)
        blended = torch.where(torch.isinf(self.threshold), smallest,
                              decay * self.threshold + (1 - decay) * smallest)
        self.threshold.copy_(torch.where(seen, blended, self.threshold))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Reconstruction of activations of any leading shape [..., d_in] (inference mode), on
        ``x``'s device (the SAE's own may differ)."""
        was_training = self.training
        self.eval()
        try:
            return self(to_device_of(x.reshape(-1, x.shape[-1]), self)).x_hat.reshape(x.shape).to(x.device)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Dense codes [tokens, d_sae] (inference mode, normalised units), on ``x``'s device."""
        was_training = self.training
        self.eval()
        try:
            return self(to_device_of(x, self)).codes.to_dense().to(x.device)
        finally:
            self.train(was_training)

    # ----------------------------------------------------------------------------- unit norm
    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        if self.decoder.grad is not None:
            g = self.decoder.grad
            g -= (g * self.decoder).sum(1, keepdim=True) * self.decoder

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.decoder /= self.decoder.norm(dim=1, keepdim=True)
