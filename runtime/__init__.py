"""Lean sampler: numpy + ONNX Runtime or TensorRT. Never imports torch (tests/test_layering.py)."""
