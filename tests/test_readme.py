"""The README's commands are the ones CI runs, its links lead somewhere, every --help reads right,
and what the commands and the suite write stays out of git status and the temporary folder."""
import configparser
import importlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

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


@pytest.mark.parametrize("script", ["get_data", "gen_spectrograms", "trainer", "predict", "report",
                                    "benchmark", "export"])
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


def test_what_the_readme_commands_write_stays_out_of_git_status(tmp_path):
    """In a repository with this .gitignore: the README's virtual environment (a real one),
    the demo's data and run, caches. `git status` shows none of them."""
    (tmp_path / ".gitignore").write_bytes((ROOT / ".gitignore").read_bytes())
    env = dict(os.environ, GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1")  # no user excludes
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True, env=env)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", ".venv"], cwd=tmp_path, check=True)
    for written in ("data/demo/annotations_final.csv", "data/demo/mp3/0/synthetic-000001.mp3",
                    "data/demo/spectrograms.npy", "experiments/demo-20260101-000000/best_model.pt",
                    "models/demo/model.safetensors",
                    "src/__pycache__/common.cpython-311.pyc", ".pytest_cache/README.md"):
        (tmp_path / written).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / written).write_bytes(b"x")
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=tmp_path,
                            capture_output=True, text=True, check=True, env=env).stdout
    assert status == "?? .gitignore\n"


def test_setup_cfg_configures_tools_and_promises_no_package():
    """The scripts run from the clone (python src/x.py); `pip install .` is not offered."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert set(config.sections()) == {"tool:pytest"}  # ruff's settings: .ruff.toml
    assert not (ROOT / "setup.py").exists() and not (ROOT / "pyproject.toml").exists()
    assert "`pip install .`" in README


def test_the_suite_s_temporary_files_go_with_pytest_s_folders(tmp_path_factory, tmp_path):
    """What the scripts write to the system's temporary folder lands in pytest's basetemp
    (conftest.py), and a passing run removes its folders (setup.cfg): nothing is left."""
    assert os.environ["TMPDIR"] == tempfile.gettempdir()
    assert Path(tempfile.gettempdir()).parent == tmp_path_factory.getbasetemp()
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    inner = "tests/test_readme.py::test_what_the_readme_commands_write_stays_out_of_git_status"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", inner], cwd=ROOT,
                          env=dict(os.environ, TMPDIR=str(system_tmp)), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-2000:]
    assert [p for p in system_tmp.rglob("*") if not p.is_dir()] == []


def test_licence_and_citation_name_the_code_and_the_paper_the_readme_cites():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")
    citation = (ROOT / "CITATION.cff").read_text()
    doi = re.search(r"doi:(10\.\S+?)\)", README)[1]  # the paper, as the README's first lines cite it
    assert "cff-version: 1.2.0" in citation and "license: MIT" in citation
    assert re.search(r"^preferred-citation:\n(  .*\n)*  doi: \"" + re.escape(doi) + '"', citation, re.M)
    assert "[LICENSE](LICENSE)" in README and "[CITATION.cff](CITATION.cff)" in README
