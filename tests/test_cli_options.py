"""One concept, one flag, one default: the shared options of ``sample``, ``ui``, ``evaluate`` and ``finetune``.

:data:`SHARED` is the table (one place to change): each concept's flag, the commands that take it, and what must be
the same in all of them (type, choices, default, how it repeats). The parsers are read back from ``dblend``'s own
argparse tree; the choices of kinds and dtypes are checked against the kinds' spec and the device layer.
"""

from __future__ import annotations

import argparse

import pytest

from diffusion_blend.cli import build_parser
from diffusion_blend.commands.options import proposal_tilt
from diffusion_blend.devices import DTYPE_CHOICES, ROUTINGS
from diffusion_blend.pipelines.kinds import SPECS
from diffusion_blend.smc import SMCOptions

PIPELINE_COMMANDS = ("sample", "ui", "evaluate")
ALL = (*PIPELINE_COMMANDS, "finetune")
KIND_CHOICES = ["auto", *SPECS]

SHARED = {
    # concept: (flag, commands, {attribute: value every command's action must have})
    "base": ("--base", ALL, {"default": None}),
    "kind": ("--kind", PIPELINE_COMMANDS, {"choices": KIND_CHOICES, "default": "auto"}),
    "expert": ("--adapter", PIPELINE_COMMANDS, {"default": [], "append": True}),
    "an expert's reward": ("--reward", PIPELINE_COMMANDS, {"default": [], "append": True}),
    "an expert's alpha": ("--alpha", PIPELINE_COMMANDS, {"default": [], "append": True}),
    "target alpha": ("--target-alpha", PIPELINE_COMMANDS, {"default": None, "type": float}),
    "reward options": ("--reward-options", ALL, {"default": None}),
    "steps": ("--steps", ALL, {"default": None, "type": int}),
    "guidance": ("--guidance-scale", ALL, {"default": None, "type": float}),
    "sampler noise": ("--eta", ALL, {"default": None, "type": float}),
    "image size": ("--resolution", ALL, {"default": None}),
    "images per preference": ("--num-images", ("sample", "ui"), {"default": None, "type": int}),
    "device": ("--device", ALL, {"default": "auto", "choices": None}),
    "dtype": ("--dtype", ALL, {"choices": list(DTYPE_CHOICES)}),
    "routing": ("--routing", ALL, {"choices": list(ROUTINGS), "default": "auto"}),
    "progress": ("--no-progress", ("sample", "evaluate", "finetune"), {"default": False}),
    "SMC particles": ("--particles", PIPELINE_COMMANDS, {"default": None, "type": int}),
    "SMC proposal": ("--smc-proposal", PIPELINE_COMMANDS, {"default": None, "choices": ["blend", "twisted"]}),
    "SMC proposal tilt": ("--smc-proposal-tilt", PIPELINE_COMMANDS, {"default": None, "type": proposal_tilt}),
    "SMC potential": ("--smc-potential", PIPELINE_COMMANDS,
                      {"default": None, "choices": ["tweedie", "none", "experts"]}),
    "SMC potential every": ("--smc-potential-every", PIPELINE_COMMANDS, {"default": None, "type": int}),
    "SMC ESS threshold": ("--smc-ess-threshold", PIPELINE_COMMANDS, {"default": None, "type": float}),
}
EXCEPTIONS = {
    ("finetune", "--dtype"): {"default": None},  # unset: the recipe's (or --config's) dtype; `auto` as elsewhere
}
"""Where a command's default differs, and why (its help says so)."""
DEPRECATED = {
    "sample": {"--pipeline": "--kind", "--height": "--resolution", "--width": "--resolution"},
    "ui": {"--sd-base": "--base"},
    "evaluate": {"--pipeline": "--kind", "--rewards": "--reward"},
    "finetune": {"--target": "--kind", "--quiet": "--no-progress"},
}
"""Old spellings kept for one release (hidden from --help, a one-line notice when used)."""


def commands() -> dict[str, argparse.ArgumentParser]:
    return dict(build_parser()._subparsers._group_actions[0].choices)


def action(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    found = [a for a in parser._actions if flag in a.option_strings]
    assert found, f"{parser.prog} has no {flag}"
    return found[0]


def observed(act: argparse.Action, attribute: str):
    if attribute == "append":
        return isinstance(act, argparse._AppendAction)
    value = getattr(act, attribute)
    return list(value) if attribute == "choices" and value is not None else value


@pytest.mark.parametrize("concept", sorted(SHARED))
def test_a_shared_concept_has_one_flag_and_one_default(concept):
    flag, names, expected = SHARED[concept]
    parsers = commands()
    for name in names:
        act = action(parsers[name], flag)
        want = {**expected, **EXCEPTIONS.get((name, flag), {})}
        got = {attribute: observed(act, attribute) for attribute in want}
        assert got == want, f"{name} {flag}"


def test_the_smc_defaults_are_smc_options_defaults():
    """Unset SMC flags take :class:`SMCOptions`' defaults in every command (the parsers hold ``None``)."""
    from diffusion_blend.commands.options import smc_options

    args = commands()["sample"].parse_args(["--base", "b", "--adapter", "a=x", "--weights", "a=1", "--prompt", "p",
                                            "--out", "o"])
    assert smc_options(args) == SMCOptions()


@pytest.mark.parametrize("name", sorted(DEPRECATED))
def test_old_spellings_are_hidden_aliases_with_a_notice(name, capsys):
    parser = commands()[name]
    for old, new in DEPRECATED[name].items():
        act = action(parser, old)
        assert act.help == argparse.SUPPRESS and new in act.new  # stores into the new flag's value
        assert old not in parser.format_help()
    if name == "sample":
        args = parser.parse_args(["--base", "b", "--adapter", "a=x", "--weights", "a=1", "--prompt", "p", "--out", "o",
                                  "--pipeline", "sd3"])
        assert args.kind == "sd3"
        assert "--pipeline is deprecated; use --kind" in capsys.readouterr().err


def test_every_option_of_every_command_has_help_text_and_shows_its_choices():
    for name, parser in commands().items():
        text = parser.format_help()
        for act in parser._actions:
            if not act.option_strings or act.help == argparse.SUPPRESS:
                continue
            assert act.help and act.help.strip() and not act.help.startswith("(default"), \
                f"{name} {act.option_strings[0]} has no help text"
            if act.choices:
                assert "{" + ",".join(map(str, act.choices)) + "}" in text, f"{name} {act.option_strings[0]}"
