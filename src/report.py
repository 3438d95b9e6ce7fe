"""Tabulate finished training runs: one row per run, mean +- std per split beside the field.

    python src/report.py experiments/study                 # every run folder in it
    python src/report.py experiments/a experiments/b --out experiments
    python src/report.py --splits data/annotations_final.csv   # split sizes and leakage

Reads RUN/results.json (and RUN/metrics.csv for the curves) of each run folder written by
trainer.py; prints a Markdown report and writes it to OUT/report.md, and, when matplotlib
is installed, OUT/curves.png (validation and test ROC-AUC and training loss per epoch, one
line per run). OUT defaults to the folder given when it is one parent folder, else to the
run folders' common parent. Per split, the mean and the sample standard deviation (ddof=1)
over its runs; a split with one run has no standard deviation ("n/a").
"""
import argparse
import csv
import json
import os
import sys
from pathlib import Path

import numpy as np

import common
import plumbing

# Published figures the runs are compared with.
# Dabral et al. 2018 on the paper split: best validation ROC-AUC 0.904, test 0.900
# (REFERENCE.md, "Published result"); no PR-AUC published.
PAPER_2018 = dict(val_roc_auc=0.904, test_roc_auc=0.900)
# Won et al. 2020, "Evaluation of CNN-based automatic music tagging models", on the clean
# split (50 unmerged tags): model, ROC-AUC, PR-AUC (src/splits/README.md).
WON_2020 = [("FCN", 0.9005, 0.4295), ("Musicnn", 0.9106, 0.4493), ("Sample-level", 0.9058, 0.4422),
            ("Sample-level + SE", 0.9103, 0.4520), ("CRNN", 0.8722, 0.3625),
            ("Self-attention", 0.9077, 0.4445), ("Harmonic CNN", 0.9127, 0.4611),
            ("Short-chunk CNN", 0.9126, 0.4590), ("Short-chunk CNN + Res", 0.9129, 0.4614)]
SPLIT_ORDER = ("paper", "clean", "random")
NEEDED = ("split", "seed", "epochs", "epoch", "val_roc_auc", "val_pr_auc", "test_roc_auc", "test_pr_auc")
NEEDED_TYPES = dict(split=str, seed=int, epochs=int, epoch=int, val_roc_auc=(int, float),
                    val_pr_auc=(int, float), test_roc_auc=(int, float), test_pr_auc=(int, float))
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
                             f"python src/trainer.py --out {path.parent} --run {path.name} --resume (same flags)")
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
        if not isinstance(value, kind) or isinstance(value, bool) or value != value:  # NaN != NaN
            raise SystemExit(f"error: {path}: {key} is {json.dumps(value)}, not {KIND_NAMES[kind]}; the file "
                             "is damaged: restore it, or rerun that run with trainer.py")
    history, metrics = [], run_dir / "metrics.csv"
    if metrics.is_file():
        with open(metrics, newline="") as f:
            reader = csv.DictReader(f)
            try:
                for row in reader:
                    if None in row or None in row.values() or not set(HISTORY_COLUMNS) <= set(row):
                        raise ValueError("not the columns of its header" if None in row or None in row.values()
                                         else f"no column {', '.join(sorted(set(HISTORY_COLUMNS) - set(row)))}")
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
    return "none (not a published split)"


def split_key(split):
    return (SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER), split)


