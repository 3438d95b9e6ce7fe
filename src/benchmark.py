"""Speed figures for the docs: where the time of one log-mel goes, how many clips/s
gen_spectrograms.py extracts with 1, 2, ... workers, how fast trainer.py trains (its fast
path against a plain port's baseline), how fast predict.py tags a folder, and how long the
paper's run takes.

    python src/benchmark.py                              # features, train, predict
    python src/benchmark.py --what train --device cuda   # training steps and evaluation
    python src/benchmark.py --what paper --device cuda   # trainer.py at the paper's size
    python src/benchmark.py --what train --device cpu --steps 3 --batch-size 8 --eval-clips 64
    python src/benchmark.py --what features --workers 1 2 --n-clips 200
    python src/benchmark.py --what features --cold-start # + first call with a cold numba cache
    python src/benchmark.py --what predict               # tagging a library; peak memory

Each benchmark is a function returning plain numbers (seconds, clips/s), so a notebook or a
test can call it; BENCHMARKS lists what --what can run. Stage timings are wall-clock
medians of warm repeats; extraction rates are the best of --runs, each run printed with the
CPU that other processes used meanwhile, since other load on the machine slows them;
predict.py's runs are whole commands, as a user runs them, each --workers setting taking its
turn in each of --runs rounds, and the medians are kept.
"""
import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import formats
import plumbing

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CLIP = ROOT / "tests" / "fixtures" / "joram-moments_of_clarity-08-solipsism-59-88.mp3"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", choices=list(BENCHMARKS) + ["all"], default="all",
                   help="which benchmark to run (default: all = features, train and predict)")
    fixtures = Path(os.environ.get("MTAT_FIXTURES", DEFAULT_CLIP.parent))
    p.add_argument("--clip", type=Path, default=fixtures / DEFAULT_CLIP.name,
                   help="audio clip to time; copies of it make the extraction data set "
                        "(default: the real MTAT clip in tests/fixtures/ or $MTAT_FIXTURES)")
    p.add_argument("--repeats", type=int, default=20,
                   help="timed repeats per stage of one log-mel (default: 20)")
    p.add_argument("--n-clips", type=int, default=200,
                   help="clips per extraction run (default: 200)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                   help="worker counts to time gen_spectrograms.py with (default: 1 2)")
    p.add_argument("--runs", type=int, default=3,
                   help="features: extraction runs per worker count, the best kept; predict: rounds of "
                        "runs, the median kept (default: 3)")
    p.add_argument("--cold-start", action="store_true",
                   help="also time the first log-mel of a fresh process with an empty numba "
                        "cache (what a fresh install pays once)")
    p.add_argument("--device", default="auto", help="train: auto | cpu | cuda (default: auto)")
    p.add_argument("--steps", type=int, default=200,
                   help="train: timed training steps per repeat (default: 200; use ~3 on a CPU)")
    p.add_argument("--batch-size", type=int, default=32, help="train: clips per step (default: 32)")
    p.add_argument("--scales", type=int, nargs="+", choices=common.SCALES, default=list(common.SCALES),
                   metavar="S",
                   help="train, paper: the network's branches, as trainer.py --scales (default: 1 2 3, the "
                        "paper's network)")
    p.add_argument("--compile", action="store_true",
                   help="train: also time the fast path under torch.compile (trainer.py --compile)")
    p.add_argument("--eval-clips", type=int, default=7863,
                   help="train: clips scored in the evaluation pass (default: 7,863, validation + "
                        "test of the paper's split; use ~64 on a CPU)")
    p.add_argument("--folder", type=Path, default=None,
                   help="predict: tag this folder of your own music (default: a library built from --clip, "
                        + LIBRARY_TEXT + ")")
    p.add_argument("--predict-workers", type=int, nargs="+", default=None,
                   help="predict: --workers counts to time predict.py with, taking turns in each of --runs "
                        "rounds (default: 1 and predict.py's default, one per core)")
    p.add_argument("--memory-minutes", type=int, nargs="*", default=[10, 30, 60],
                   help="predict: lengths of the files whose peak memory is measured "
                        "(default: 10 30 60; a 60-minute WAV takes 605 MiB of disk)")
    p.add_argument("--epochs", type=int, default=3,
                   help="paper: epochs of trainer.py timed, then projected to 40 (default: 3; the "
                        "first pays the start-up costs, so at least 2)")
    p.add_argument("--paper-clips", type=int, default=common.N_CLIPS,
                   help=f"paper: spectrogram rows (default: {common.N_CLIPS:,}, the paper's split; fewer: "
                        "--split random, 70%% train and 10%% validation, for a quick try on a CPU)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="paper: time trainer.py on this data folder's spectrograms (default: random "
                        "float16 spectrograms labelled by the real annotations, written to a "
                        "temporary folder)")
    p.add_argument("--trainer-flags", default="",
                   help="paper: more trainer.py flags, one string, e.g. \"--precision fp32 --no-fused-adam "
                        "--no-resident --no-cudnn-benchmark\" for the trainer's fp32 baseline, or \"--compile\"")
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error("--epochs must be at least 2: the first epoch pays the start-up costs")
    if args.paper_clips < 20:
        p.error("--paper-clips must be at least 20")
    for flag in ("steps", "batch_size", "eval_clips", "repeats", "n_clips", "runs"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def median_seconds(fn, repeats):
    """Median wall-clock seconds of fn() over `repeats` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# -----------------------------------------------------------------------------
# Features
def time_log_mel(clip_path, repeats=20, blas_threads=1):
    """Seconds per stage of common.log_mel on one clip, warm (median of `repeats`).

    The stages are those librosa.load + common run: decode (soundfile), resample to
    SAMPLE_RATE (channels averaged, then librosa.resample with librosa.load's default,
    soxr_hq), mel (mel spectrogram, log, crop/pad). blas_threads: OpenBLAS threads, 1 as
    in gen_spectrograms.py's workers; None leaves the library's default (one per core).

    Returns dict of seconds: decode, resample, mel, total (one common.log_mel call).
    """
    import librosa
    import soundfile
    from threadpoolctl import threadpool_limits

    def decode():
        return soundfile.read(clip_path, dtype="float32", always_2d=True)

    with threadpool_limits(limits=blas_threads):
        common.log_mel(clip_path)  # the first call pays imports and numba: time_first_log_mel
        audio, sr = decode()
        resampled = librosa.resample(librosa.to_mono(audio.T), orig_sr=sr,
                                     target_sr=common.SAMPLE_RATE)
        return dict(
            decode=median_seconds(decode, repeats),
            resample=median_seconds(lambda: librosa.resample(
                librosa.to_mono(audio.T), orig_sr=sr, target_sr=common.SAMPLE_RATE), repeats),
            mel=median_seconds(lambda: common.fit_frames(common.log_mel_of_audio(resampled)),
                               repeats),
            total=median_seconds(lambda: common.log_mel(clip_path), repeats))


def time_first_log_mel(clip_path, cold_numba_cache=False):
    """One-off costs of a fresh Python process: seconds to import common, then of the
    first and the second common.log_mel(clip_path).

    cold_numba_cache: give numba an empty cache folder (NUMBA_CACHE_DIR), as on a fresh
    install, so that librosa's numba functions are compiled instead of loaded.
    Returns dict of seconds: import_common, first_log_mel, second_log_mel.
    """
    code = ("import json, sys, time; sys.path.insert(0, sys.argv[1]); t0 = time.perf_counter(); "
            "import common; t1 = time.perf_counter(); common.log_mel(sys.argv[2]); "
            "t2 = time.perf_counter(); common.log_mel(sys.argv[2]); t3 = time.perf_counter(); "
            "print(json.dumps(dict(import_common=t1 - t0, first_log_mel=t2 - t1, "
            "second_log_mel=t3 - t2)))")
    with tempfile.TemporaryDirectory() as cache_dir:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir) if cold_numba_cache else None
        out = subprocess.run([sys.executable, "-c", code, str(ROOT / "src"), str(clip_path)],
                             env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def make_copies_dataset(clip_path, n_clips, data_dir):
    """An MTAT-layout folder of n_clips copies of one clip: annotations_final.csv (one tag)
    and mp3/<hex digit>/copy-<i>.<suffix>, as gen_spectrograms.py reads it."""
    data_dir = Path(data_dir)
    lines = ['"clip_id"\t"tag"\t"mp3_path"']
    for i in range(n_clips):
        path = f"{i % 16:x}/copy-{i}{Path(clip_path).suffix}"
        (data_dir / "mp3" / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(clip_path, data_dir / "mp3" / path)
        lines.append(f'"{i}"\t"0"\t"{path}"')
    (data_dir / "annotations_final.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode())


def busy_cpu_seconds():
    """CPU seconds the whole machine has been busy since boot (Linux), or None."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except OSError:
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


def time_extraction(workers, n_clips, clip_path, runs=3, dtype="float16"):
    """Clips/s of gen_spectrograms.main on n_clips copies of clip_path: the best of `runs`
    (the least disturbed by other load; each run's rate and the CPU that other processes
    used meanwhile are printed).

    Runs in this process after one warm-up, so the rate is the steady state: without
    Python's and librosa's start-up (a few seconds, once per run of the script).
    """
    import gen_spectrograms

    rates = []
    with tempfile.TemporaryDirectory() as data_dir:
        make_copies_dataset(clip_path, n_clips, data_dir)
        gen_spectrograms.warm_up()
        args = ["--data-dir", data_dir, "--workers", str(workers), "--dtype", dtype, "--overwrite"]
        for _ in range(runs):
            busy0, mine0 = busy_cpu_seconds(), os.times()
            summary = gen_spectrograms.main(args)
            busy1, mine1 = busy_cpu_seconds(), os.times()
            rates.append(summary["clips_per_s"])
            mine = sum(mine1[:4]) - sum(mine0[:4])  # this process and its (reaped) workers
            line = (f"  {workers} worker(s): {rates[-1]:.1f} clips/s, "
                    f"{mine / summary['n_computed'] * 1000:.0f} CPU ms per clip")
            if busy0 is not None:
                others = max(busy1 - busy0 - mine, 0) / summary["seconds"]
                line += f"; other processes used {others:.2f} of {os.cpu_count()} cores meanwhile"
            print(line, flush=True)
    return max(rates)


def features_benchmark(args):
    """Per-stage cost of one log-mel, one-off costs, and extraction clips/s by workers."""
    if not args.clip.is_file():
        raise SystemExit(f"error: {args.clip} not found; pass --clip with any audio file "
                         "(MTAT's: 29 s, 16 kHz mono MP3)")
    results = {}
    for name, threads in (("log_mel_s", 1), ("log_mel_s_default_blas_threads", None)):
        results[name] = time_log_mel(args.clip, args.repeats, blas_threads=threads)
        print(f"{name}: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in results[name].items()),
              flush=True)
    caches = [("first_call_s", "warm", False)]
    if args.cold_start:
        caches.append(("first_call_cold_s", "cold", True))
    for name, cache, cold in caches:
        results[name] = time_first_log_mel(args.clip, cold_numba_cache=cold)
        print(f"fresh process, {cache} numba cache: "
              + ", ".join(f"{k} {v:.2f} s" for k, v in results[name].items()), flush=True)
    rates = {workers: [] for workers in args.workers}
    for _ in range(args.runs):  # worker counts take turns, so that they see the same load
        for workers in args.workers:
            rates[workers].append(time_extraction(workers, args.n_clips, args.clip, runs=1))
    rates = {workers: max(r) for workers, r in rates.items()}
    for workers, rate in rates.items():
        minutes = common.N_CLIPS / rate / 60
        print(f"gen_spectrograms.py, {workers} worker(s), best of {args.runs}: {rate:.1f} clips/s "
              f"(x{rate / rates[args.workers[0]]:.2f} of {args.workers[0]}); "
              f"all {common.N_CLIPS:,} MTAT clips in {minutes:.1f} min", flush=True)
    results["clips_per_s"] = rates
    return results


# -----------------------------------------------------------------------------
# Training and evaluation of the network
def forward_flops(n_tags=50, scales=common.SCALES):
    """Floating-point operations of one clip's forward pass, counted from the layer shapes
    (a multiply-add is 2; convolutions and dense layers only, the rest is negligible)."""
    import torch

    model = common.MSCNN(n_tags, scales=scales)
    flops = []

    def count(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            flops.append(2 * output.numel() * module.in_channels * kh * kw)
        else:
            flops.append(2 * module.in_features * module.out_features)

    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.register_forward_hook(count)
    with torch.no_grad():
        model.eval()(torch.zeros(1, 1, common.N_MELS, common.N_FRAMES))
    return sum(flops)


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trainer_args(device, mode, data_bytes):
    """trainer.py's arguments and speed choices for this device, as a run of the mode
    would resolve them ('fast+compile': with --compile)."""
    import trainer

    args = trainer.parse_args(["--device", device.type] + (["--compile"] if mode == "fast+compile" else []))
    plumbing.resolve_speed_choices(args, device, data_bytes)
    return args


def model_for(mode, device, args=None, scales=common.SCALES):
    """A fresh MSCNN of these scales as the mode runs it: 'baseline' plain fp32 layout; 'fast'
    and 'fast+compile' as trainer.py builds it (plumbing.on_device, plumbing.parallel)."""
    if mode == "baseline":
        return common.MSCNN(scales=scales).to(device)
    return plumbing.parallel(plumbing.on_device(common.MSCNN(scales=scales), device), device, args, 1)[0]


def fixed_norm(device):
    """(mean, std) per mel band matching the random inputs (normal, mean -8, std 2)."""
    import torch

    return torch.full((common.N_MELS,), -8.0, device=device), torch.full((common.N_MELS,), 2.0, device=device)


def time_train_steps(device, mode, steps, batch_size, repeats=3, scales=common.SCALES):
    """Median seconds per training step of MSCNN on random data of the real shape.

    mode 'baseline': what a plain port does: fp32, eager, each batch a float32 host array
    copied to the device. mode 'fast': trainer.train_epoch itself with trainer.py's speed
    choices for the device (plumbing.resolve_speed_choices): the data float16 (resident on
    CUDA) and normalised on the device, channels_last, and on CUDA bf16 autocast, fused
    Adam and cudnn.benchmark. 'fast+compile': the same with trainer.py --compile.
    """
    import numpy as np
    import torch

    import trainer

    fast = mode != "baseline"
    torch.manual_seed(0)
    n_stored = 4 * batch_size  # a small pool of clips to draw batches from
    host = np.random.default_rng(0).normal(-8, 2, (n_stored, common.N_MELS, common.N_FRAMES))
    labels = torch.from_numpy((np.random.default_rng(1).random((n_stored, 50)) < 0.1).astype(np.float32))
    batches = np.stack([np.sort(np.random.default_rng(i).choice(n_stored, batch_size, replace=False))
                        for i in range(steps)])
    norm = fixed_norm(device)
    if fast:
        host = host.astype(np.float16)
        args = trainer_args(device, mode, host.nbytes)
        source = plumbing.to_device_source(host, device, args.resident)
        labels = labels.to(device)
    else:
        torch.backends.cudnn.benchmark = False
        host = host.astype(np.float32)
    model = model_for(mode, device, args if fast else None, scales).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fast and args.fused_adam)

    def run_steps():
        if fast:
            trainer.train_epoch(model, optimizer, source, labels, batches, norm, args.precision == "bf16")
        else:
            for rows in batches:
                x = common.normalise(torch.from_numpy(host[rows]).to(device), *norm)
                trainer.train_step(model, optimizer, x, labels[rows].to(device), False)
        sync(device)

    run_steps()  # warm-up: allocations, cudnn autotuning, compilation
    return median_seconds(run_steps, repeats) / steps


def time_evaluation(device, mode, n_clips, scales=common.SCALES):
    """Seconds to score n_clips clips (no gradients), as trainer.evaluate does ('fast':
    trainer.predict_rows with the trainer's choices and --eval-batch-size; 'fast+compile':
    and --compile) or a plain port would ('baseline': fp32, batches of 32 copied from the
    host)."""
    import numpy as np
    import torch

    import trainer

    fast = mode != "baseline"
    host = np.random.default_rng(0).normal(-8, 2, (n_clips, common.N_MELS, common.N_FRAMES)).astype(
        np.float16 if fast else np.float32)
    norm = fixed_norm(device)
    rows = np.arange(n_clips)
    if fast:
        args = trainer_args(device, mode, host.nbytes)
        source = plumbing.to_device_source(host, device, args.resident)
    else:
        torch.backends.cudnn.benchmark = False
    model = model_for(mode, device, args if fast else None, scales)

    def run():
        if fast:
            trainer.predict_rows(model, source, rows, norm, args.eval_batch_size, device, args.precision == "bf16")
        else:
            trainer.predict_rows(model, host, rows, norm, 32, device, False)
        sync(device)

    run()
    return median_seconds(run, 2)


def train_benchmark(args):
    """ms/step, clips/s and TFLOP/s of the baseline and the fast path (and with --compile,
    the fast path compiled); projected time of the paper's run (40 epochs of 18,000 clips,
    plus scoring 7,863 clips every epoch)."""
    device = plumbing.resolve_device(args.device)
    scales = tuple(sorted(set(args.scales)))
    flops = forward_flops(scales=scales)
    print(f"MSCNN, scales {' '.join(map(str, scales))}, forward: {flops / 1e9:.2f} GFLOP per clip, "
          f"training step ~3x: {3 * flops / 1e9:.2f} GFLOP per clip; device {device}", flush=True)
    results = dict(device=str(device), scales=list(scales), forward_gflop_per_clip=flops / 1e9)
    print(f"{'path':12} {'ms/step':>9} {'clips/s':>9} {'TFLOP/s':>8} {'eval clips/s':>13} {'40 epochs':>10} {'speed-up':>8}")
    for mode in ("baseline", "fast") + (("fast+compile",) if args.compile else ()):
        step_s = time_train_steps(device, mode, args.steps, args.batch_size, scales=scales)
        eval_s = time_evaluation(device, mode, args.eval_clips, scales)
        eval_rate = args.eval_clips / eval_s
        projected_s = 40 * (18000 // args.batch_size * step_s + 7863 / eval_rate)
        row = dict(ms_per_step=1000 * step_s, clips_per_s=args.batch_size / step_s,
                   tflops=3 * flops * args.batch_size / step_s / 1e12, eval_clips_per_s=eval_rate,
                   projected_40_epochs_s=projected_s)
        row["speedup"] = results.get("baseline", row)["ms_per_step"] / row["ms_per_step"]
        results[mode] = row
        print(f"{mode:12} {row['ms_per_step']:9.1f} {row['clips_per_s']:9.1f} {row['tflops']:8.3f} "
              f"{eval_rate:13.1f} {format_duration(projected_s):>10} {row['speedup']:7.2f}x", flush=True)
    results["speedup"] = results["fast"]["speedup"]
    return results


def format_duration(seconds):
    """1234.5 -> '20.6 min'; seconds, minutes or hours, whichever reads best."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


# -----------------------------------------------------------------------------
# Tagging a music folder with predict.py
def write_track(path, clip_path, minutes, sample_rate=44100, format=None):
    """A long 44.1 kHz stereo track made of the clip, looped (resampled once), written block
    by block so that an hour never sits in memory; the channels differ a little."""
    import librosa
    import numpy as np
    import soundfile

    clip = librosa.resample(common.load_audio(clip_path), orig_sr=common.SAMPLE_RATE,
                            target_sr=sample_rate)
    stereo = np.stack([clip, 0.8 * clip], axis=1)
    n_left = int(minutes * 60 * sample_rate)
    with soundfile.SoundFile(path, "w", sample_rate, 2, format=format) as f:
        while n_left > 0:
            f.write(stereo[:n_left])
            n_left -= len(stereo)


# a music library in small: (files, minutes each) of 44.1 kHz stereo MP3
LIBRARY = ((30, 0.5), (10, 4), (1, 1))
LIBRARY_TEXT = " + ".join(f"{n} x {m * 60:g} s" for n, m in LIBRARY) + " of 44.1 kHz stereo MP3"


def write_library(folder, clip_path, seed=0):
    """LIBRARY's files under folder, track_00.mp3, track_01.mp3, ..., the lengths in a
    shuffled order as in a real library; each length is written once from the clip
    (write_track), then copied. Returns their paths, sorted."""
    import random

    minutes = [m for n_files, m in LIBRARY for _ in range(n_files)]
    random.Random(seed).shuffle(minutes)
    written = {}
    for i, m in enumerate(minutes):
        path = folder / f"track_{i:02d}.mp3"
        if m in written:
            shutil.copyfile(written[m], path)
        else:
            write_track(path, clip_path, m, format="MP3")
            written[m] = path
    return sorted(folder.glob("*.mp3"))


def random_checkpoint(path, n_tags=50):
    """A checkpoint in trainer.py's format with untrained weights: the speed and memory of
    predict.py do not depend on what the weights are."""
    import torch

    torch.manual_seed(0)
    norm = torch.full((common.N_MELS,), -8.0), torch.full((common.N_MELS,), 3.0)
    formats.save_best_model(path, common.MSCNN(n_tags).state_dict(), [f"tag{i}" for i in range(n_tags)],
                             norm, args={}, epoch=1, metrics={})


def time_predict_stages(paths, checkpoint_path):
    """Seconds per stage of tagging the files as a CPU worker of predict.py does it, summed
    over the files, in a worker process of plumbing.pool_results as predict.py's are (one
    thread: this process's thread counts stay as they are): decode (soundfile block reads
    and the channel mean), resample (soxr's stream), log-mel (LogMelStream), network (the
    windows through MSCNN, predict.CPU_BATCH at a time). The first file is tagged once
    before, untimed (imports, numba, filter banks)."""
    [(_, times)] = plumbing.pool_results(stage_seconds, [(paths, checkpoint_path)], 1)
    if isinstance(times, Exception):
        raise SystemExit(f"error: timing the stages failed: {times}")
    return times


def stage_seconds(task):
    """time_predict_stages's work, in the worker: task = (paths, checkpoint_path)."""
    import numpy as np
    import soundfile
    import soxr
    import torch

    import predict

    def decode(path):
        with soundfile.SoundFile(path) as f:
            blocks = []
            while len(block := f.read(predict.BLOCK_S * f.samplerate, dtype="float32",
                                      always_2d=True)):
                blocks.append(np.mean(block.T, axis=0))
            return blocks, f.samplerate

    def resample(blocks, rate):
        stream = soxr.ResampleStream(rate, common.SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        return [stream.resample_chunk(b) for b in blocks] + [
            stream.resample_chunk(np.zeros(0, np.float32), last=True)]

    def log_mel(resampled):
        stream = predict.LogMelStream()
        return np.concatenate([stream.feed(y) for y in resampled] + [stream.finish()], axis=1)

    paths, checkpoint_path = task
    torch.set_num_threads(1)  # BLAS and OpenMP: one thread already (plumbing.start_worker)
    model, tag_names, norm_mean, norm_std = predict.load_checkpoint(checkpoint_path, torch.device("cpu"))
    times = dict.fromkeys(("decode", "resample", "log-mel", "network"), 0.0)
    predict.tag_file(paths[0], model, tag_names, norm_mean, norm_std)  # warm-up
    for path in paths:
        t0 = time.perf_counter()
        blocks, rate = decode(path)
        t1 = time.perf_counter()
        resampled = resample(blocks, rate)
        t2 = time.perf_counter()
        spec = log_mel(resampled)
        t3 = time.perf_counter()
        predict.score_file(spec, 0.0, model, tag_names, norm_mean, norm_std)
        t4 = time.perf_counter()
        for stage, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[stage] += seconds
    return times


def time_predict_run(folder, checkpoint_path, workers, csv_path):
    """(wall seconds, CPU seconds) of `python src/predict.py folder --workers N --csv
    csv_path` as a user runs it, start-up and exit included; the CPU time is that of the
    process and its worker processes (user + system, from the rusage of reaped children)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "src" / "predict.py"), str(folder),
                           "--checkpoint", str(checkpoint_path), "--workers", str(workers),
                           "--csv", str(csv_path)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"error: predict.py --workers {workers} failed: "
                         f"{(done.stderr.strip().splitlines() or [''])[-1]}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def peak_memory_mib(command):
    """Peak resident memory (MiB) of a command: the largest ru_maxrss among it and its
    children, read by a small Python process that starts it (Linux keeps the maxrss of the
    process that forked across exec, so this large process must not start it itself; with
    --workers 0 predict.py does everything in one process)."""
    code = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], "
            "stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True); "
            "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
            "(done.stderr.strip().splitlines() or [''])[-1])")
    out = subprocess.run([sys.executable, "-c", code] + [str(c) for c in command],
                         capture_output=True, text=True, check=True).stdout.split(maxsplit=2)
    if out[0] != "0":
        raise SystemExit(f"error: {' '.join(map(str, command))} failed: {out[2:]}")
    return int(out[1]) / 1024  # Linux reports KiB


def predict_benchmark(args):
    """predict.py over a music folder (--folder, or LIBRARY built from --clip), by --workers
    setting: tracks per minute and CPU time / wall time (median of --runs paired rounds, the
    settings taking turns so that they see the same load), the speed-up over the first
    setting (median of the rounds' ratios), whether every setting wrote the same CSV, and
    where the time goes (time_predict_stages); then the peak memory of one
    --memory-minutes long WAV (44.1 kHz stereo, 16-bit)."""
    import soundfile

    import predict

    if not args.clip.is_file():
        raise SystemExit(f"error: {args.clip} not found; pass --clip with any audio file")
    settings = args.predict_workers or sorted({1, predict.default_workers()})
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = tmp / "best_model.pt"
        random_checkpoint(checkpoint)
        if args.folder is None:
            folder = tmp / "music"
            folder.mkdir()
            paths = write_library(folder, args.clip)
        else:
            folder = args.folder
            if not folder.is_dir():
                raise SystemExit(f"error: --folder {folder}: not a folder; pass a folder of audio files")
            paths = [Path(p) for p in predict.expand_inputs([str(folder)])[0]]
            if not paths:
                raise SystemExit(f"error: --folder {folder}: no audio file in it "
                                 f"({' '.join(predict.AUDIO_EXTENSIONS)})")
        seconds_of_audio = sum(soundfile.info(str(p)).duration for p in paths)
        print(f"folder: {len(paths)} files, {seconds_of_audio / 3600:.2f} h of audio"
              + ("" if args.folder else f" ({LIBRARY_TEXT})"), flush=True)
        stages = time_predict_stages(paths, checkpoint)
        total = sum(stages.values())
        print("where the time goes, one thread: " + ", ".join(
            f"{stage} {seconds:.2f} s ({100 * seconds / total:.0f}%)" for stage, seconds in stages.items()),
            flush=True)
        results["stages_s"] = stages
        walls, cpus = ({workers: [] for workers in settings} for _ in range(2))
        csv_texts = {}
        for run in range(args.runs):
            for workers in settings:
                csv_path = tmp / f"tags_{workers}.csv"
                seconds, cpu = time_predict_run(folder, checkpoint, workers, csv_path)
                walls[workers].append(seconds)
                cpus[workers].append(cpu)
                csv_texts.setdefault(workers, csv_path.read_text())
                print(f"  round {run + 1}, --workers {workers}: {seconds:.2f} s wall, {cpu:.2f} s CPU",
                      flush=True)
        first = settings[0]
        results["predict_runs"] = {}
        for workers in settings:
            wall = statistics.median(walls[workers])
            cpu_per_wall = statistics.median(c / w for c, w in zip(cpus[workers], walls[workers]))
            speedup = statistics.median(w0 / w for w0, w in zip(walls[first], walls[workers]))
            results["predict_runs"][workers] = dict(wall_s=wall, tracks_per_min=len(paths) / wall * 60,
                                                    cpu_per_wall=cpu_per_wall, speedup=speedup,
                                                    walls_s=walls[workers], cpus_s=cpus[workers])
            print(f"--workers {workers}, median of {args.runs}: {wall:.2f} s, "
                  f"{len(paths) / wall * 60:.1f} tracks/min, CPU time {cpu_per_wall:.2f} x wall time, "
                  f"x{speedup:.2f} the speed of --workers {first}", flush=True)
        same = len(set(csv_texts.values())) == 1
        results["same_output"] = same
        print("the CSVs of every setting: " + ("identical" if same else "DIFFERENT"), flush=True)
        results["peak_mib"] = {}
        for minutes in args.memory_minutes:
            long_path = tmp / f"long_{minutes}min.wav"
            write_track(long_path, args.clip, minutes)
            peak = peak_memory_mib([sys.executable, str(ROOT / "src" / "predict.py"),
                                    str(long_path), "--checkpoint", str(checkpoint),
                                    "--workers", "0"])
            results["peak_mib"][minutes] = peak
            print(f"peak memory, one {minutes}-minute 44.1 kHz stereo WAV "
                  f"({long_path.stat().st_size / 2**20:.0f} MiB), --workers 0: {peak:.0f} MiB",
                  flush=True)
            long_path.unlink()
    return results


# -----------------------------------------------------------------------------
# The paper's run: trainer.py at full size, timed for a few epochs, projected to 40
def write_random_spectrograms(data_dir, n_clips, device, seed=0, chunk_rows=1024):
    """DATA/spectrograms.npy (+ .json) as gen_spectrograms.py writes them, but random:
    float16 (n_clips, N_MELS, N_FRAMES), normal with mean -8 and std 2 (about a log-mel's),
    drawn on `device` chunk by chunk and streamed to disk; and DATA/annotations_final.csv,
    the real MTAT annotations of tests/fixtures/ (their first n_clips rows label the rows)."""
    import gzip

    import numpy as np
    import torch


    annotations = Path(os.environ.get("MTAT_FIXTURES", DEFAULT_CLIP.parent)) / "annotations_final.csv.gz"
    if not annotations.is_file():
        raise SystemExit(f"error: {annotations} not found: the real MTAT annotations label the random "
                         "spectrograms; restore tests/fixtures/ from git (or fix $MTAT_FIXTURES)")
    data_dir.mkdir(parents=True, exist_ok=True)
    with gzip.open(annotations) as src, plumbing.atomic_write(data_dir / "annotations_final.csv", "wb") as dst:
        shutil.copyfileobj(src, dst)
    shape = (n_clips, common.N_MELS, common.N_FRAMES)
    generator = torch.Generator(device).manual_seed(seed)
    with plumbing.atomic_write(data_dir / "spectrograms.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, dict(descr=np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                                                     fortran_order=False, shape=shape))
        for start in range(0, n_clips, chunk_rows):
            rows = min(chunk_rows, n_clips - start)
            chunk = torch.randn((rows,) + shape[1:], generator=generator, device=device)
            f.write(chunk.mul_(2).sub_(8).half().cpu().numpy().tobytes())
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the GPU's memory is the run's (the trainer checks what is free)
    mp3_paths = common.read_annotations(data_dir / "annotations_final.csv")[3]
    plumbing.write_json(data_dir / "spectrograms.json", formats.spectrogram_meta(
        formats.spectrogram_settings(n_clips, "float16", mp3_paths),
        note="random values written by src/benchmark.py --what paper, for timing only"))


def project_40_epochs(wall_s, epoch_s):
    """The 40-epoch time of a run timed for len(epoch_s) epochs: its start-up (the wall
    time outside the epochs: data, upload, band statistics, checkpoints), its first epoch
    (which pays cuDNN's autotuning and compilation) and 39 epochs at the median of the
    others. -> (startup_s, projected_s)."""
    startup_s = wall_s - sum(epoch_s)
    return startup_s, startup_s + epoch_s[0] + 39 * statistics.median(epoch_s[1:])


def paper_benchmark(args):
    """trainer.py with its defaults (the paper's recipe, the device's speed choices) for
    --epochs epochs on --paper-clips rows, every epoch scored as the paper's run does;
    seconds per epoch, start-up, and the projected 40 epochs."""
    import csv

    import trainer

    device = plumbing.resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or Path(tmp) / "data"
        if args.data_dir is None:
            t0 = time.perf_counter()
            write_random_spectrograms(data_dir, args.paper_clips, device)
            print(f"random spectrograms: {args.paper_clips:,} rows written in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
        flags = ["--data-dir", str(data_dir), "--out", tmp, "--run", "paper", "--epochs", str(args.epochs),
                 "--device", device.type, "--scales", *map(str, args.scales)]
        if args.paper_clips < common.N_CLIPS:
            flags += ["--split", "random", "--train-size", str(args.paper_clips * 7 // 10),
                      "--val-size", str(args.paper_clips // 10), "--batch-size", str(args.batch_size)]
        flags += shlex.split(args.trainer_flags)
        t0 = time.perf_counter()
        trainer.main(flags)
        wall_s = time.perf_counter() - t0
        with open(Path(tmp) / "paper" / "metrics.csv", newline="") as f:
            epoch_s = [float(row["seconds"]) for row in csv.DictReader(f)]
    startup_s, projected_s = project_40_epochs(wall_s, epoch_s)
    print(f"trainer.py {' '.join(flags[6:])}: epochs " + ", ".join(f"{s:.1f}" for s in epoch_s)
          + f" s, start-up {startup_s:.1f} s; 40 epochs projected {format_duration(projected_s)}", flush=True)
    return dict(device=str(device), n_clips=args.paper_clips, epoch_s=epoch_s, startup_s=startup_s,
                projected_40_epochs_s=projected_s)


# what --what can run; each takes the parsed args and returns a dict of figures
BENCHMARKS = {"features": features_benchmark, "train": train_benchmark,
              "predict": predict_benchmark, "paper": paper_benchmark}
ALL = ("features", "train", "predict")  # --what all: what a CPU can run in minutes


def main(argv=None):
    args = parse_args(argv)
    names = list(ALL) if args.what == "all" else [args.what]
    print(f"machine: {os.cpu_count()} CPU cores; python {sys.version.split()[0]}")
    return {name: BENCHMARKS[name](args) for name in names}


if __name__ == "__main__":  # SIGTERM and SIGHUP as Ctrl-C: its temporary folders are removed
    plumbing.run_script(main, "interrupted: no figure of the unfinished benchmark was kept")
