"""Layer 4: small networks (noise predictors) for the toy testbeds."""

from .mlp import LORA_TARGETS, TimeMLP, mlp_forward, timestep_embedding

__all__ = ["LORA_TARGETS", "TimeMLP", "mlp_forward", "timestep_embedding"]
