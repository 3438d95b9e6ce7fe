"""Tabulate finished training runs: one row per run, mean +- std per split beside the field.

    python src/report.py experiments/study                 # every run folder in it
    python src/report.py experiments/a experiments/b --out experiments
    python src/report.py --splits data/annotations_final.csv   # split sizes and leakage
    python src/report.py --splits tests/fixtures/annotations_final.csv.gz   # the same, shipped copy

Prints a Markdown report and writes OUT/report.md (with matplotlib also curves.png, per_tag_gain.png): per
split and --scales, mean and std (ddof=1) over its runs; 95% bootstrap intervals, paired differences.
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

# Won et al. 2020, "Evaluation of CNN-based automatic music tagging models", on the clean split (50 unmerged
# tags): model, ROC-AUC, PR-AUC (src/splits/README.md; all figures: docs/results.md, "Reference figures").
WON_2020 = [("FCN", 0.9005, 0.4295), ("Musicnn", 0.9106, 0.4493), ("Sample-level", 0.9058, 0.4422),
            ("Sample-level + SE", 0.9103, 0.4520), ("CRNN", 0.8722, 0.3625),
            ("Self-attention", 0.9077, 0.4445), ("Harmonic CNN", 0.9127, 0.4611),
            ("Short-chunk CNN", 0.9126, 0.4590), ("Short-chunk CNN + Res", 0.9129, 0.4614)]
# MARBLE on the folder split: ROC-AUC of probes on frozen self-supervised features; PR-AUC "about 0.40".
MARBLE_FOLDER = [("MERT-330M", 0.913), ("MusicFM", 0.913), ("MuQ", 0.914)]
MARBLE_PR_AUC = 0.40
WON_ROC, WON_PR = [m[1] for m in WON_2020], [m[2] for m in WON_2020]
# Per published split: (its cell in the per-split table, its clips); Dabral et al. 2018 is this network
REFERENCES = {
    "paper": ("Dabral et al. 2018: test ROC-AUC 0.900 (val 0.904); no PR-AUC published",
              "the original's draw of clips, 18,000 / 2,000 / 5,863; clips of one song on both sides"),
    "clean": (f"Won et al. 2020, {len(WON_2020)} models: ROC-AUC {min(WON_ROC):.4f}–{max(WON_ROC):.4f}, "
              f"PR-AUC {min(WON_PR):.4f}–{max(WON_PR):.4f} (table below)",
              "Lee et al. 2017's lists, 15,244 / 1,529 / 4,332, the 50 most frequent tags unmerged"),
    "folder": ("MARBLE, frozen features probed: " + ", ".join(f"{m} {roc:.3f}" for m, roc in MARBLE_FOLDER)
               + f" ROC-AUC, PR-AUC about {MARBLE_PR_AUC:.2f}",
               "MTAT's folders 0-b / c / d-f with every usable clip, 18,706 / 1,825 / 5,329, the same tags")}
# Per split with a table of the field: its heading and the published rows as (ROC-AUC, row)
FIELD = {
    "clean": ("The clean split against the field (Won et al. 2020)",
              [(roc, f"| {name} | {roc:.4f} | {pr:.4f} |") for name, roc, pr in WON_2020]),
    "folder": ("The folder split against the field (MARBLE: probes on frozen self-supervised features)",
               [(roc, f"| {name} | {roc:.3f} | about {MARBLE_PR_AUC:.2f} |") for name, roc in MARBLE_FOLDER])}
SPLIT_ORDER = ("paper", "clean", "folder", "random")
METRICS = ("val_roc_auc", "val_pr_auc", "test_roc_auc", "test_pr_auc")
NUMBER = (int, float)
NEEDED = dict(split=str, seed=int, epochs=int, epoch=int, **dict.fromkeys(METRICS, NUMBER), scales=list,
              split_overlap=dict)  # results.json's fields that the report reads, and their types
KIND_NAMES = {str: "a string", int: "an integer", NUMBER: "a number", list: "a list", dict: "an object"}
HISTORY_COLUMNS = ("epoch", "train_loss", "val_roc_auc", "test_roc_auc")  # of metrics.csv, for the curves


def find_runs(paths):
    """The run folders (with results.json) among paths and their subfolders; notes unfinished ones."""
    runs = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise SystemExit(f"error: {path} is not a folder; give run folders of trainer.py or their parent")
        if (path / "results.json").is_file():
            runs.append(path)
            continue
        if (path / "last.pt").is_file():
            raise SystemExit(f"error: {path} has no results.json: the run has not finished; finish it with "
                             f"python src/trainer.py --out {path.parent} --run {path.name} --resume (same "
                             "flags)")
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
    """-> results.json's fields (scales a tuple), name, run_dir and history (metrics.csv's rows, or [])."""
    path = run_dir / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: cannot read {path}: {error}") from None
    version = results.get("format_version") if isinstance(results, dict) else None
    if version != formats.RUN_FORMAT:
        raise SystemExit(f"error: {path} is of format {version}, this code reads {formats.RUN_FORMAT}; "
                         "rerun that run with this trainer.py")
    damaged = "the file is damaged: restore it, or rerun that run with trainer.py"
    missing = [key for key in NEEDED if key not in results]
    if missing:
        raise SystemExit(f"error: {path} lacks {', '.join(missing)}; {damaged}")
    for key, kind in NEEDED.items():
        value = results[key]
        if (not isinstance(value, kind) or isinstance(value, bool)
                or (isinstance(value, float) and math.isnan(value))):
            raise SystemExit(f"error: {path}: {key} is {json.dumps(value)}, not {KIND_NAMES[kind]}; "
                             + damaged)
    history, metrics = [], run_dir / "metrics.csv"
    if metrics.is_file():
        with open(metrics, newline="") as f:
            reader = csv.DictReader(f)
            try:
                for line in reader:
                    lacking = ", ".join(sorted(set(HISTORY_COLUMNS) - set(line)))
                    if None in line or None in line.values():
                        raise ValueError("not the columns of its header")
                    if lacking:
                        raise ValueError(f"no column {lacking}")
                    history.append({k: float(v) for k, v in line.items()})
            except (ValueError, csv.Error) as error:
                raise SystemExit(f"error: {metrics}: line {reader.line_num}: {error}; the file is damaged: "
                                 "restore it, or delete it to report the run without its curves") from None
    return dict(results, scales=tuple(results["scales"]), name=run_dir.name, run_dir=run_dir, history=history)


def row(*cells):
    """A row of a Markdown table; an empty cell reads '| |'."""
    return "|" + "|".join(f" {cell} " if cell != "" else " " for cell in cells) + "|"


def table(*columns):
    return [row(*columns), "|" + "---|" * len(columns)]


def scales_text(scales):
    return " ".join(map(str, scales))


def config_name(run):
    """The split, and the scales when they are not the paper's three: 'clean, scales 1'."""
    return run["split"] + ("" if run["scales"] == common.SCALES else f", scales {scales_text(run['scales'])}")


