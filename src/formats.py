"""The files passed between the stages, each written and read in one place (atomic writes: plumbing.py)."""
import contextlib
import csv
import hashlib
import io
import math
import re
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

import common
import get_data
from devices import is_main, log, on_device
from plumbing import atomic_write, check_folder, check_npy, file_digest, hold_lock, read_json, write_json

# --- The spectrogram store: spectrograms.npy, row i = annotation row i, then .json (there: complete)
SPECTROGRAMS_FORMAT = 1  # spectrograms.json's format_version; a reader refuses any other


def spectrogram_settings(n_clips, dtype, mp3_paths):
    """What a spectrogram file is made with: equal settings, the same rows and values."""
    return dict(common.feature_params(), dtype=dtype, n_clips=n_clips,
                mp3_paths_md5=paths_md5(mp3_paths[:n_clips]))


def spectrogram_meta(settings, failed=(), **facts):
    """spectrograms.json: settings, format_version, shape, failed (row, clip_id, path, error), `facts`."""
    return dict(settings, format_version=SPECTROGRAMS_FORMAT,
                shape=[settings["n_clips"], common.N_MELS, common.N_FRAMES],
                failed=sorted(failed, key=lambda f: f["row"]), **facts)


def annotations_path(data_dir):
    """DATA/annotations_final.csv, or its .csv.gz where only that exists (read_annotations reads both)."""
    path = Path(data_dir) / "annotations_final.csv"
    gzipped = path.with_name(path.name + ".gz")
    return gzipped if not path.exists() and gzipped.exists() else path


def open_spectrograms(data_dir, mp3_paths=None):
    """-> DATA/spectrograms.npy as a read-only memmap, checked (given mp3_paths: for NaN, inf too), and its
    .json's dict; else exit in one line."""
    npy, meta_path = data_dir / "spectrograms.npy", data_dir / "spectrograms.json"
    rerun = f"python src/gen_spectrograms.py --data-dir {data_dir}"
    again = f"compute the spectrograms again: {rerun} --overwrite"
    if not npy.is_file() or not meta_path.is_file():
        raise SystemExit(f"error: {npy} (+ .json) not found or incomplete; run: {rerun}")
    try:
        meta = read_json(meta_path)
    except ValueError as error:
        raise SystemExit(f"error: {error}; {again}") from None
    if (version := meta.get("format_version")) != SPECTROGRAMS_FORMAT:
        raise SystemExit(f"error: {meta_path} is of format {version}, this code reads {SPECTROGRAMS_FORMAT}; "
                         f"{again}")
    wanted = common.feature_params(meta.get("resampler"))
    found = {key: meta.get(key) for key in wanted}
    if found != wanted:
        raise SystemExit(f"error: {meta_path} was made with feature parameters {found}, but this code "
                         f"uses {wanted}; rerun: {rerun} --overwrite")
    n_clips, dtype = meta.get("n_clips"), meta.get("dtype")
    if not isinstance(n_clips, int) or dtype not in ("float16", "float32"):
        raise SystemExit(f"error: {meta_path} lacks n_clips or dtype; {again}")
    try:  # its size against its header and its .json: np.load's memory map would not name the file
        check_npy(npy, (n_clips, common.N_MELS, common.N_FRAMES), dtype)
    except ValueError as error:
        raise SystemExit(f"error: {error} ({meta_path.name} says {n_clips} clips, {dtype}); run {rerun}: "
                         "it recomputes the damaged rows (or says to pass --overwrite)") from None
    spectrograms = np.load(npy, mmap_mode="r")
    if mp3_paths is not None:
        csv_path = annotations_path(data_dir)
        if len(spectrograms) > len(mp3_paths):
            raise SystemExit(f"error: {npy} has {len(spectrograms)} rows but {csv_path} only "
                             f"{len(mp3_paths)}; {again}")
        if meta.get("mp3_paths_md5") != paths_md5(mp3_paths[:n_clips]):
            why = (f"its {n_clips} rows were made from other annotation rows (reordered or replaced since)"
                   if "mp3_paths_md5" in meta else f"{meta_path.name} does not say which rows it holds")
            raise SystemExit(f"error: {npy} no longer matches {csv_path}: {why}; {again}")
        if len(bad := non_finite_rows(spectrograms)):
            raise SystemExit(f"error: {npy} holds NaN or inf in {len(bad)} row(s) (the first: row {bad[0]}, "
                             f"{mp3_paths[bad[0]]}): the file is damaged; run {rerun}: it computes those "
                             "rows again")
    return spectrograms, meta


