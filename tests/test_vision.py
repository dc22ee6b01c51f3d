"""Chapter 5's pieces: the image readers, the ViT's hook points, prompt adaptation with a frozen
backbone and head, and the PatchSAE analyses (masking, the official statistics, grouping, devices)."""

import gzip
import struct

import numpy as np
import pytest
import torch

from saelib.core.sae import SAE, SAEConfig
from saelib.studies import patch_analysis
from saelib.studies.patch_analysis import (
    LatentStats,
    chance_share,
    existing_share,
    group_latents,
    group_summary,
    harvest_tokens,
    label_entropy,
    latent_stats,
    masked_reconstruction,
    masking_curves,
    patch_maps,
    rank_scores,
    spliced_accuracy,
    split_half_noise,
    top_turnover,
)
from saelib.subjects.prompts import (
    OPTIMIZERS,
    DeepPrompts,
    PromptConfig,
    ZeroShotHead,
    adapt,
    backbone_digest,
    load_task,
)
from saelib.subjects.vision import (
    FASHION_DIR,
    FASHION_PROMPT_NAMES,
    CLIPTextHead,
    HookedCLIPVision,
    HookedViT,
    IdxFormatError,
    ViTConfig,
    load_fashion_mnist,
    read_idx,
    train_vit,
)

TINY = ViTConfig(d_model=16, n_layers=2, n_heads=2, d_mlp=32, epochs=0.012, batch_size=32, warmup_steps=5)


def images(n, seed=0):
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- IDX reader

def idx_bytes(array: np.ndarray) -> bytes:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_read_idx_round_trips_plain_and_gzip(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.idx").write_bytes(idx_bytes(a))
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress(idx_bytes(a)))
    assert np.array_equal(read_idx(tmp_path / "a.idx"), a)
    assert np.array_equal(read_idx(tmp_path / "a.idx.gz"), a)