def split_key(split):
    return (SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER), split)


def run_key(run):
    return split_key(run["split"]), run["seed"], run["scales"] != common.SCALES, run["name"]


def share(count, total):
    """'5,591 (95.4%)'; a share short of all never reads 100.0%."""
    percent = 100 * count / total if total else 0.0
    text = ">99.9" if count < total and percent >= 99.95 else f"{percent:.1f}"
    return f"{count:,} ({text}%)"


def format_report(runs):
    """Markdown: the runs; per split and --scales mean ± std beside the references; tables of the field."""
    runs = sorted(runs, key=run_key)
    lines = ["# Results", "", "## Runs", "",
             *table("run", "split", "seed", "epochs", "best epoch", "val ROC-AUC", "val PR-AUC",
                    "test ROC-AUC", "test PR-AUC", "test clips sharing a song with training")]
    for r in runs:
        test = r["split_overlap"]["test"]
        parsed = test["unparsed"] < test["n_clips"]  # else no clip name is MTAT's: nothing audited
        song = share(test["song"], test["n_clips"]) if parsed else "n/a (names not MTAT's)"
        lines.append(row(r["name"], config_name(r), r["seed"], r["epochs"], r["epoch"],
                         *(f"{r[key]:.4f}" for key in METRICS), song))
    lines += ["", "## Per split: mean ± sample standard deviation (ddof=1) over its runs", "",
              *table("split", "runs", "val ROC-AUC", "test ROC-AUC", "test PR-AUC", "published reference")]
    configurations = sorted({(r["split"], r["scales"]) for r in runs},
                            key=lambda config: (split_key(config[0]), config[1] != common.SCALES, config[1]))
    ours = {}  # per split, this project's rows for its table of the field: (mean test ROC-AUC, row)
    for split, scales in configurations:
        group = [r for r in runs if (r["split"], r["scales"]) == (split, scales)]
        epochs = sorted({r["epochs"] for r in group})
        differ = f" (epochs differ: {', '.join(map(str, epochs))})" if len(epochs) > 1 else ""
        figures = []  # mean ± the sample's standard deviation (ddof=1), 'n/a' for one run
        for key in ("val_roc_auc", "test_roc_auc", "test_pr_auc"):
            values = [r[key] for r in group]
            std = f"{np.std(values, ddof=1):.4f}" if len(values) > 1 else "n/a"
            figures.append(f"{np.mean(values):.4f} ± {std}")
        reference = REFERENCES[split][0] if split in REFERENCES else "none (not a published split)"
        lines.append(row(config_name(group[0]), f"{len(group)}{differ}", *figures, reference))
        roc, pr = (np.mean([r[key] for r in group]) for key in ("test_roc_auc", "test_pr_auc"))
        what = "multi-scale CNN" if scales == common.SCALES else f"--scales {scales_text(scales)}"
        name = f"**this project: {what}, mean of {len(group)} run(s)**"
        ours.setdefault(split, []).append((roc, row(name, f"{roc:.4f}", f"{pr:.4f}")))
    lines += ["", "## Published references, by split", ""]
    lines += [f"- **{split} split** ({clips}): {cell}." for split, (cell, clips) in REFERENCES.items()]
    lines += ["", "A figure compares only with runs on its own split: the three differ in their clips."]
    for split, (heading, published) in FIELD.items():
        if split in ours:
            lines += ["", f"## {heading}, by test ROC-AUC", "", *table("model", "ROC-AUC", "PR-AUC")]
            lines += [text for _, text in sorted(published + ours[split], key=lambda entry: -entry[0])]
    return "\n".join(lines) + "\n"


