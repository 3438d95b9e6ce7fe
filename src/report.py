"""Tabulate finished training runs: one row per run, mean +- std per split beside the field.

    python src/report.py experiments/study                 # every run folder in it
    python src/report.py experiments/a experiments/b --out experiments
    python src/report.py --splits data/annotations_final.csv   # split sizes and leakage
    python src/report.py --splits tests/fixtures/annotations_final.csv.gz   # the same, shipped copy

Reads RUN/results.json (and RUN/metrics.csv for the curves) of each run folder written by
trainer.py; prints a Markdown report and writes it to OUT/report.md, and, when matplotlib
is installed, OUT/curves.png (validation and test ROC-AUC and training loss per epoch, one
line per run). OUT defaults to the folder given when it is one parent folder, else to the
run folders' common parent. Per split (and --scales), the mean and the sample standard
deviation (ddof=1) over its runs; a split with one run has no standard deviation ("n/a").

From RUN/test_scores.npz (the best epoch's test scores) it adds each run's test ROC-AUC and
PR-AUC with a 95% bootstrap interval over the test clips and, for runs of two --scales
scored on the same clips and paired by seed, the paired difference with its interval and
p-value, overall and per tag (src/uncertainty.py; OUT/per_tag_gain.png with matplotlib).
What the intervals mean and do not: docs/results.md.
"""
import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

import common
import formats
import plumbing
import uncertainty

# Published figures the runs are compared with.
# Dabral et al. 2018 on the paper split: best validation ROC-AUC 0.904, test 0.900
# (docs/original.md, "The published result"); no PR-AUC published.
PAPER_2018 = {"val_roc_auc": 0.904, "test_roc_auc": 0.900}
# Won et al. 2020, "Evaluation of CNN-based automatic music tagging models", on the clean
# split (50 unmerged tags): model, ROC-AUC, PR-AUC (src/splits/README.md).
WON_2020 = [("FCN", 0.9005, 0.4295), ("Musicnn", 0.9106, 0.4493), ("Sample-level", 0.9058, 0.4422),
            ("Sample-level + SE", 0.9103, 0.4520), ("CRNN", 0.8722, 0.3625),
            ("Self-attention", 0.9077, 0.4445), ("Harmonic CNN", 0.9127, 0.4611),
            ("Short-chunk CNN", 0.9126, 0.4590), ("Short-chunk CNN + Res", 0.9129, 0.4614)]
# The folder split (MTAT's folders 0-b / c / d-f, all usable clips; common.folder_split), as
# the MARBLE benchmark reports it: ROC-AUC of probes on frozen self-supervised features.
MARBLE_FOLDER = [("MERT-330M", 0.913), ("MusicFM", 0.913), ("MuQ", 0.914)]
MARBLE_PR_AUC = 0.40  # "about 0.40" for all three
SPLIT_ORDER = ("paper", "clean", "folder", "random")
NEEDED = ("split", "seed", "epochs", "epoch", "val_roc_auc", "val_pr_auc", "test_roc_auc", "test_pr_auc")
NEEDED_TYPES = {"split": str, "seed": int, "epochs": int, "epoch": int, "val_roc_auc": (int, float),
                "val_pr_auc": (int, float), "test_roc_auc": (int, float), "test_pr_auc": (int, float)}
KIND_NAMES = {str: "a string", int: "an integer", (int, float): "a number"}
HISTORY_COLUMNS = ("epoch", "train_loss", "val_roc_auc", "test_roc_auc")  # what the curves draw


# -----------------------------------------------------------------------------
# finding and reading runs
def find_runs(paths):
    """Run folders (those with a results.json) among paths, or in their subfolders.

    A path holding results.json is a run; any other folder is a parent whose subfolders
    with results.json are its runs (unfinished ones, with only last.pt, are skipped with a
    note on stderr). Raises SystemExit with one line for a path that is neither.
    """
    runs = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise SystemExit(f"error: {path} is not a folder; give run folders of trainer.py or their parent")
        if (path / "results.json").is_file():
            runs.append(path)
            continue
        if (path / "last.pt").is_file():
            raise SystemExit(f"error: {path} has no results.json: the run has not finished; finish it with "
                             f"python src/trainer.py --out {path.parent} --run {path.name} --resume "
                             "(same flags)")
        children = sorted(p for p in path.iterdir() if p.is_dir())
        found = [p for p in children if (p / "results.json").is_file()]
        for unfinished in (p for p in children if (p / "last.pt").is_file() and p not in found):
            print(f"note: skipping {unfinished}: no results.json (unfinished run)", file=sys.stderr)
        if not found:
            raise SystemExit(f"error: no runs found in {path} (no results.json in it or its subfolders); "
                             "give run folders of trainer.py or their parent")
        runs += found
    return sorted(set(runs), key=runs.index)


