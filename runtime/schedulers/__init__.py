"""Numpy schedulers with the diffusers scheduler interface, shared by the runtime and the reference."""
