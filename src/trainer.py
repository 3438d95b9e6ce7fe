"""Stage 3: train the multi-scale CNN on log-mel spectrograms and keep the best model.

    python src/trainer.py                          # the paper's recipe on data/
    python src/trainer.py --split random --train-size 300 --val-size 50 --epochs 5
    torchrun --nproc_per_node=4 src/trainer.py --run-name four_gpus   # global batch 4 x 32

Reads DATA/annotations_final.csv (or .csv.gz) and DATA/spectrograms.npy (+ .json); writes
OUT/RUN/best_model.pt, last.pt, metrics.csv, results.json and test_scores.npz (see experiments/README.md).
"""
import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import common
import devices
import formats
import plumbing
from devices import is_main, log, world_size

# -----------------------------------------------------------------------------
# The paper's recipe (docs/original.md): the defaults of the flags below
EPOCHS = 40
BATCH_SIZE = 32            # clips per step, reshuffled every epoch (epoch_batches)
SUPER_BATCH = 3000         # the original cut each epoch into runs of this many clips, then into batches
LR = 1e-3                  # Adam (betas 0.9, 0.999, eps 1e-8), no weight decay
MILESTONES = [20, 30, 35]  # the learning rate is divided by 10 after these epochs
DROPOUT = 0.4              # drop probability before the 500-unit dense layer
BN_MOMENTUM = 0.01         # batch norm: running = 0.99 running + 0.01 batch
N_TAGS = 50                # the most frequent tags, after merging synonyms
SPLIT = "paper"            # the original's 18,000 / 2,000 / 5,863 draw (common.paper_split)
SCALES = common.SCALES     # the three branches: the paper's claim is that they beat one
SEED = 1337
# what must not change between an interrupted run and its --resume
RESUME_KEYS = ("split", "train_size", "val_size", "split_seed", "seed", "n_tags", "no_merge", "batch_size",
               "lr", "milestones", "dropout", "bn_momentum", "scales")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    recipe = p.add_argument_group("the recipe (defaults: the paper's)")
    recipe.add_argument("--epochs", type=plumbing.at_least(1), default=EPOCHS,
                        help=f"training epochs (default: {EPOCHS})")
    recipe.add_argument("--batch-size", type=plumbing.at_least(1), default=BATCH_SIZE,
                        help=f"clips per step per process; global batch: x processes (default: {BATCH_SIZE})")
    recipe.add_argument("--lr", type=plumbing.float_in(0, math.inf), default=LR,
                        help=f"Adam learning rate (default: {LR})")
    recipe.add_argument("--milestones", type=int, nargs="*", default=MILESTONES,
                        help="epochs after which the learning rate is divided by 10 (default: "
                             f"{' '.join(map(str, MILESTONES))})")
    recipe.add_argument("--dropout", type=plumbing.float_in(0, 1, low_closed=True), default=DROPOUT,
                        help=f"dropout probability before the dense layer (default: {DROPOUT})")
    recipe.add_argument("--bn-momentum", type=plumbing.float_in(0, 1, high_closed=True), default=BN_MOMENTUM,
                        help=f"batch norm: running = (1 - m) running + m batch (default: {BN_MOMENTUM}, "
                             "the paper's; a run of a few hundred steps wants ~0.1 to catch up)")
    recipe.add_argument("--scales", type=int, nargs="+", choices=SCALES, default=list(SCALES), metavar="S",
                        help="branches 1 (full resolution), 2 (average-pooled 2x4), 3 (4x16); '--scales 1' "
                             "is the single-scale baseline testing the paper's claim (default: all three)")
    recipe.add_argument("--n-tags", type=plumbing.at_least(1), default=N_TAGS,
                        help=f"keep the N most frequent tags (default: {N_TAGS}; clean/folder splits: 50)")
    recipe.add_argument("--no-merge", action="store_true",
                        help="do not merge synonym tags before the top N (implied by --split clean/folder)")
    recipe.add_argument("--seed", type=int, default=SEED,
                        help=f"seed of weights, dropout and batch order, not of the split (default: {SEED})")
    data = p.add_argument_group("data and split")
    data.add_argument("--data-dir", type=Path, default=Path("data"),
                      help="folder of annotations_final.csv(.gz) and spectrograms.npy/.json (default: data)")
    data.add_argument("--split", choices=["paper", "clean", "folder", "random"], default=SPLIT,
                      help="'paper': the original's split of the 25,863 MTAT clips (18,000 / 2,000 / 5,863, "
                           "its RandomState(1337) draw; a song's clips fall on both sides); 'clean': the "
                           "field's song-disjoint split (15,244 / 1,529 / 4,332 clips listed in src/splits/, "
                           "as Lee et al. 2017 and Won et al. 2020; needs all 25,863 rows); 'folder': MTAT's "
                           "folders 0-b / c / d-f, every usable clip (18,706 / 1,825 / 5,329), as in MARBLE; "
                           "clean and folder: the 50 most frequent tags, unmerged; 'random': any data set by "
                           "--train-size/--val-size/--split-seed (default: paper)")
    data.add_argument("--train-size", type=int, default=18000,
                      help="training clips of --split random (default: 18000)")
    data.add_argument("--val-size", type=int, default=2000,
                      help="validation clips of --split random; the rest is the test set (default: 2000)")
    data.add_argument("--split-seed", type=int, default=1337,
                      help="seed of --split random's draw, independent of --seed (default: 1337)")
    run = p.add_argument_group("the run")
    run.add_argument("--out", type=Path, default=Path("experiments"),
                     help="where run folders go (default: experiments)")
    run.add_argument("--run", "--run-name", help="a folder under --out (default: the date and time); under "
                     "torchrun spell it --run-name, as torchrun takes --run for its own --run-path")
    run.add_argument("--resume", action="store_true", help="continue the run --run from its last.pt")
    devices.add_speed_flags(p.add_argument_group("device and speed (the numbers stay the paper's)"))
    args = p.parse_args(argv)
    if len(set(args.scales)) != len(args.scales):
        p.error(f"--scales {' '.join(map(str, args.scales))} repeats a branch; give each at most once")
    args.scales = sorted(args.scales)
    if args.split in ("clean", "folder"):  # the benchmarks' tags: the 50 most frequent, not merged
        if args.n_tags != 50:
            p.error(f"--split {args.split} is scored on the 50 most frequent tags; leave --n-tags at 50")
        args.no_merge = True
    return args