def load_run(run_dir):
    """-> dict: results.json's fields, plus name (the folder name), run_dir and history
    (metrics.csv's rows as dicts of floats; [] without the file)."""
    path = run_dir / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: cannot read {path}: {error}") from None
    missing = [key for key in NEEDED if not isinstance(results, dict) or key not in results]
    if missing:
        raise SystemExit(f"error: {path} lacks {', '.join(missing)} (written by an older trainer.py?); "
                         "rerun that run with the current trainer.py")
    for key, kind in NEEDED_TYPES.items():
        value = results[key]
        if (not isinstance(value, kind) or isinstance(value, bool)
                or (isinstance(value, float) and math.isnan(value))):
            raise SystemExit(f"error: {path}: {key} is {json.dumps(value)}, not {KIND_NAMES[kind]}; the file "
                             "is damaged: restore it, or rerun that run with trainer.py")
    history, metrics = [], run_dir / "metrics.csv"
    if metrics.is_file():
        with open(metrics, newline="") as f:
            reader = csv.DictReader(f)
            try:
                for row in reader:
                    uneven, lacking = None in row or None in row.values(), set(HISTORY_COLUMNS) - set(row)
                    if uneven or lacking:
                        raise ValueError("not the columns of its header" if uneven
                                         else f"no column {', '.join(sorted(lacking))}")
                    history.append({k: float(v) for k, v in row.items()})
            except (ValueError, csv.Error) as error:
                raise SystemExit(f"error: {metrics}: line {reader.line_num}: {error}; the file is damaged: "
                                 "restore it, or delete it to report the run without its curves") from None
    return dict(results, name=run_dir.name, run_dir=run_dir, history=history)


# -----------------------------------------------------------------------------
# the report
def mean_std(values):
    """-> (mean, sample standard deviation with ddof=1, or None for fewer than 2 values)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), (float(values.std(ddof=1)) if len(values) > 1 else None)


def scales_of(run):
    """The run's --scales as a tuple (runs from before --scales had all three)."""
    return tuple(run.get("scales") or common.SCALES)


def config_name(run):
    """The split, and the scales when they are not the paper's three: 'clean, scales 1'."""
    scales = scales_of(run)
    return run["split"] if scales == common.SCALES else f"{run['split']}, scales {scales_text(scales)}"


def format_mean_std(values):
    mean, std = mean_std(values)
    return f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f} ± n/a"


def share(count, total):
    """'5,591 (95.4%)'; a share short of all never reads 100.0%."""
    percent = 100 * count / total if total else 0.0
    text = ">99.9" if count < total and percent >= 99.95 else f"{percent:.1f}"
    return f"{count:,} ({text}%)"


def song_overlap(run):
    """The test clips sharing a song with a training clip, as text."""
    test = run.get("split_overlap", {}).get("test")
    if test is None:
        return "not audited"
    if test["unparsed"] == test["n_clips"]:
        return "n/a (names not MTAT's)"
    return share(test["song"], test["n_clips"])


def reference(split):
    if split == "paper":
        return (f"Dabral et al. 2018: test ROC-AUC {PAPER_2018['test_roc_auc']:.3f} "
                f"(val {PAPER_2018['val_roc_auc']:.3f}); no PR-AUC published")
    if split == "clean":
        rocs, prs = [m[1] for m in WON_2020], [m[2] for m in WON_2020]
        return (f"Won et al. 2020, {len(WON_2020)} models: ROC-AUC {min(rocs):.4f}–{max(rocs):.4f}, "
                f"PR-AUC {min(prs):.4f}–{max(prs):.4f} (table below)")
    if split == "folder":
        models = ", ".join(f"{name} {roc:.3f}" for name, roc in MARBLE_FOLDER)
        return f"MARBLE, frozen features probed: {models} ROC-AUC, PR-AUC about {MARBLE_PR_AUC:.2f}"
    return "none (not a published split)"


def split_key(split):
    return (SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER), split)