def non_finite_rows(rows, chunk_rows=256):
    """Indices (int64) of the rows of an array (N, ...) that hold NaN or inf, read by chunks (memmaps too)."""
    bad = [np.zeros(0, np.int64)]
    for start in range(0, len(rows), chunk_rows):
        chunk = np.asarray(rows[start:start + chunk_rows])
        bad.append(start + np.flatnonzero(~np.isfinite(chunk).reshape(len(chunk), -1).all(axis=1)))
    return np.concatenate(bad)


# --- Provenance: what a derived file was made from, recorded by its writer and checked by its readers
MTAT_ANNOTATIONS_MD5 = get_data.MD5[get_data.ANNOTATIONS]  # MTAT's annotations_final.csv
SYNTHETIC_MARKER = "synthetic.json"  # written beside the annotations by get_data.py --synthetic
DATA_IDENTITY = ("annotations_md5", "n_clips", "dtype", "mp3_paths_md5")  # what --resume compares
SPLIT_IDENTITY = ("name", "n_train", "n_val", "n_test", "rows_md5")


def paths_md5(mp3_paths):
    """MD5 of the clips' paths, in order: which annotation rows a spectrogram file holds."""
    return hashlib.md5("\n".join(mp3_paths).encode()).hexdigest()


def mark_synthetic(data_dir, annotations_bytes, **facts):
    """Mark the annotations about to be written to data_dir synthetic (by their MD5), with `facts`."""
    write_json(Path(data_dir) / SYNTHETIC_MARKER,
               dict(facts, annotations_md5=hashlib.md5(annotations_bytes).hexdigest()))


def dataset_of(csv_path, annotations_md5):
    """'MTAT' (its published annotations), 'synthetic' (get_data.py --synthetic's, by MD5) or 'other'."""
    if annotations_md5 == MTAT_ANNOTATIONS_MD5:
        return "MTAT"
    with contextlib.suppress(OSError, ValueError):
        if read_json(Path(csv_path).parent / SYNTHETIC_MARKER).get("annotations_md5") == annotations_md5:
            return "synthetic"
    return "other"


def provenance(args, split, meta):
    """What a run trains on (meta: spectrograms.json's), for its .pt files and results.json: {'data': ...,
    'split': ..., 'code_commit': this clone's git commit or None}, plain types."""
    csv_path = annotations_path(args.data_dir)
    md5 = file_digest(csv_path)
    git = shutil.which("git") and subprocess.run(["git", "-C", Path(__file__).parent, "rev-parse", "HEAD"],
                                                 capture_output=True, text=True)
    rows_md5 = hashlib.md5(b"|".join(np.asarray(part, np.int64).tobytes() for part in split)).hexdigest()
    return dict(data=dict(annotations=str(csv_path), annotations_md5=md5, dataset=dataset_of(csv_path, md5),
                          spectrograms=str(args.data_dir / "spectrograms.npy"),
                          **{key: meta.get(key) for key in DATA_IDENTITY[1:]}),
                split=dict(name=args.split, split_seed=args.split_seed if args.split == "random" else None,
                           **{f"n_{part}": len(rows) for part, rows in zip(("train", "val", "test"), split)},
                           rows_md5=rows_md5),
                code_commit=git.stdout.strip() if git and git.returncode == 0 else None)