def format_report(runs):
    """Markdown: the runs, then per split the mean ± std beside the published reference,
    then (with clean-split runs) where their mean stands in Won et al.'s table."""
    runs = sorted(runs, key=lambda r: (split_key(r["split"]), r["seed"], r["name"]))
    lines = ["# Results", "",
             "## Runs", "",
             "| run | split | seed | epochs | best epoch | val ROC-AUC | val PR-AUC | test ROC-AUC | "
             "test PR-AUC | test clips sharing a song with training |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['name']} | {r['split']} | {r['seed']} | {r['epochs']} | {r['epoch']} | "
                     f"{r['val_roc_auc']:.4f} | {r['val_pr_auc']:.4f} | {r['test_roc_auc']:.4f} | "
                     f"{r['test_pr_auc']:.4f} | {song_overlap(r)} |")
    lines += ["", "## Per split: mean ± sample standard deviation (ddof=1) over its runs", "",
              "| split | runs | val ROC-AUC | test ROC-AUC | test PR-AUC | published reference |",
              "|---|---|---|---|---|---|"]
    splits = sorted({r["split"] for r in runs}, key=split_key)
    for split in splits:
        group = [r for r in runs if r["split"] == split]
        epochs = sorted({r["epochs"] for r in group})
        n_runs = f"{len(group)}" + (f" (epochs differ: {', '.join(map(str, epochs))})" if len(epochs) > 1 else "")
        lines.append(f"| {split} | {n_runs} | {format_mean_std([r['val_roc_auc'] for r in group])} | "
                     f"{format_mean_std([r['test_roc_auc'] for r in group])} | "
                     f"{format_mean_std([r['test_pr_auc'] for r in group])} | {reference(split)} |")
    clean = [r for r in runs if r["split"] == "clean"]
    if clean:
        roc, _ = mean_std([r["test_roc_auc"] for r in clean])
        pr, _ = mean_std([r["test_pr_auc"] for r in clean])
        table = WON_2020 + [(f"**this project: multi-scale CNN, mean of {len(clean)} run(s)**", roc, pr)]
        lines += ["", "## The clean split against the field (Won et al. 2020), by test ROC-AUC", "",
                  "| model | ROC-AUC | PR-AUC |", "|---|---|---|"]
        lines += [f"| {name} | {a:.4f} | {b:.4f} |" for name, a, b in sorted(table, key=lambda m: -m[1])]
    return "\n".join(lines) + "\n"


def plot_curves(runs, path):
    """curves.png: validation ROC-AUC, test ROC-AUC and training loss per epoch, one line
    per run (a colour per run, a line style per split). Returns False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    splits = sorted({r["split"] for r in runs}, key=split_key)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = (("val_roc_auc", "validation ROC-AUC"), ("test_roc_auc", "test ROC-AUC"), ("train_loss", "training loss"))
    for run in runs:
        if not run["history"]:
            print(f"note: {run['run_dir']} has no metrics.csv: no curve for it", file=sys.stderr)
            continue
        epochs = [row["epoch"] for row in run["history"]]
        style = dict(color=f"C{runs.index(run) % 10}", linestyle=("-", "--", ":", "-.")[splits.index(run["split"]) % 4])
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
# the splits themselves
def split_table(csv_path):
    """Markdown table of the paper and clean splits on MTAT's annotations: clips per part
    and, for validation and test, how many share a song, album, artist with training
    (common.split_overlap). The numbers of docs/results.md."""
    clip_ids, _, _, mp3_paths = common.read_annotations(csv_path)
    lines = ["| split | part | clips | sharing a song with training | an album | an artist |",
             "|---|---|---|---|---|---|"]
    for split, (train, val, test) in (("paper", common.paper_split(len(clip_ids))),
                                      ("clean", common.clean_split(clip_ids))):
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
    p.add_argument("--splits", type=Path, metavar="CSV", default=None,
                   help="instead, print the split table (sizes and leakage audit of the paper and "
                        "clean splits) of this annotations_final.csv")
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
        out = args.runs[0] if single_parent else Path(os.path.commonpath([d.resolve().parent for d in run_dirs]))
    plumbing.check_folder(out, "--out")  # a file there, or read-only: one line, before the report
    text = format_report(runs)
    with plumbing.atomic_write(out / "report.md") as f:
        f.write(text)
    print(text, end="")
    written = [out / "report.md"]
    if plot_curves(runs, out / "curves.png"):
        written.append(out / "curves.png")
    else:
        print("note: matplotlib is not installed: no curves.png", file=sys.stderr)
    print(f"wrote {', '.join(map(str, written))}", file=sys.stderr)
    return text


if __name__ == "__main__":
    main()