def run_key(run):
    """The order of runs in the tables: by split, seed, the paper's scales first, name."""
    return split_key(run["split"]), run["seed"], scales_of(run) != common.SCALES, run["name"]


def published_references():
    """Markdown: each published figure with the split it was measured on."""
    rocs, prs = [m[1] for m in WON_2020], [m[2] for m in WON_2020]
    marble = ", ".join(f"{name} {roc:.3f}" for name, roc in MARBLE_FOLDER)
    return ["", "## Published references, by split", "",
            ("- **paper split** (the original's draw of clips, 18,000 / 2,000 / 5,863; clips of one song "
             "on both sides): Dabral et al. 2018, this network: test ROC-AUC "
             f"{PAPER_2018['test_roc_auc']:.3f} (validation {PAPER_2018['val_roc_auc']:.3f}); no PR-AUC "
             "published."),
            ("- **clean split** (Lee et al. 2017's lists, 15,244 / 1,529 / 4,332, the 50 most frequent tags "
             f"unmerged): Won et al. 2020, {len(WON_2020)} networks trained end to end: ROC-AUC "
             f"{min(rocs):.4f}–{max(rocs):.4f}, PR-AUC {min(prs):.4f}–{max(prs):.4f}."),
            ("- **folder split** (MTAT's folders 0-b / c / d-f with every usable clip, 18,706 / 1,825 / "
             "5,329, the same tags): the MARBLE benchmark, probes on frozen self-supervised features: "
             f"{marble} ROC-AUC, PR-AUC about {MARBLE_PR_AUC:.2f}."),
            "", "A figure compares only with runs on its own split: the three differ in their clips."]


