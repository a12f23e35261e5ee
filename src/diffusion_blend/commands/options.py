"""The command line's shared options, declared once: a concept has one flag, one default and one help text in every
command that takes it (``sample``, ``ui``, ``evaluate``, ``finetune``; ``tests/test_cli_options.py`` holds the table).

Light: no torch. Values are checked where they enter (:func:`parse_resolution`, :func:`parse_pairs`,
:func:`parse_alphas`, :func:`smc_options`); old spellings stay as deprecated aliases for one release
(:class:`DeprecatedAlias`: the new flag's value, and a one-line note on stderr).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

from diffusion_blend.devices import DTYPE_CHOICES, ROUTINGS
from diffusion_blend.errors import DiffusionBlendError, positive_number
from diffusion_blend.pipelines.kinds import SPECS

BASE_KINDS = tuple(SPECS)
KIND_CHOICES = ("auto", *BASE_KINDS)
SMC_PROPOSALS = ("blend", "twisted")
SMC_POTENTIALS = ("tweedie", "none", "experts")
METHODS = ("mpa", "ls", "smc")
NUM_IMAGES = 4
"""Images per preference in ``sample`` and the UI on a pipeline base (a 2 x 2 grid)."""
DIGITS_UI_IMAGES = 16
SMC_FIELDS = {"particles": "particles", "smc_proposal": "proposal", "smc_proposal_tilt": "proposal_tilt",
              "smc_potential": "potential", "smc_potential_every": "potential_every",
              "smc_ess_threshold": "ess_threshold"}
"""SMC's flags (their ``argparse`` destinations) and the :class:`~diffusion_blend.smc.SMCOptions` field each sets."""


class DeprecatedAlias(argparse.Action):
    """An old spelling of ``new``: stores into the new flag's destination and says once that it is deprecated."""

    def __init__(self, option_strings: list[str], dest: str, new: str = "", **kwargs: Any) -> None:
        self.new = new
        kwargs.setdefault("help", argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"dblend: note: {option_string} is deprecated; use {self.new} (the old spelling goes in the next "
              "release)", file=sys.stderr)
        setattr(namespace, self.dest, True if self.nargs == 0 else values)


def deprecated(parser: Any, old: str, new: str, dest: str, *, flag: bool = False) -> None:
    """Accept ``old`` as a hidden, deprecated spelling of ``new`` (same destination)."""
    parser.add_argument(old, dest=dest, action=DeprecatedAlias, new=new, nargs=0 if flag else None,
                        default=argparse.SUPPRESS)


def add_base(parser: Any, *, required: bool, what: str = "base pipeline") -> None:
    """``--base`` (a local folder or a hub id) and ``--kind`` (which pipeline it is)."""
    parser.add_argument("--base", required=required, metavar="PATH_OR_ID",
                        help=f"{what}: a local diffusers folder or a hub id (from_pretrained)")
    parser.add_argument("--kind", choices=KIND_CHOICES, default="auto",
                        help="the base's kind: auto reads the folder's (or cached hub id's) model_index.json")


def add_experts(parser: Any, *, required: bool) -> None:
    """The experts: ``--adapter`` files, their rewards and KL weights, and a target alpha."""
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH_OR_ID", required=required,
                        help="a LoRA expert: diffusers LoRA file or folder, peft folder, or hub id "
                        "ORG/NAME[:SUBFOLDER][@REVISION] (repeat per expert)")
    parser.add_argument("--reward", action="append", default=[], metavar="NAME=REWARD",
                        help="the registry reward expert NAME serves, for files without our metadata (repeat; "
                        "dblend rewards lists them)")
    parser.add_argument("--alpha", action="append", default=[], metavar="[NAME=]A",
                        help="the KL weight an expert was fine-tuned with, for files without our metadata: NAME=A "
                        "(repeat) or A for every such file")
    parser.add_argument("--target-alpha", type=float, default=None, metavar="A",
                        help="blend experts of different alphas toward p_pre exp(lambda r_w / A) (coefficients "
                        "lambda w_i alpha_i / A); default: each expert's own alpha")
    parser.add_argument("--reward-options", metavar="JSON",
                        help='per-reward factory options, e.g. {"aesthetic": {"model": "/models/clip"}}')


