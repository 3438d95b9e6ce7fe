"""Stage 3: train the multi-scale CNN on log-mel spectrograms and keep the best model.

    python src/trainer.py                          # the paper's recipe on data/
    python src/trainer.py --split random --train-size 300 --val-size 50 --epochs 5
    torchrun --nproc_per_node=4 src/trainer.py --run-name four_gpus   # global batch 4 x 32

Reads DATA/annotations_final.csv and DATA/spectrograms.npy (+ .json); writes
OUT/RUN/best_model.pt, last.pt, metrics.csv and results.json (see experiments/README.md).
"""
import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import common

# what must not change between an interrupted run and its --resume
RESUME_KEYS = ("split", "train_size", "val_size", "split_seed", "seed", "n_tags", "no_merge", "batch_size",
               "lr", "milestones", "dropout", "bn_momentum")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=Path("data"),
                   help="folder with annotations_final.csv and spectrograms.npy/.json (default: data)")
    p.add_argument("--out", type=Path, default=Path("experiments"), help="where run folders go (default: experiments)")
    p.add_argument("--run", "--run-name", dest="run", default=None,
                   help="run name, a folder under --out (default: the date and time); under torchrun "
                        "spell it --run-name, as torchrun takes --run for its own --run-path")
    p.add_argument("--epochs", type=int, default=40, help="training epochs (default: 40)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="clips per step and per process; under torchrun the global batch is this x processes (default: 32)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 0.001)")
    p.add_argument("--milestones", type=int, nargs="*", default=[20, 30, 35],
                   help="epochs after which the learning rate is divided by 10 (default: 20 30 35)")
    p.add_argument("--dropout", type=float, default=0.4, help="dropout probability before the dense layer (default: 0.4)")
    p.add_argument("--bn-momentum", type=float, default=0.01,
                   help="batch norm's running-statistics update, PyTorch's convention: running = "
                        "(1 - m) running + m batch (default: 0.01, the paper's; a run of only a few "
                        "hundred steps wants ~0.1 so that the statistics used for scoring catch up)")
    p.add_argument("--n-tags", type=int, default=50,
                   help="keep the N most frequent tags (default: 50; --split clean needs 50)")
    p.add_argument("--no-merge", action="store_true",
                   help="do not merge synonym tags before choosing the top N (implied by --split clean)")
    p.add_argument("--split", choices=["paper", "clean", "random"], default="paper",
                   help="'paper': the original's exact split of the 25,863 MTAT clips (18,000 / 2,000 / "
                        "5,863, always its RandomState(1337) draw; clips of one song fall on both sides); "
                        "'clean': the field's song-disjoint benchmark split (15,244 / 1,529 / 4,332 listed "
                        "clips, src/splits/; the 50 most frequent tags without synonym merging, as Lee et al. "
                        "2017 and Won et al. 2020; needs all 25,863 spectrogram rows); 'random': a split of "
                        "any data set by --train-size/--val-size/--split-seed (default: paper)")
    p.add_argument("--train-size", type=int, default=18000, help="training clips for --split random (default: 18000)")
    p.add_argument("--val-size", type=int, default=2000,
                   help="validation clips for --split random; the rest is the test set (default: 2000)")
    p.add_argument("--split-seed", type=int, default=1337,
                   help="seed of --split random's draw, independent of --seed (default: 1337)")
    p.add_argument("--seed", type=int, default=1337,
                   help="seed of the weights, dropout and batch order; never of the split, so runs with "
                        "different seeds are scored on the same clips (default: 1337)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto = cuda when available)")
    p.add_argument("--eval-batch-size", type=int, default=256, help="clips per step when scoring (default: 256)")
    p.add_argument("--resume", action="store_true", help="continue the run --run from its last.pt")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network (with CUDA graphs on CUDA); off by default: 1.9x slower "
                        "on a CPU and not yet measured on a GPU (python src/benchmark.py --compile)")
    # speed choices: 'auto' (None) is decided per device by resolve_speed_choices; naming one
    # runs a GPU's choice on the CPU too, which is how CI tests the GPU's path
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="bf16: the network under bfloat16 autocast (weights, loss and Adam stay fp32); "
                        "fp32: float32 throughout (on CUDA, PyTorch's default of TF32 convolutions); "
                        "auto: bf16 on CUDA, fp32 on a CPU (default: auto)")
    p.add_argument("--fused-adam", action=argparse.BooleanOptionalAction, default=None,
                   help="Adam's fused kernel, one for all parameters (PyTorch has it for CUDA and CPU) "
                        "(default: on CUDA)")
    p.add_argument("--resident", action=argparse.BooleanOptionalAction, default=None,
                   help="hold all spectrograms as one tensor on the device, so a batch is an index "
                        "(on a CPU: in RAM, the whole array), instead of reading batches from the "
                        "memory map (default: on CUDA when spectrograms.npy fits in free GPU memory "
                        "with 6 GiB to spare)")
    p.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=None,
                   help="let cuDNN time its convolution algorithms for the fixed input shape and keep "
                        "the fastest (no effect on a CPU) (default: on CUDA)")
    args = p.parse_args(argv)
    for flag in ("epochs", "batch_size", "eval_batch_size", "n_tags"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.split == "clean":  # the benchmark's tags: the 50 most frequent, not merged
        if args.n_tags != 50:
            p.error("--split clean is scored on the 50 most frequent tags; leave --n-tags at 50")
        args.no_merge = True
    return args


GPU_RESERVE_BYTES = 6 * 2 ** 30  # GPU memory left free beside resident data: model, activations


def resolve_speed_choices(args, device):
    """Decide each speed choice left at auto for this device, the one place where they
    are decided; the result replaces auto in args (so it is printed, and saved with the
    checkpoints' args). What a CPU run and a GPU run with the same choices differ in is
    then only the device.

    precision: bf16 on CUDA; fp32 on a CPU (exact, and bf16 gives a CPU no speed-up).
    fused_adam, cudnn_benchmark: on CUDA. resident: on CUDA when DATA/spectrograms.npy
    fits in free GPU memory with GPU_RESERVE_BYTES to spare (else pinned host batches);
    never by default on a CPU, where the memory map keeps host memory bounded.
    Raises SystemExit when --resident asks for more than the GPU has free.
    """
    cuda = device.type == "cuda"
    if args.precision == "auto":
        args.precision = "bf16" if cuda else "fp32"
    if args.fused_adam is None:
        args.fused_adam = cuda
    if args.cudnn_benchmark is None:
        args.cudnn_benchmark = cuda
    npy = args.data_dir / "spectrograms.npy"
    if cuda and args.resident is not False and npy.is_file():  # a missing file: load_spectrograms says so
        data_bytes, free_bytes = npy.stat().st_size, torch.cuda.mem_get_info(device)[0]
        fits = data_bytes <= free_bytes - GPU_RESERVE_BYTES
        sizes = (f"{npy} ({data_bytes / 2**30:.1f} GiB) does not fit in the GPU's free "
                 f"{free_bytes / 2**30:.1f} GiB with {GPU_RESERVE_BYTES / 2**30:.0f} GiB to spare")
        if args.resident and not fits:
            raise SystemExit(f"error: --resident: {sizes}; drop --resident to read pinned host batches")
        if not fits:
            log(f"{sizes}: pinned host batches")
        args.resident = fits
    args.resident = bool(args.resident)
    return args


# -----------------------------------------------------------------------------
# data
def load_spectrograms(data_dir):
    """Open DATA/spectrograms.npy memory-mapped after checking its .json parameters.

    Returns ndarray (N, N_MELS, N_FRAMES) (a read-only memmap, float16 or float32).
    """
    npy, meta_path = data_dir / "spectrograms.npy", data_dir / "spectrograms.json"
    if not npy.is_file() or not meta_path.is_file():
        raise SystemExit(f"error: {npy} (+ .json) not found or incomplete; "
                         f"run: python src/gen_spectrograms.py --data-dir {data_dir}")
    try:
        meta = common.read_json(meta_path)
    except ValueError as error:
        raise SystemExit(f"error: {error}; compute the spectrograms again: "
                         f"python src/gen_spectrograms.py --data-dir {data_dir} --overwrite") from None
    wanted = common.feature_params()
    found = {key: meta.get(key) for key in wanted}
    if found != wanted:
        raise SystemExit(f"error: {meta_path} was made with feature parameters {found}, but this code "
                         f"uses {wanted}; rerun: python src/gen_spectrograms.py --data-dir {data_dir} --overwrite")
    if not isinstance(meta.get("n_clips"), int) or meta.get("dtype") not in ("float16", "float32"):
        raise SystemExit(f"error: {meta_path} lacks n_clips or dtype; compute the spectrograms again: "
                         f"python src/gen_spectrograms.py --data-dir {data_dir} --overwrite")
    try:  # its size against its header and its .json: np.load's memory map would not name the file
        common.check_npy(npy, (meta["n_clips"], common.N_MELS, common.N_FRAMES), meta["dtype"])
    except ValueError as error:
        raise SystemExit(f"error: {error} ({meta_path.name} says {meta['n_clips']} clips, {meta['dtype']}); "
                         f"run python src/gen_spectrograms.py --data-dir {data_dir}: it recomputes "
                         "the damaged rows (or says to pass --overwrite)") from None
    return np.load(npy, mmap_mode="r")


def make_split(args, n_clips, clip_ids=None):
    """-> train_idx, val_idx, test_idx (sorted annotation rows), by --split.

    n_clips: spectrogram rows; clip_ids: the annotations' clip ids (needed by 'clean').
    The paper and clean splits are fixed; 'random' is drawn from --split-seed, never --seed.
    """
    if args.split in ("paper", "clean"):
        if n_clips != common.N_CLIPS:
            raise SystemExit(f"error: --split {args.split} needs all {common.N_CLIPS} MTAT clips, the data has "
                             f"{n_clips}; use --split random --train-size N --val-size M")
        if args.split == "paper":
            return common.paper_split(n_clips)  # always the original's RandomState(1337) draw
        try:
            return common.clean_split(clip_ids)
        except ValueError as error:
            raise SystemExit(f"error: {args.data_dir / 'annotations_final.csv'}: {error}") from None
    try:
        return common.random_split(n_clips, args.train_size, args.val_size, args.split_seed)
    except ValueError as error:
        raise SystemExit(f"error: {error}; choose smaller --train-size/--val-size") from None


def audit_split(mp3_paths, train_idx, val_idx, test_idx):
    """Print and return the leakage audit: {'val': split_overlap, 'test': split_overlap}."""
    overlap = {name: common.split_overlap(mp3_paths, train_idx, rows)
               for name, rows in (("val", val_idx), ("test", test_idx))}
    for name, counts in overlap.items():
        if counts["unparsed"] == counts["n_clips"]:
            log(f"leakage audit, {name}: no clip name is in MTAT's form (artist-album-track-title-start-end); "
                "nothing to audit")
            continue
        def share(what):  # two decimals: 5,862 of 5,863 must not read 100%
            return f"{counts[what]:,} ({100 * counts[what] / max(counts['n_clips'], 1):.2f}%)"
        log(f"leakage audit, {name}: of {counts['n_clips']:,} clips, {share('song')} share a song with a "
            f"training clip, {share('album')} an album, {share('artist')} an artist"
            + (f"; {counts['unparsed']:,} names not in MTAT's form, not audited" if counts["unparsed"] else ""))
    return overlap


def check_scorable(labels, val_idx, test_idx):
    """Refuse a split whose validation or test set has no tag with both positive and
    negative clips: its macro ROC-AUC would be NaN every epoch (no best model, and NaN is
    not JSON). labels: 0/1 ndarray (N, T)."""
    for name, rows, fix in (("validation", val_idx, "a larger --val-size"),
                            ("test", test_idx, "a smaller --train-size or --val-size")):
        positives = labels[rows].sum(axis=0)
        if not ((positives > 0) & (positives < len(rows))).any():
            raise SystemExit(f"error: the {name} set ({len(rows)} clip{'s' * (len(rows) != 1)}) has no tag with both positive "
                             f"and negative clips, so it cannot be scored (ROC-AUC); choose {fix}")


def band_stats(source, rows, device, chunk_rows=256):
    """Mean and standard deviation per mel band over all frames of the given clips.

    source: what to_device_source returned; the sums run where the data lives (float64,
    in chunks, so memory stays bounded: seconds on a CPU for MTAT, a blink on a GPU).
    Returns two float32 tensors (N_MELS,) on device.
    """
    total = torch.zeros(common.N_MELS, dtype=torch.float64, device=device)
    total_sq = torch.zeros(common.N_MELS, dtype=torch.float64, device=device)
    rows_on_device = torch.from_numpy(rows).to(device)
    for start in tqdm(range(0, len(rows), chunk_rows), desc="band statistics", unit="chunk",
                      leave=False, disable=not is_main()):
        chunk = slice(start, start + chunk_rows)
        x = get_batch(source, rows[chunk], rows_on_device[chunk]).double()
        total += x.sum(dim=(0, 2))
        total_sq += x.square().sum(dim=(0, 2))
    n = len(rows) * common.N_FRAMES
    mean = total / n
    std = (total_sq / n - mean ** 2).clamp(min=0).sqrt()
    return mean.float(), std.clamp(min=1e-6).float()


def to_device_source(spectrograms, device, resident=None):
    """Where batches are read from: resident=True, the whole array as one tensor on
    device (one upload, then indexing costs nothing); False, the host memmap; None, what
    --resident's default picks (resident on CUDA when it fits in free GPU memory)."""
    if resident is None:
        resident = (device.type == "cuda"
                    and spectrograms.nbytes <= torch.cuda.mem_get_info(device)[0] - GPU_RESERVE_BYTES)
    return upload(spectrograms, device) if resident else spectrograms


def upload(spectrograms, device, chunk_rows=1024):
    """A copy of the array (N, N_MELS, N_FRAMES) as a tensor of its dtype on device,
    made in chunks so host memory stays bounded."""
    resident = torch.empty(spectrograms.shape, dtype=getattr(torch, spectrograms.dtype.name), device=device)
    for start in tqdm(range(0, len(spectrograms), chunk_rows), desc=f"to {device}", unit="chunk",
                      leave=False, disable=not is_main()):
        chunk = np.array(spectrograms[start:start + chunk_rows])  # writable: torch warns on a read-only memmap
        resident[start:start + chunk_rows] = torch.from_numpy(chunk)
    return resident


def get_batch(source, rows, rows_on_device):
    """Spectrogram rows -> tensor (B, N_MELS, N_FRAMES) on rows_on_device's device.

    rows: sorted int ndarray, to read a host memmap; rows_on_device: the same rows as a
    tensor on the device, to index a resident tensor without waiting for the GPU (a
    host-to-device copy of the indices each step would stall the queue of kernels).
    """
    if isinstance(source, torch.Tensor):
        return source[rows_on_device]
    batch = torch.from_numpy(np.asarray(source[rows]))
    if rows_on_device.is_cuda:
        return batch.pin_memory().to(rows_on_device.device, non_blocking=True)
    return batch


# -----------------------------------------------------------------------------
# distributed helpers (one process without torchrun)
def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return rank() == 0


def log(message):
    if is_main():
        tqdm.write(message)


def setup_distributed(device_name):
    """Start the process group under torchrun; -> the device this process uses."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return common.resolve_device(device_name)
    device = common.resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


# -----------------------------------------------------------------------------
# training and evaluation
def epoch_batches(train_idx, seed, epoch, batch_size):
    """This process's batches for one epoch: int ndarray (steps, batch_size), rows sorted.

    A fresh permutation per epoch, derived from (seed, epoch) alone so that a resumed run
    sees the same batches, cut into global batches of batch_size x processes (the last
    partial one dropped); each process takes every world_size()-th clip of each.
    """
    order = np.random.default_rng([seed, epoch]).permutation(train_idx)
    global_batch = batch_size * world_size()
    steps = len(order) // global_batch
    return np.sort(order[:steps * global_batch].reshape(steps, global_batch)[:, rank()::world_size()], axis=1)


def build_model(n_tags, dropout, device, bn_momentum=0.01):
    """MSCNN on device in channels_last layout: measured 1.35x faster training steps and
    1.8x faster scoring on a 2-core AVX2 CPU (oneDNN), and the layout cuDNN's bf16
    convolutions prefer. The numbers are the same as in the default layout."""
    return common.MSCNN(n_tags, dropout, bn_momentum).to(device, memory_format=torch.channels_last)


def compile_model(model, device):
    """torch.compile (--compile): inductor's fused kernels and, on CUDA, CUDA graphs that
    replay each fixed-shape step as one launch ('reduce-overhead'). Opt-in: on a 2-core
    CPU it made training steps 1.9x slower; on a GPU it is not yet measured (benchmark.py
    --compile measures it)."""
    return torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None)


def train_step(model, optimizer, x, y, use_bf16):
    """One Adam step on a normalised batch x (B, 1, 128, 628), targets y (B, T) float.

    Returns the batch's mean binary cross-entropy (a 0-dim tensor, not synchronised)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        logits = model(x)
    loss = F.binary_cross_entropy_with_logits(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_epoch(model, optimizer, source, labels, batches, norm, use_bf16, bar=None, check_every=50):
    """Train over one epoch's batches; -> the epoch's mean training loss (all processes).

    source: what to_device_source returned; labels: float tensor (N, T) on the device;
    batches: int ndarray (steps, B) from epoch_batches; norm: (mean, std) from band_stats.
    The batch rows go to the device once, so no step waits for the GPU; the loss is read
    back every check_every steps, to show it and to stop (FloatingPointError) when it is
    not finite.
    """
    batches_on_device = torch.from_numpy(batches).to(labels.device)
    loss_sum = torch.zeros((), device=labels.device)
    for step in range(len(batches)):
        rows_on_device = batches_on_device[step]
        x = common.normalise(get_batch(source, batches[step], rows_on_device), *norm)
        loss_sum += train_step(model, optimizer, x, labels[rows_on_device], use_bf16)
        if bar is not None:
            bar.update(batches.shape[1] * world_size())
        if (step + 1) % check_every == 0 or step + 1 == len(batches):
            mean_loss = loss_sum.clone()
            if world_size() > 1:
                dist.all_reduce(mean_loss)
            mean_loss = mean_loss.item() / (step + 1) / world_size()
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"training loss became {mean_loss}")
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.4f}")
    return mean_loss


