"""storage.memoized_call: a slow analysis computed once, read back verified, keyed by content."""

import pytest
import torch
from torch import nn

from saelib.core import storage
from saelib.subjects.prompts import ZeroShotHead

CALLS: list[str] = []


def scaled_sum(x: torch.Tensor, module: nn.Module, scale: float = 1.0) -> dict:
    CALLS.append("computed")
    with torch.no_grad():
        return {"sum": module(x).sum() * scale, "rows": len(x)}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELIB_CACHE", str(tmp_path))
    CALLS.clear()
    return tmp_path


def test_a_call_is_computed_once_then_read_back(cache):
    x, lin = torch.randn(5, 3), nn.Linear(3, 2)
    first = storage.memoized_call("results", scaled_sum, x, lin, scale=2.0)
    again = storage.memoized_call("results", scaled_sum, x, lin, scale=2.0)
    assert CALLS == ["computed"] and torch.equal(first["sum"], again["sum"]) and again["rows"] == 5
    folders = [p for p in (cache / "results").iterdir() if not p.name.startswith(".")]
    assert len(folders) == 1 and (folders[0] / "key.json").exists()


def test_the_key_sees_every_argument_by_content(cache):
    x, lin = torch.randn(5, 3), nn.Linear(3, 2)
    storage.memoized_call("results", scaled_sum, x, lin)
    y = x.clone()
    y[0, 0] = torch.nextafter(y[0, 0], torch.tensor(1e9))  # one bit
    storage.memoized_call("results", scaled_sum, y, lin)
    with torch.no_grad():
        lin.bias[0] += 1
    storage.memoized_call("results", scaled_sum, x, lin)
    storage.memoized_call("results", scaled_sum, x, lin, scale=3.0)
    assert len(CALLS) == 4
    # two heads with the same weights but other class groups are other modules (their repr)
    head = nn.Linear(3, 4)
    storage.memoized_call("results", scaled_sum, x, ZeroShotHead(head, ((0,), (1,))))
    storage.memoized_call("results", scaled_sum, x, ZeroShotHead(head, ((0, 2), (1,))))
    storage.memoized_call("results", scaled_sum, x, ZeroShotHead(head, ((0,), (1,))))
    assert len(CALLS) == 6


def test_a_damaged_result_is_refused_and_unkeyable_arguments_say_why(cache):
    x, lin = torch.randn(5, 3), nn.Linear(3, 2)
    storage.memoized_call("results", scaled_sum, x, lin)
    result = next((cache / "results").glob("*/result.pt"))
    result.write_bytes(result.read_bytes()[:-10])
    with pytest.raises(storage.DamagedError, match="result.pt is damaged: .*delete .* and rerun to compute it again"):
        storage.memoized_call("results", scaled_sum, x, lin)
    with pytest.raises(TypeError, match="cannot key .*<lambda>: a local function or lambda has no stable name"):
        storage.memoized_call("results", lambda: 1)
    with pytest.raises(TypeError, match="cannot key an argument of type object"):
        storage.memoized_call("results", scaled_sum, object(), lin)