# -----------------------------------------------------------------------------
# Data: the labels, the split and its leakage audit
def load_data(args):
    """-> labels uint8 (N, T) of the --n-tags most frequent tags (merged unless --no-merge), tag_names,
    clip_ids (N,), mp3_paths, spectrograms memmap (N, N_MELS, N_FRAMES): N, the .npy's rows (of --limit)."""
    path = formats.annotations_path(args.data_dir)
    if not path.is_file():
        raise SystemExit(f"error: {path} not found; run: python src/get_data.py --data-dir {args.data_dir}")
    try:
        clip_ids, labels, tag_names, mp3_paths = common.load_tags(path, args.n_tags, merge=not args.no_merge)
    except ValueError as error:  # it names the file and what is wrong in it
        raise SystemExit(f"error: {error}; restore the file (python src/get_data.py --data-dir "
                         f"{args.data_dir} for MTAT) or correct it") from None
    spectrograms, meta = formats.open_spectrograms(args.data_dir, mp3_paths)  # these rows, finite
    common.RESAMPLER = meta["resampler"]  # checkpoints record it, predict.py computes the same
    n = len(spectrograms)
    return labels[:n], tag_names, clip_ids[:n], mp3_paths[:n], spectrograms, meta


def make_split(args, n_clips, clip_ids=None, mp3_paths=None):
    """-> train_idx, val_idx, test_idx (sorted rows) by --split; 'clean' needs clip_ids, 'folder' mp3_paths"""
    if args.split == "random":
        try:
            return common.random_split(n_clips, args.train_size, args.val_size, args.split_seed)
        except ValueError as error:
            raise SystemExit(f"error: {error}; choose smaller --train-size/--val-size") from None
    if n_clips != common.N_CLIPS and args.split == "folder":
        log(f"note: --split folder of {n_clips:,} clips, not of all {common.N_CLIPS:,} MTAT clips: "
            "not the benchmarks' split")
    elif n_clips != common.N_CLIPS:
        raise SystemExit(f"error: --split {args.split} needs all {common.N_CLIPS} MTAT clips, the data "
                         f"has {n_clips}; use --split random --train-size N --val-size M")
    if args.split == "paper":
        return common.paper_split(n_clips)  # always the original's RandomState(1337) draw
    try:
        return common.folder_split(mp3_paths) if args.split == "folder" else common.clean_split(clip_ids)
    except ValueError as error:
        fix = "; use --split random" if args.split == "folder" else ""
        raise SystemExit(f"error: {args.data_dir / 'annotations_final.csv'}: {error}{fix}") from None


