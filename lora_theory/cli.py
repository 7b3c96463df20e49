"""The ``lora-theory`` command: one argument parser with a sub-command per task.

The top layer of the package: it imports the layers below (analysis, toymodels, figures, diagnose); none of them
imports it. Each command lives with its package in a module that exposes ``HELP`` (one line), ``DESCRIPTION``
(a paragraph), ``add_arguments(parser)`` and ``run(args) -> exit status``; :data:`COMMANDS` lists them. Only the
module of the command being run is imported (``lora-theory diagnose`` never imports the training engine), except
for ``lora-theory --help``, which shows every command's one-line help.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import textwrap

DESCRIPTION = (
    "Check the theory of LoRA fine-tuning: prove the closed forms, regenerate the papers' figures with measured "
    "verdicts, diagnose your own PEFT adapters, run your own sweeps and judge their results. "
    "Run 'lora-theory COMMAND --help' for the options of a command."
)

# command -> the module that implements it (HELP, DESCRIPTION, add_arguments, run), in the order of the help
COMMANDS = {
    "verify": "analysis.verify.cli",
    "data": "toymodels.data_cli",
    "sweep": "toymodels.sweep_cli",
    "stats": "lora_theory.stats",
    "figures": "figures.cli",
    "diagnose": "diagnose.cli",
    "bench": "lora_theory.bench",
}


class _Formatter(argparse.HelpFormatter):
    """Descriptions as paragraphs: each blank-line-separated paragraph is wrapped on its own; an indented line
    (an example command) is kept as written."""

    def _fill_text(self, text, width, indent):
        out = []
        for para in text.split("\n\n"):
            if para.startswith(" "):
                out.append(textwrap.indent(para, indent))
            else:
                out.append(textwrap.fill(re.sub(r"\s+", " ", para).strip(), width, initial_indent=indent,
                                         subsequent_indent=indent))
        return "\n\n".join(out)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or, with ``only``, of that command alone (the others' modules not imported)."""
    parser = argparse.ArgumentParser(prog="lora-theory", description=DESCRIPTION, formatter_class=_Formatter)
    sub = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        if only is not None and name != only:
            continue
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION, formatter_class=_Formatter)
        module.add_arguments(command)
        command.set_defaults(run_command=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        only = argv[0] if argv[:1] and argv[0] in COMMANDS else None
        args = build_parser(only).parse_args(argv)
        return args.run_command(args)
    except KeyboardInterrupt:  # Ctrl-C: a sweep has already said what is cached and how to resume; no traceback
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