def test_read_idx_rejects_truncated_and_corrupt_files_clearly(tmp_path):
    a = np.arange(5 * 28 * 28, dtype=np.int64).astype(np.uint8).reshape(5, 28, 28)
    good = idx_bytes(a)
    (tmp_path / "short.gz").write_bytes(gzip.compress(good[:-100]))
    with pytest.raises(IdxFormatError, match=r"short.gz is truncated: .*shape \[5, 28, 28\].*reinstall"):
        read_idx(tmp_path / "short.gz")
    (tmp_path / "long").write_bytes(good + b"\x00")
    with pytest.raises(IdxFormatError, match="longer than its header says"):
        read_idx(tmp_path / "long")
    packed = gzip.compress(good)
    (tmp_path / "cut.gz").write_bytes(packed[: len(packed) // 2])  # a download cut short
    with pytest.raises(IdxFormatError, match=r"cut.gz is a damaged gzip file.*dataset-fashion-mnist"):
        read_idx(tmp_path / "cut.gz")
    flipped = bytearray(packed)
    flipped[len(flipped) // 2] ^= 0xFF  # a corrupt byte inside the compressed stream
    (tmp_path / "flip.gz").write_bytes(bytes(flipped))
    with pytest.raises(IdxFormatError, match="damaged gzip file"):
        read_idx(tmp_path / "flip.gz")
    (tmp_path / "text.gz").write_bytes(gzip.compress(b"hello, not an idx file"))
    with pytest.raises(IdxFormatError, match="is not an IDX file"):
        read_idx(tmp_path / "text.gz")
    (tmp_path / "head").write_bytes(good[:9])
    with pytest.raises(IdxFormatError, match="truncated inside its header"):
        read_idx(tmp_path / "head")


def test_fashion_reader_names_the_missing_package_and_mismatched_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test", root=tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros((4, 28, 28)))))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(3))))
    with pytest.raises(IdxFormatError, match="do not form an image set"):
        load_fashion_mnist("test", root=tmp_path)
    with pytest.raises(ValueError, match="unknown split 'val'"):
        load_fashion_mnist("val")


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_test_set():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10_000, 1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() < x.max() <= 1
    assert torch.equal(torch.bincount(y), torch.full((10,), 1000))


def test_vit_hook_names_and_shapes():
    model = HookedViT(TINY)
    x = images(3)
    logits, cache = model.run_with_cache(x)
    assert logits.shape == (3, 10)
    for i in range(TINY.n_layers):
        for name in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post"):
            assert cache[f"blocks.{i}.{name}"].shape == (3, 1 + 7 * 7, 16), name
        assert cache[f"blocks.{i}.attn.hook_pattern"].shape == (3, 2, 50, 50)
    assert cache["hook_embed"].shape == (3, 49, 16) and cache["ln_final.hook_normalized"].shape == (3, 50, 16)
    # stop_at_layer returns the residual stream after that many blocks, as the hook sees it
    assert torch.allclose(model(x, stop_at_layer=1), cache["blocks.0.hook_resid_post"])
    # deep prompts follow the image tokens; positions 0..49 stay CLS and patches
    prompts = DeepPrompts(16, n_tokens=3, depth=2)
    _, cache = model.run_with_cache(x, prompts=prompts)
    assert cache["hook_pos_embed"].shape == (3, 50, 16)
    assert cache["blocks.0.hook_resid_pre"].shape == (3, 53, 16)  # block 0's prompts appended
    assert torch.equal(cache["blocks.0.hook_resid_pre"][:, 50:], prompts.tokens[0].expand(3, -1, -1))
    assert torch.equal(cache["blocks.1.hook_resid_pre"][:, 50:], prompts.tokens[1].expand(3, -1, -1))
    with pytest.raises(ValueError, match=r"expected images \[batch, 1, 28, 28\]"):
        model(torch.rand(2, 28, 28))


def test_vit_pretraining_resumes_exactly(tmp_path):
    straight = train_vit(TINY, tmp_path / "a", progress=False, resume_every=5)
    train_vit(TINY, tmp_path / "b", progress=False, resume_every=5, stop_at_step=10)
    assert (tmp_path / "b" / "resume.pt").exists() and not (tmp_path / "b" / "model.pt").exists()
    resumed = train_vit(TINY, tmp_path / "b", progress=False, resume_every=5)
    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="different configuration"):
        train_vit(TINY, tmp_path / "a", progress=False, lr=1e-2)
    # bfloat16 autocast: other weights, still finite, and a finished record
    half = train_vit(TINY, tmp_path / "c", progress=False, precision="bfloat16")
    c = torch.load(half / "model.pt", weights_only=True)
    assert all(torch.isfinite(c[k]).all() for k in c) and not torch.equal(a["head.weight"], c["head.weight"])
    with pytest.raises(ValueError, match="precision must be"):
        ViTConfig(precision="float16")


# ----------------------------------------------------------------------------- prompts

def test_zero_shot_head_is_the_pretraining_heads_logsumexp_per_group():
    head = torch.nn.Linear(8, 5)
    features = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    zs = ZeroShotHead(head, ((3,), (0, 4), (1,)))
    logits = head(features)
    expected = torch.stack([logits[:, 3], torch.log(logits[:, 0].exp() + logits[:, 4].exp()), logits[:, 1]], -1)
    assert torch.allclose(zs(features), expected, atol=1e-6) and zs.out_features == 3
    with pytest.raises(ValueError, match="distinct classes"):
        ZeroShotHead(head, ((0, 1), (1,)))


def test_prompt_adaptation_leaves_the_backbone_and_the_head_bit_identical():
    torch.manual_seed(0)
    model = HookedViT(TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
    x, y = images(48), torch.arange(48) % 3
    head = ZeroShotHead(model.head, ((0,), (4, 5), (9,)))
    base = PromptConfig(n_tokens=2, depth=2, epochs=3, batch_size=16, lr=1e-2)
    learned = {}
    for optimizer in OPTIMIZERS:  # the book's AdamW and MaPLe's SGD
        result = adapt(model, x, y, head, base.with_optimizer(optimizer), cache=False, progress=False)
        after = model.state_dict()  # the head is the model's own: its weights are in here too
        assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == grads_before
        # ... while the prompts did learn, and only they
        assert not torch.equal(result.prompts.tokens, DeepPrompts(16, 2, 2).tokens)
        assert len(result.history) == 3 and not result.prompts.tokens.requires_grad
        learned[optimizer] = result.prompts.tokens
    assert not torch.equal(learned["adamw"], learned["maple_sgd"])
    sgd = base.with_optimizer("maple_sgd")
    assert (sgd.optimizer, sgd.momentum, sgd.weight_decay, sgd.warmup_epochs, sgd.warmup_lr) == \
        ("sgd", 0.9, 5e-4, 1, 1e-5)
    with pytest.raises(ValueError, match="unknown prompt optimizer 'adam'; valid: \\['adamw', 'maple_sgd'\\]"):
        base.with_optimizer("adam")


def test_prompt_adaptation_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELIB_CACHE", str(tmp_path))
    model = HookedViT(TINY)
    x, y = images(32), torch.arange(32) % 2
    cfg = PromptConfig(n_tokens=2, depth=1, epochs=2, batch_size=16)
    head = ZeroShotHead(model.head, ((0,), (1,)))
    first = adapt(model, x, y, head, cfg, progress=False)
    again = adapt(model, x, y, head, cfg, progress=False)
    assert torch.equal(first.prompts.tokens, again.prompts.tokens) and again.seconds == first.seconds
    digest = backbone_digest(model)
    assert digest == backbone_digest(HookedViT(TINY))  # same seed, same weights: same cache key


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_target_tasks_are_matched_and_the_inverted_one_shows_the_same_images():
    near, far = (load_task(n, shots=5, test_per_class=7) for n in ("fashion-upper", "fashion-upper-inverted"))
    assert near.classes == far.classes == ("T-shirt/top", "pullover", "coat", "shirt")
    assert near.groups == far.groups == ((0,), (2,), (4,), (6,))
    assert torch.equal(near.train_labels, far.train_labels) and torch.equal(near.test_labels, far.test_labels)
    assert torch.bincount(near.train_labels).tolist() == [5] * 4
    assert torch.bincount(near.test_labels).tolist() == [7] * 4
    assert torch.allclose(far.test_images, 1 - near.test_images)
    assert torch.allclose(far.train_images, 1 - near.train_images)


# ----------------------------------------------------------------------------- PatchSAE analyses

def relu_sae(d_in=16, d_sae=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(d_in, d_sae, rule="relu", l1_coeff=0.1))
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(d_sae, generator=gen) * 0.2)
        sae.init_from_sample(torch.randn(256, d_in, generator=gen) * 2 + 0.5)
    return sae


def test_masking_all_on_is_the_plain_splice_and_all_off_removes_every_latent():
    sae = relu_sae()
    x = torch.randn(5, 50, 16, generator=torch.Generator().manual_seed(1)) * 2
    on = masked_reconstruction(sae, x, torch.ones(64, dtype=torch.bool))
    assert torch.allclose(on, sae.reconstruct(x), atol=1e-5)
    off = masked_reconstruction(sae, x, torch.zeros(64, dtype=torch.bool))
    assert torch.allclose(off, (sae.b_dec / sae.input_scale).expand_as(x), atol=1e-6)
    # one latent's contribution is exactly its code times its decoder row
    only = masked_reconstruction(sae, x, torch.arange(64) == 7)
    codes = sae.encode(x.reshape(-1, 16))[:, 7].reshape(5, 50, 1)
    assert torch.allclose(only - off, codes * sae.decoder[7] / sae.input_scale, atol=1e-5)
    # per-image masks broadcast over each image's tokens
    per_image = torch.zeros(5, 64, dtype=torch.bool)
    per_image[2] = True
    mixed = masked_reconstruction(sae, x, per_image)
    assert torch.allclose(mixed[2], on[2], atol=1e-6) and torch.allclose(mixed[0], off[0], atol=1e-6)
    with pytest.raises(ValueError, match="the SAE has 64 latents"):
        masked_reconstruction(sae, x, torch.ones(10, dtype=torch.bool))


def test_spliced_accuracy_and_masking_curves_on_a_vit():
    torch.manual_seed(0)
    model = HookedViT(TINY).eval()
    x, y = images(40), torch.arange(40) % 10
    acts = model(x, stop_at_layer=1)
    sae = SAE(SAEConfig(16, 64, rule="relu", l1_coeff=0.1))
    sae.init_from_sample(acts.reshape(-1, 16))
    truth = (model(x).argmax(-1) == y).float().mean().item()
    assert spliced_accuracy(model, 0, acts, y) == pytest.approx(truth)
    plain = spliced_accuracy(model, 0, acts, y, sae)
    assert spliced_accuracy(model, 0, acts, y, sae, torch.ones(64, dtype=torch.bool)) == pytest.approx(plain)
    counts = torch.rand(64, 10, generator=torch.Generator().manual_seed(2))
    curves = masking_curves(model, 0, sae, acts, y, counts, [1, 5, 64])
    assert set(curves.latents) == {"class top-k", "dataset top-k", "random k"} and len(curves) == 18
    at_all = curves[curves.k == 64]
    assert np.allclose(at_all[at_all["mode"] == "on"].accuracy, plain)
    # one row by hand: every image keeps the 5 latents its true class counts most
    top5 = torch.zeros(10, 64, dtype=torch.bool).scatter_(1, counts.argsort(0, descending=True)[:5].T, True)
    row = curves[(curves.k == 5) & (curves.latents == "class top-k") & (curves["mode"] == "off")]
    assert row.accuracy.item() == pytest.approx(spliced_accuracy(model, 0, acts, y, sae, ~top5[y]))


def official_statistics(codes, labels, n_top=10, eps=1e-9):
    """The official code's definitions (dynamical-inference/patchsae: tasks/compute_sae_feature_data.py
    and analysis/utils.py calculate_entropy), written out by hand, latent by latent, with loops."""
    n, _, n_latents = codes.shape
    per_image = codes.mean(1)  # get_sae_activations: the mean over the sequence
    frequency, mean_act, entropy, top = [], [], [], []
    for j in range(n_latents):
        v = [float(per_image[i, j]) for i in range(n)]
        fired = sum(1 for a in v if a > 0)
        frequency.append(fired / n)  # sae_sparsity / images processed
        mean_act.append(sum(v) / fired if fired else float("nan"))  # sae_mean_acts / sae_sparsity
        order = sorted(range(n), key=lambda i: -v[i])[:n_top]  # max_activating_image_indices
        top.append(order)
        mass = {}
        for i in order:
            mass[int(labels[i])] = mass.get(int(labels[i]), 0.0) + v[i]
        total = sum(mass.values())
        entropy.append(-sum(m / total * np.log(m / total + eps) for m in mass.values()) if total > 0 else float("nan"))
    return np.array(frequency), np.array(mean_act), np.array(entropy), top


def test_latent_stats_follow_the_official_definitions_on_a_tiny_example():
    sae = relu_sae()
    x = torch.randn(12, 7, 16, generator=torch.Generator().manual_seed(3)) * 2
    y = torch.tensor([0, 1, 1, 2, 0, 2, 1, 0, 0, 2, 1, 1])
    tau = 0.3  # in input units, as the official threshold on raw codes
    st = latent_stats(sae, x, y, 3, tau=tau, chunk=5)
    codes = sae.encode(x.reshape(-1, 16)).reshape(12, 7, 64) / sae.input_scale  # input units
    frequency, mean_act, entropy, top = official_statistics(codes, y)
    fired = frequency > 0
    assert np.allclose(st.frequency.numpy(), frequency)
    assert np.allclose(st.mean_activation.numpy()[fired], mean_act[fired], rtol=1e-5)
    assert np.allclose(st.label_entropy.numpy(), entropy, atol=1e-5, equal_nan=True)
    assert all(st.top_images(j).tolist() == top[j] for j in range(64) if fired[j])
    # class-level counts: codes above tau, summed over tokens (prompt tokens included), then images
    for c in range(3):
        assert torch.allclose(st.class_counts[:, c], (codes[y == c] > tau).sum((0, 1)).float())
    assert torch.equal(st.image_counts, (codes > tau).sum(1).to(torch.int16))
    maps, cls_codes = patch_maps(sae, x[:2, :5], 5, 2)  # CLS + a 2x2 grid; a prompt token after them
    assert maps.shape == (2, 2, 2) and torch.allclose(maps.reshape(2, 4), codes[:2, 1:5, 5], atol=1e-6)
    assert torch.allclose(cls_codes, codes[:2, 0, 5], atol=1e-6)


def test_tau_is_in_input_units_so_a_rescaled_sae_counts_alike():
    """An SAE of the same activations at another input scale has other normalised codes, but the
    same codes in input units, so the same counts."""
    sae = relu_sae()
    x = torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(5)) * 2
    y = torch.tensor([0, 1, 0, 1])
    scaled = relu_sae()
    with torch.no_grad():
        scaled.input_scale.mul_(3.0)
        scaled.b_dec.mul_(3.0)
        scaled.b_enc.mul_(3.0)
    a, b = latent_stats(sae, x, y, 2, tau=0.3), latent_stats(scaled, x, y, 2, tau=0.3)
    assert torch.equal(a.class_counts, b.class_counts)
    assert torch.allclose(a.image_means, b.image_means, atol=1e-5)


def test_every_analysis_moves_its_data_to_the_saes_and_the_models_device(monkeypatch):
    """SAE and model may sit on another device than the activation tables (a gpu build keeps its
    tables in CPU memory): each analysis hands its data to saelib.core.devices.to_device_of for the
    module that reads it. Checked here by spying on that one helper (a CPU-only machine has no
    second device; the CUDA test of tests/test_devices.py runs the same calls on a GPU)."""
    import saelib.core.metrics as metrics
    from saelib.core.metrics import evaluate

    moved = []
    real = patch_analysis.to_device_of

    def spy(t, module):
        moved.append(module)
        return real(t, module)

    monkeypatch.setattr(patch_analysis, "to_device_of", spy)
    monkeypatch.setattr(metrics, "to_device_of", spy)
    model = HookedViT(TINY).eval()
    x, y = images(6), torch.arange(6) % 2
    acts = harvest_tokens(model, x, "blocks.0.hook_resid_post")
    assert moved == [model]
    sae = SAE(SAEConfig(16, 32, rule="relu", l1_coeff=0.1))
    sae.init_from_sample(acts.reshape(-1, 16))
    calls = {
        "latent_stats": lambda: latent_stats(sae, acts, y, 2, tau=0.1),
        "patch_maps": lambda: patch_maps(sae, acts, 3, TINY.grid),
        "masked_reconstruction": lambda: masked_reconstruction(sae, acts, torch.ones(32, dtype=torch.bool)),
        "spliced_accuracy": lambda: spliced_accuracy(model, 0, acts, y, sae),
        "masking_curves": lambda: masking_curves(model, 0, sae, acts, y, torch.rand(32, 2), [1, 32]),
        "evaluate": lambda: evaluate(sae, acts.reshape(-1, 16)),
    }
    for name, call in calls.items():
        moved.clear()
        call()
        assert sae in moved, f"{name} reads the SAE without moving its data to the SAE's device"
        if name in ("spliced_accuracy", "masking_curves"):
            assert model in moved, f"{name} runs the model without moving its data to the model's device"


def test_label_entropy_edge_cases():
    mass = torch.tensor([[1.0, 0, 0], [1, 1, 1], [0, 0, 0], [3, 1, 0]])
    h = label_entropy(mass)
    assert h[0] == 0 and torch.isclose(h[1], torch.log(torch.tensor(3.0))) and torch.isnan(h[2])
    p = torch.tensor([0.75, 0.25])
    assert torch.isclose(h[3], -(p * p.log()).sum())


def test_grouping_by_class_ranks():
    base = torch.tensor([[9.0, 0], [8, 1], [0, 7], [1, 0], [0, 0]])
    adapted = torch.tensor([[9.0, 0], [0, 1], [6, 7], [1, 0], [0, 5]])
    g = group_latents(base, adapted, top=2, bottom=3)
    pairs = {(r.latent, r["class"]): r.group for _, r in g.iterrows()}
    assert pairs[(0, 0)] == "high" and pairs[(2, 1)] == "high"
    assert pairs[(1, 0)] == "high-to-low"  # base rank 1, no count after: ranked last
    assert pairs[(2, 0)] == "low-to-high" and pairs[(4, 1)] == "low-to-high"
    summary = group_summary(g)
    assert summary["high pairs"] == 2 and summary["low-to-high latents"] == 2
    assert summary["changed share"] == pytest.approx(3 / 5)
    # adapted tops: {0, 2} for class 0, {2, 4} for class 1; base tops: {0, 1} and {2, 1}
    assert existing_share(base, adapted, top=2) == pytest.approx(2 / 3)
    turnover = top_turnover(base, adapted, top=2)  # base tops (0,0) (1,0) (2,1) (1,1); adapted (0,0) (2,0) (2,1) (4,1)
    assert turnover == {"new": pytest.approx(2 / 4), "dropped": pytest.approx(2 / 4)}
    with pytest.raises(ValueError, match="0 < top <= bottom"):
        group_latents(base, adapted, top=3, bottom=2)
    # a random pick of the 5 latents counted after adaptation hits a base top ({0, 1, 2}) 3 times in 5
    assert chance_share(base, adapted, top=2) == pytest.approx(3 / 5)


def test_class_specific_ranking_divides_by_the_dataset_count():
    counts = torch.tensor([[90.0, 90], [10, 0], [0, 5], [1e-4, 0]])
    spec = rank_scores(counts, "specific")
    # latent 0 tops both classes by raw count but is class-blind; latent 3 is too rare to rank
    assert torch.allclose(spec, torch.tensor([[0.5, 0.5], [1, 0], [0, 1], [0, 0]]))
    assert existing_share(counts, counts, top=1, by="specific") == 1.0
    assert top_turnover(counts, counts[[0, 2, 1, 3]], top=1, by="specific") == {"new": 1.0, "dropped": 1.0}
    with pytest.raises(ValueError, match="unknown ranking"):
        rank_scores(counts, "raw")


def counts_only(image_counts, labels):
    """LatentStats with only the per-image and class counts set (what split_half_noise reads)."""
    n_classes = int(labels.max()) + 1
    by_class = torch.zeros(n_classes, image_counts.shape[1]).index_add_(0, labels, image_counts.float()).T
    return LatentStats(image_means=None, labels=labels, n_classes=n_classes, class_counts=by_class,
                       image_counts=image_counts, tau=0.0)


def test_split_half_noise_is_the_rms_difference_between_halves():
    labels = torch.tensor([0, 0])
    base = counts_only(torch.tensor([[1], [1]], dtype=torch.int16), labels)
    adapted = counts_only(torch.tensor([[4], [2]], dtype=torch.int16), labels)
    change = lambda b, a: float(a.sum() - b.sum())  # noqa: E731
    # one class of two images: every halving puts one in each half, so the halves differ by
    # (4 - 1) - (2 - 1) = 2 in one order or the other
    assert split_half_noise(change, base, adapted, labels, splits=7) == pytest.approx(2.0)
    assert split_half_noise(change, base, base, labels) == 0.0  # nothing changed: no noise
    with pytest.raises(ValueError, match="at least one split"):
        split_half_noise(change, base, adapted, labels, splits=0)


def test_split_half_noise_halves_each_class():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    ones = counts_only(torch.ones(6, 3, dtype=torch.int16), labels)
    classes_seen = lambda b, a: float((b.sum(0) > 0).sum())  # noqa: E731
    # a halving that ignored the classes would leave some class out of a half
    assert split_half_noise(classes_seen, ones, ones, labels, splits=30) == 0.0
    assert split_half_noise(lambda b, a: float(b[0, 0]), ones, ones, labels) == 0.0


def test_split_half_noise_of_the_top_turnover_is_reproducible():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 4
    base = counts_only(torch.randint(0, 5, (40, 30), generator=gen, dtype=torch.int16), labels)
    adapted = counts_only(torch.randint(0, 5, (40, 30), generator=gen, dtype=torch.int16), labels)
    moved = lambda b, a: top_turnover(b, a, 5)["new"]  # noqa: E731
    noise = split_half_noise(moved, base, adapted, labels, seed=1)
    assert 0 < noise < 1 and noise == split_half_noise(moved, base, adapted, labels, seed=1)
    assert noise != split_half_noise(moved, base, adapted, labels, seed=2)


def test_vision_exercise_checks_accept_saelib_and_reject_mistakes(capsys):
    from saelib.book.exercises import check_label_entropy, check_masked_reconstruction

    assert check_label_entropy(label_entropy)
    assert not check_label_entropy(lambda m: -(m / m.sum(1, keepdim=True) * (m / m.sum(1, keepdim=True)
                                                                            ).log()).sum(1))
    assert "NaN" in capsys.readouterr().out or True
    assert check_masked_reconstruction(masked_reconstruction)
    assert not check_masked_reconstruction(lambda sae, x, keep: (sae.encode(x) * keep) @ sae.decoder + sae.b_dec)
    assert "divide by sae.input_scale" in capsys.readouterr().out


def test_clip_vision_tower_behind_the_vit_interface():
    """The gpu profile's route, offline: a randomly initialised CLIP vision tower from transformers
    gets the ViT's hook names, and without prompts gives transformers' own pooled output."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=4)
    torch.manual_seed(0)
    tower = CLIPVisionModel(config).eval()
    model = HookedCLIPVision(tower).eval()
    x = images(3)
    _, cache = model.run_with_cache(x)
    assert cache["blocks.1.hook_resid_post"].shape == (3, 50, 32) and cache["hook_embed"].shape == (3, 50, 32)
    pixels = (x.expand(-1, 3, -1, -1) - model.pixel_mean) / model.pixel_std
    with torch.no_grad():
        expected = tower(pixel_values=pixels).pooler_output
        assert torch.allclose(model(x, return_type="features"), expected, atol=1e-5)
    prompts = DeepPrompts(32, n_tokens=2, depth=1)
    _, cache = model.run_with_cache(x, prompts=prompts)
    assert cache["blocks.1.hook_resid_post"].shape == (3, 52, 32)
    # the official hook reads the whole sequence, prompt tokens included
    assert torch.equal(harvest_tokens(model, x, "blocks.0.hook_resid_post", prompts=prompts),
                       cache["blocks.0.hook_resid_post"])


def tiny_clip():
    """A random CLIPModel (vision 28x28 in 4x4 patches, a small text tower) and a BPE tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    from saelib.subjects.language_models import train_tokenizer

    tokenizer = train_tokenizer([f"a photo of a {w}." for w in FASHION_PROMPT_NAMES] * 20, vocab_size=300)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, eos_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=4),
        projection_dim=16)
    torch.manual_seed(0)
    return CLIPModel(config).eval(), tokenizer


