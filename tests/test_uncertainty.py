"""How sure a test score is: the trainer's test_scores.npz, the bootstrap where the answer is
known, and report.py's intervals and paired comparisons on runs of the real trainer."""
import re

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

import common
import formats
import report
import trainer
import uncertainty
from conftest import write_spectrogram_set


# -----------------------------------------------------------------------------
# the trainer's test scores
@pytest.mark.slow
def test_trainer_saves_the_best_epochs_test_scores(small_run, small_data_dir):
    run_dir, results = small_run
    saved = formats.read_test_scores(run_dir, results["epoch"])
    _, labels, tag_names, _ = common.load_tags(small_data_dir / "annotations_final.csv", 4, merge=False)
    test_idx = common.random_split(48, 32, 8, seed=1337)[2]
    assert saved["epoch"] == results["epoch"] and saved["tag_names"] == tag_names
    assert saved["scores"].dtype == np.float32 and saved["scores"].shape == (8, 4)
    assert np.array_equal(saved["rows"], test_idx) and np.array_equal(saved["labels"], labels[test_idx])
    assert common.roc_auc(saved["labels"], saved["scores"]) == results["test_roc_auc"]
    assert common.pr_auc(saved["labels"], saved["scores"]) == results["test_pr_auc"]
    with pytest.raises(ValueError, match=f"holds the test scores of epoch {results['epoch']}, not of "
                                         "the best "
                                         "epoch 7"):
        formats.read_test_scores(run_dir, 7)