def check_same_provenance(saved, current, run_dir):
    """--resume: refuse (one line) a last.pt trained on other data or another split than this command's."""
    for part, keys, what in (("data", DATA_IDENTITY, "other data"),
                             ("split", SPLIT_IDENTITY, "another split")):
        old, new = saved[part], current[part]
        if differ := [key for key in keys if old.get(key) != new.get(key)]:
            found = ", ".join(f"{key} {old.get(key)} there, {new.get(key)} here" for key in differ)
            where = (f"{old['annotations']} and {old['spectrograms']}" if part == "data"
                     else f"split {old['name']}")
            raise SystemExit(f"error: cannot resume {run_dir}: it was trained on {where}, this command gives "
                             f"it {what} ({found}); pass the --data-dir it was trained on, or start a new "
                             "--run")


def describe_training(checkpoint):
    """For predict.py: (a line: its data, split, epoch and scores; a warning line, or None for MTAT)."""
    metrics, prov = checkpoint["metrics"], checkpoint["provenance"]
    data, split = prov["data"], prov["split"]
    scores = ", ".join(f"{name} ROC-AUC {metrics[key]:.4f}" for name, key in (
        ("validation", "val_roc_auc"), ("test", "test_roc_auc")) if isinstance(metrics.get(key), float))
    sizes = " / ".join(f"{split[f'n_{part}']:,}" for part in ("train", "val", "test"))
    name = {"MTAT": "MTAT", "synthetic": "a synthetic set"}.get(data["dataset"], "other data")
    line = (f"model: trained on {name} ({data['annotations']}), split {split['name']} ({sizes} "
            f"clips), epoch {checkpoint.get('epoch')}" + (f": {scores}" if scores else ""))
    if data["dataset"] == "MTAT":
        return line, None
    kind = ("a synthetic demo set (get_data.py --synthetic), not MTAT: its tags say little about real music"
            if data["dataset"] == "synthetic" else "other data than MTAT: its tags are those data's")
    return line, f"warning: this model was trained on {kind}"


def non_finite(tensors):
    """The names of the float tensors of a dict holding NaN or inf, as 'a, b, c and more'; '' if none."""
    bad = [name for name, t in tensors.items()
           if torch.is_tensor(t) and t.is_floating_point() and not t.isfinite().all()]
    return ", ".join(bad[:3]) + " and more" * (len(bad) > 3)


def divergence_message(error, epoch, run_dir, history, best):
    """The line that stops a diverged run: every finished epoch was saved, last.pt holds history's last."""
    kept = (f"the last good checkpoints in {run_dir} are intact (last.pt: epoch {history[-1]['epoch']}, "
            f"best_model.pt: epoch {best['epoch']})" if history
            else f"no checkpoint was written to {run_dir}")
    return f"error: {error} in epoch {epoch}; stopped before saving it; {kept}. Try a lower --lr"


# --- The run folder: best_model.pt (for inference), last.pt (for --resume), metrics.csv, results.json
RUN_FORMAT = 1  # format_version of best_model.pt, last.pt and results.json; readers refuse any other
RUN_LOCK = ".lock"  # in the run folder while a trainer.py writes it (hold_lock)
TEST_SCORES = "test_scores.npz"  # the best epoch's test scores, beside results.json
METRICS_COLUMNS = ("val_roc_auc", "test_roc_auc", "val_pr_auc", "test_pr_auc")  # metrics.csv's scores
CHECKPOINT_KEYS = ("state_dict", "tag_names", "norm_mean", "norm_std", "feature_params", "args", "epoch",
                   "metrics", "provenance")
LAST_KEYS = ("model", "optimizer", "scheduler", "torch_rng", "cuda_rng", "history", "best", "epoch", "args",
             "provenance")


def json_args(args):  # the arguments as plain types: a checkpoint loads with weights_only=True
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def claim_run(args):
    """OUT/RUN, claimed and locked by the main process before any work (the others get its path)."""
    run_dir = args.out / (args.run or time.strftime("%Y%m%d-%H%M%S"))
    if not is_main():
        return run_dir
    last = run_dir / "last.pt"
    if args.resume and (args.run is None or not last.is_file()):
        raise SystemExit(f"error: --resume needs --run NAME of a run with a last.pt ({last} not found)")
    check_folder(args.out, "--out")
    made = not run_dir.exists()
    check_folder(run_dir, "--out")
    hold_lock(run_dir / RUN_LOCK, f"the run folder {run_dir}", "choose another --run",
              remove_empty_folder=made)  # an error before the first epoch removes the folder made here
    if not args.resume and last.exists():
        raise SystemExit(f"error: {run_dir} already holds a run; pass --resume to continue it or another "
                         "--run")
    return run_dir