def audit_split(args, mp3_paths, train_idx, val_idx, test_idx):
    """Print the split's sizes and its leakage audit; -> {'val': split_overlap, 'test': split_overlap}."""
    log(f"split {args.split}: {len(train_idx):,} train / {len(val_idx):,} val / {len(test_idx):,} test clips"
        + (f" (--split-seed {args.split_seed})" if args.split == "random" else ""))
    overlap = {name: common.split_overlap(mp3_paths, train_idx, rows)
               for name, rows in (("val", val_idx), ("test", test_idx))}
    for name, counts in overlap.items():
        if counts["unparsed"] == counts["n_clips"]:
            log(f"leakage audit, {name}: no clip name is in MTAT's form "
                "(artist-album-track-title-start-end); nothing to audit")
            continue
        def share(what):  # two decimals: 5,862 of 5,863 must not read 100%
            return f"{counts[what]:,} ({100 * counts[what] / max(counts['n_clips'], 1):.2f}%)"
        log(f"leakage audit, {name}: of {counts['n_clips']:,} clips, {share('song')} share a song with a "
            f"training clip, {share('album')} an album, {share('artist')} an artist"
            + (f"; {counts['unparsed']:,} names not in MTAT's form, not audited"
               if counts["unparsed"] else ""))
    return overlap


def check_split(args, labels, tag_names, train_idx, val_idx, test_idx):
    """Refuse fewer training clips than a global batch, a val/test set no tag can score; note unused tags."""
    if len(train_idx) < args.batch_size * world_size():
        raise SystemExit(f"error: {len(train_idx)} training clips are fewer than one global batch "
                         f"({args.batch_size} x {world_size()}); lower --batch-size")
    for name, rows, fix in (("validation", val_idx, "a larger --val-size"),
                            ("test", test_idx, "a smaller --train-size or --val-size")):
        positives = labels[rows].sum(axis=0)
        if not ((positives > 0) & (positives < len(rows))).any():
            raise SystemExit(f"error: the {name} set ({len(rows)} clip{'s' * (len(rows) != 1)}) has no tag "
                             "with both positive and negative clips, so it cannot be scored (ROC-AUC); "
                             f"choose {fix}")
    if untagged := [name for name, count in zip(tag_names, labels.sum(axis=0)) if count == 0]:
        log(f"{len(untagged)} of the {len(tag_names)} tags have no clip in this data set; "
            "they are kept as outputs but cannot be scored")


# -----------------------------------------------------------------------------
# Normalisation: per mel band, over the training clips only (the original used all clips)
def band_stats(source, rows, device, chunk_rows=256):
    """-> mean, std per mel band over the rows' frames: float32 (N_MELS,), summed on `device` in float64."""
    total, total_sq = torch.zeros(2, common.N_MELS, dtype=torch.float64, device=device)
    rows_on_device = torch.from_numpy(rows).to(device)
    for start in tqdm(range(0, len(rows), chunk_rows), desc="band statistics", unit="chunk",
                      leave=False, disable=not is_main()):
        chunk = slice(start, start + chunk_rows)
        x = devices.get_batch(source, rows[chunk], rows_on_device[chunk]).double()
        total += x.sum(dim=(0, 2))
        total_sq += x.square().sum(dim=(0, 2))
    n = len(rows) * common.N_FRAMES
    mean = total / n
    std = (total_sq / n - mean ** 2).clamp(min=0).sqrt()
    return mean.float(), std.clamp(min=1e-6).float()


# -----------------------------------------------------------------------------
# Training: binary cross-entropy, Adam, one epoch of shuffled batches
def epoch_order(train_idx, n_clips, seed, epoch):
    """The training rows in epoch `epoch`'s (1-based) order, int64 (n_train,), as the original: their order
    in common.original_order(n_clips, seed)'s shuffle, then its RandomState's in-place shuffle per epoch."""
    rng, shuffled = common.original_order(n_clips, seed)
    order = shuffled[np.isin(shuffled, train_idx)]
    for _ in range(epoch - 1):
        rng.shuffle(order)
    return order


