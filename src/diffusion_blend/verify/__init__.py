"""Acceptance verification of RL fine-tuning against exact optima on the 2-D Gaussian-mixture testbed."""