def read_checkpoint(path, keys, what):
    """A .pt file read once (weights_only) -> its dict + `sha256`; ValueError unless `what` of `keys`."""
    data = Path(path).read_bytes()
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and unsafe-global errors alike
        raise ValueError(f"{path}: not {what} ({load_error_reason(error)})") from None
    if missing := [k for k in keys if not isinstance(checkpoint, dict) or k not in checkpoint]:
        best = "model" in missing and isinstance(checkpoint, dict) and "state_dict" in checkpoint
        raise ValueError(f"{path}: not {what}{' but a best_model.pt' * best} (missing {', '.join(missing)})")
    if (version := checkpoint.get("format_version")) != RUN_FORMAT:
        raise ValueError(f"{path}: of format {version}, this code reads {RUN_FORMAT}")
    return dict(checkpoint, sha256=hashlib.sha256(data).hexdigest())


def start_run(args, run_dir, prov, resume_keys, model, optimizer, scheduler, device):
    """-> (history, best, start_epoch); --resume: last.pt's, its state restored; refused if it does not fit"""
    if not args.resume:
        return [], None, 1
    path = run_dir / "last.pt"
    fix = "it cannot be resumed: restore it from a copy, or start a new --run"
    try:
        state = read_checkpoint(path, LAST_KEYS, "a last.pt of trainer.py")
    except ValueError as error:
        raise SystemExit(f"error: {error}; {fix}") from None
    if changed := [k for k in resume_keys if state["args"].get(k) != json_args(args)[k]]:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise SystemExit(f"error: cannot resume {run_dir} with different {flags}")
    check_same_provenance(state["provenance"], prov, run_dir)
    try:
        model.load_state_dict(state["model"])
        load_optimizer_state(optimizer, state["optimizer"], args.fused_adam)
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state["cuda_rng"] is not None:  # dropout masks on CUDA
            torch.cuda.set_rng_state(state["cuda_rng"], device)
    except (RuntimeError, ValueError, KeyError, TypeError) as error:  # another network's, or damaged
        reason = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
        raise SystemExit(f"error: {path}: its state does not fit this run ({reason}); {fix}") from None
    log(f"resuming {run_dir} after epoch {state['epoch']}")
    return state["history"], state["best"], state["epoch"] + 1


def load_optimizer_state(optimizer, saved, fused):
    """optimizer.load_state_dict(saved) with this run's --fused-adam, not the one saved in its groups."""
    for group in saved["param_groups"]:
        group["fused"] = fused
    optimizer.load_state_dict(saved)