def plot_curves(plt, runs):
    """Validation ROC-AUC, test ROC-AUC and training loss per epoch; a colour per run, a style per split."""
    splits = sorted({r["split"] for r in runs}, key=split_key)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = {"val_roc_auc": "validation ROC-AUC", "test_roc_auc": "test ROC-AUC",
              "train_loss": "training loss"}
    for index, run in enumerate(runs):
        if not run["history"]:
            print(f"note: {run['run_dir']} has no metrics.csv: no curve for it", file=sys.stderr)
            continue
        style = dict(color=f"C{index % 10}", linestyle=("-", "--", ":", "-.")[splits.index(run["split"]) % 4])
        for ax, key in zip(axes, panels):
            ax.plot([line["epoch"] for line in run["history"]], [line[key] for line in run["history"]],
                    marker=".", **style, label=f"{run['name']} ({run['split']}, seed {run['seed']})")
    for ax, title in zip(axes, panels.values()):
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return fig


def paired_comparisons(group):
    """Each other --scales against the one with most branches, by seed. -> [(scales_a, scales_b, pairs)]."""
    by_scales = {}
    for index, run in enumerate(group):
        by_scales.setdefault(run["scales"], {}).setdefault(run["seed"], []).append(index)
    first, *others = sorted(by_scales, key=lambda scales: (-len(scales), scales))
    comparisons = []
    for other in others:
        pairs = []
        for seed in sorted(set(by_scales[first]) & set(by_scales[other])):
            a, b = by_scales[first][seed], by_scales[other][seed]
            if len(a) > 1 or len(b) > 1:
                names = ", ".join(group[i]["name"] for i in a + b)
                print(f"note: several runs of seed {seed} ({names}) on the same clips: seed {seed} left out "
                      "of the paired comparison", file=sys.stderr)
            else:
                pairs.append((a[0], b[0], seed))
        if pairs:
            comparisons.append((first, other, pairs))
    return comparisons


