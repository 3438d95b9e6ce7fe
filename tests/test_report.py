"""report.py on real trainer runs: the table, mean ± sample std per split, curves, errors."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import SRC, write_spectrogram_set

import common
import formats
import report
import trainer


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two one-epoch runs that differ only in --seed, on spectrograms of pure noise (on the
    learnable set both score 1.0, and a standard deviation of 0 would check nothing)."""
    data = tmp_path_factory.mktemp("noise")
    write_spectrogram_set(data, 48, n_tags=4, seed=0)
    noise = np.random.default_rng(0).normal(-8.0, 1.0, (48, common.N_MELS, common.N_FRAMES))
    np.save(data / "spectrograms.npy", noise.astype(np.float16))
    out = tmp_path_factory.mktemp("study")
    for seed in ("1", "2"):
        trainer.main(["--data-dir", str(data), "--out", str(out), "--run", f"seed{seed}",
                      "--epochs", "1", "--seed", seed, "--split", "random", "--train-size", "32",
                      "--val-size", "8", "--batch-size", "32", "--n-tags", "4", "--no-merge",
                      "--device", "cpu"])
    return out


@pytest.mark.slow
def test_report_table_mean_and_sample_std(two_runs, capsys):
    text = report.main([str(two_runs)])
    assert capsys.readouterr().out == text
    assert (two_runs / "report.md").read_text() == text
    results = [json.loads((two_runs / f"seed{s}" / "results.json").read_text()) for s in ("1", "2")]
    assert [r["seed"] for r in results] == [1, 2] and results[0]["split"] == "random"
    for r, name in zip(results, ("seed1", "seed2")):
        assert (f"| {name} | random | {r['seed']} | 1 | {r['epoch']} | {r['val_roc_auc']:.4f} | "
                f"{r['val_pr_auc']:.4f} | {r['test_roc_auc']:.4f} | {r['test_pr_auc']:.4f} |") in text
    # the seeds change the model, not the split: same clips, different scores
    assert results[0]["n_test"] == results[1]["n_test"]
    assert results[0]["test_roc_auc"] != results[1]["test_roc_auc"]
    row = next(line for line in text.splitlines() if line.startswith("| random | 2 |"))
    for key in ("val_roc_auc", "test_roc_auc", "test_pr_auc"):
        values = [r[key] for r in results]
        assert f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}" in row, (key, row)
    population_std = np.std([r["test_roc_auc"] for r in results], ddof=0)
    assert f"± {population_std:.4f}" not in row  # the sample standard deviation, not the population's
    assert "none (not a published split)" in row
    assert (two_runs / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# what format_report needs of a run beyond its scores: as load_run gives it
OVERLAP = {"test": {"n_clips": 100, "song": 3, "album": 5, "artist": 9, "unparsed": 0}}


def test_report_references_and_one_run(tmp_path):
    runs = [{"name": f"{split}-seed1", "split": split, "seed": 1, "epochs": 40, "epoch": 30,
             "val_roc_auc": 0.9, "val_pr_auc": 0.4, "test_roc_auc": 0.905, "test_pr_auc": 0.45, "history": [],
             "run_dir": tmp_path, "scales": common.SCALES, "split_overlap": OVERLAP}
            for split in ("clean", "paper")]
    text = report.format_report(runs)
    assert ("| paper | 1 | 0.9000 ± n/a | 0.9050 ± n/a | 0.4500 ± n/a | Dabral et al. 2018: test ROC-AUC "
            "0.900") in text
    assert "Won et al. 2020, 9 models: ROC-AUC 0.8722–0.9129, PR-AUC 0.3625–0.4614" in text
    # the clean runs' mean takes its place in Won et al.'s table, by ROC-AUC
    rows = [line for line in text.split("against the field")[1].splitlines() if line.startswith("| ")][2:]
    assert rows[5].startswith("| Sample-level | 0.9058") and rows[6].startswith("| **this project")
    assert text.index("| paper |") < text.index("| clean |")
    assert "| paper-seed1 | paper | 1 | 40 | 30 | 0.9000 | 0.4000 | 0.9050 | 0.4500 | 3 (3.0%) |" in text


def test_report_errors_are_one_line(tmp_path, mtat_clip):
    with pytest.raises(SystemExit, match=f"^error: {mtat_clip}: neither UTF-8 text nor an intact gzip"):
        report.main(["--splits", str(mtat_clip)])
    with pytest.raises(SystemExit, match="no runs found in"):
        report.main([str(tmp_path)])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match="has no results.json: the run has not finished"):
        report.main([str(tmp_path / "run")])
    results = tmp_path / "run" / "results.json"
    results.write_text('{"epoch": 3}')  # no format_version: not of this trainer.py
    with pytest.raises(SystemExit) as stop:
        report.main([str(tmp_path / "run")])
    assert str(stop.value) == (f"error: {results} is of format None, this code reads {formats.RUN_FORMAT}; "
                               "rerun that run with this trainer.py")
    results.write_text(json.dumps({"epoch": 3, "format_version": formats.RUN_FORMAT}))
    with pytest.raises(SystemExit, match="lacks split, seed, epochs"):
        report.main([str(tmp_path / "run")])


