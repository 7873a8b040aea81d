"""Trainers for the autoencoder and the latent diffusion model."""