def add_sampling(parser: Any, *, seed: bool = True) -> None:
    """Steps, guidance, the sampler's noise level, image size and seed (unset: the base kind's spec)."""
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the base kind's)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="guidance scale (default: the base kind's; FLUX: its distilled guidance)")
    parser.add_argument("--eta", type=float, default=None,
                        help="the sampler's noise: DDIM eta for SD / SDXL, the flow SDE's noise level for SD3 / FLUX "
                        "(default: the base kind's)")
    parser.add_argument("--resolution", default=None, metavar="N|HxW",
                        help="image size in pixels: N (square) or HxW (default: the base's native size)")
    if seed:
        parser.add_argument("--seed", type=int, default=0, help="seed of image 0; image k uses seed + k")


def add_method(parser: Any) -> None:
    """``--method``: how the experts are combined (the same three in ``sample`` and the UI)."""
    parser.add_argument("--method", choices=METHODS, default="mpa",
                        help="mpa: deterministic blend (DB-MPA); ls: one expert drawn per step (DB-MPA-LS); smc: "
                        "sequential Monte Carlo with the blend as proposal, toward the exact target (--particles)")


def add_smc(parser: Any) -> None:
    """SMC on the blend's options (``--method smc``; unset: :class:`~diffusion_blend.smc.SMCOptions`' defaults)."""
    parser.add_argument("--particles", type=int, default=None,
                        help="SMC: particles per image (default 4)")
    parser.add_argument("--smc-proposal", choices=SMC_PROPOSALS, default=None,
                        help="SMC's proposal: the blend's step, or the base's step moved by its variance times the "
                        "blend's score deviation (twisted SMC, for experts whose steps are continuous-time tilts; "
                        "docs/method.md) (default blend; evaluate --setting gmm: twisted)")
    parser.add_argument("--smc-proposal-tilt", type=proposal_tilt, default=None, help=TILT_HELP)
    parser.add_argument("--smc-potential", choices=SMC_POTENTIALS, default=None,
                        help="SMC's potential: r_w of the Tweedie estimate, 0, or the experts' value increments "
                        "(default tweedie)")
    parser.add_argument("--smc-potential-every", type=int, default=None,
                        help="SMC: evaluate the potential every k steps, held in between (default 1)")
    parser.add_argument("--smc-ess-threshold", type=float, default=None,
                        help="SMC: resample an image's particles when their ESS < threshold x N (0: never, 1: always; "
                        "default 0.5)")


TILT_HELP = ("SMC's proposal tilt: 'auto' (default: learned step by step from the run's own weights, never below the "
             "blend; docs/method.md) or a number t > 0: the proposal blends at KL scale t x lambda, the target keeps "
             "lambda")