def epoch_batches(order, batch_size):
    """This process's batches (sorted rows), as the original: runs of SUPER_BATCH rows cut into global batches
    of batch_size x processes; a run's last joins the one before if it gives a process < 2 clips."""
    global_batch, batches = batch_size * world_size(), []
    for start in range(0, len(order), SUPER_BATCH):
        run = order[start:start + SUPER_BATCH]
        batches += [run[i:i + global_batch] for i in range(0, len(run), global_batch)]
        if len(batches) > 1 and len(batches[-1]) < 2 * world_size():  # batch norm cannot train on 1 clip
            batches[-2:] = [np.concatenate(batches[-2:])]
    return [np.sort(batch[devices.rank()::world_size()]) for batch in batches]


def train_step(model, optimizer, x, y, use_bf16):
    """One Adam step on a normalised x (B, 1, 128, 628), y (B, T) float; -> mean BCE (0-dim, not synced)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        logits = model(x)
    loss = F.binary_cross_entropy_with_logits(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_epoch(model, optimizer, source, labels, batches, norm, use_bf16, desc=None, check_every=50):
    """One epoch; -> its mean training loss (all processes). labels: float (N, T) on the device; desc: the
    bar's title (None: no bar); FloatingPointError if the loss (read every check_every steps) is not finite"""
    model.train()
    all_rows_on_device = torch.from_numpy(np.concatenate(batches)).to(labels.device)  # once: no step waits
    loss_sum = torch.zeros((), device=labels.device)
    with tqdm(total=len(all_rows_on_device) * world_size(), desc=desc, unit="clip", unit_scale=True,
              leave=False, disable=desc is None or not is_main()) as bar:
        for step, rows_on_device in enumerate(all_rows_on_device.split([len(batch) for batch in batches])):
            x = common.normalise(devices.get_batch(source, batches[step], rows_on_device), *norm)
            loss_sum += train_step(model, optimizer, x, labels[rows_on_device], use_bf16)
            bar.update(len(batches[step]) * world_size())
            if (step + 1) % check_every == 0 or step + 1 == len(batches):
                mean_loss = loss_sum.clone()
                if world_size() > 1:
                    dist.all_reduce(mean_loss)
                mean_loss = mean_loss.item() / (step + 1) / world_size()
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"training loss became {mean_loss}")
                bar.set_postfix(loss=f"{mean_loss:.4f}")
    return mean_loss


# -----------------------------------------------------------------------------
# Evaluation: macro ROC-AUC and PR-AUC of validation and test after every epoch
def predict_rows(model, source, rows, norm, batch_size, device, use_bf16):
    """Sigmoid scores float32 (len(rows), T) by common.score, as predict.py; torchrun: shares gathered."""
    model.eval()
    my_rows = np.array_split(rows, world_size())[devices.rank()]
    rows_on_device = torch.from_numpy(my_rows).to(device)
    scores = []
    for start in range(0, len(my_rows), batch_size):
        batch = slice(start, start + batch_size)
        x = devices.get_batch(source, my_rows[batch], rows_on_device[batch])
        scores.append(common.score(model, x, *norm, bf16=use_bf16))  # kept on the device: no wait per batch
    scores = torch.cat(scores).cpu().numpy() if scores else None
    if world_size() > 1:
        gathered = [None] * world_size()
        dist.all_gather_object(gathered, scores)
        scores = np.concatenate([share for share in gathered if share is not None])
    return scores


def evaluate(model, source, labels, val_idx, test_idx, norm, args, device):
    """-> ({val,test}_{roc,pr}_auc: macro, test_roc_auc_per_tag: list}, test scores (len(test_idx), T))."""
    metrics = {}
    for name, rows in (("val", val_idx), ("test", test_idx)):
        scores = predict_rows(model, source, rows, norm, args.eval_batch_size, device,
                              args.precision == "bf16")
        if not np.isfinite(scores).all():
            raise FloatingPointError(f"the {name} scores became non-finite")
        for metric in ("roc_auc", "pr_auc"):
            per_tag = getattr(common, metric)(labels[rows], scores, per_tag=True)  # NaN: unscorable tag
            metrics[f"{name}_{metric}"] = common.macro_mean(per_tag)
            if name == "test" and metric == "roc_auc":
                metrics["test_roc_auc_per_tag"] = per_tag.tolist()
    return metrics, scores


