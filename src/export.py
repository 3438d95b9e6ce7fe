"""A trained run -> a model folder to share: model.safetensors, model.json (its card), README.md."""
import argparse
import json
import math
import os
import shlex
import shutil
import tempfile
from pathlib import Path

import formats
import plumbing
import uncertainty


def make_card(name, model, checkpoint, run_dir):
    """model.json: what the model is, was trained on and scored (save_model_folder adds the rest)."""
    metrics = {key: checkpoint["metrics"][key] for key in ("epoch", *formats.METRICS_COLUMNS)}
    if (scores := formats.read_test_scores(run_dir, checkpoint["epoch"])) is not None:  # as report.py's
        figure = uncertainty.bootstrap_runs(scores["labels"], [scores["scores"]])["runs"][0]
        for m in ("roc", "pr"):
            metrics[f"test_{m}_auc_95"] = [None if math.isnan(v) else v for v in figure[m][1:]]  # NaN: null
        metrics["interval"] = (f"{uncertainty.CONFIDENCE:.0%} bootstrap over the {len(scores['rows'])} test "
                               "clips; none for validation (its scores are not kept)")
    words = ["python", "src/trainer.py"]
    for key, value in checkpoint["args"].items():  # every flag as recorded; --no-X: devices.py's speed flags
        if value is not None and (value is not False or key in ("fused_adam", "resident", "cudnn_benchmark")):
            words += [f"--{'no-' * (value is False)}{key.replace('_', '-')}",
                      *(value if isinstance(value, list) else [] if isinstance(value, bool) else [value])]
    prov, warning = checkpoint["provenance"], formats.describe_training(checkpoint)[1]
    overlap = plumbing.read_json(run_dir / "results.json").get("split_overlap")
    return dict(name=name, model="MSCNN (Dabral et al. 2018), PyTorch", tags=checkpoint["tag_names"],
                network=dict(scales=list(model.scales), n_tags=len(checkpoint["tag_names"])),
                feature_params=checkpoint["feature_params"], training_data=prov["data"], metrics=metrics,
                split=dict(prov["split"], overlap=overlap),
                trained_with=shlex.join(map(str, words)), code_commit=prov.get("code_commit"),
                weights_licence="CC BY-NC-SA 3.0 (MTAT's)" if prov["data"]["dataset"] == "MTAT" else None,
                source_checkpoint_sha256=checkpoint["sha256"], warning=warning and warning[len("warning: "):])


def model_readme(card, out):
    """README.md: the front matter model hubs read, then the card in words."""
    data, split, m, licence = card["training_data"], card["split"], card["metrics"], card["weights_licence"]
    cell = {key: f"{m[key]:.4f}" for key in formats.METRICS_COLUMNS}
    for key in ("test_roc_auc", "test_pr_auc"):  # with its interval where it has one
        if None not in m.get(f"{key}_95", [None]):
            cell[key] += " [{:.4f}, {:.4f}]".format(*m[f"{key}_95"])
    lines = ["---", "library_name: pytorch", f"license: {'cc-by-nc-sa-3.0' if licence else 'other'}",
             'tags: ["music", "audio", "auto-tagging"]', *['datasets: ["magnatagatune"]'] * bool(licence),
             'metrics: ["roc_auc", "pr_auc"]', "---", "", f"# {card['name']}: a multi-scale CNN music tagger",
             "", *[f"**Warning: {card['warning']}.**", ""] * bool(card["warning"]),
             f"{card['model']}, scales {json.dumps(card['network']['scales'])}, trained on {data['dataset']} "
             f"data (annotations MD5 {data['annotations_md5']}), split `{split['name']}` ({split['n_train']}"
             f" / {split['n_val']} / {split['n_test']} clips), epoch {m['epoch']} (the best on validation). "
             f"Its {len(card['tags'])} tags, in output order: {', '.join(card['tags'])}.", "",
             "| | ROC-AUC | PR-AUC |", "|---|---|---|",
             f"| validation | {cell['val_roc_auc']} | {cell['val_pr_auc']} |",
             f"| test | {cell['test_roc_auc']} | {cell['test_pr_auc']} |", "",
             f"Macro averages over the tags; intervals: {m.get('interval', 'none')}. Tag audio with it and "
             f"the code (commit {card['code_commit'] or 'unknown'}):", "",
             f"    python src/predict.py song.mp3 --checkpoint {out}", "",
             f"Trained with `{card['trained_with']}`. Weights: {licence or 'licence not stated'}; code: MIT. "
             "Cite Dabral, Deshmukh, Malapati, \"A Multi-scale Convolutional Neural Network Architecture for "
             'Music Auto-Tagging", Springer 2018, doi:10.1007/978-981-13-1592-3_60.', ""]
    return "\n".join(lines)


@plumbing.releasing_locks
def main(argv=None):
    """-> the card written to --out/model.json; the folder is written beside --out, then renamed to it."""
    p = argparse.ArgumentParser(description="Export a trained run to share: a model folder (docs/predict.md)")
    p.add_argument("run", help="the folder of a finished run of trainer.py, or its best_model.pt")
    p.add_argument("--out", type=Path, required=True, help="the model folder to write, e.g. models/NAME")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is a model folder already")
    args = p.parse_args(argv)
    out, best = args.out, Path(args.run) / "best_model.pt" if Path(args.run).is_dir() else Path(args.run)
    if not best.is_file() or not (best.parent / "results.json").is_file():
        raise SystemExit(f"error: {args.run}: no best_model.pt and results.json there; give a finished run")
    if best.parent.resolve().is_relative_to(out.resolve()):
        raise SystemExit(f"error: --out {out} is or holds the run folder {best.parent}; pass another --out")
    try:
        model, checkpoint = formats.load_model(best)  # its features, weights and shapes checked
        card = make_card(out.name, model, checkpoint, best.parent)
    except ValueError as error:
        raise SystemExit(f"error: {error}; export another run, or train this one again") from None
    plumbing.check_folder(out.parent, "--out")
    plumbing.hold_lock(out.parent / f"{out.name}.lock", out, "pass another --out")
    if out.exists() and not (args.overwrite and formats.is_model_folder(out)):
        raise SystemExit(f"error: --out {out} exists; pass another --out, or --overwrite (a model folder)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    os.chmod(tmp, 0o777 & ~plumbing.UMASK)  # not mkdtemp's 0o700: the folder is to share
    try:
        card = formats.save_model_folder(tmp, checkpoint, card)
        with plumbing.atomic_write(tmp / "README.md") as f:
            f.write(model_readme(card, out))
        formats.load_model(tmp)  # read back as predict.py reads it
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():  # --overwrite: the folder replaced, removed once the new one is in place
        os.rename(out, tmp.with_suffix(".old"))
    os.rename(tmp, out)
    shutil.rmtree(tmp.with_suffix(".old"), ignore_errors=True)
    print(f"wrote {out}; tag with it: python src/predict.py song.mp3 --checkpoint {out}")
    return card


if __name__ == "__main__":
    plumbing.run_script(main, "interrupted: --out is as it was; rerun the same command")
