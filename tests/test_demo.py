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
def test_synthetic_data_to_trained_model(tmp_path, mtat_clip):
    run_script("get_data.py", "--synthetic", "112", "--seed", "1", "--data-dir", "data/demo", cwd=tmp_path)
    run_script("gen_spectrograms.py", "--data-dir", "data/demo", "--workers", "2", cwd=tmp_path)
    meta = json.loads((tmp_path / "data/demo/spectrograms.json").read_text())
    assert meta["n_clips"] == 112 and meta["failed"] == []
    result = run_script("trainer.py", "--data-dir", "data/demo", "--run", "demo", "--split", "random",
                        "--train-size", "64", "--val-size", "24", "--epochs", "4", "--batch-size", "8",
                        "--bn-momentum", "0.1", "--device", "cpu", cwd=tmp_path)
    run_dir = tmp_path / "experiments" / "demo"
    assert sorted(p.name for p in run_dir.iterdir()) == ["best_model.pt", "last.pt", "metrics.csv",
                                                        "results.json",
                                                        "test_scores.npz"]
    results = json.loads((run_dir / "results.json").read_text())
    assert result.stdout.splitlines()[-1].startswith("best validation ROC-AUC")
    assert f"best model: {run_dir.relative_to(tmp_path) / 'best_model.pt'}" in result.stdout
    # the synonym merge ran on the way: merged names, not MTAT's spellings
    assert "drum" in results["test_roc_auc_per_tag"] and "drums" not in results["test_roc_auc_per_tag"]
    assert results["test_roc_auc"] >= 0.7, results  # clearly above chance after 4 short epochs
    # it knows what it was trained on, and says so when it tags real music
    assert results["provenance"]["data"]["dataset"] == "synthetic"
    assert results["provenance"]["split"] | {"rows_md5": None} == dict(
        name="random", split_seed=1337, n_train=64, n_val=24, n_test=24, rows_md5=None)
    tagged = run_script("predict.py", str(mtat_clip), "--checkpoint", str(run_dir), cwd=tmp_path)
    assert tagged.stderr.splitlines()[:2] == [
        f"model: trained on a synthetic set (data/demo/annotations_final.csv), split random (64 / 24 / 24 "
        f"clips), epoch {results['epoch']}: validation ROC-AUC {results['val_roc_auc']:.4f}, test ROC-AUC "
        f"{results['test_roc_auc']:.4f}",
        "warning: this model was trained on a synthetic demo set (get_data.py --synthetic), not MTAT: its "
        "tags say little about real music"]
    # shared as a model folder, it tags as its checkpoint does, and still says what it was trained on
    run_script("export.py", "experiments/demo", "--out", "models/demo", cwd=tmp_path)
    card = json.loads((tmp_path / "models/demo/model.json").read_text())
    assert card["training_data"]["dataset"] == "synthetic" and "synthetic" in card["warning"]
    rows = {}
    for checkpoint in ("experiments/demo", "models/demo"):
        tagged = run_script("predict.py", str(mtat_clip), "--checkpoint", checkpoint, "--csv", "tags.csv",
                            cwd=tmp_path)
        assert "warning: this model was trained on a synthetic demo set" in tagged.stderr
        header, row = (tmp_path / "tags.csv").read_text().splitlines()
        rows[checkpoint] = row.split(",")
    column = header.split(",").index("checkpoint_sha256")
    assert [cell for i, cell in enumerate(rows["models/demo"]) if i != column] == \
        [cell for i, cell in enumerate(rows["experiments/demo"]) if i != column]