def interval(low, high, form=".4f"):
    return f"[{low:{form}}, {high:{form}}]" if np.isfinite(low) and np.isfinite(high) else "n/a"


def uncertainty_report(runs, n_resamples):
    """Markdown of each run's bootstrap intervals and the paired comparisons -> (text, the comparisons)."""
    groups = {}  # by what the runs were scored on (so --split random runs of other --split-seed never pair)
    for run in runs:
        try:
            run["scores"] = saved = formats.read_test_scores(run["run_dir"], run["epoch"])
        except ValueError as error:
            print(f"note: {error}; no interval for {run['name']}", file=sys.stderr)
            continue
        if saved is None:
            print(f"note: {run['run_dir']} has no {formats.TEST_SCORES}: no interval for it", file=sys.stderr)
            continue
        key = (run["split"], saved["rows"].tobytes(), saved["labels"].tobytes(), tuple(saved["tag_names"]))
        groups.setdefault(key, []).append(run)
    figures, compared = {}, []
    for group in groups.values():
        saved = group[0]["scores"]
        comparisons = paired_comparisons(group)
        result = uncertainty.bootstrap_runs(saved["labels"], [run["scores"]["scores"] for run in group],
                                            [[(a, b) for a, b, _ in pairs] for _, _, pairs in comparisons],
                                            n_resamples=n_resamples)
        figures.update((id(run), figure) for run, figure in zip(group, result["runs"]))
        for (scales_a, scales_b, pairs), entry in zip(comparisons, result["comparisons"]):
            compared.append(dict(entry, split=group[0]["split"], scales_a=scales_a, scales_b=scales_b,
                                 pairs=[(group[a], group[b], seed) for a, b, seed in pairs],
                                 tag_names=saved["tag_names"], labels=saved["labels"]))
    lines = ["", f"## How sure each test score is: {uncertainty.CONFIDENCE:.0%} bootstrap intervals over the "
             "test clips", "", *table("run", "split", "seed", "test clips", "test ROC-AUC [95% interval]",
                                      "test PR-AUC [95% interval]")]
    for run in sorted(runs, key=run_key):
        figure = figures.get(id(run))
        if figure is None:
            cells = ("", f"{run['test_roc_auc']:.4f} (no {formats.TEST_SCORES})", f"{run['test_pr_auc']:.4f}")
        else:
            cells = (f"{len(run['scores']['rows']):,}",
                     *(f"{figure[m][0]:.4f} {interval(*figure[m][1:])}" for m in ("roc", "pr")))
        lines.append(row(run["name"], config_name(run), run["seed"], *cells))
    lines += ["", f"Percentile intervals of {n_resamples:,} resamples of each run's test clips (scipy.stats."
              "bootstrap; a tag that a resample leaves without a positive or a negative clip is left out of "
              "that resample's macro mean). They say how far this one trained model's score could move on "
              "another test set drawn like this one, not how far another seed would move it (the ± above); "
              "see docs/results.md."]
    if compared:
        lines += ["", "## Does multi-scale help? Paired comparisons on the same test clips"]
    for c in compared:
        lines += comparison_lines(c, n_resamples)
    return "\n".join(lines) + "\n", compared