def test_test_scores_file_is_checked(tmp_path):
    assert formats.read_test_scores(tmp_path) is None  # a run of an older trainer.py
    formats.save_test_scores(tmp_path, np.zeros((3, 2)), np.zeros((3, 2)), np.arange(3), ["a", "b"], 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test_scores.npz"]  # no .tmp left
    formats.save_test_scores(tmp_path, np.zeros((3, 2)), np.zeros((2, 2)), np.arange(3), ["a", "b"], 1)
    with pytest.raises(ValueError,
                       match=r"scores \(3, 2\), labels \(2, 2\), rows \(3,\) .* do not fit together"):
        formats.read_test_scores(tmp_path)
    (tmp_path / "test_scores.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="test_scores.npz is damaged or not trainer.py's"):
        formats.read_test_scores(tmp_path)


# -----------------------------------------------------------------------------
# the bootstrap where the answer is known
def noisy_set(n_clips=400, n_tags=5, seed=0):
    """labels (n, T) with about 20% positives; a good model's scores (positives higher, so
    ROC-AUC ~0.9, ties at 0.1 steps) and a useless one's (uniform noise, ~0.5)."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n_clips, n_tags)) < 0.2).astype(np.uint8)
    labels[0], labels[1] = 1, 0  # every tag has both classes
    good = np.round(rng.normal(0, 1, labels.shape) + 1.8 * labels, 1).astype(np.float32)
    noise = rng.random(labels.shape).astype(np.float32)
    return labels, good, noise


def test_resampled_metrics_equal_scikit_learns():
    labels, good, _ = noisy_set(200)
    prepared = uncertainty.tag_orders(labels, good)
    draws = np.random.default_rng(1).integers(0, 200, (4, 200))
    counts = np.stack([np.bincount(d, minlength=200) for d in draws]).astype(np.int32)
    roc, pr = uncertainty.weighted_per_tag(prepared, counts)
    for b, draw in enumerate(draws):  # scikit-learn on the resampled clips themselves, ties and all
        np.testing.assert_allclose(roc[b], roc_auc_score(labels[draw], good[draw], average=None),
                                   rtol=0, atol=1e-12)
        np.testing.assert_allclose(pr[b], average_precision_score(labels[draw], good[draw], average=None),
                                   rtol=0, atol=1e-12)
    ones = np.ones((1, 200), dtype=np.int32)
    roc, pr = uncertainty.weighted_per_tag(prepared, ones)
    np.testing.assert_allclose(roc[0], common.roc_auc(labels, good, per_tag=True), atol=1e-12)
    np.testing.assert_allclose(pr[0], common.pr_auc(labels, good, per_tag=True), atol=1e-12)
    # a resample with no positive clip of tag 0: NaN there, the other tags scored
    counts = np.ones((1, 200), dtype=np.int32)
    counts[0, labels[:, 0] == 1] = 0
    roc, pr = uncertainty.weighted_per_tag(prepared, counts)
    assert np.isnan(roc[0, 0]) and np.isnan(pr[0, 0]) and np.isfinite(roc[0, 1:]).all()


def test_identical_scores_differ_by_zero():
    labels, good, _ = noisy_set()
    result = uncertainty.bootstrap_runs(labels, [good, good.copy()], [[(0, 1)]], n_resamples=500)
    for metric in ("roc", "pr"):
        point, low, high, p = result["comparisons"][0][metric]
        assert point == low == high == 0 and p == 1
        tag_point, tag_low, tag_high, tag_p = result["comparisons"][0][f"{metric}_per_tag"]
        assert (np.all(tag_point == 0) and np.all(tag_low == 0) and np.all(tag_high == 0)
                and np.all(tag_p == 1))


def test_a_clearly_better_model_has_an_interval_above_zero():
    labels, good, noise = noisy_set()
    result = uncertainty.bootstrap_runs(labels, [good, noise], [[(0, 1)]], n_resamples=500)
    (good_fig, noise_fig), comparison = result["runs"], result["comparisons"][0]
    assert good_fig["roc"][0] == pytest.approx(common.roc_auc(labels, good), abs=1e-12)
    assert noise_fig["pr"][0] == pytest.approx(common.pr_auc(labels, noise), abs=1e-12)
    for figure in (good_fig, noise_fig):  # intervals contain the point estimates
        for metric in ("roc", "pr"):
            point, low, high = figure[metric]
            assert low <= point <= high and high - low < 0.2
    assert good_fig["roc"][1] > 0.8 and noise_fig["roc"][1] < 0.5 < noise_fig["roc"][2]
    point, low, high, p = comparison["roc"]
    assert point == pytest.approx(good_fig["roc"][0] - noise_fig["roc"][0], abs=1e-12)
    assert 0 < low <= point <= high and p == pytest.approx(2 / 501)
    assert comparison["pr"][1] > 0
    tag_point, tag_low, tag_high, _ = comparison["roc_per_tag"]
    assert np.all(tag_low > 0) and np.all((tag_low <= tag_point) & (tag_point <= tag_high))
    # the other way round: the same interval, mirrored
    reverse = uncertainty.bootstrap_runs(labels, [good, noise], [[(1, 0)]], n_resamples=500)["comparisons"][0]
    assert reverse["roc"][0] == -point and reverse["roc"][2] == pytest.approx(-low) and reverse["roc"][3] == p


def test_the_interval_narrows_with_more_clips():
    widths = []
    for n_clips in (100, 1600):
        labels, good, _ = noisy_set(n_clips)
        _, low, high = uncertainty.bootstrap_runs(labels, [good], n_resamples=300)["runs"][0]["roc"]
        widths.append(high - low)
    assert widths[1] < widths[0] / 2.5  # ~1/sqrt(n): a quarter, give or take the resampling


def test_seed_pairs_average_and_unscorable_tags():
    labels, good, noise = noisy_set(60, n_tags=3)
    labels[:, 2] = 0
    labels[5, 2] = 1  # one positive clip: many resamples cannot score tag 2
    result = uncertainty.bootstrap_runs(labels, [good, noise, good, noise[::-1].copy()], [[(0, 1), (2, 3)]],
                                        n_resamples=200)
    comparison = result["comparisons"][0]
    expected = np.mean([common.roc_auc(labels, good) - common.roc_auc(labels, noise),
                        common.roc_auc(labels, good) - common.roc_auc(labels, noise[::-1])])
    assert comparison["roc"][0] == pytest.approx(expected, abs=1e-12)
    # the macro mean leaves tag 2 out where it cannot score it
    assert np.isfinite(comparison["roc"][1:]).all()
    point, low, high, p = comparison["roc_per_tag"]
    assert np.isfinite(point[2]) and np.isnan(low[2]) and np.isnan(high[2]) and np.isnan(p[2])
    assert np.isfinite(low[:2]).all()


def test_bootstrap_p_value():
    assert uncertainty.bootstrap_p_value(np.zeros(99)) == 1.0
    assert uncertainty.bootstrap_p_value(np.ones(99)) == pytest.approx(0.02)
    assert uncertainty.bootstrap_p_value(np.r_[-np.ones(4), np.ones(95)]) == pytest.approx(0.1)
    assert uncertainty.bootstrap_p_value(np.r_[np.ones(4), -np.ones(95)]) == pytest.approx(0.1)
    assert np.isnan(uncertainty.bootstrap_p_value([1.0, np.nan]))


# -----------------------------------------------------------------------------
# report.py on runs of the real trainer: two --scales x two seeds, scored on the same clips
@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    """--scales 1 2 3 and --scales 1, seeds 1 and 2, one epoch on 64 spectrograms of pure noise
    (16 test clips): scores near chance, so that the runs differ (on the learnable set all
    would score 1.0)."""
    data = tmp_path_factory.mktemp("noise")
    write_spectrogram_set(data, 64, n_tags=4, seed=0)
    noise = np.random.default_rng(0).normal(-8.0, 1.0, (64, common.N_MELS, common.N_FRAMES))
    np.save(data / "spectrograms.npy", noise.astype(np.float16))
    out = tmp_path_factory.mktemp("study")
    for scales in (["1", "2", "3"], ["1"]):
        for seed in ("1", "2"):
            name = f"{'scales1-' if scales == ['1'] else ''}seed{seed}"
            trainer.main(["--data-dir", str(data), "--out", str(out), "--run", name, "--epochs", "1",
                          "--seed", seed, "--scales", *scales, "--split", "random", "--train-size", "32",
                          "--val-size", "16",
                          "--batch-size", "32", "--n-tags", "4", "--no-merge", "--device", "cpu"])
    return out


def parse_figure(cell):
    """'0.5312 [0.4102, 0.6475]' -> (0.5312, 0.4102, 0.6475)."""
    match = re.fullmatch(r"\s*([-+]?\d\.\d{4}) \[([-+]?\d\.\d{4}), ([-+]?\d\.\d{4})\]\s*", cell)
    assert match, cell
    return tuple(float(v) for v in match.groups())


@pytest.mark.slow
def test_report_intervals_and_paired_comparison(ablation, capsys):
    text = report.main([str(ablation), "--resamples", "400"])
    assert (ablation / "report.md").read_text() == text
    # the earlier sections are kept, the configurations apart
    assert "| seed1 | random | 1 | 1 |" in text and "| scales1-seed1 | random, scales 1 | 1 | 1 |" in text
    assert re.search(r"^\| random \| 2 \| ", text, re.M)
    assert re.search(r"^\| random, scales 1 \| 2 \| ", text, re.M)
    # every run's interval contains its point estimate, which is results.json's
    section = text.split("## How sure each test score is")[1].split("## Does multi-scale help?")[0]
    rows = [line.split("|")[1:-1] for line in section.splitlines()
            if re.match(r"\| (scales1-)?seed\d ", line)]
    assert len(rows) == 4
    for cells in rows:
        results = report.load_run(ablation / cells[0].strip())
        assert cells[3].strip() == "16"
        for cell, key in ((cells[4], "test_roc_auc"), (cells[5], "test_pr_auc")):
            point, low, high = parse_figure(cell)
            assert low <= point <= high and point == round(results[key], 4)
    # the paired comparison: three scales against one, seeds paired, overall and per tag
    comparison = text.split("### random split: scales 1 2 3 against 1")[1]
    assert "On the random split, three scales (1 2 3) against one (1): test ROC-AUC difference" in comparison
    row = next(line for line in comparison.splitlines() if line.startswith("| ROC-AUC |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    runs = {name: report.load_run(ablation / name)
            for name in ("seed1", "seed2", "scales1-seed1", "scales1-seed2")}
    gains = [runs[f"seed{s}"]["test_roc_auc"] - runs[f"scales1-seed{s}"]["test_roc_auc"] for s in (1, 2)]
    assert float(cells[3]) == pytest.approx(np.mean(gains), abs=1e-4)
    low, high = (float(v) for v in cells[4].strip("[]").split(", "))
    assert low <= float(cells[3]) <= high and 0 < float(cells[5]) <= 1
    assert cells[6] == f"{gains[0]:+.4f} (1), {gains[1]:+.4f} (2)"
    tag_rows = [line for line in comparison.splitlines() if re.match(r"\| t\d \|", line)]
    assert sorted(line.split("|")[1].strip() for line in tag_rows) == ["t0", "t1", "t2", "t3"]
    differences = [float(line.split("|")[4]) for line in tag_rows]
    assert differences == sorted(differences, reverse=True)  # largest gain first
    assert "![per-tag gain" in text and (ablation / "per_tag_gain.png").read_bytes()[:4] == b"\x89PNG"
    assert "per_tag_gain.png" in capsys.readouterr().err


@pytest.mark.slow
def test_report_without_test_scores_and_without_resamples(ablation, tmp_path, capsys):
    (tmp_path / "no_scores").mkdir()
    for name in ("results.json", "metrics.csv"):
        (tmp_path / "no_scores" / name).write_bytes((ablation / "seed1" / name).read_bytes())
    text = report.main([str(tmp_path / "no_scores"), "--out", str(tmp_path)])
    assert "(no test_scores.npz)" in text and "Does multi-scale help?" not in text
    assert (f"{tmp_path / 'no_scores'} has no test_scores.npz: no interval for it"
            in capsys.readouterr().err)
    assert "How sure" not in report.main([str(ablation / "seed1"), "--out", str(tmp_path),
                                          "--resamples", "0"])