def save_epoch(run_dir, model, optimizer, scheduler, history, best, improved, tag_names, norm, args, device,
               prov):
    """Save a finished epoch (main process only), each file atomically: a kill leaves the last one's whole."""
    if not is_main():
        return
    state_dict = {k: v.cpu() for k, v in model.state_dict().items()}
    if improved:
        save_best_model(run_dir / "best_model.pt", state_dict, tag_names, norm, json_args(args),
                        best["epoch"], best, prov)
    with atomic_write(run_dir / "last.pt", "wb") as f:
        torch.save(dict(model=state_dict, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                        torch_rng=torch.get_rng_state(),
                        cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                        history=history, best=best, epoch=history[-1]["epoch"], args=json_args(args),
                        provenance=prov, format_version=RUN_FORMAT), f)
    with atomic_write(run_dir / "metrics.csv", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def save_best_model(path, state_dict, tag_names, norm, args, epoch, metrics, prov):
    """best_model.pt: state_dict (its keys say the MSCNN's scales), tag_names, norm, the run's facts."""
    with atomic_write(path, "wb") as f:
        torch.save(dict(state_dict=state_dict, tag_names=list(tag_names), norm_mean=norm[0].cpu(),
                        norm_std=norm[1].cpu(), feature_params=common.feature_params(), args=args,
                        epoch=epoch, metrics=metrics, provenance=prov, format_version=RUN_FORMAT), f)


def load_model(checkpoint_path, device="cpu"):
    """A best_model.pt or model folder read once -> (its MSCNN on `device`, eval mode; its dict + sha256)"""
    checkpoint = (read_model_folder(checkpoint_path) if is_model_folder(checkpoint_path) else
                  read_checkpoint(checkpoint_path, CHECKPOINT_KEYS, "a PyTorch checkpoint of this project"))
    wanted = common.feature_params(checkpoint["feature_params"].get("resampler"))  # the caller uses it
    if checkpoint["feature_params"] != wanted:
        raise ValueError(f"{checkpoint_path}: trained on features {checkpoint['feature_params']}, "
                         f"but this code computes {wanted}")
    tensors = dict(checkpoint["state_dict"], **{key: checkpoint[key] for key in ("norm_mean", "norm_std")})
    if bad := non_finite(tensors):  # a diverged run's weights: they would tag every clip with garbage
        raise ValueError(f"{checkpoint_path}: holds non-finite values (NaN or inf) in {bad}; the run that "
                         "wrote it diverged: use a checkpoint of an earlier epoch, or train again with a "
                         "lower --lr")
    scales = sorted({int(key[len("branch")]) for key in checkpoint["state_dict"] if key.startswith("branch")})
    n_tags = len(checkpoint["tag_names"])
    model = common.MSCNN(n_tags=n_tags, scales=scales or common.SCALES)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:  # keys or shapes of another network, listed on several lines
        raise ValueError(f"{checkpoint_path}: its weights do not fit the MSCNN of {n_tags} tags and scales "
                         f"{' '.join(map(str, model.scales))} ({' '.join(str(error).split())})") from None
    return on_device(model, device).eval(), checkpoint


# --- A model folder (export.py): model.safetensors (the weights, norm_mean, norm_std) + model.json (its card)
MODEL_FORMAT, MODEL_WEIGHTS, MODEL_CARD = 1, "model.safetensors", "model.json"  # MODEL_FORMAT: only one read


def is_model_folder(path):  # either file: read_model_folder names the other if missing
    return Path(path).is_dir() and any((Path(path) / name).exists() for name in (MODEL_WEIGHTS, MODEL_CARD))


def save_model_folder(folder, checkpoint, card):
    """Write a best_model.pt's tensors and `card`, with their SHA-256, into `folder`; -> that card."""
    tensors = dict(checkpoint["state_dict"], **{key: checkpoint[key] for key in ("norm_mean", "norm_std")})
    with atomic_write(Path(folder) / MODEL_WEIGHTS, "wb") as f:
        f.write(data := safetensors.torch.save({name: t.contiguous() for name, t in tensors.items()}))
    card = dict(card, format_version=MODEL_FORMAT, weights_sha256=hashlib.sha256(data).hexdigest())
    write_json(Path(folder) / MODEL_CARD, card, indent=2)
    return card


def read_model_folder(folder):
    """A model folder -> a dict as read_checkpoint's (sha256: model.safetensors'), read with no pickle."""
    weights, card_path = Path(folder) / MODEL_WEIGHTS, Path(folder) / MODEL_CARD
    if missing := [path.name for path in (card_path, weights) if not path.is_file()]:
        raise ValueError(f"{folder}: no {' or '.join(missing)} in it: not a whole model folder of export.py")
    card = read_json(card_path)
    if (version := card.get("format_version")) != MODEL_FORMAT:
        raise ValueError(f"{card_path}: of format {version}, this code reads {MODEL_FORMAT}")
    if (sha256 := file_digest(weights, "sha256")) != card.get("weights_sha256"):
        raise ValueError(f"{weights}: damaged or replaced (its SHA-256 is not the one {MODEL_CARD} records)")
    try:
        tensors = safetensors.torch.load_file(weights)
        return dict(norm_mean=tensors.pop("norm_mean"), norm_std=tensors.pop("norm_std"), state_dict=tensors,
                    tag_names=card["tags"], feature_params=card["feature_params"],
                    epoch=card["metrics"]["epoch"], metrics=card["metrics"], sha256=sha256,
                    provenance=dict(data=card["training_data"], split=card["split"]))
    except Exception as error:  # SafetensorError, or a KeyError: a tensor or a key of the card missing
        raise ValueError(f"{folder}: not export.py's ({type(error).__name__}: {error})") from None


def load_error_reason(error):
    """Why torch.load failed, in a few words: its messages bury it in lines of advice about weights_only."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # no terminal colour codes
    if "WeightsUnpickler error:" in text:
        reason = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0]
        return "weights-only loading refused it: " + re.split(r"(?<=\.)\s", reason)[0].rstrip(".")
    if isinstance(error, EOFError) or not text.strip():
        return "the file ends early: truncated?"
    return f"{type(error).__name__}: " + re.split(r"(?<=\.)\s", text.strip().splitlines()[0])[0].rstrip(".")


def write_results(run_dir, best, tag_names, args, split, overlap, prov):
    """results.json (returned): the best epoch's scores (NaN as null), the run's settings, provenance."""
    results = {k: best[k] for k in ("epoch", "val_roc_auc", "val_pr_auc", "test_roc_auc", "test_pr_auc")}
    results["test_roc_auc_per_tag"] = {name: None if math.isnan(auc) else auc
                                       for name, auc in zip(tag_names, best["test_roc_auc_per_tag"])}
    results.update(best_model=str(run_dir / "best_model.pt"), format_version=RUN_FORMAT, split=args.split,
                   split_seed=args.split_seed if args.split == "random" else None, scales=list(args.scales),
                   seed=args.seed, epochs=args.epochs, n_tags=len(tag_names), merge=not args.no_merge,
                   **{f"n_{part}": len(rows) for part, rows in zip(("train", "val", "test"), split)},
                   split_overlap=overlap, provenance=prov)
    write_json(run_dir / "results.json", results, indent=2)
    return results


def save_test_scores(run_dir, scores, labels, rows, tag_names, epoch):
    """RUN/test_scores.npz, for report.py, written before the checkpoints: --resume redoes a cut epoch."""
    if not is_main():
        return
    with atomic_write(run_dir / TEST_SCORES, "wb") as f:
        np.savez(f, scores=np.asarray(scores, np.float32), labels=np.asarray(labels, np.uint8),
                 rows=np.asarray(rows, np.int64), tag_names=np.array(tag_names, str), epoch=np.int64(epoch))


def read_test_scores(run_dir, epoch=None):
    """save_test_scores' arrays, or None; ValueError naming the file if damaged or not of the best `epoch`."""
    path = Path(run_dir) / TEST_SCORES
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            saved = {key: f[key] for key in ("scores", "labels", "rows", "tag_names", "epoch")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:  # cut short, or not ours
        raise ValueError(f"{path} is damaged or not trainer.py's ({type(error).__name__}: {error})") from None
    n_clips, n_tags = saved["scores"].shape if saved["scores"].ndim == 2 else (-1, -1)
    if (saved["labels"].shape != (n_clips, n_tags) or saved["rows"].shape != (n_clips,)
            or saved["tag_names"].shape != (n_tags,) or not np.isfinite(saved["scores"]).all()):
        shapes = ", ".join(f"{key} {saved[key].shape}" for key in ("scores", "labels", "rows"))
        raise ValueError(f"{path}: {shapes} and tag_names {saved['tag_names'].shape} do not fit together")
    if epoch is not None and int(saved["epoch"]) != epoch:
        raise ValueError(f"{path} holds the test scores of epoch {saved['epoch']}, not of the best epoch "
                         f"{epoch} (a run stopped between the two files whose resumed epoch scored "
                         "otherwise)")
    return dict(saved, epoch=int(saved["epoch"]), tag_names=[str(name) for name in saved["tag_names"]])
