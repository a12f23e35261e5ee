"""Diffusion Blend."""