def test_report_names_each_reference_with_its_split_and_keeps_scales_apart(tmp_path):
    runs = [{"name": f"folder-{tag}seed{seed}", "split": "folder", "seed": seed, "epochs": 40, "epoch": 30,
             "val_roc_auc": 0.9, "val_pr_auc": 0.4, "test_roc_auc": roc, "test_pr_auc": 0.41, "history": [],
             "run_dir": tmp_path, "scales": scales, "split_overlap": OVERLAP}
            for seed in (1, 2) for tag, roc, scales in (("", 0.912 + seed / 1000, common.SCALES),
                                                        ("scales1-", 0.905, (1,)))]
    text = report.format_report(runs)
    # the paper's three scales are the split's own row; --scales 1 is its own group
    assert ("| folder | 2 | 0.9000 ± 0.0000 | 0.9135 ± 0.0007 | 0.4100 ± 0.0000 | MARBLE, frozen features "
            "probed: MERT-330M 0.913, MusicFM 0.913, MuQ 0.914 ROC-AUC, PR-AUC about 0.40 |") in text
    assert "| folder, scales 1 | 2 | 0.9000 ± 0.0000 | 0.9050 ± 0.0000 |" in text
    assert "| folder-scales1-seed1 | folder, scales 1 | 1 |" in text
    references = text.split("## Published references, by split")[1]
    assert "**paper split**" in references and "Dabral et al. 2018" in references
    assert "**clean split**" in references and "Won et al. 2020" in references
    assert "**folder split**" in references and "18,706 / 1,825 / 5,329" in references
    assert "MARBLE" in references
    field = text.split("## The folder split against the field")[1]
    rows = [line for line in field.splitlines() if line.startswith("| ")]
    assert rows[1:] == ["| MuQ | 0.914 | about 0.40 |",
                        "| **this project: multi-scale CNN, mean of 2 run(s)** | 0.9135 | 0.4100 |",
                        "| MERT-330M | 0.913 | about 0.40 |", "| MusicFM | 0.913 | about 0.40 |",
                        "| **this project: --scales 1, mean of 2 run(s)** | 0.9050 | 0.4100 |"]


# report.py as a script, its check of --out made slow: the signal comes while it works
SLOW_REPORT = """
import runpy, sys, time
sys.path.insert(0, {src!r})
import plumbing
def slow_check_folder(path, flag):
    print("working", flush=True)
    time.sleep(60)
plumbing.check_folder = slow_check_folder
sys.argv = ["report.py", {run_dir!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_report_in_one_line_with_its_exit_status(tmp_path, signum):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps({
        "split": "random", "seed": 1, "epochs": 1, "epoch": 1, "val_roc_auc": 0.9, "val_pr_auc": 0.4,
        "test_roc_auc": 0.9, "test_pr_auc": 0.4, "scales": [1, 2, 3], "split_overlap": OVERLAP,
        "format_version": formats.RUN_FORMAT}))
    code = SLOW_REPORT.format(src=str(SRC), run_dir=str(run_dir), script=str(SRC / "report.py"))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline() == "working\n"
        os.kill(proc.pid, signum)  # SIGTERM ended it without a word, Ctrl-C with a traceback
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, err  # 143, 130
    assert "Traceback" not in err
    assert err.strip().splitlines() == [
        "interrupted: each file written is whole; rerun the same command for the report"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_resamples_below_zero_is_refused_when_parsed(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        report.main([str(tmp_path), "--resamples", "-1"])
    assert stop.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.endswith("error: argument --resamples: must be at least 0, got -1")
