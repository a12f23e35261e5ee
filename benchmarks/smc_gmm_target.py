"""Which target SMC reaches on the Gaussian mixture: the base chain's tilt vs the continuous-time tilt (issue 25).

The `gmm` setting's experts are exact continuous-time tilts; SMC's target is the base sampler's chain tilted at the
end (docs/method.md). This script measures, per w (lambda = 1, alpha = 1):

- the continuous-time target's `r_w` (closed form) and the chain's tilt (importance weighting of `--chain-samples`
  draws of the base sampler's chain, generator seed 777), and the gap between them;
- DB-MPA (`--mpa-samples` samples, seed 100) and SMC (`--samples` samples per tilt, seed `--seed`, `--particles` N,
  `--proposal`, `--tilts`, Tweedie potential) against both, with standard errors;
- the base chain's and the mixture's spread along `right` (what the linear reward's tilt weighs most).

    PYTHONPATH=src python benchmarks/smc_gmm_target.py --steps 20 --samples 4096 --seed 10 --particles 16 \\
        --tilts 1,auto          # the diagnosis rows of docs/evaluation.md (tuning seed 10)
    PYTHONPATH=src python benchmarks/smc_gmm_target.py --particles 64 --samples 2048 --weights 0,0.25,0.5
"""

from __future__ import annotations

import argparse
import math


def main() -> None:
    import torch

    from diffusion_blend.denoisers import BlendedDenoiser
    from diffusion_blend.evaluation.oracle import importance_weighted_oracle
    from diffusion_blend.preference import BASE, Preference
    from diffusion_blend.sampling import sample
    from diffusion_blend.smc import SMCOptions, smc_sample
    from diffusion_blend.testbeds.gmm.closed_form import combined_reward, tilted_target
    from diffusion_blend.testbeds.gmm.setting import gmm_setting
    from diffusion_blend.testbeds.gmm.study import study_testbed

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=4096, help="SMC output samples per point")
    parser.add_argument("--seed", type=int, default=10, help="SMC's generator seed")
    parser.add_argument("--particles", type=int, default=16)
    parser.add_argument("--proposal", default="twisted", choices=("blend", "twisted"))
    parser.add_argument("--tilts", default="auto", help="comma-separated: auto and numbers")
    parser.add_argument("--weights", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--chain-samples", type=int, default=200_000)
    parser.add_argument("--mpa-samples", type=int, default=16_384)
    args = parser.parse_args()
    torch.set_num_threads(1)
    setting, (base, rewards) = gmm_setting(args.steps), study_testbed()
    with torch.no_grad():
        chain = sample(setting.family.member(BASE), setting.scheduler_factory(), generator=777,
                       shape=(args.chain_samples, 2), num_inference_steps=args.steps, progress=False).samples.double()
    mixture = base.sample(args.chain_samples, torch.Generator().manual_seed(7)).double()
    for name, draws in (("chain", chain), ("mixture", mixture)):
        right = draws[:, 0]
        tilted = float((torch.softmax(right, 0) * right).sum())
        print(f"{name}: right mean {float(right.mean()):.3f} std {float(right.std()):.3f} 99.9 % quantile "
              f"{float(right.quantile(0.999)):.2f}; tilted by exp(right): mean {tilted:.3f}")
    for w in (float(v) for v in args.weights.split(",")):
        preference = Preference({"right": w, "corner": 1.0 - w}, 1.0)
        rw = combined_reward(rewards, preference)
        closed = tilted_target(base, rewards, preference, 1.0).expectation(rw)
        estimate = importance_weighted_oracle({n: r(chain) for n, r in rewards.items()}, preference, 1.0)
        target = sum(v * estimate.expected_rewards[n] for n, v in preference.weights.items())
        print(f"w={w:g}: closed form {closed:.4f}, chain's tilt {target:.4f} (ESS {estimate.effective_sample_size:.0f})"
              f", chain - closed {target - closed:+.4f}")
        rows = [("DB-MPA", sample(BlendedDenoiser(setting.family, preference), setting.scheduler_factory(),
                                  generator=100, shape=(args.mpa_samples, 2), num_inference_steps=args.steps,
                                  progress=False).samples, None)]
        for tilt in args.tilts.split(","):
            options = SMCOptions(particles=args.particles, proposal=args.proposal,
                                 proposal_tilt=tilt if tilt == "auto" else float(tilt))
            out = smc_sample(setting.family, preference, setting.scheduler_factory(), reward=rw, alpha=1.0,
                             generator=args.seed, options=options, shape=(args.samples, 2),
                             num_inference_steps=args.steps, progress=False)
            rows.append((f"SMC N={args.particles} {args.proposal} tilt {tilt}", out.samples, out))
        for label, samples, out in rows:
            values = rw(samples).double()
            mean, se = float(values.mean()), float(values.std()) / math.sqrt(values.numel())
            extra = "" if out is None else (f"; final ESS {float(out.final_ess.mean()):.1f}; tilts "
                                            + " ".join(f"{float(t):.2f}" for t in out.tilts))
            print(f"  {label}: {mean:.4f} ± {se:.4f}; error vs chain {mean - target:+.4f}, vs closed form "
                  f"{mean - closed:+.4f}{extra}")


if __name__ == "__main__":
    main()
