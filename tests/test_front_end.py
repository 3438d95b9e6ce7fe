"""Shapes follow common.py's constants: a copy of the repository whose front end is changed in
common.py alone (96 mel bands, hop 256) runs the whole pipeline: synthetic data ->
spectrograms -> one epoch -> tagging a file."""
import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FRONT_END = {"N_MELS": 96, "HOP_LENGTH": 256, "N_FRAMES": 1256}  # 1 + 321,379 samples // 256


@pytest.mark.slow
def test_another_front_end_runs_end_to_end(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    common = repo / "src" / "common.py"
    text = common.read_text()
    for name, value in FRONT_END.items():
        text, n = re.subn(rf"^{name} = \d+", f"{name} = {value}", text, flags=re.M)
        assert n == 1, name
    common.write_text(text)
    data, out = tmp_path / "data", tmp_path / "experiments"

    def run(script, *args):
        done = subprocess.run([sys.executable, str(repo / "src" / script), *map(str, args)],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{script}: {done.stderr[-2000:]}"
        return done

    run("get_data.py", "--synthetic", "12", "--data-dir", data)
    run("gen_spectrograms.py", "--data-dir", data, "--workers", "2")
    spectrograms = np.load(data / "spectrograms.npy", mmap_mode="r")
    assert spectrograms.shape == (12, 96, 1256)
    meta = json.loads((data / "spectrograms.json").read_text())
    assert (meta["n_mels"], meta["hop_length"], meta["n_frames"]) == (96, 256, 1256)
    run("trainer.py", "--data-dir", data, "--out", out, "--run", "r", "--split", "random",
        "--train-size", "8",
        "--val-size", "2", "--epochs", "1", "--batch-size", "4", "--device", "cpu")
    clip = sorted((data / "mp3").glob("*/*.mp3"))[0]
    run("predict.py", clip, "--checkpoint", out / "r" / "best_model.pt", "--csv", tmp_path / "tags.csv")
    with open(tmp_path / "tags.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert ([row["path"] for row in rows] == [str(clip)] and rows[0]["error"] == ""
            and rows[0]["windows"] == "1")
    # the unchanged code refuses what the changed one made, in one line
    refused = subprocess.run([sys.executable, str(ROOT / "src" / "trainer.py"), "--data-dir", str(data),
                              "--out", str(out), "--run", "s", "--device", "cpu", "--split", "random",
                              "--train-size", "8", "--val-size", "2"], capture_output=True, text=True)
    assert refused.returncode == 1 and "was made with feature parameters" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