@torch.no_grad()
def predict_rows(model, source, rows, norm, batch_size, device, use_bf16):
    """Sigmoid scores (len(rows), T) float32 ndarray for the given spectrogram rows.

    Under torchrun each process scores a share of the rows and the shares are gathered."""
    model.eval()
    my_rows = np.array_split(rows, world_size())[rank()]
    rows_on_device = torch.from_numpy(my_rows).to(device)
    scores = []
    for start in range(0, len(my_rows), batch_size):
        batch = slice(start, start + batch_size)
        x = common.normalise(get_batch(source, my_rows[batch], rows_on_device[batch]), *norm)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            scores.append(torch.sigmoid(model(x).float()))  # kept on the device: no wait per batch
    scores = torch.cat(scores).cpu().numpy() if scores else None
    if world_size() > 1:
        gathered = [None] * world_size()
        dist.all_gather_object(gathered, scores)
        scores = np.concatenate([share for share in gathered if share is not None])
    return scores


def evaluate(model, source, labels, val_idx, test_idx, norm, args, device, use_bf16):
    """-> dict of validation and test ROC-AUC and PR-AUC (macro), and per-tag test ROC-AUC."""
    metrics = {}
    for name, rows in (("val", val_idx), ("test", test_idx)):
        scores = predict_rows(model, source, rows, norm, args.eval_batch_size, device, use_bf16)
        if not np.isfinite(scores).all():
            raise FloatingPointError(f"the {name} scores became non-finite")
        for metric in ("roc_auc", "pr_auc"):
            per_tag = getattr(common, metric)(labels[rows], scores, per_tag=True)  # NaN: unscorable tag
            metrics[f"{name}_{metric}"] = common.macro_mean(per_tag)
            if name == "test" and metric == "roc_auc":
                metrics["test_roc_auc_per_tag"] = per_tag.tolist()
    return metrics


