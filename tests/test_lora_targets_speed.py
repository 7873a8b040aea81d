"""The LoRA-target search (export/lora_targets.locate): initializers indexed by layout and a sampled fingerprint,
each candidate confirmed by an exact comparison a chunk at a time. It must find what a full byte comparison of
every initializer in both orientations finds, and nothing a sample alone would confuse."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from ldm_rt.export import lora_targets
from ldm_rt.export.lora_targets import fingerprint, locate, sample_positions
from ldm_rt.runtime.lora import Target


def write_onnx(path, initializers: dict[str, np.ndarray], external: bool = False):
    """A graph that only returns its initializers (locate reads nothing else)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", [n], [f"{n}_out"]) for n in initializers],
        "weights",
        [],
        [helper.make_tensor_value_info(f"{n}_out", helper.np_dtype_to_tensor_dtype(a.dtype), a.shape) for n, a in initializers.items()],
        [numpy_helper.from_array(a, n) for n, a in initializers.items()],
    )
    model = helper.make_model(graph)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


def unsampled(shape: tuple[int, ...]) -> int:
    """A flat position of a tensor of `shape` that its fingerprint does not look at."""
    count = int(np.prod(shape))
    return next(p for p in range(count - 1, -1, -1) if p not in set(sample_positions(count).tolist()))


def test_initializers_alike_at_every_sample_are_told_apart_by_the_exact_comparison(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((16, 8, 3, 3), dtype=np.float32)
    b = a.copy()
    b.reshape(-1)[unsampled(a.shape)] += 1.0  # one value the fingerprint never reads
    assert fingerprint(a, np.dtype("<f4")) == fingerprint(b, np.dtype("<f4"))  # the sample cannot tell them apart
    path = write_onnx(tmp_path / "m.onnx", {"A": a, "B": b})

    assert locate(path, {"a": a, "b": b}) == {"a": Target("A", False), "b": Target("B", False)}
    c = a.copy()
    c.reshape(-1)[unsampled(a.shape) - 1] -= 1.0  # alike at the samples, equal to neither
    assert locate(path, {"c": c}) == {}

    # Without the exact comparison both initializers would match each weight: ambiguous, nothing found.
    monkeypatch.setattr(lora_targets._Initializers, "equal", lambda self, t, dtype, values: True)
    assert locate(path, {"a": a, "b": b}) == {}


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
def test_a_transposed_weight_is_found_compared_a_chunk_at_a_time(tmp_path, monkeypatch, external):
    """A bias-free Linear exports as MatMul on W^T; the fp16 file holds it in float16. The comparison runs over
    several chunks (a difference in the last one still tells), from the proto or from the external data file."""
    monkeypatch.setattr(lora_targets, "CHUNK_ELEMENTS", 40)  # 5 rows of 8 per chunk: 4 chunks for a 20 x 8 W^T
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 20), dtype=np.float32)  # Linear(20 -> 8).weight
    square = rng.standard_normal((12, 12), dtype=np.float32)
    path = write_onnx(
        tmp_path / "m.onnx",
        {"onnx::MatMul_1": np.ascontiguousarray(w.T), "onnx::MatMul_2": np.ascontiguousarray(square.T).astype(np.float16)},
        external,
    )
    if external:
        by_name = {t.name: t for t in onnx.load(str(path), load_external_data=False).graph.initializer}
        assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in by_name.values())

    found = locate(path, {"proj": w, "attn.to_q": square})
    assert found == {"proj": Target("onnx::MatMul_1", True), "attn.to_q": Target("onnx::MatMul_2", True)}
    late = w.copy()
    late[-1, -1] += 1e-3  # W^T's last row: the fourth chunk
    assert late.reshape(-1)[-1] != w.reshape(-1)[-1] and locate(path, {"proj": late}) == {}


def brute_force(initializers: dict[str, np.ndarray], weights: dict[str, np.ndarray]) -> dict[str, Target]:
    """The rule stated plainly: every initializer's bytes against W and W^T in float32 and float16."""
    found, claimed = {}, {}
    for module, w in weights.items():
        hits = []
        for (name, init), transposed in itertools.product(initializers.items(), (False, True)):
            a = w.T if transposed else w
            if (not transposed or w.ndim == 2) and init.shape == a.shape and init.tobytes() == a.astype(init.dtype).tobytes():
                hits.append(Target(name, transposed))
        if len(hits) == 1:
            found[module] = hits[0]
            claimed.setdefault(hits[0].initializer, []).append(module)
    return {m: t for m, t in found.items() if len(claimed[t.initializer]) == 1}


def test_the_indexed_search_finds_what_comparing_every_initializer_finds(tmp_path, monkeypatch):
    """Duplicates (two, and four zero tensors), a symmetric square weight (W == W^T: two hits), a weight two modules
    share, -0.0 against 0.0, float16 copies and fp32-kept blocks, a constant and an empty tensor: the same result as
    the plain rule."""
    monkeypatch.setattr(lora_targets, "CHUNK_ELEMENTS", 64)
    rng = np.random.default_rng(2)
    n = lambda *s: rng.standard_normal(s, dtype=np.float32)
    sym = n(6, 6)
    sym = sym + sym.T
    zero = np.zeros((6, 4), np.float32)
    weights = {
        "conv": n(4, 3, 3, 3), "lin": n(5, 7), "lin16": n(7, 5), "sq": n(6, 6), "sym": sym, "dup": n(3, 9),
        "shared_a": n(2, 8), "zero": zero, "negzero": -zero, "missing": n(5, 7), "ones": np.ones((4, 2), np.float32),
        "zeros": np.zeros((3, 3, 1, 1), np.float32), "empty": np.zeros((0, 4), np.float32),
    }  # fmt: skip
    weights["shared_b"] = weights["shared_a"].copy()
    initializers = {
        "conv.weight": weights["conv"], "MatMul_lin": weights["lin"].T.copy(), "Gemm_lin16": weights["lin16"].astype(np.float16),
        "MatMul_lin16": weights["lin16"].T.astype(np.float16), "sq.weight": weights["sq"].T.copy(), "sym": sym,
        "dup_1": weights["dup"], "dup_2": weights["dup"].copy(), "shared": weights["shared_a"], "zero": zero,
        "ones": np.ones((4, 2), np.float16), "other_conv": n(4, 3, 3, 3), "empty": np.zeros((0, 4), np.float32),
        **{f"zero_init_{i}": np.zeros((3, 3, 1, 1), np.float32) for i in range(4)},
    }  # fmt: skip
    path = write_onnx(tmp_path / "m.onnx", initializers)
    expected = brute_force(initializers, weights)
    assert locate(path, weights) == expected
    # The cases above are not all trivially empty or all found: the plain rule keeps some and drops others.
    assert {"conv", "lin", "sq", "zero", "ones", "empty"} <= expected.keys() and expected["sq"] == Target("sq.weight", True)
    assert not expected.keys() & {"lin16", "sym", "dup", "shared_a", "shared_b", "negzero", "missing", "zeros"}
