"""The command-line conventions (provkit.cli_shell, the README's "Command-line conventions"), held against
the parser of every command of every console script in pyproject.toml's [project.scripts].

The parsers are found, not listed: each script's ``main([])`` runs until it asks argparse to parse, and the
parser it built is taken from there; every subcommand is walked from it.  A command added later is checked
without a change here.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from mainkit.shell import Verbatim, json_ready, print_json
from provkit.cli_shell import KEY_TYPE_NAMES, RETIRED_NAMES

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


class _Built(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__()
        self.parser = parser


def _root_parser(entry: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    module, _, name = entry.partition(":")
    main = getattr(importlib.import_module(module), name)

    def caught(self: argparse.ArgumentParser, *_: object, **__: object) -> None:
        raise _Built(self)

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_known_args", caught)
        with pytest.raises(_Built) as built:
            main([])
    return built.value.parser


def _walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, f"{path} {name}")


def _commands(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, argparse.ArgumentParser]]:
    found = []
    for script, entry in SCRIPTS.items():
        found += list(_walk(_root_parser(entry, monkeypatch), script))
    return found


@pytest.fixture(scope="module")
def commands() -> list[tuple[str, argparse.ArgumentParser]]:
    with pytest.MonkeyPatch.context() as patch:
        return _commands(patch)


def _arguments(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        if action.help == argparse.SUPPRESS:
            continue
        yield action


def _name(action: argparse.Action) -> str:
    return "/".join(action.option_strings) or action.dest


def test_every_console_script_is_walked(commands):
    assert {path.split()[0] for path, _ in commands} == set(SCRIPTS)
    assert len(commands) > len(SCRIPTS)  # the subcommands too


def test_every_argument_and_subcommand_has_help(commands):
    missing = [
        f"{path}: {_name(action)}"
        for path, parser in commands
        for action in _arguments(parser)
        if not (action.help or "").strip()
    ]
    for path, parser in commands:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helped = {choice.dest for choice in action._choices_actions if (choice.help or "").strip()}
                missing += [f"{path} {name}" for name in action.choices if name not in helped]
    assert missing == []


def test_help_is_plain_text_without_rest_markup(commands):
    marked = [path for path, parser in commands if "``" in parser.format_help()]
    assert marked == []


def test_a_numeric_option_names_its_unit(commands):
    unnamed = [
        f"{path}: {_name(action)}"
        for path, parser in commands
        for action in _arguments(parser)
        if action.option_strings and action.type in (int, float) and not action.metavar
    ]
    assert unnamed == []


def test_an_option_with_a_default_shows_it(commands):
    hidden = []
    for path, parser in commands:
        formatter = parser._get_formatter()
        for action in _arguments(parser):
            default = action.default
            if not action.option_strings or default is None or isinstance(default, bool) or default == "":
                continue
            if "default" not in formatter._format_action(action):
                hidden.append(f"{path}: {_name(action)}")
    assert hidden == []


def test_options_are_never_abbreviated(commands):
    assert [path for path, parser in commands if parser.allow_abbrev] == []


def test_shared_concepts_have_one_name_and_one_spelling(commands):
    retired = [
        f"{path}: {name} (say {RETIRED_NAMES[name]})"
        for path, parser in commands
        for action in parser._actions
        for name in (*action.option_strings, action.dest if not action.option_strings else "")
        if name in RETIRED_NAMES
    ]
    assert retired == []
    key_types = [
        (path, tuple(action.choices or ()))
        for path, parser in commands
        for action in parser._actions
        if "--key-type" in action.option_strings
    ]
    assert key_types, "no command takes --key-type any more?"
    assert [(path, choices) for path, choices in key_types if not set(choices) <= set(KEY_TYPE_NAMES)] == []
    ids = [
        f"{path}: {action.dest}"
        for path, parser in commands
        for action in parser._actions
        if not action.option_strings
        and re.search(r"(^|_)(guid|id)$", action.dest)
        and action.dest != "device_id"
        and "device" in (action.help or "").lower()
    ]
    assert ids == []


def test_json_flags_are_switches_with_help(commands):
    wrong = [
        path
        for path, parser in commands
        for action in parser._actions
        if "--json" in action.option_strings and not (action.nargs == 0 and action.help)
    ]
    assert wrong == []


# -- --json output ------------------------------------------------------------------------------------
def test_json_output_has_snake_case_keys_and_null_for_absent(capsys):
    print_json({"device_id": "x", "owner": "", "desired": {"properties": Verbatim({"telemetryInterval": 5})}})
    assert capsys.readouterr().out == (
        '{\n  "device_id": "x",\n  "owner": null,\n  "desired": {\n    "properties": {\n'
        '      "telemetryInterval": 5\n    }\n  }\n}\n'
    )
    for wrong in ({"device id": 1}, {"deviceId": 1}, {"ok": [{"Bad": 1}]}):
        with pytest.raises(ValueError, match="not snake_case"):
            json_ready(wrong)


def _prints_json_by_hand(path: Path) -> list[int]:
    """Lines where ``print(json.dumps(...))`` writes a command's output past ``print_json``."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print" and node.args:
            inner = node.args[0]
            if isinstance(inner, ast.Call) and ast.unparse(inner.func) == "json.dumps":
                lines.append(node.lineno)
    return lines


def test_every_json_answer_goes_through_print_json():
    """So the key check above is made on every --json answer a test produces (it runs on every print)."""
    by_hand = {
        str(path.relative_to(ROOT)): lines
        for path in sorted((ROOT / "src").rglob("*.py"))
        if path != ROOT / "src" / "mainkit" / "shell.py" and (lines := _prints_json_by_hand(path))
    }
    assert by_hand == {}