def comparison_lines(c, n_resamples):
    """Markdown of one paired comparison: the verdict, the overall table, the per-tag table."""
    a, b, n_pairs = scales_text(c["scales_a"]), scales_text(c["scales_b"]), len(c["pairs"])
    point, low, high, p = c["roc"]
    claim = c["scales_a"] == common.SCALES and c["scales_b"] == (1,)
    what = f"three scales ({a}) against one ({b})" if claim else f"scales {a} against {b}"
    if not (np.isfinite(low) and np.isfinite(high)):
        end = "no interval: some resample of these few test clips could score no tag"
    elif low > 0:
        end = "the paper's claim holds here: three scales beat one" if claim else "the first is better"
    elif high < 0:
        end = "the paper's claim fails here: one scale beats three" if claim else "the second is better"
    else:
        end = ("the paper's claim is not shown here: the interval includes 0" if claim
               else "no difference shown: the interval includes 0")
    lines = ["", f"### {c['split']} split: scales {a} against {b}", "",
             f"**On the {c['split']} split, {what}: test ROC-AUC difference {point:+.4f} (95% interval "
             f"{interval(low, high, '+.4f')} over the test clips, paired bootstrap p = {p:.4f}, {n_pairs} "
             f"seed pair{'s' * (n_pairs != 1)}): {end}.**", "",
             *table("test metric", f"scales {a}", f"scales {b}", "difference", "95% interval", "p",
                    "per seed pair")]
    for name, key, metric in (("ROC-AUC", "test_roc_auc", "roc"), ("PR-AUC", "test_pr_auc", "pr")):
        point, low, high, p = c[metric]
        means = (f"{np.mean([pair[side][key] for pair in c['pairs']]):.4f}" for side in (0, 1))
        seeds = ", ".join(f"{run_a[key] - run_b[key]:+.4f} ({seed})" for run_a, run_b, seed in c["pairs"])
        lines.append(row(name, *means, f"{point:+.4f}", interval(low, high, "+.4f"), f"{p:.4f}", seeds))
    signs = {np.sign(run_a["test_roc_auc"] - run_b["test_roc_auc"]) for run_a, run_b, _ in c["pairs"]}
    disagree = " The seed pairs disagree in sign: the seeds move the difference more than its interval shows."
    lines += ["", "The difference is the mean over the seed pairs (same seed, same clips) of the first "
              f"scales' score minus the second's; its interval and p come from the same {n_resamples:,} "
              "resamples of the test clips, each scoring every run (paired): p = 2 (1 + k) / (N + 1), k the "
              "resamples on the far side of 0." + (disagree if len(signs - {0.0}) > 1 else "")]
    point, low, high, p = c["roc_per_tag"]
    per_run = [np.mean([common.roc_auc(c["labels"], pair[side]["scores"]["scores"], per_tag=True)
                        for pair in c["pairs"]], axis=0) for side in (0, 1)]
    n_tags, gain, loss = len(point), int(np.sum(low > 0)), int(np.sum(high < 0))
    lines += ["", f"Per tag, test ROC-AUC (mean over the seed pairs), largest gain first: {gain} of {n_tags} "
              f"tags gain with an interval above 0, {loss} lose with one below 0 (were no tag really "
              f"different, about {0.05 * n_tags:.1f} of the {n_tags} would still reach p < 0.05 by chance).",
              "", *table("tag", f"scales {a}", f"scales {b}", "difference", "95% interval", "p")]
    for tag in sorted(range(n_tags), key=lambda t: -np.nan_to_num(point[t], nan=-np.inf)):
        lines.append(row(c["tag_names"][tag], f"{per_run[0][tag]:.4f}", f"{per_run[1][tag]:.4f}",
                         f"{point[tag]:+.4f}", interval(low[tag], high[tag], "+.4f"),
                         f"{p[tag]:.4f}" if np.isfinite(p[tag]) else "n/a (a resample cannot score it)"))
    return lines


