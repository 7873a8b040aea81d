"""Inference backends behind one interface: run(inputs: dict[str, ndarray]) -> dict[str, ndarray]."""
