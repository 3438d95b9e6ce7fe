"""The demo path end to end through the real scripts, by subprocess, at a small size."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT


def run_script(*argv, cwd):
    result = subprocess.run([sys.executable, str(ROOT / "src" / argv[0]), *argv[1:]], cwd=cwd,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{argv[0]} failed:\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_synthetic_data_to_trained_model(tmp_path):
    run_script("get_data.py", "--synthetic", "112", "--seed", "1", "--data-dir", "data/demo", cwd=tmp_path)
    run_script("gen_spectrograms.py", "--data-dir", "data/demo", "--workers", "2", cwd=tmp_path)
    meta = json.loads((tmp_path / "data/demo/spectrograms.json").read_text())
    assert meta["n_clips"] == 112 and meta["failed"] == []
    result = run_script("trainer.py", "--data-dir", "data/demo", "--run", "demo", "--split", "random",
                        "--train-size", "64", "--val-size", "24", "--epochs", "4", "--batch-size", "8",
                        "--bn-momentum", "0.1", "--device", "cpu", cwd=tmp_path)
    run_dir = tmp_path / "experiments" / "demo"
    assert sorted(p.name for p in run_dir.iterdir()) == ["best_model.pt", "last.pt", "metrics.csv", "results.json",
                                                        "test_scores.npz"]
    results = json.loads((run_dir / "results.json").read_text())
    assert result.stdout.splitlines()[-1].startswith("best validation ROC-AUC")
    assert f"best model: {run_dir.relative_to(tmp_path) / 'best_model.pt'}" in result.stdout
    # the synonym merge ran on the way: merged names, not MTAT's spellings
    assert "drum" in results["test_roc_auc_per_tag"] and "drums" not in results["test_roc_auc_per_tag"]
    assert results["test_roc_auc"] >= 0.7, results  # clearly above chance after 4 short epochs
