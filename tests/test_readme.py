"""The README's commands are the ones CI runs, its links lead somewhere, and every --help reads right."""
import importlib
import re

import pytest

from conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_commands_as_written():
    commands = [line.strip() for line in README.splitlines()
                if re.match(r"\s{4}pip install -r requirements", line)]
    assert len(commands) == 2, commands  # the demo and the tests
    ci_lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    for command in commands:
        command = command.split("  #")[0].strip()  # the README's comment is not part of it
        assert command in ci_lines, f"README command not run by .ci/run: {command}"


def test_readme_is_short_and_its_local_links_exist():
    assert len(README.splitlines()) <= 210
    targets = re.findall(r"\]\(((?:docs|src|tests)/[^)#]+)", README)
    assert "docs/faults.md" in targets and "docs/trainer.md" in targets
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, missing


@pytest.mark.parametrize("script", ["get_data", "gen_spectrograms", "trainer", "predict", "report", "benchmark"])
def test_each_help_states_a_default_once_and_never_none(script, capsys):
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(script).main(["--help"])
    assert stop.value.code == 0
    options = re.split(r"\n {2}(?=-)", capsys.readouterr().out)[1:]  # one block per flag
    assert len(options) >= 3
    for block in options:
        block = " ".join(block.split())
        assert "(default: None)" not in block and "(default: False)" not in block, block
        assert block.count("(default") <= 1, block