def format_report(runs):
    """Markdown: the runs, then per split (and --scales) the mean ± std beside the published
    reference, the references by split, then (with clean- or folder-split runs) where their
    mean stands in Won et al.'s or MARBLE's table."""
    runs = sorted(runs, key=run_key)
    lines = ["# Results", "",
             "## Runs", "",
             ("| run | split | seed | epochs | best epoch | val ROC-AUC | val PR-AUC | test ROC-AUC | "
              "test PR-AUC | test clips sharing a song with training |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['name']} | {config_name(r)} | {r['seed']} | {r['epochs']} | {r['epoch']} | "
                     f"{r['val_roc_auc']:.4f} | {r['val_pr_auc']:.4f} | {r['test_roc_auc']:.4f} | "
                     f"{r['test_pr_auc']:.4f} | {song_overlap(r)} |")
    lines += ["", "## Per split: mean ± sample standard deviation (ddof=1) over its runs", "",
              "| split | runs | val ROC-AUC | test ROC-AUC | test PR-AUC | published reference |",
              "|---|---|---|---|---|---|"]
    configs = sorted({(r["split"], scales_of(r)) for r in runs},
                     key=lambda c: (split_key(c[0]), c[1] != common.SCALES, c[1]))
    for split, scales in configs:
        group = [r for r in runs if r["split"] == split and scales_of(r) == scales]
        epochs = sorted({r["epochs"] for r in group})
        n_runs = f"{len(group)}" + (f" (epochs differ: {', '.join(map(str, epochs))})"
                                    if len(epochs) > 1 else "")
        lines.append(f"| {config_name(group[0])} | {n_runs} | "
                     f"{format_mean_std([r['val_roc_auc'] for r in group])} | "
                     f"{format_mean_std([r['test_roc_auc'] for r in group])} | "
                     f"{format_mean_std([r['test_pr_auc'] for r in group])} | {reference(split)} |")
    lines += published_references()
    clean = [r for r in runs if r["split"] == "clean"]
    if clean:
        table = WON_2020 + project_rows(clean)
        lines += ["", "## The clean split against the field (Won et al. 2020), by test ROC-AUC", "",
                  "| model | ROC-AUC | PR-AUC |", "|---|---|---|"]
        lines += [f"| {name} | {a:.4f} | {b:.4f} |" for name, a, b in sorted(table, key=lambda m: -m[1])]
    folder = [r for r in runs if r["split"] == "folder"]
    if folder:  # MARBLE publishes ROC-AUC per model and PR-AUC only roughly
        table = [(name, roc, None) for name, roc in MARBLE_FOLDER] + project_rows(folder)
        lines += ["", ("## The folder split against the field (MARBLE: probes on frozen self-supervised "
                       "features), by test ROC-AUC"), "", "| model | ROC-AUC | PR-AUC |", "|---|---|---|"]
        lines += [f"| {name} | {a:.4f} | {b:.4f} |" if b is not None
                  else f"| {name} | {a:.3f} | about {MARBLE_PR_AUC:.2f} |"
                  for name, a, b in sorted(table, key=lambda m: -m[1])]
    return "\n".join(lines) + "\n"


def project_rows(runs):
    """This project's rows for a table of the field, one per --scales: (name, mean test
    ROC-AUC, mean test PR-AUC)."""
    rows = []
    for scales in sorted({scales_of(r) for r in runs}, key=lambda s: (s != common.SCALES, s)):
        group = [r for r in runs if scales_of(r) == scales]
        what = "multi-scale CNN" if scales == common.SCALES else f"--scales {scales_text(scales)}"
        rows.append((f"**this project: {what}, mean of {len(group)} run(s)**",
                     mean_std([r["test_roc_auc"] for r in group])[0],
                     mean_std([r["test_pr_auc"] for r in group])[0]))
    return rows


def plot_curves(runs, path):
    """curves.png: validation ROC-AUC, test ROC-AUC and training loss per epoch, one line
    per run (a colour per run, a line style per split). Returns False when matplotlib is not installed."""
    plt = plumbing.import_pyplot()
    if plt is None:
        return False
    splits = sorted({r["split"] for r in runs}, key=split_key)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = (("val_roc_auc", "validation ROC-AUC"), ("test_roc_auc", "test ROC-AUC"),
              ("train_loss", "training loss"))
    for run in runs:
        if not run["history"]:
            print(f"note: {run['run_dir']} has no metrics.csv: no curve for it", file=sys.stderr)
            continue
        epochs = [row["epoch"] for row in run["history"]]
        style = {"color": f"C{runs.index(run) % 10}",
                 "linestyle": ("-", "--", ":", "-.")[splits.index(run["split"]) % 4]}
        for ax, (key, _) in zip(axes, panels):
            ax.plot(epochs, [row[key] for row in run["history"]], marker=".", **style,
                    label=f"{run['name']} ({run['split']}, seed {run['seed']})")
    for ax, (_, title) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    with plumbing.atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return True


# -----------------------------------------------------------------------------
# how sure: bootstrap intervals over the test clips and paired comparisons (uncertainty.py)
def load_scores(runs):
    """Set run['scores'] to the run's test_scores.npz (formats.read_test_scores), or None
    with a note on stderr when it has none (an older trainer.py) or a damaged one."""
    for run in runs:
        try:
            run["scores"] = formats.read_test_scores(run["run_dir"], run["epoch"])
        except ValueError as error:
            run["scores"] = None
            print(f"note: {error}; no interval for {run['name']}", file=sys.stderr)
            continue
        if run["scores"] is None:
            print(f"note: {run['run_dir']} has no {formats.TEST_SCORES} (made by an older trainer.py): "
                  "no interval for it", file=sys.stderr)


def same_clip_groups(runs):
    """Runs with test scores, grouped by what they were scored on: one split, the same test
    rows, labels and tags (so --split random runs of other --split-seed never pair)."""
    groups = {}
    for run in runs:
        saved = run.get("scores")
        if saved is not None:
            key = (run["split"], saved["rows"].tobytes(), saved["labels"].tobytes(),
                   tuple(saved["tag_names"]))
            groups.setdefault(key, []).append(run)
    return list(groups.values())


def paired_comparisons(group):
    """The comparisons within a group of runs on the same clips: each other --scales against
    the one with the most branches (the paper's three where present), its runs paired by
    seed. -> list of (scales_a, scales_b, [(run index a, run index b, seed), ...])."""
    by_scales = {}
    for index, run in enumerate(group):
        by_scales.setdefault(scales_of(run), {}).setdefault(run["seed"], []).append(index)
    order = sorted(by_scales, key=lambda scales: (-len(scales), scales))
    comparisons = []
    for other in order[1:]:
        pairs = []
        for seed in sorted(set(by_scales[order[0]]) & set(by_scales[other])):
            a, b = by_scales[order[0]][seed], by_scales[other][seed]
            if len(a) > 1 or len(b) > 1:
                names = ", ".join(group[i]["name"] for i in a + b)
                print(f"note: several runs of seed {seed} ({names}) on the same clips: seed {seed} left out "
                      "of the paired comparison", file=sys.stderr)
                continue
            pairs.append((a[0], b[0], seed))
        if pairs:
            comparisons.append((order[0], other, pairs))
    return comparisons


def scales_text(scales):
    return " ".join(map(str, scales))


def interval(low, high, signed=False):
    if not (np.isfinite(low) and np.isfinite(high)):
        return "n/a"
    form = "+.4f" if signed else ".4f"
    return f"[{low:{form}}, {high:{form}}]"


def verdict(split, scales_a, scales_b, roc, n_pairs):
    """One sentence on a comparison; for three scales against branch 1 alone, the paper's claim."""
    point, low, high, p = roc
    claim = scales_a == common.SCALES and scales_b == (1,)
    what = (f"three scales ({scales_text(scales_a)}) against one ({scales_text(scales_b)})" if claim
            else f"scales {scales_text(scales_a)} against {scales_text(scales_b)}")
    if not (np.isfinite(low) and np.isfinite(high)):
        end = "no interval: some resample of these few test clips could score no tag"
    elif low > 0:
        end = "the paper's claim holds here: three scales beat one" if claim else "the first is better"
    elif high < 0:
        end = "the paper's claim fails here: one scale beats three" if claim else "the second is better"
    else:
        end = ("the paper's claim is not shown here: the interval includes 0" if claim
               else "no difference shown: the interval includes 0")
    return (f"On the {split} split, {what}: test ROC-AUC difference {point:+.4f} (95% interval "
            f"{interval(low, high, True)} over the test clips, paired bootstrap p = {p:.4f}, "
            f"{n_pairs} seed pair{'s' * (n_pairs != 1)}): {end}.")


def uncertainty_report(runs, n_resamples):
    """Markdown: each run's test ROC-AUC and PR-AUC with its 95% bootstrap interval over the
    test clips; per group of runs on the same clips, the paired comparisons (verdict,
    overall and per tag). -> (text, the comparisons: uncertainty.bootstrap_runs' dicts plus
    split, scales_a, scales_b, pairs [(run a, run b, seed)], tag_names, labels)."""
    figures, compared = {}, []
    for group in same_clip_groups(runs):
        saved = [run["scores"] for run in group]
        comparisons = paired_comparisons(group)
        result = uncertainty.bootstrap_runs(saved[0]["labels"], [s["scores"] for s in saved],
                                            [[(a, b) for a, b, _ in pairs] for _, _, pairs in comparisons],
                                            n_resamples=n_resamples)
        for run, figure in zip(group, result["runs"]):
            figures[id(run)] = figure
        for (scales_a, scales_b, pairs), entry in zip(comparisons, result["comparisons"]):
            compared.append(dict(entry, split=group[0]["split"], scales_a=scales_a, scales_b=scales_b,
                                 pairs=[(group[a], group[b], seed) for a, b, seed in pairs],
                                 tag_names=saved[0]["tag_names"], labels=saved[0]["labels"]))
    lines = ["", (f"## How sure each test score is: {uncertainty.CONFIDENCE:.0%} bootstrap intervals "
                  "over the test clips"), "",
             "| run | split | seed | test clips | test ROC-AUC [95% interval] | test PR-AUC [95% interval] |",
             "|---|---|---|---|---|---|"]
    for run in sorted(runs, key=run_key):
        figure = figures.get(id(run))
        start = f"| {run['name']} | {config_name(run)} | {run['seed']} | "
        if figure is None:
            lines.append(start + f"| {run['test_roc_auc']:.4f} (no {formats.TEST_SCORES}) | "
                         f"{run['test_pr_auc']:.4f} |")
            continue
        lines.append(start + f"{len(run['scores']['rows']):,} | "
                     + " | ".join(f"{figure[m][0]:.4f} {interval(*figure[m][1:])}" for m in ("roc", "pr"))
                     + " |")
    lines += ["", (f"Percentile intervals of {n_resamples:,} resamples of each run's test clips "
                   "(scipy.stats.bootstrap; a tag that a resample leaves without a positive or a negative "
                   "clip is left out of that resample's macro mean). They say how far this one trained "
                   "model's score could move on another test set drawn like this one, not how far another "
                   "seed would move it (the ± above); see docs/results.md.")]
    if compared:
        lines += ["", "## Does multi-scale help? Paired comparisons on the same test clips"]
    for c in compared:
        lines += comparison_lines(c, n_resamples)
    return "\n".join(lines) + "\n", compared


def comparison_lines(c, n_resamples):
    """Markdown of one paired comparison: the verdict, the overall table, the per-tag table."""
    a, b = scales_text(c["scales_a"]), scales_text(c["scales_b"])
    lines = ["", f"### {c['split']} split: scales {a} against {b}", "",
             f"**{verdict(c['split'], c['scales_a'], c['scales_b'], c['roc'], len(c['pairs']))}**", "",
             f"| test metric | scales {a} | scales {b} | difference | 95% interval | p | per seed pair |",
             "|---|---|---|---|---|---|---|"]
    for name, key, metric in (("ROC-AUC", "test_roc_auc", "roc"), ("PR-AUC", "test_pr_auc", "pr")):
        point, low, high, p = c[metric]
        mean_a = np.mean([run_a[key] for run_a, _, _ in c["pairs"]])
        mean_b = np.mean([run_b[key] for _, run_b, _ in c["pairs"]])
        seeds = ", ".join(f"{run_a[key] - run_b[key]:+.4f} ({seed})" for run_a, run_b, seed in c["pairs"])
        lines.append(f"| {name} | {mean_a:.4f} | {mean_b:.4f} | {point:+.4f} | {interval(low, high, True)} | "
                     f"{p:.4f} | {seeds} |")
    signs = {np.sign(run_a["test_roc_auc"] - run_b["test_roc_auc"]) for run_a, run_b, _ in c["pairs"]}
    lines += ["", "The difference is the mean over the seed pairs (same seed, same clips) of the first "
              "scales' score minus the second's; its interval and p come from the same "
              f"{n_resamples:,} resamples of the test clips, each scoring every run (paired): "
              "p = 2 (1 + k) / (N + 1), k the resamples on the far side of 0."
              + (" The seed pairs disagree in sign: the seeds move the difference more than its interval "
                 "shows." if len(signs - {0.0}) > 1 else "")]
    point, low, high, p = c["roc_per_tag"]
    per_run = [np.mean([common.roc_auc(c["labels"], pair[side]["scores"]["scores"], per_tag=True)
                        for pair in c["pairs"]], axis=0) for side in (0, 1)]
    n_tags, gain, loss = len(point), int(np.sum(low > 0)), int(np.sum(high < 0))
    lines += ["", (f"Per tag, test ROC-AUC (mean over the seed pairs), largest gain first: {gain} of "
                   f"{n_tags} tags gain with an interval above 0, {loss} lose with one below 0 (were no tag "
                   f"really different, about {0.05 * n_tags:.1f} of the {n_tags} would still reach p < 0.05 "
                   "by chance)."),
              "", f"| tag | scales {a} | scales {b} | difference | 95% interval | p |",
              "|---|---|---|---|---|---|"]
    for tag in sorted(range(n_tags), key=lambda t: -np.nan_to_num(point[t], nan=-np.inf)):
        lines.append(f"| {c['tag_names'][tag]} | {per_run[0][tag]:.4f} | {per_run[1][tag]:.4f} | "
                     f"{point[tag]:+.4f} | {interval(low[tag], high[tag], True)} | "
                     + (f"{p[tag]:.4f} |" if np.isfinite(p[tag]) else "n/a (a resample cannot score it) |"))
    return lines


def plot_per_tag_gain(compared, path):
    """per_tag_gain.png: per comparison, each tag's test ROC-AUC difference with its 95%
    interval, largest gain first (green: interval above 0, red: below, grey: includes 0).
    Returns False when matplotlib is not installed."""
    plt = plumbing.import_pyplot()
    if plt is None:
        return False
    n_tags = max(len(c["tag_names"]) for c in compared)
    fig, axes = plt.subplots(1, len(compared), figsize=(6 * len(compared), 1.2 + 0.2 * n_tags), squeeze=False)
    for ax, c in zip(axes[0], compared):
        point, low, high, _ = c["roc_per_tag"]
        order = sorted(range(len(point)), key=lambda t: np.nan_to_num(point[t], nan=-np.inf))
        point, low, high = point[order], low[order], high[order]
        y = np.arange(len(order))
        ax.barh(y, point, color=np.where(low > 0, "tab:green", np.where(high < 0, "tab:red", "tab:grey")))
        known = np.isfinite(low)  # a tag some resample cannot score has no interval
        ax.errorbar(point[known], y[known], xerr=[point[known] - low[known], high[known] - point[known]],
                    fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(y, [c["tag_names"][t] for t in order], fontsize=7)
        ax.set_xlabel(f"test ROC-AUC, scales {scales_text(c['scales_a'])} minus {scales_text(c['scales_b'])}")
        ax.set_title(f"{c['split']} split, {len(c['pairs'])} seed pair(s), 95% intervals over test clips",
                     fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    with plumbing.atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return True


# -----------------------------------------------------------------------------
# the splits themselves
def split_table(csv_path):
    """Markdown table of the paper, clean and folder splits on MTAT's annotations: clips per
    part and, for validation and test, how many share a song, album, artist with training
    (common.split_overlap). The numbers of docs/results.md."""
    clip_ids, _, _, mp3_paths = common.read_annotations(csv_path)
    lines = ["| split | part | clips | sharing a song with training | an album | an artist |",
             "|---|---|---|---|---|---|"]
    for split, (train, val, test) in (("paper", common.paper_split(len(clip_ids))),
                                      ("clean", common.clean_split(clip_ids)),
                                      ("folder", common.folder_split(mp3_paths))):
        lines.append(f"| {split} | train | {len(train):,} | | | |")
        for part, rows in (("val", val), ("test", test)):
            o = common.split_overlap(mp3_paths, train, rows)
            lines.append(f"| {split} | {part} | {len(rows):,} | {share(o['song'], o['n_clips'])} | "
                         f"{share(o['album'], o['n_clips'])} | {share(o['artist'], o['n_clips'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", type=Path, metavar="RUN_DIR",
                   help="run folders of trainer.py (each with results.json), or a folder holding them")
    p.add_argument("--out", type=Path, default=None,
                   help="where report.md and curves.png go (default: the parent folder given, "
                        "else the run folders' common parent)")
    p.add_argument("--resamples", type=plumbing.at_least(0), default=uncertainty.N_RESAMPLES, metavar="N",
                   help="resamples of the test clips for the bootstrap intervals and paired comparisons "
                        f"(default: {uncertainty.N_RESAMPLES}; 0 leaves those sections out)")
    p.add_argument("--splits", type=Path, metavar="CSV", default=None,
                   help="instead, print the split table (sizes and leakage audit of the paper, clean "
                        "and folder splits) of this annotations_final.csv (or a gzip of it)")
    args = p.parse_args(argv)
    if args.splits is not None:
        try:
            text = split_table(args.splits)
        except (OSError, ValueError) as error:
            raise SystemExit(f"error: {error}") from None
        print(text, end="")
        return text
    if not args.runs:
        p.error("give at least one RUN_DIR (or --splits CSV)")
    run_dirs = find_runs(args.runs)
    runs = [load_run(run_dir) for run_dir in run_dirs]
    out = args.out
    if out is None:
        single_parent = len(args.runs) == 1 and not (args.runs[0] / "results.json").is_file()
        out = (args.runs[0] if single_parent
               else Path(os.path.commonpath([d.resolve().parent for d in run_dirs])))
    plumbing.check_folder(out, "--out")  # a file there, or read-only: one line, before the report
    text, written = format_report(runs), []
    if args.resamples > 0:
        load_scores(runs)
        extra, compared = uncertainty_report(runs, args.resamples)
        if compared and plot_per_tag_gain(compared, out / "per_tag_gain.png"):
            extra += "\n![per-tag gain: test ROC-AUC difference per tag](per_tag_gain.png)\n"
            written.append(out / "per_tag_gain.png")
        elif compared:
            print("note: matplotlib is not installed: no per_tag_gain.png", file=sys.stderr)
        text += extra
    with plumbing.atomic_write(out / "report.md") as f:
        f.write(text)
    print(text, end="")
    written.insert(0, out / "report.md")
    if plot_curves(runs, out / "curves.png"):
        written.append(out / "curves.png")
    else:
        print("note: matplotlib is not installed: no curves.png", file=sys.stderr)
    print(f"wrote {', '.join(map(str, written))}", file=sys.stderr)
    return text


if __name__ == "__main__":  # SIGTERM and SIGHUP stop it as Ctrl-C does
    plumbing.run_script(main, "interrupted: each file written is whole; rerun the same command for the "
                              "report")
