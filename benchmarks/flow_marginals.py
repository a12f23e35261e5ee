"""Do flow-matching samplers keep the flow's marginals? Closed-form Gaussian data, exact velocity.

Data ``x_0 ~ N(m, diag(s2))`` with ``m = (1, -0.5)``, ``s2 = (4, 0.09)``; the exact rectified-flow velocity
``E[eps - x_0 | x_s]`` is known in closed form, so any deviation of the samples' mean/variance from the data's is
the sampler's (plus Monte Carlo error: about 0.03 on the first variance with N = 40,000).

    PYTHONPATH=src python benchmarks/flow_marginals.py

Compared: diffusers' Euler ODE, our FlowMatchSDEScheduler (Flow-GRPO's SDE) at noise levels 0.7 and 1.0, and
diffusers' FlowMatchEulerDiscreteScheduler(stochastic_sampling=True); shift 3 (SD3's), 10 / 50 / 200 steps.
"""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffusion_blend.sampling import FlowMatchSDEScheduler, sample

MEAN, VAR = torch.tensor([1.0, -0.5]), torch.tensor([4.0, 0.09])
N = 40_000


def velocity(x, t):
    s = float(t) / 1000
    var_s = (1 - s) ** 2 * VAR + s**2
    centred = x - (1 - s) * MEAN
    return s / var_s * centred - (MEAN + (1 - s) * VAR / var_s * centred)


def main() -> None:
    torch.set_num_threads(1)
    print(f"data: mean {MEAN.tolist()}, variance {VAR.tolist()}")
    for steps in (10, 50, 200):
        for name, scheduler, eta in [
            ("Euler ODE", FlowMatchEulerDiscreteScheduler(shift=3.0), 0.0),
            ("SDE eta=0.7", FlowMatchSDEScheduler(shift=3.0), 0.7),
            ("SDE eta=1.0", FlowMatchSDEScheduler(shift=3.0), 1.0),
            (
                "diffusers stochastic_sampling",
                FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True),
                0.0,
            ),
        ]:
            x = sample(velocity, scheduler, generator=0, shape=(N, 2), num_inference_steps=steps, eta=eta,
                       progress=False).samples
            mean = ", ".join(f"{v:.3f}" for v in x.mean(0).tolist())
            var = ", ".join(f"{v:.3f}" for v in x.var(0).tolist())
            print(f"{steps:4d} steps  {name:30s} mean ({mean})  variance ({var})")


if __name__ == "__main__":
    main()
