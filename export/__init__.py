"""ONNX export, parity checks, TensorRT engines and the artifact manifest."""
