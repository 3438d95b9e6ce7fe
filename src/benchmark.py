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
    python src/benchmark.py --what predict               # tagging a folder; peak memory

Each benchmark is a function returning plain numbers (seconds, clips/s), so a notebook or a
test can call it; BENCHMARKS lists what --what can run. Stage timings are wall-clock
medians of warm repeats; extraction rates are the best of --runs, each run printed with the
CPU that other processes used meanwhile, since other load on the machine slows them.
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
                   help="extraction runs per worker count; the best is kept (default: 3)")
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
    p.add_argument("--tracks", type=int, default=8,
                   help="predict: 4-minute tracks in the folder tagged (default: 8)")
    p.add_argument("--predict-workers", type=int, nargs="+", default=[1, 2],
                   help="predict: --workers counts to time predict.py with (default: 1 2)")
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
    for flag in ("tracks", "steps", "batch_size", "eval_clips", "repeats", "n_clips", "runs"):
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


def random_checkpoint(path, n_tags=50):
    """A checkpoint in trainer.py's format with untrained weights: the speed and memory of
    predict.py do not depend on what the weights are."""
    import torch


    torch.manual_seed(0)
    norm = torch.full((common.N_MELS,), -8.0), torch.full((common.N_MELS,), 3.0)
    plumbing.save_best_model(path, common.MSCNN(n_tags).state_dict(), [f"tag{i}" for i in range(n_tags)],
                             norm, args={}, epoch=1, metrics={})


def time_predict_stages(track_path, checkpoint_path, batch_size=64):
    """Seconds per stage of tagging one track, as predict.py does it: decode (soundfile
    block reads and the channel mean), resample (soxr's stream), mel (log-mel frames), each
    with one BLAS thread as in a decoder process; scoring (its windows through the
    network, torch's default threads)."""
    import numpy as np
    import soundfile
    import soxr
    import torch
    from threadpoolctl import threadpool_limits

    import predict

    def decode():
        with soundfile.SoundFile(track_path) as f:
            blocks = []
            while len(block := f.read(predict.BLOCK_S * f.samplerate, dtype="float32",
                                      always_2d=True)):
                blocks.append(np.mean(block.T, axis=0))
            return blocks, f.samplerate

    def resample(blocks, rate):
        stream = soxr.ResampleStream(rate, common.SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        return [stream.resample_chunk(b) for b in blocks] + [
            stream.resample_chunk(np.zeros(0, np.float32), last=True)]

    def mel(resampled):
        stream = predict.LogMelStream()
        return np.concatenate([stream.feed(y) for y in resampled] + [stream.finish()], axis=1)

    model, _, norm_mean, norm_std = predict.load_checkpoint(checkpoint_path, torch.device("cpu"))
    times = {}
    with threadpool_limits(limits=1):
        mel(resample(*decode()))  # warm-up: imports, numba, filter banks
        for name, fn in (("decode", decode), ("resample", lambda: resample(*blocks)),
                         ("mel", lambda: mel(resampled))):
            t0 = time.perf_counter()
            out = fn()
            times[name] = time.perf_counter() - t0
            if name == "decode":
                blocks = out
            elif name == "resample":
                resampled = out
    spec = out
    starts = predict.window_starts(spec.shape[1], common.N_FRAMES // 2)
    windows = np.stack([common.fit_frames(spec[:, s:]) for s in starts])
    predict.score_batch(model, windows[:batch_size], norm_mean, norm_std)  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(windows), batch_size):
        predict.score_batch(model, windows[i:i + batch_size], norm_mean, norm_std)
    times["scoring"] = time.perf_counter() - t0
    times["windows"] = len(starts)
    return times


def time_predict_folder(folder, checkpoint_path, workers):
    """(seconds, CPU seconds of other processes meanwhile or None) of one predict.main run
    over the folder, its printout discarded."""
    import contextlib
    import io

    import predict

    busy0, mine0 = busy_cpu_seconds(), os.times()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        predict.main([str(folder), "--checkpoint", str(checkpoint_path), "--workers", str(workers)])
    seconds = time.perf_counter() - t0
    busy1, mine1 = busy_cpu_seconds(), os.times()
    if busy0 is None:
        return seconds, None
    mine = sum(mine1[:4]) - sum(mine0[:4])  # this process and its (reaped) decoders
    return seconds, max(busy1 - busy0 - mine, 0) / seconds


def time_decode_folder(folder, workers):
    """Seconds for predict.py's decoder pool alone to turn every file of the folder into
    log-mel (predict.decode_all consumed, nothing scored): the rate a fast GPU would see."""
    import predict

    paths, _ = predict.expand_inputs([str(folder)])
    t0 = time.perf_counter()
    for path, result in predict.decode_all(paths, workers):
        if isinstance(result, Exception):
            raise SystemExit(f"error: {result}")
    return time.perf_counter() - t0


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
    """predict.py over a folder of --tracks 4-minute 44.1 kHz stereo MP3s: tracks per minute
    by --workers count (best of --runs, counts taking turns), the seconds per stage of one
    track, and the peak memory of one --memory-minutes long WAV (44.1 kHz stereo, 16-bit)."""
    if not args.clip.is_file():
        raise SystemExit(f"error: {args.clip} not found; pass --clip with any audio file")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = tmp / "best_model.pt"
        random_checkpoint(checkpoint)
        folder = tmp / "music"
        folder.mkdir()
        write_track(folder / "track0.mp3", args.clip, 4, format="MP3")
        for i in range(1, args.tracks):
            shutil.copyfile(folder / "track0.mp3", folder / f"track{i}.mp3")
        stages = time_predict_stages(folder / "track0.mp3", checkpoint)
        total = sum(v for k, v in stages.items() if k != "windows")
        print(f"one 4-minute 44.1 kHz stereo MP3 ({stages['windows']} windows): " + ", ".join(
            f"{k} {stages[k]:.2f} s ({100 * stages[k] / total:.0f}%)"
            for k in ("decode", "resample", "mel", "scoring")), flush=True)
        results["stages_s"] = stages
        rates = {workers: [] for workers in args.predict_workers}
        decode_rates = {workers: [] for workers in args.predict_workers}
        for run in range(args.runs):  # worker counts take turns, so that they see the same load
            for workers in args.predict_workers:
                seconds, others = time_predict_folder(folder, checkpoint, workers)
                rates[workers].append(args.tracks / seconds * 60)
                decode_rates[workers].append(args.tracks / time_decode_folder(folder, workers) * 60)
                print(f"  run {run + 1}, --workers {workers}: {rates[workers][-1]:.1f} tracks/min "
                      f"tagged, {decode_rates[workers][-1]:.1f} tracks/min decoded alone"
                      + (f"; other processes used {others:.2f} of {os.cpu_count()} cores while "
                         "tagging" if others is not None else ""), flush=True)
        first = args.predict_workers[0]
        for name, by_workers in (("tagged (predict.py)", rates), ("decoded alone", decode_rates)):
            best = {workers: max(r) for workers, r in by_workers.items()}
            for workers, rate in best.items():
                print(f"{name}, --workers {workers}, best of {args.runs}: {rate:.1f} tracks/min "
                      f"(x{rate / best[first]:.2f} of --workers {first})", flush=True)
            results["tracks_per_min" if by_workers is rates else "decoded_tracks_per_min"] = best
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

    import gen_spectrograms

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
    plumbing.write_json(data_dir / "spectrograms.json", dict(
        gen_spectrograms.settings_of(n_clips, "float16", mp3_paths), shape=list(shape), failed=[],
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