def plot_per_tag_gain(plt, compared):
    """Per comparison, each tag's test ROC-AUC difference and 95% interval (green above 0, red below)."""
    n_tags = max(len(c["tag_names"]) for c in compared)
    fig, axes = plt.subplots(1, len(compared), figsize=(6 * len(compared), 1.2 + 0.2 * n_tags), squeeze=False)
    for ax, c in zip(axes[0], compared):
        point, low, high, _ = c["roc_per_tag"]
        order = sorted(range(len(point)), key=lambda t: np.nan_to_num(point[t], nan=-np.inf))
        point, low, high, y = point[order], low[order], high[order], np.arange(len(order))
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
    return fig


def save_png(plt, fig, path):
    fig.tight_layout()
    with plumbing.atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return path


def split_table(csv_path):
    """Markdown: clips per part of each split, and how many share a song, album, artist with training."""
    clip_ids, _, _, mp3_paths = common.read_annotations(csv_path)
    lines = table("split", "part", "clips", "sharing a song with training", "an album", "an artist")
    for split, (train, val, test) in (("paper", common.paper_split(len(clip_ids))),
                                      ("clean", common.clean_split(clip_ids)),
                                      ("folder", common.folder_split(mp3_paths))):
        lines.append(row(split, "train", f"{len(train):,}", "", "", ""))
        for part, rows in (("val", val), ("test", test)):
            o = common.split_overlap(mp3_paths, train, rows)
            shares = (share(o[what], o["n_clips"]) for what in ("song", "album", "artist"))
            lines.append(row(split, part, f"{len(rows):,}", *shares))
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", type=Path, metavar="RUN_DIR",
                   help="run folders of trainer.py (each with results.json), or a folder holding them")
    p.add_argument("--out", type=Path, help="where report.md and the figures go (default: the parent "
                   "folder given, else the run folders' common parent)")
    p.add_argument("--resamples", type=plumbing.at_least(0), default=uncertainty.N_RESAMPLES, metavar="N",
                   help="bootstrap resamples of test clips (default: %(default)s; 0: no bootstrap sections)")
    p.add_argument("--splits", type=Path, metavar="CSV", help="instead, print the paper, clean and folder "
                   "splits' sizes and leakage audit on this annotations_final.csv (or its .gz)")
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
    if args.out is None and len(args.runs) == 1 and args.runs[0] not in run_dirs:
        args.out = args.runs[0]  # the one folder of runs given; else the runs' common parent
    out = args.out or Path(os.path.commonpath([d.resolve().parent for d in run_dirs]))
    plumbing.check_folder(out, "--out")  # a file there, or read-only: one line, before the report
    text, written = format_report(runs), [out / "report.md"]
    plt = plumbing.import_pyplot()  # None without matplotlib: no figures
    if args.resamples > 0:
        extra, compared = uncertainty_report(runs, args.resamples)
        if compared and plt is None:
            print("note: matplotlib is not installed: no per_tag_gain.png", file=sys.stderr)
        elif compared:
            written.append(save_png(plt, plot_per_tag_gain(plt, compared), out / "per_tag_gain.png"))
            extra += "\n![per-tag gain: test ROC-AUC difference per tag](per_tag_gain.png)\n"
        text += extra
    with plumbing.atomic_write(out / "report.md") as f:
        f.write(text)
    print(text, end="")
    if plt is None:
        print("note: matplotlib is not installed: no curves.png", file=sys.stderr)
    else:
        written.append(save_png(plt, plot_curves(plt, runs), out / "curves.png"))
    print(f"wrote {', '.join(map(str, written))}", file=sys.stderr)
    return text


if __name__ == "__main__":  # SIGTERM and SIGHUP stop it as Ctrl-C does
    plumbing.run_script(main, "interrupted: each file written is whole; rerun the same command for the "
                              "report")