def proposal_tilt(text: str) -> float | str:
    """``--smc-proposal-tilt``: ``auto`` or a number (checked by ``SMCOptions`` where the options are built)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {text!r}") from None


def add_device(parser: Any, *, routing: bool = True) -> None:
    """``--device``, ``--dtype`` and (where experts are evaluated) ``--routing``."""
    parser.add_argument("--device", default="auto",
                        help="torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:N, mps")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="weights dtype; auto: float16 on cuda, float32 on cpu")
    if routing:
        parser.add_argument("--routing", choices=ROUTINGS, default="auto",
                            help="how the experts are evaluated: one batched forward, one forward each, or auto "
                            "(sequential on CPU, batched on CUDA when it fits)")


def add_progress(parser: Any) -> None:
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_num_images(parser: Any) -> None:
    parser.add_argument("--num-images", type=int, default=None,
                        help=f"images per preference; image k uses seed + k (default {NUM_IMAGES}; the digits UI: "
                        f"{DIGITS_UI_IMAGES}, the sample size of its Pareto-plot estimates)")


def check_positive(args: argparse.Namespace, *dests: str) -> None:
    """Integer flags that must be >= 1 when given."""
    for dest in dests:
        value = getattr(args, dest, None)
        if value is not None and value < 1:
            raise DiffusionBlendError(f"{_flag(dest)} must be >= 1, got {value}")


def check_eta(eta: float | None) -> None:
    if eta is not None and not 0.0 <= eta <= 1.0:
        raise DiffusionBlendError(f"--eta must be in [0, 1], got {eta:g}")


def resolve_resolution(args: argparse.Namespace) -> None:
    """``--resolution`` (or the deprecated ``--height`` / ``--width``) into ``args.height`` and ``args.width``."""
    old = {dest: getattr(args, dest, None) for dest in ("height", "width")}
    given = [f"--{dest}" for dest, value in old.items() if value is not None]
    if given and args.resolution is not None:
        raise DiffusionBlendError(f"give the image size once: --resolution or {' and '.join(given)}, not both")
    if given:
        args.resolution = "x".join(str(old[dest] if old[dest] is not None else (old["width"] or old["height"]))
                                   for dest in ("height", "width"))
    args.height, args.width = parse_resolution(args.resolution)


def parse_resolution(text: str | None, flag: str = "--resolution") -> tuple[int | None, int | None]:
    """``N`` or ``HxW`` as ``(height, width)`` (``(None, None)`` when unset), each a positive multiple of 8."""
    if text is None:
        return None, None
    parts = str(text).lower().split("x")
    try:
        values = [int(part) for part in parts]
    except ValueError:
        raise DiffusionBlendError(f"{flag} takes N or HxW in pixels, got {text!r}") from None
    if len(values) not in (1, 2) or any(v < 8 or v % 8 for v in values):
        raise DiffusionBlendError(f"{flag} takes N or HxW, each a positive multiple of 8, got {text!r}")
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def square_resolution(text: str | None, flag: str = "--resolution") -> int | None:
    """A square ``--resolution N`` (fine-tuning and evaluation are square); ``HxW`` with ``H != W`` is refused."""
    height, width = parse_resolution(text, flag)
    if height != width:
        raise DiffusionBlendError(f"{flag} {text}: this command works on square images; give one size N")
    return height


def parse_pairs(items: list[str], flag: str = "--adapter", value: str = "PATH") -> dict[str, str]:
    """``NAME=VALUE`` arguments (``--adapter``, ``--reward``) as a dict; malformed or repeated names: one line."""
    pairs: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise DiffusionBlendError(f"cannot parse {flag} {item!r}: expected NAME={value}")
        if name.strip() in pairs:
            raise DiffusionBlendError(f"{flag} {name.strip()!r} given twice")
        pairs[name.strip()] = path.strip()
    return pairs


def parse_alphas(items: list[str], flag: str = "--alpha") -> tuple[float | None, dict[str, float]]:
    """``--alpha A`` (for every file without metadata) and ``--alpha NAME=A`` (one expert): the default and the
    per-expert values, each a positive number (alpha 0, no KL term, has an unbounded tilt: refused)."""
    default, per_expert = None, {}
    for item in items:
        name, sep, value = item.rpartition("=")
        what = f"{flag} {item}"
        try:
            number = float(value)
        except ValueError:
            raise DiffusionBlendError(f"cannot parse {what}: expected A or NAME=A with a number A") from None
        if number == 0:
            raise DiffusionBlendError(f"{what}: an expert fine-tuned without a KL term (alpha 0) has an unbounded "
                                      "tilt exp(r / alpha); no blend targets it")
        number = positive_number(number, what)
        if not sep:
            if default is not None:
                raise DiffusionBlendError(f"{flag} A given twice")
            default = number
        elif not name.strip() or name.strip() in per_expert:
            raise DiffusionBlendError(f"cannot parse {what}: a NAME=A pair per expert, each once")
        else:
            per_expert[name.strip()] = number
    return default, per_expert


@dataclass(frozen=True)
class ExpertOptions:
    """``add_experts``' flags, parsed and checked (no model loaded): what :meth:`BlendSession.open
    <diffusion_blend.pipelines.session.BlendSession.open>` takes."""

    adapters: dict[str, str]
    rewards: dict[str, str]
    default_alpha: float | None
    alphas: dict[str, float]
    target_alpha: float | None
    reward_options: dict[str, Any]


def expert_options(args: argparse.Namespace) -> ExpertOptions:
    """The experts' flags as :class:`ExpertOptions` (alphas positive; names are matched to the files by
    :func:`~diffusion_blend.pipelines.experts.read_experts`, before any model loads)."""
    adapters = parse_pairs(args.adapter)
    rewards = parse_pairs(args.reward, "--reward", "REWARD")
    default_alpha, alphas = parse_alphas(args.alpha)
    target_alpha = None if args.target_alpha is None else positive_number(args.target_alpha, "--target-alpha")
    return ExpertOptions(adapters, rewards, default_alpha, alphas, target_alpha, reward_options(args))


def reward_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--reward-options`` JSON as a dict (one line when it does not parse)."""
    import json

    if not getattr(args, "reward_options", None):
        return {}
    try:
        options = json.loads(args.reward_options)
    except json.JSONDecodeError as err:
        raise DiffusionBlendError(f"--reward-options is not valid JSON ({err})") from None
    if not isinstance(options, dict):
        raise DiffusionBlendError("--reward-options must be a JSON object: {\"reward\": {option: value}}")
    return options


def given_smc_flags(args: argparse.Namespace) -> list[str]:
    """The SMC flags given on the command line (their defaults are ``None``)."""
    return [_flag(dest) for dest in SMC_FIELDS if getattr(args, dest, None) is not None]


def refuse_smc_flags_without_smc(args: argparse.Namespace) -> None:
    """SMC's flags change nothing unless SMC runs: refused (naming them) rather than ignored."""
    given = given_smc_flags(args)
    if given and args.method != "smc":
        raise DiffusionBlendError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for --method smc "
                                  f"(this run uses --method {args.method})")


def smc_options(args: argparse.Namespace, proposal: str | None = None):
    """The SMC flags as :class:`~diffusion_blend.smc.SMCOptions` (checked once, errors in the flags' spelling);
    unset flags take its defaults (``proposal``: a setting's own default proposal)."""
    from diffusion_blend.smc import SMCOptions

    given = {field: getattr(args, dest) for dest, field in SMC_FIELDS.items() if getattr(args, dest, None) is not None}
    if proposal is not None:
        given.setdefault("proposal", proposal)
    try:
        return SMCOptions(**given)
    except DiffusionBlendError as err:
        raise DiffusionBlendError(in_flag_spelling(str(err), {f: _flag(d) for d, f in SMC_FIELDS.items()})) from None


def in_flag_spelling(message: str, flags: dict[str, str]) -> str:
    """A library message with its Python names replaced by the flags that set them: ``name='value'`` anywhere
    (``proposal='blend'`` -> ``--smc-proposal blend``), identifiers with an underscore anywhere (``proposal_tilt``),
    and a plain word that opens the message (``particles must be`` -> ``--particles must be``); other plain words
    stay English ("the pathwise estimator")."""
    import re

    for name in sorted(flags, key=len, reverse=True):
        message = re.sub(rf"(?<![\w-]){name}='(\w+)'", rf"{flags[name]} \1", message)
        anywhere = "_" in name
        pattern = rf"(?<![\w-]){name}(?![\w]|'s)" if anywhere else rf"^{name}(?![\w]|'s)"
        message = re.sub(pattern, flags[name], message)
    return message


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")
