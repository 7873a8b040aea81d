"""The fp16 overflow search keeps exactly the offending blocks in fp32, and the result is finite."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from ldm_rt.export.errors import Fp16Error
from ldm_rt.export.fp16 import find_fp32_islands, half_model, is_watched
from ldm_rt.export.onnx_export import export_component
from ldm_rt.export.parity import check_onnx, reference_cases, sample_sets
from ldm_rt.reference.autoencoder import ResnetBlock
from ldm_rt.runtime.contracts import ComponentContract, Dim, TensorSpec, Tolerance

CHANNELS = 32


def toy_contract() -> ComponentContract:
    return ComponentContract(
        name="toy",
        inputs=(TensorSpec("x", "float32", ("batch", CHANNELS, "h", "w")),),
        outputs=(TensorSpec("y", "float32", ("batch", CHANNELS, "h", "w")),),
        dims=(Dim("batch", 1, 1, 2), Dim("h", 4, 8, 8), Dim("w", 4, 8, 8)),
        tolerance={"fp32": Tolerance(1e-4), "fp16": Tolerance(2e-2, 1e-2)},
    )


class Toy(nn.Module):
    """Two reference autoencoder ResnetBlocks; `hot` has a first conv whose activations pass 65504."""

    def __init__(self, overflow: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.cool = ResnetBlock(CHANNELS, CHANNELS)
        self.hot = ResnetBlock(CHANNELS, CHANNELS)
        if overflow:
            with torch.no_grad():
                # conv1 outputs reach ~1e5-1e6 (weights stay ~2e4): inf in fp16; norm2 brings them back to O(1) in fp32.
                self.hot.conv1.weight.mul_(3e5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hot(self.cool(x))


def _cases(model: nn.Module):
    contract = toy_contract()
    return contract, reference_cases(model.eval(), contract, sample_sets(contract))


def test_overflowing_block_is_kept_in_fp32_and_the_result_is_finite(tmp_path):
    model = Toy(overflow=True)
    contract, cases = _cases(model)
    assert all(np.isfinite(c.reference).all() for c in cases)
    x = torch.from_numpy(cases[0].inputs["x"])
    with torch.no_grad():
        plain = half_model(model, contract, [])(x)
    assert not torch.isfinite(plain).all(), "the toy must overflow in plain fp16, or the test shows nothing"

    search = find_fp32_islands(model, contract, cases)
    assert search.kept_fp32 == ["hot"]  # the block with finite input and non-finite output, nothing else
    assert search.parity.passed
    with torch.no_grad():
        fixed = half_model(model, contract, search.kept_fp32)(x)
    assert torch.isfinite(fixed).all()
    assert fixed.dtype == torch.float32  # float32 I/O, as the contract says

    # The islands survive export: the fp16 graph keeps hot's weights in fp32 and runs finite in ORT.
    path = tmp_path / "toy_fp16.onnx"
    export_component(half_model(model, contract, search.kept_fp32), contract, path)
    graph = onnx.load(str(path)).graph
    types = {t.name: t.data_type for t in graph.initializer if len(t.dims) == 4}
    hot = [n for n in types if "hot.conv1" in n]
    cool = [n for n in types if "cool.conv1" in n]
    assert hot and cool
    assert all(types[n] == onnx.TensorProto.FLOAT for n in hot)
    assert all(types[n] == onnx.TensorProto.FLOAT16 for n in cool)
    result = check_onnx(path, contract, "fp16", cases)
    assert result.passed, result.max_abs_err


def test_a_model_without_overflow_keeps_nothing_in_fp32():
    model = Toy(overflow=False)
    contract, cases = _cases(model)
    search = find_fp32_islands(model, contract, cases)
    assert search.kept_fp32 == []
    assert search.parity.passed and min(search.parity.max_abs_err) > 0


class Offset(nn.Module):
    """(x + 2048) - 2048: exact in fp32; fp16's spacing at 2048 is 2, so the fraction is lost."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 2048.0) - 2048.0


class Lossy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(8, CHANNELS)
        self.offset = Offset()
        self.proj = nn.Conv2d(CHANNELS, CHANNELS, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.offset(self.norm(x)))


def watch_with_offset(module: nn.Module) -> bool:
    return is_watched(module) or isinstance(module, Offset)


def test_finite_but_inaccurate_block_is_found_by_its_own_error():
    torch.manual_seed(0)
    model = Lossy().eval()
    contract, cases = _cases(model)
    with torch.no_grad():
        plain = half_model(model, contract, [])(torch.from_numpy(cases[0].inputs["x"]))
    err = float((plain - torch.from_numpy(cases[0].reference)).abs().max())
    assert np.isfinite(err) and err > contract.tolerance["fp16"].bound(cases[0].reference)
    search = find_fp32_islands(model, contract, cases, watch=watch_with_offset)
    assert search.kept_fp32 == ["offset"]
    assert search.parity.passed


def test_hopeless_fp16_is_a_one_line_error():
    torch.manual_seed(0)
    model = Lossy().eval()
    contract, cases = _cases(model)
    # Offset is not watched by default, so no island can fix it: the search gives up and says what to do.
    with pytest.raises(Fp16Error, match="build this model without --fp16") as e:
        find_fp32_islands(model, contract, cases, max_islands=2)
    assert "\n" not in str(e.value)


def test_watched_blocks_are_named_by_class_not_by_string():
    # Issue 15: a renamed or subclassed reference block must stay watched (a string list silently stopped).
    from ldm_rt.export.fp16 import ALWAYS_FP32, BLOCK_TYPES
    from ldm_rt.reference.unet import ResBlock

    assert all(isinstance(t, type) and issubclass(t, nn.Module) for t in BLOCK_TYPES + ALWAYS_FP32)

    class RenamedResnetBlock(ResnetBlock):
        pass

    assert is_watched(RenamedResnetBlock(CHANNELS, CHANNELS))
    assert ResBlock in BLOCK_TYPES and not is_watched(nn.Conv2d(1, 1, 1))


def test_the_half_copy_casts_as_it_copies_and_keeps_tied_weights_tied():
    import copy

    from ldm_rt.export.fp16 import _half_copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 8))
    model[2].weight = model[0].weight  # tied, as CLIP-style embeddings can be
    half = _half_copy(model)
    want = copy.deepcopy(model).half().state_dict()
    got = half.state_dict()
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in got)
    assert half[2].weight is half[0].weight and half[0].weight.dtype == torch.float16
    assert model[0].weight.dtype == torch.float32 and half[0].weight is not model[0].weight  # the original is untouched
