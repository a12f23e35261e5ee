"""SMC on the blend vs FK steering on the demo's digits experts: oracle fraction vs network evaluations (README).

One weight per run (1 thread, < 60 s on 2 shared cores at 128 samples), experts cached by `dblend demo --out runs/demo`:

    PYTHONPATH=src python benchmarks/smc_digits.py 0.2 128   # then 0.5 and 0.8
    PYTHONPATH=src python benchmarks/smc_digits.py plot      # docs/images/smc_oracle_fraction.png

The oracle's gain and the base's mean r_w come from the demo report (IS over its 20,000 base samples).
"""
import json
import sys
PLOT = 'import json, matplotlib\nmatplotlib.use("Agg")\nimport matplotlib.pyplot as plt\nrows = []\nfor w in (0.2, 0.5, 0.8):\n    rows += json.load(open(f"runs/smc-digits-w{w}.json"))\nlab = {"mpa": "DB-MPA", "ls": "DB-MPA-LS", "smc": "SMC on blend (N=2,4,8,16)", "fk": "FK steering (same N)",\n       "fk-equal": "FK steering (3N: equal NFE)"}\nsty = {"mpa": "o", "ls": "s", "smc": "o-", "fk": "^--", "fk-equal": "v:"}\nfig, axes = plt.subplots(1, 3, figsize=(15, 4))\nfor ax, w in zip(axes, (0.2, 0.5, 0.8)):\n    for m, st in sty.items():\n        pts = sorted((r for r in rows if r["method"] == m and r["w"] == w), key=lambda r: r["nfe"])\n        ax.errorbar([p["nfe"] for p in pts], [p["fraction"] for p in pts], yerr=[p["se"] for p in pts], fmt=st,\n                    label=lab[m], capsize=2, ms=5)\n    ax.axhline(1, color="k", lw=0.8, ls=":"); ax.axhline(0.9, color="C3", lw=0.6, ls="--")\n    ax.set_xscale("log"); ax.set_xlabel("network evaluations per sample"); ax.set_ylabel("gain in r_w / IS oracle\'s gain")\n    ax.set_title(f"digits (ink vs digit_prob_3), w = {w:g}"); ax.legend(fontsize=7)\nfig.savefig("docs/images/smc_oracle_fraction.png", dpi=100, bbox_inches="tight")\n'
import torch
torch.set_num_threads(1)
from diffusion_blend.demo.config import DemoConfig
from diffusion_blend.demo.adapters import ensure_demo_adapters
from diffusion_blend.demo.pipeline import load_demo_models
from diffusion_blend.smc import smc_sample
from diffusion_blend.sampling import sample
from diffusion_blend.denoisers import BlendedDenoiser, SwitchingDenoiser
from diffusion_blend.digits.model import digits_scheduler
from diffusion_blend.digits.data import IMAGE_SHAPE, to_image_space
from diffusion_blend.evaluation.stats import mean_and_standard_error
from diffusion_blend.preference import Preference
if sys.argv[1] == "plot":
    exec(PLOT)
    sys.exit(0)
w = float(sys.argv[1]); B = int(sys.argv[2]) if len(sys.argv) > 2 else 64
demo = DemoConfig()
models = load_demo_models(ensure_demo_adapters("runs/demo", demo, progress=False), demo, progress=False)
pts = json.load(open("runs/demo/report/results.json"))["points"]
p = Preference(demo.weights(w), 1.0)
mp = [q for q in pts if q["method"] == "DB-MPA" and abs(q["w"] - w) < 1e-9][0]
base_rw = mp["oracle_weighted_reward"] - mp["oracle_gain_weighted_reward"]; gain = mp["oracle_gain_weighted_reward"]
def rw(x):
    im = to_image_space(x)
    return sum(v * models.rewards[n](im).double() for n, v in p.weights.items())
rows = []
def record(method, n, samples, nfe, ess=None):
    m, se = mean_and_standard_error(rw(samples))
    rows.append(dict(method=method, w=w, particles=n, fraction=(m - base_rw) / gain, se=se / gain, nfe=nfe, ess=ess))
    print(rows[-1], flush=True)
shape = (B, *IMAGE_SHAPE)
record("mpa", None, sample(BlendedDenoiser(models.family, p), digits_scheduler("ddim"), generator=11, shape=shape, num_inference_steps=10, progress=False).samples, 20)
record("ls", None, sample(SwitchingDenoiser(models.family, p, 12), digits_scheduler("ddim"), generator=11, shape=shape, num_inference_steps=10, progress=False).samples, 10)
for n in (2, 4, 8, 16):
    for method, prop, k in (("smc", "blend", n), ("fk", "base", n), ("fk-equal", "base", 3 * n)):
        o = smc_sample(models.family, p, digits_scheduler("ddim"), reward=rw, alpha=demo.alpha, particles=k, proposal=prop, generator=11, shape=shape, num_inference_steps=10, progress=False)
        record(method, n, o.samples, o.network_evaluations, float(o.final_ess.mean()))
json.dump(rows, open(f"runs/smc-digits-w{w}.json", "w"), indent=1)
