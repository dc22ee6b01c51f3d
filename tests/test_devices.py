"""Device handling in one place (saelib.core.devices), and a static check of the chapters.

What runs here, on a CPU-only machine: the helper moves data to a module's device ("meta", torch's
data-less device, stands in for a GPU), and ``evaluate`` hands an SAE on "meta" its rows on
"meta": the forward pass then fails inside the allocation (meta tensors have no values to select
on), where before the rows reached the SAE on the CPU and the first product failed on the devices.
What does not run here: a numeric evaluation with the SAE on a GPU and the data on the CPU; the
last test does that where CUDA exists and is skipped otherwise."""

import ast
import json

import numpy as np
import pytest
import torch
from torch import nn

from saelib.book.build import chapters
from saelib.core.devices import module_device, to_device_of
from saelib.core.metrics import evaluate
from saelib.core.sae import SAE, SAEConfig


def _sae() -> SAE:
    return SAE(SAEConfig(d_in=8, d_sae=32, rule="topk", k=2))


def test_to_device_of_moves_data_to_the_module():
    sae = _sae().to("meta")
    assert sae.device == module_device(sae) == torch.device("meta")
    for x in (torch.randn(4, 8), np.zeros((4, 8), dtype=np.float32)):
        assert to_device_of(x, sae).device.type == "meta"
    assert module_device(nn.Identity()) == torch.device("cpu")  # nothing to say where: the CPU
    x = torch.randn(4, 8)
    assert to_device_of(x, _sae()) is x  # already there: no copy


def test_evaluate_feeds_rows_on_the_sae_device():
    with pytest.raises(NotImplementedError, match="meta"):
        evaluate(_sae().to("meta"), torch.randn(64, 8))


def test_reconstruct_and_encode_answer_on_the_input_device():
    sae = _sae()
    x = torch.randn(16, 8)
    assert sae.reconstruct(x).device == x.device and sae.encode(x).shape == (16, 32)


# Calls that hand data to an SAE or a model through saelib: their arguments must not be moved to the
# CPU first (the functions move data to the module's device themselves).
FEEDS = {"evaluate", "encode", "reconstruct", "splice_metrics", "splice_sweep", "downstream_errors",
         "firing_matrix", "nmse_of", "gather_features", "latent_stats", "patch_maps",
         "masked_reconstruction", "spliced_accuracy", "masking_curves", "harvest_tokens"}


def moved_feeds(source: str) -> list[str]:
    """Calls in ``source`` that feed an SAE (a FEEDS function, or calling a name with "sae" in it)
    with an argument containing ``.cpu()`` or ``.numpy()``.

    Limits: by name only (an SAE bound to another name, or data moved on an earlier line and passed
    as a variable, is not seen); IPython magics are skipped."""
    code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
    found = []
    for node in ast.walk(ast.parse(code)):
        if not isinstance(node, ast.Call):
            continue
        callee = ast.unparse(node.func)
        if callee.rsplit(".", 1)[-1] not in FEEDS and "sae" not in callee.lower():
            continue
        for arg in [*node.args, *(k.value for k in node.keywords)]:
            for sub in ast.walk(arg):
                if (isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute)
                        and sub.func.attr in ("cpu", "numpy")):
                    found.append(ast.unparse(node))
    return found


def test_the_lint_sees_a_moved_argument_and_not_a_moved_result():
    assert moved_feeds("ev = evaluate(sae, acts.cpu())") == ["evaluate(sae, acts.cpu())"]
    assert moved_feeds("z = saes['mc'](x.numpy())")
    assert moved_feeds("l0 = evaluate(sae, acts).l0_per_token.numpy()") == []
    assert moved_feeds("r = (sae.reconstruct(x).norm(dim=1) / n).numpy()") == []


@pytest.mark.parametrize("path", chapters(), ids=lambda p: p.stem)
def test_no_chapter_moves_an_sae_input_to_the_cpu(path):
    cells = json.loads(path.read_text())["cells"]
    found = [hit for c in cells if c["cell_type"] == "code" for hit in moved_feeds("".join(c["source"]))]
    assert found == [], f"{path.name} moves data to the CPU before an SAE reads it: {found}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (none on the project machine)")
def test_evaluate_with_the_sae_on_the_gpu_matches_the_cpu():
    sae, x = _sae(), torch.randn(512, 8)
    sae.init_from_sample(x)
    on_cpu, on_gpu = evaluate(sae, x), evaluate(sae.to("cuda"), x)
    assert on_gpu.density.device.type == "cpu"
    assert abs(on_cpu.nmse - on_gpu.nmse) < 1e-4 and torch.equal(on_cpu.l0_per_token, on_gpu.l0_per_token)


def test_importing_saelib_backs_large_tensors_with_huge_pages():
    """A fresh 64 MB tensor after ``import saelib`` takes far fewer page faults than its 16,384
    pages of 4 KB: PyTorch's allocator asked for transparent huge pages (THP_MEM_ALLOC_ENABLE)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("this kernel has transparent huge pages off")
    code = ("import resource, saelib, torch, os; before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; "
            "torch.empty(16 * 2**20).fill_(1); "
            "print(os.environ['THP_MEM_ALLOC_ENABLE'], resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    flag, faults = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                  check=True).stdout.split()
    assert flag == "1"
    assert int(faults) < 16_384 // 4, f"{faults} page faults for 64 MB: huge pages were not used"
