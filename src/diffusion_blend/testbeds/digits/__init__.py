"""The digits testbed: real 8x8 digits, a small pixel-space diffusion model, a classifier, quality checks."""