def test_clips_zero_shot_head_equals_clips_own_logits():
    """The gpu profile's zero-shot classifier is CLIP's own: the hooked vision tower with
    CLIPTextHead gives transformers' logits_per_image for "a photo of a {class}." prompts."""
    clip, tokenizer = tiny_clip()
    head = CLIPTextHead.from_clip(clip, tokenizer, FASHION_PROMPT_NAMES)
    model = HookedCLIPVision(clip.vision_model, head).eval()
    assert model.cfg.n_classes == head.out_features == 10 and not list(head.parameters())
    x = images(5)
    tokens = tokenizer([f"a photo of a {n}." for n in FASHION_PROMPT_NAMES], padding=True, return_tensors="pt")
    pixels = (x.expand(-1, 3, -1, -1) - model.pixel_mean) / model.pixel_std
    with torch.no_grad():
        expected = clip(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                        pixel_values=pixels).logits_per_image
        got = model(x)
    assert got.shape == (5, 10) and torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    # the task heads of chapter 5 read it like the ViT's own head
    task_head = ZeroShotHead(model.head, ((0,), (2,), (4,), (6,)))
    assert torch.allclose(model(x, head=task_head), got[:, [0, 2, 4, 6]], atol=1e-5)
    assert "template='a photo of a {}.'" in repr(head)  # in memoized_call's keys


