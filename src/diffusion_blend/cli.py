"""``dblend``: the command-line interface (layer 9: parse, call the library, print).

Each sub-command lives in its own module under ``diffusion_blend.commands`` and exposes
``register(subparsers)``, which adds a parser whose ``func(args)`` runs the command. Registering must stay
cheap: command modules import torch, diffusers and the rest inside ``func``, so ``dblend --help``,
``dblend COMMAND --help`` and ``dblend coefficients`` start without them (tests/test_cli.py checks that no
heavy module is imported). Bad input, and a full disk, end with one readable line on stderr and exit status 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from diffusion_blend import __version__, commands


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that ends each option with its default, unless the text already names it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = (action.help or "").strip()
        default = action.default
        if ("default" in text or "%(default)" in text or default is None or default is False
                or default == [] or default is argparse.SUPPRESS or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``dblend: error: ...``) and exit status 2; help shows defaults."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"dblend: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="dblend", description="Diffusion Blend: inference-time multi-preference alignment for diffusion models."
    )
    parser.add_argument("--version", action="version", version=f"dblend (diffusion-blend) {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        if hasattr(module, "register"):  # (commands.options holds the shared options, not a command)
            module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from diffusion_blend.files import is_disk_full
    from diffusion_blend.quiet import install_log_filters

    install_log_filters()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("dblend: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
            FileExistsError) as err:
        if args.debug:
            raise
        print(f"dblend: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # unexpected: still one line unless --debug
        if args.debug:
            raise
        if is_disk_full(err):  # a writer outside files.atomic_path (a library's save) ran out of space
            print(f"dblend: error: no space left on the device ({_one_line(err)}); free some space and run the "
                  "command again", file=sys.stderr)
            return 2
        print(f"dblend: internal error: {type(err).__name__}: {_one_line(err)} (rerun with --debug for details)",
              file=sys.stderr)
        return 1
    return int(result or 0)


def _one_line(err: BaseException) -> str:
    """The error's message on one line (a multi-line message from a library is joined)."""
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
