"""The digits testbed's spec (light: read by ``dblend finetune --help`` without torch): the demo's sampler and its
experts' recipe, so that ``dblend finetune --kind digits`` trains as ``dblend demo`` does."""

from diffusion_blend.spec import ModelSpec

DIGITS_SPEC = ModelSpec(
    kind="digits", label="8x8 handwritten digits (embedded base)", scheduler="ddim", noise_level=1.0, steps=10,
    lora_rank=8, lora_alpha=8.0, lora_targets=("input_proj", "fc1", "time_proj", "fc2", "output_proj"),
    recipe=dict(estimator="pathwise", iterations=400, batch_size=128, minibatch_size=128, learning_rate=1e-3,
                num_inference_steps=10),
    notes={"sampler": "DDIM eta 1, 10 steps, Stable Diffusion's DDIM settings (every step stochastic): plain DDIM's "
                      "deterministic last step lets an adapter move samples at no KL cost (docs/demo.md)",
           "recipe": "pathwise (back-propagation through the chain with the exact per-step KL): the score-function "
                     "estimator did not reach 0.8 of the best objective in the budget (docs/demo.md)",
           "lora": "every block's fc1 / time_proj / fc2 and the input / output projections"},
)