def test_clip_resize_matches_clips_own_preprocessing():
    """Fashion-MNIST's 28x28 grey images reach CLIP's resolution by a bicubic resize on tensors;
    transformers' CLIPImageProcessor (PIL bicubic, then the same normalisation) gives the same
    pixels up to PIL's rounding to 8 bits and its edge handling, closer than another kernel would."""
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=112, patch_size=16)
    model = HookedCLIPVision(CLIPVisionModel(config)).eval()
    # smooth images (a blurred grid), as garments are: bicubic kernels differ most on pixel noise
    x = torch.nn.functional.interpolate(images(4)[:, :, ::4, ::4], size=(28, 28), mode="bilinear",
                                        align_corners=False)
    processor = CLIPImageProcessor(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112})
    pil = [Image.fromarray((im[0].numpy() * 255).round().astype(np.uint8)).convert("RGB") for im in x]
    theirs = processor(images=pil, return_tensors="pt")["pixel_values"]
    captured = {}

    def keep_pixels(module, args, out):
        captured["pixels"] = args[0]  # returns None: the output is left as it is

    model.vision.embeddings.register_forward_hook(keep_pixels)
    with torch.no_grad():
        model(x, return_type="features")
    ours = captured["pixels"]
    assert ours.shape == theirs.shape == (4, 3, 112, 112)
    gap = (ours - theirs).abs() * model.pixel_std  # back in [0, 1] pixel units
    # bicubic: mean 0.0040, max 0.022; a bilinear resize would give 0.0048 and 0.040, nearest 0.022, 0.13
    assert gap.mean() < 0.0045 and gap.max() < 0.03, (float(gap.mean()), float(gap.max()))


