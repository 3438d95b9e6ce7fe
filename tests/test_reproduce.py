"""reproduce.sh end to end at a small size: its real steps on a synthetic set."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def reproduce(tmp_path):
    env = dict(os.environ, SYNTHETIC="24", SPLITS="random", SEEDS="1 2", WORKERS="2",
               DATA=str(tmp_path / "data"), OUT=str(tmp_path / "study"),
               TRAIN_ARGS="--train-size 12 --val-size 6 --epochs 1 --batch-size 4 --device cpu",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))  # its `python`
    result = subprocess.run(["bash", str(ROOT / "reproduce.sh")], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_reproduce_runs_skips_finished_and_resumes_interrupted(tmp_path):
    out = reproduce(tmp_path)
    study = tmp_path / "study"
    assert sorted(p.name for p in study.iterdir()) == [
        "curves.png", "per_tag_gain.png", "random-scales1-seed1", "random-scales1-seed2", "random-seed1",
        "random-seed2", "report.md"]
    results = {seed: json.loads((study / f"random-seed{seed}" / "results.json").read_text())
               for seed in (1, 2)}
    assert [results[s]["seed"] for s in (1, 2)] == [1, 2] and results[1]["split"] == "random"
    assert results[1]["n_train"] == 12 and results[1]["epochs"] == 1
    report = (study / "report.md").read_text()
    assert "| random-seed1 | random | 1 | 1 | 1 |" in report
    # the ablation: --scales 1 with the same seeds, scored on the same clips, compared pair by pair
    single = json.loads((study / "random-scales1-seed1" / "results.json").read_text())
    assert single["scales"] == [1] and results[1]["scales"] == [1, 2, 3] and single["seed"] == 1
    assert "| random-scales1-seed1 | random, scales 1 | 1 | 1 | 1 |" in report
    assert "## How sure each test score is" in report and "### random split: scales 1 2 3 against 1" in report
    assert "On the random split, three scales (1 2 3) against one (1): test ROC-AUC difference" in report
    assert "2 seed pairs" in report and out.count("finished, skipped") == 0
    assert "study finished" in out

    # seed 1 finished; seed 2 killed after its last checkpoint, before results.json
    finished = (study / "random-seed1" / "results.json").stat().st_mtime_ns
    (study / "random-seed2" / "results.json").unlink()
    out = reproduce(tmp_path)
    assert f"{study}/random-seed1: finished, skipped" in out
    assert f"{study}/random-seed2: interrupted, resuming" in out
    assert (study / "random-seed1" / "results.json").stat().st_mtime_ns == finished
    assert json.loads((study / "random-seed2" / "results.json").read_text()) == results[2]