# -----------------------------------------------------------------------------
@plumbing.releasing_locks
def main(argv=None):
    args = parse_args(argv)
    device = devices.setup_distributed(args.device)
    run_dir = formats.claim_run(args)  # checked, made and locked before any work
    torch.manual_seed(args.seed)

    # data: labels, spectrograms, the split and its audit, per-band statistics of training
    labels, tag_names, clip_ids, mp3_paths, spectrograms, meta = load_data(args)
    log(devices.resolve_speed_choices(args, device, spectrograms.nbytes))  # --precision, --resident, ...
    train_idx, val_idx, test_idx = make_split(args, len(spectrograms), clip_ids, mp3_paths)
    overlap = audit_split(args, mp3_paths, train_idx, val_idx, test_idx)
    check_split(args, labels, tag_names, train_idx, val_idx, test_idx)
    provenance = formats.provenance(args, (train_idx, val_idx, test_idx), meta)  # in every checkpoint
    source = devices.to_device_source(spectrograms, device, args.resident)
    norm = band_stats(source, train_idx, device)
    labels_on_device = torch.from_numpy(labels).float().to(device)

    # the model, Adam and its step schedule (the loss is train_step's)
    model = common.MSCNN(len(tag_names), args.dropout, args.bn_momentum, args.scales, args.seed)
    model = devices.on_device(model, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=args.fused_adam)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.milestones, gamma=0.1)
    history, best, start_epoch = formats.start_run(args, run_dir, provenance, RESUME_KEYS, model, optimizer,
                                                    scheduler, device)
    model, plain_model = devices.parallel(model, device, args, start_epoch)  # torchrun, --compile
    log(f"{len(tag_names)} tags, scales {' '.join(map(str, args.scales))}, "
        f"{sum(p.numel() for p in plain_model.parameters()):,} parameters, "
        f"device {device}" + (f" x {world_size()} processes" if world_size() > 1 else ""))

    for epoch in range(start_epoch, args.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        batches = epoch_batches(epoch_order(train_idx, len(spectrograms), args.seed, epoch), args.batch_size)
        started = time.time()
        try:  # a diverged epoch stops the run before anything of it is saved
            mean_loss = train_epoch(model, optimizer, source, labels_on_device, batches, norm,
                                    args.precision == "bf16", desc=f"epoch {epoch}/{args.epochs}")
            train_seconds = time.time() - started
            if bad := formats.non_finite(plain_model.state_dict()):  # a finite loss can hide it
                raise FloatingPointError(f"the weights became non-finite ({bad})")
            metrics, test_scores = evaluate(model, source, labels, val_idx, test_idx, norm, args, device)
        except FloatingPointError as error:
            raise SystemExit(formats.divergence_message(error, epoch, run_dir, history, best)) from None
        scheduler.step()
        history.append(dict(epoch=epoch, lr=lr, train_loss=round(mean_loss, 6), **{k: round(metrics[k], 6)
                            for k in formats.METRICS_COLUMNS}, seconds=round(time.time() - started, 2)))
        improved = best is None or metrics["val_roc_auc"] > best["val_roc_auc"]  # the best validation epoch
        if improved:
            best = dict(metrics, epoch=epoch)
            formats.save_test_scores(run_dir, test_scores, labels[test_idx], test_idx, tag_names, epoch)
        log(f"epoch {epoch:3d}  lr {lr:.0e}  loss {mean_loss:.4f}  val ROC-AUC {metrics['val_roc_auc']:.4f}  "
            f"test ROC-AUC {metrics['test_roc_auc']:.4f}  {len(train_idx) / train_seconds:.0f} clips/s"
            + ("  *" if improved else ""))
        formats.save_epoch(run_dir, plain_model, optimizer, scheduler, history, best, improved, tag_names,
                            norm, args, device, provenance)

    results = None
    if is_main():
        results = formats.write_results(run_dir, best, tag_names, args, (train_idx, val_idx, test_idx),
                                         overlap, provenance)
        print(f"best model: {run_dir / 'best_model.pt'}\nbest validation ROC-AUC {best['val_roc_auc']:.4f} "
              f"at epoch {best['epoch']}; test ROC-AUC {best['test_roc_auc']:.4f}, "
              f"PR-AUC {best['test_pr_auc']:.4f}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return results  # None in the processes other than rank 0


if __name__ == "__main__":  # every file is written atomically: the last finished epoch's are whole
    plumbing.run_script(main, "interrupted: the checkpoints of the last finished epoch are kept in the run "
                              "folder; continue with the same command plus --resume --run NAME")