def test_clip_resize_matches_clips_own_preprocessing_on_rgb_of_another_shape():
    """A hub dataset's RGB image, not square and not CLIP's size (56 x 40, wider than tall;
    and a 150 x 120 one that is shrunk): CLIPImageProcessor resizes the shortest side (PIL
    bicubic, antialiased when shrinking) and crops the centre; the loader's clip_resize + uint8
    rounding and the tower's normalisation give the same pixels, within the grey test's bounds."""
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from saelib.subjects.image_datasets import clip_resize

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=112, patch_size=16)
    model = HookedCLIPVision(CLIPVisionModel(config)).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112})
    gen = torch.Generator().manual_seed(0)
    captured = {}
    model.vision.embeddings.register_forward_hook(lambda m, args, out: captured.update(pixels=args[0]))
    for height, width in ((40, 56), (120, 150)):
        # smooth colour images: a coarse random grid blurred up, as photos are at this scale
        coarse = torch.rand((3, 3, height // 8, width // 8), generator=gen)
        x = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
        x = (x * 255).round() / 255  # what a decoded 8-bit image holds
        pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in x]
        theirs = processor(images=pil, return_tensors="pt")["pixel_values"]
        ours_uint8 = (clip_resize(x, 112) * 255).round().to(torch.uint8)  # as load_hub_images stores it
        with torch.no_grad():
            model(ours_uint8, return_type="features")
        ours = captured["pixels"]
        assert ours_uint8.shape == ours.shape == theirs.shape == (3, 3, 112, 112)
        gap = (ours - theirs).abs() * model.pixel_std
        assert gap.mean() < 0.0045 and gap.max() < 0.03, (height, width, float(gap.mean()), float(gap.max()))
        # the float path (no uint8 step) agrees too: the tower resizes a batch itself
        with torch.no_grad():
            model(x, return_type="features")
        assert (captured["pixels"] - ours).abs().max() * model.pixel_std.max() < 2.5 / 255


def test_clip_resize_keeps_the_centre_of_the_shortest_side():
    from saelib.subjects.image_datasets import clip_resize

    wide = torch.zeros((1, 3, 10, 30))
    wide[..., 10:20] = 1.0  # the middle third, which the centre crop of the 10 x 10 square keeps
    out = clip_resize(wide, 10)
    assert out.shape == (1, 3, 10, 10) and torch.equal(out, torch.ones_like(out))
    tall = torch.rand((2, 1, 30, 20))
    assert clip_resize(tall, 8).shape == (2, 1, 8, 8)
    same = torch.rand((1, 3, 8, 8))
    assert torch.equal(clip_resize(same, 8), same)  # CLIP's own size: left as it is
    with pytest.raises(ValueError, match=r"expected images \[n, C, H, W\]"):
        clip_resize(torch.rand(3, 8, 8), 8)


@pytest.mark.parametrize("raw, readable", [
    ("AnnualCrop", "annual crop"), ("SeaLake", "sea lake"), ("HerbaceousVegetation", "herbaceous vegetation"),
    ("apple_pie", "apple pie"), ("bonnet, poke bonnet", "bonnet"), ("Doberman, Doberman pinscher", "doberman"),
    ("polka-dotted", "polka-dotted"), ("T-shirt/top", "t-shirt/top")])
def test_class_names_read_as_a_prompt_says_them(raw, readable):
    from saelib.subjects.image_datasets import readable_class_name

    assert readable_class_name(raw) == readable
