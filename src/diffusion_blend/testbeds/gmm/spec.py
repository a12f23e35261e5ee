"""The Gaussian-mixture testbed's spec (light: read by ``dblend finetune --help`` without torch)."""

from diffusion_blend.spec import ModelSpec

GMM_SPEC = ModelSpec(
    kind="gmm", label="2-D Gaussian mixture (learned MLP base)", scheduler="ddim", noise_level=1.0, steps=20,
    lora_rank=8, lora_alpha=8.0, lora_targets=(r"(layers\.\d+|out)",),
    recipe=dict(iterations=200, batch_size=256, minibatch_size=256, updates_per_batch=2, learning_rate=3e-3,
                num_inference_steps=20, checkpoint_every=25),
    notes={"sampler": "DDIM eta 1 with 20 steps: a 2-D sample is cheap, the chain is the one the trainer's exact KL "
                      "and the closed-form targets are measured on",
           "recipe": "the trainer's verification recipe (docs/finetuning.md): 200 iterations of 256 trajectories"},
)