def check_finite(model):
    """Raise FloatingPointError naming the parameters and buffers (batch norm's running
    statistics too) that hold NaN or inf: the loss is only read every few steps and a
    finite loss does not mean finite running statistics."""
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise FloatingPointError(f"the weights became non-finite ({', '.join(bad[:3])}"
                                 f"{' and more' if len(bad) > 3 else ''})")


def divergence_message(error, epoch, run_dir, history, best):
    """The line that stops a diverged run, true about what is on disk: every finished epoch
    was saved, so last.pt holds the last epoch of history (none: nothing was saved)."""
    if history:
        kept = (f"the last good checkpoints in {run_dir} are intact (last.pt: epoch {history[-1]['epoch']}, "
                f"best_model.pt: epoch {best['epoch']})")
    else:
        kept = f"no checkpoint was written to {run_dir}"
    return f"error: {error} in epoch {epoch}; stopped before saving it; {kept}. Try a lower --lr"


def main(argv=None):
    args = parse_args(argv)
    device = setup_distributed(args.device)
    torch.manual_seed(args.seed)
    resolve_speed_choices(args, device)  # --precision, --fused-adam, --resident, --cudnn-benchmark
    use_bf16 = args.precision == "bf16"
    torch.backends.cudnn.benchmark = args.cudnn_benchmark  # fixed input shape: autotuning pays once
    log(f"device {device}: precision {args.precision}, fused Adam {on_off(args.fused_adam)}, "
        f"resident data {on_off(args.resident)}, cudnn.benchmark {on_off(args.cudnn_benchmark)}, "
        f"compile {on_off(args.compile)}")

    # data: labels from the annotations, features memory-mapped, the split, band statistics
    csv_path = args.data_dir / "annotations_final.csv"
    if not csv_path.is_file():
        raise SystemExit(f"error: {csv_path} not found; run: python src/get_data.py --data-dir {args.data_dir}")
    clip_ids, labels, tag_names, mp3_paths = common.load_tags(csv_path, args.n_tags, merge=not args.no_merge)
    spectrograms = load_spectrograms(args.data_dir)
    if len(spectrograms) > len(labels):
        raise SystemExit(f"error: {args.data_dir / 'spectrograms.npy'} has {len(spectrograms)} rows but "
                         f"{csv_path} only {len(labels)}; regenerate the spectrograms with --overwrite")
    labels = labels[:len(spectrograms)]  # spectrograms made with --limit cover the first rows
    train_idx, val_idx, test_idx = make_split(args, len(spectrograms), clip_ids)
    log(f"split {args.split}: {len(train_idx):,} train / {len(val_idx):,} val / {len(test_idx):,} test clips"
        + (f" (--split-seed {args.split_seed})" if args.split == "random" else ""))
    overlap = audit_split(mp3_paths, train_idx, val_idx, test_idx)
    check_scorable(labels, val_idx, test_idx)
    if len(train_idx) < args.batch_size * world_size():
        raise SystemExit(f"error: {len(train_idx)} training clips are fewer than one global batch "
                         f"({args.batch_size} x {world_size()}); lower --batch-size")
    untagged = [name for name, count in zip(tag_names, labels.sum(axis=0)) if count == 0]
    if untagged:
        log(f"{len(untagged)} of the {len(tag_names)} tags have no clip in this data set; "
            "they are kept as outputs but cannot be scored")
    source = to_device_source(spectrograms, device, args.resident)
    norm = band_stats(source, train_idx, device)
    labels_on_device = torch.from_numpy(labels).float().to(device)

    # model, optimiser, schedule
    model = build_model(len(tag_names), args.dropout, device, args.bn_momentum)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=args.fused_adam)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.milestones, gamma=0.1)
    run_dir = args.out / (args.run or time.strftime("%Y%m%d-%H%M%S"))
    history, best, start_epoch = [], None, 1
    if args.resume:
        if args.run is None or not (run_dir / "last.pt").is_file():
            raise SystemExit(f"error: --resume needs --run NAME of a run with a last.pt ({run_dir / 'last.pt'} not found)")
        state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
        saved = dict({"split_seed": state["args"]["seed"]}, **state["args"])  # older runs drew --split random from --seed
        changed = [k for k in RESUME_KEYS if saved[k] != json_args(args)[k]]
        if changed:
            raise SystemExit(f"error: cannot resume {run_dir} with different {', '.join('--' + k.replace('_', '-') for k in changed)}")
        model.load_state_dict(state["model"])
        load_optimizer_state(optimizer, state["optimizer"], args.fused_adam)
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:  # dropout masks on CUDA
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        history, best, start_epoch = state["history"], state["best"], state["epoch"] + 1
        log(f"resuming {run_dir} after epoch {state['epoch']}")
    elif is_main():
        if (run_dir / "last.pt").exists():
            raise SystemExit(f"error: {run_dir} already holds a run; pass --resume to continue it or another --run")
        run_dir.mkdir(parents=True, exist_ok=True)
    if world_size() > 1:
        if device.type == "cuda":  # batch norm over the global batch, as on one GPU
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        torch.manual_seed(args.seed + 1000 * rank() + start_epoch)  # each process its own dropout masks
    plain_model = model.module if world_size() > 1 else model  # what is saved
    if args.compile:
        model = compile_model(model, device)
    n_params = sum(p.numel() for p in plain_model.parameters() if p.requires_grad)
    log(f"{len(spectrograms)} clips ({len(train_idx)} train / {len(val_idx)} val / {len(test_idx)} test), "
        f"{len(tag_names)} tags, {n_params:,} parameters, device {device}"
        + (f" x {world_size()} processes" if world_size() > 1 else ""))

    for epoch in range(start_epoch, args.epochs + 1):
        model.train()
        lr = optimizer.param_groups[0]["lr"]
        batches = epoch_batches(train_idx, args.seed, epoch, args.batch_size)
        started = time.time()
        try:  # a diverged epoch stops the run before anything of it is saved
            with tqdm(total=batches.size * world_size(), desc=f"epoch {epoch}/{args.epochs}", unit="clip",
                      unit_scale=True, leave=False, disable=not is_main()) as bar:
                mean_loss = train_epoch(model, optimizer, source, labels_on_device, batches, norm, use_bf16, bar)
            train_seconds = time.time() - started
            check_finite(plain_model)
            metrics = evaluate(model, source, labels, val_idx, test_idx, norm, args, device, use_bf16)
        except FloatingPointError as error:
            raise SystemExit(divergence_message(error, epoch, run_dir, history, best)) from None
        scheduler.step()
        history.append(dict(epoch=epoch, lr=lr, train_loss=round(mean_loss, 6),
                            val_roc_auc=round(metrics["val_roc_auc"], 6), test_roc_auc=round(metrics["test_roc_auc"], 6),
                            val_pr_auc=round(metrics["val_pr_auc"], 6), test_pr_auc=round(metrics["test_pr_auc"], 6),
                            seconds=round(time.time() - started, 2)))
        improved = best is None or metrics["val_roc_auc"] > best["val_roc_auc"]
        if improved:
            best = dict(metrics, epoch=epoch)
        log(f"epoch {epoch:3d}  lr {lr:.0e}  loss {mean_loss:.4f}  val ROC-AUC {metrics['val_roc_auc']:.4f}  "
            f"test ROC-AUC {metrics['test_roc_auc']:.4f}  {len(train_idx) / train_seconds:.0f} clips/s"
            + ("  *" if improved else ""))
        if is_main():
            state_dict = {k: v.cpu() for k, v in plain_model.state_dict().items()}
            # each through common.atomic_write: a full disk is one line, the previous file stays
            if improved:
                with common.atomic_write(run_dir / "best_model.pt", "wb") as f:
                    torch.save(dict(state_dict=state_dict, tag_names=tag_names, norm_mean=norm[0].cpu(),
                                    norm_std=norm[1].cpu(), feature_params=common.feature_params(),
                                    args=json_args(args), epoch=epoch, metrics=best), f)
            with common.atomic_write(run_dir / "last.pt", "wb") as f:
                torch.save(dict(model=state_dict, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                                torch_rng=torch.get_rng_state(), history=history, best=best, epoch=epoch,
                                cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                                args=json_args(args)), f)
            with common.atomic_write(run_dir / "metrics.csv", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(history[0]))
                writer.writeheader()
                writer.writerows(history)

    summary = (f"best validation ROC-AUC {best['val_roc_auc']:.4f} at epoch {best['epoch']}; "
               f"test ROC-AUC {best['test_roc_auc']:.4f}, PR-AUC {best['test_pr_auc']:.4f}")
    results = None
    if is_main():
        results = {k: best[k] for k in ("epoch", "val_roc_auc", "val_pr_auc", "test_roc_auc", "test_pr_auc")}
        # null, not NaN (which is not JSON), for a tag the test set cannot score
        results["test_roc_auc_per_tag"] = {name: None if math.isnan(auc) else auc
                                           for name, auc in zip(tag_names, best["test_roc_auc_per_tag"])}
        results["best_model"] = str(run_dir / "best_model.pt")
        # what report.py needs to group and compare runs
        results.update(split=args.split, split_seed=args.split_seed if args.split == "random" else None,
                       seed=args.seed, epochs=args.epochs, n_tags=len(tag_names), merge=not args.no_merge,
                       n_train=len(train_idx), n_val=len(val_idx), n_test=len(test_idx), split_overlap=overlap)
        with common.atomic_write(run_dir / "results.json") as f:  # valid JSON: check_scorable refused NaN
            f.write(json.dumps(results, indent=2, allow_nan=False) + "\n")
        print(f"best model: {run_dir / 'best_model.pt'}\n{summary}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return results  # None in the processes other than rank 0


def load_optimizer_state(optimizer, saved, fused):
    """optimizer.load_state_dict(saved), but with this run's --fused-adam: a saved state
    carries the interrupted run's choice in its parameter groups, and would impose it."""
    for group in saved["param_groups"]:
        group["fused"] = fused
    optimizer.load_state_dict(saved)


def on_off(flag):
    return "on" if flag else "off"


def json_args(args):
    """The arguments as plain types (a checkpoint loads with weights_only=True)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # every file is written atomically: the last finished epoch's are whole
        print("\ninterrupted: the checkpoints of the last finished epoch are kept in the run folder; "
              "continue with the same command plus --resume --run NAME", file=sys.stderr)
        raise SystemExit(130)
