"""The one ``lora-theory`` parser (lora_theory/cli.py): every command's help in words, bad arguments exit 2 naming
the argument, and only the module of the command being run is imported."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from lora_theory import cli

CONVERTED = list(cli.COMMANDS)


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out
    for name in CONVERTED:  # the one-line help, written once in the command's module
        first_words = " ".join(importlib.import_module(cli.COMMANDS[name]).HELP.split()[:4])
        assert first_words in " ".join(out.split())


@pytest.mark.parametrize("name", CONVERTED)
def test_command_module_contract_and_help_in_words(name, capsys):
    module = importlib.import_module(cli.COMMANDS[name])
    assert isinstance(module.HELP, str) and "\n" not in module.HELP and module.HELP
    assert isinstance(module.DESCRIPTION, str) and len(module.DESCRIPTION.split()) >= 10
    for text in (module.HELP, module.DESCRIPTION):
        assert "``" not in text and ":func:" not in text and ":mod:" not in text, text  # no RST
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    for action in parser._actions:  # every option and argument has its help text
        assert action.help, f"{name}: {action.dest} has no help"
    with pytest.raises(SystemExit) as exc:
        cli.main([name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: lora-theory {name}" in out and "`" not in out
    assert " ".join(module.DESCRIPTION.split()[:6]) in " ".join(out.split())


@pytest.mark.parametrize("argv, named", [
    (["nosuch"], "COMMAND"),
    ([], "COMMAND"),
    (["verify", "nosuch-topic"], "TOPIC"),
    (["verify", "--seed", "x"], "--seed"),
    (["data", "--fetch", "imagenet"], "--fetch"),
    (["bench", "--bogus"], "--bogus"),
])
def test_bad_arguments_exit_2_naming_the_argument(argv, named, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and named in err


def test_only_the_command_run_is_imported():
    """``lora-theory verify --help`` builds the verify parser alone: the engine, the figures and diagnose are not
    imported (in a fresh interpreter, so that other tests' imports do not count)."""
    code = ("import sys\nfrom lora_theory import cli\ntry:\n    cli.main(['verify', '--help'])\nexcept SystemExit:\n"
            "    pass\nheavy = [m for m in ('torch', 'toymodels.loop', 'figures', 'diagnose') if m in sys.modules]\n"
            "print('IMPORTED', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "IMPORTED []" in out, out


def test_verify_runs_one_topic(capsys):
    assert cli.main(["verify", "rank_scaling", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "rank_scaling" in out and "checks passed" in out and "(seed 3)" in out and "FAIL" not in out
