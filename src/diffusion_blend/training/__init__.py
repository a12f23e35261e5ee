"""Layer 6: training loops (denoiser pretraining; KL-regularized RL fine-tuning lives beside it)."""
