"""Speed figures: a log-mel's stages, gen_spectrograms.py, trainer.py, predict.py, the paper's run.

    python src/benchmark.py                              # features, train, predict
    python src/benchmark.py --what paper --device cuda   # trainer.py at the paper's size
"""
import argparse
import csv
import gzip
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch
from torch.utils.benchmark import Timer

import common
import devices
import formats
import gen_spectrograms
import plumbing
import predict
import trainer

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("MTAT_FIXTURES", ROOT / "tests" / "fixtures"))
LIBRARY = ((30, 0.5), (10, 4), (1, 1))  # predict's music library in small: (files, minutes each)
LIBRARY_TEXT = " + ".join(f"{n} x {m * 60:g} s" for n, m in LIBRARY) + " of 44.1 kHz stereo MP3"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add, at_least, n = p.add_argument, plumbing.at_least, plumbing.at_least(1)
    add("--what", choices=[*BENCHMARKS, "all"], default="all", help="default: all = features, train, predict")
    add("--clip", type=Path, default=FIXTURES / "joram-moments_of_clarity-08-solipsism-59-88.mp3",
        help="audio clip to time; its copies make the data sets (default: the MTAT clip in tests/fixtures/)")
    add("--repeats", type=n, default=20, help="features: timed runs per stage of one log-mel (default: 20)")
    add("--n-clips", type=n, default=200, help="features: clips per extraction run (default: 200)")
    add("--workers", type=n, nargs="+", default=[1, 2], help="features: extraction workers (default: 1 2)")
    add("--runs", type=n, default=3, help="whole-run rounds, the best (features) or median kept (default: 3)")
    add("--cold-start", action="store_true", help="features: also time a fresh install's first log-mel")
    add("--device", default="auto", help="train, paper: auto | cpu | cuda (default: auto)")
    add("--steps", type=n, default=200, help="train: steps per timed run (default: 200; ~3 on a CPU)")
    add("--batch-size", type=n, default=32, help="train, paper: clips per step (default: 32)")
    add("--scales", type=int, nargs="+", choices=common.SCALES, default=list(common.SCALES), metavar="S",
        help="train, paper: the network's branches, as trainer.py --scales (default: 1 2 3, the paper's)")
    add("--compile", action="store_true", help="train: also time the fast path with trainer.py --compile")
    add("--eval-clips", type=n, default=7863, help="train: clips scored per pass (default: 7,863)")
    add("--folder", type=Path, help=f"predict: a folder of your music (default: {LIBRARY_TEXT} from --clip)")
    add("--predict-workers", type=n, nargs="+", help="predict: predict.py --workers (default: 1, all cores)")
    add("--memory-minutes", type=n, nargs="*", default=[10, 30, 60], help="predict: peak MiB of N-min WAVs")
    add("--epochs", type=at_least(2), default=3, help="paper: epochs timed, projected to 40 (default: 3)")
    add("--paper-clips", type=at_least(20), default=common.N_CLIPS, help="paper: rows (fewer: random split)")
    add("--data-dir", type=Path, help="paper: this data folder's spectrograms (default: random ones)")
    add("--trainer-flags", default="", help="paper: more trainer.py flags, e.g. \"--precision fp32\"")
    args = p.parse_args(argv)
    if args.what in ("all", "features", "predict") and not args.clip.is_file():
        p.error(f"--clip {args.clip}: not found; pass --clip with any audio file")
    return args


def timed(stmt, runs=1, **names):
    """(seconds per run of stmt, its value): torch.utils.benchmark's Timer, warm-up runs then `runs` timed."""
    value = [None]
    timer = Timer(f"_value[0] = {stmt}", globals={**names, "_value": value},
                  num_threads=torch.get_num_threads())
    return timer.timeit(runs).median, value[0]


def paired_rounds(settings, runs, measure):  # {setting: [measure(setting, run)]}, the settings taking turns
    rounds = [[measure(setting, run) for setting in settings] for run in range(runs)]
    return {setting: [measured[i] for measured in rounds] for i, setting in enumerate(settings)}


def pipeline_seconds(path, runs=1, log_mel="log-mel"):
    """common's pipeline on one file, stage by stage -> (seconds by stage, spec (N_MELS, n), duration_s)."""
    names = {"common": common, "path": str(path), "rate": common.decode(str(path))[0]}
    decode_s, names["blocks"] = timed("list(common.decode(path)[1])", runs, **names)
    resample_s, names["resampled"] = timed("list(common.resample(rate, blocks))", runs, **names)
    log_mel_s, frames = timed("list(common.log_mel_frames(resampled))", runs, **names)
    return ({"decode": decode_s, "resample": resample_s, log_mel: log_mel_s},
            np.concatenate(frames, axis=1), sum(map(len, names["resampled"])) / common.SAMPLE_RATE)


def time_log_mel(clip_path, repeats=20, blas_threads=1):
    """Seconds per stage of one log-mel (pipeline_seconds), and in all, at blas_threads (None: one a core)."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=blas_threads):
        total_s = timed("common.log_mel(path)", repeats, common=common, path=str(clip_path))[0]
        return {**pipeline_seconds(clip_path, repeats, log_mel="mel")[0], "total": total_s}


def time_extraction(workers, n_clips, clip_path, runs=3):
    """Clips/s of gen_spectrograms.main on n_clips copies of the clip: the best of `runs`, each printed."""
    def busy_cpu_seconds():  # the whole machine's since boot (Linux's /proc/stat), or None
        if not os.path.exists("/proc/stat"):
            return None
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
    rates, paths = [], [f"{i % 16:x}/copy-{i}{Path(clip_path).suffix}" for i in range(n_clips)]
    with tempfile.TemporaryDirectory() as data_dir:
        for path in paths:
            (Path(data_dir) / "mp3" / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(clip_path, Path(data_dir) / "mp3" / path)
        lines = ['"clip_id"\t"tag"\t"mp3_path"'] + [f'"{i}"\t"0"\t"{path}"' for i, path in enumerate(paths)]
        (Path(data_dir) / "annotations_final.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode())
        common.warm_up()
        for _ in range(runs):
            busy0, mine0 = busy_cpu_seconds(), os.times()
            done = gen_spectrograms.main(["--data-dir", data_dir, "--workers", str(workers), "--overwrite"])
            busy1, mine1 = busy_cpu_seconds(), os.times()
            rates.append(done["clips_per_s"])
            mine = sum(mine1[:4]) - sum(mine0[:4])  # this process and its (reaped) workers
            line = (f"  {workers} worker(s): {rates[-1]:.1f} clips/s, "
                    f"{mine / done['n_computed'] * 1000:.0f} CPU ms per clip")
            if busy0 is not None:
                others = max(busy1 - busy0 - mine, 0) / done["seconds"]
                line += f"; other processes used {others:.2f} of {os.cpu_count()} cores meanwhile"
            print(line, flush=True)
    return max(rates)


def features_benchmark(args):
    """Seconds per stage of one log-mel, a fresh process's one-off seconds, clips/s by --workers."""
    results = {}
    for name, threads in (("log_mel_s", 1), ("log_mel_s_default_blas_threads", None)):
        results[name] = stages = time_log_mel(args.clip, args.repeats, blas_threads=threads)
        print(f"{name}: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in stages.items()), flush=True)
    code = ("import json, sys, time; t = time.perf_counter; sys.path.insert(0, sys.argv[1]); t0 = t(); "
            "import common; t1 = t(); common.log_mel(sys.argv[2]); t2 = t(); common.log_mel(sys.argv[2]); "
            "print(json.dumps(dict(import_common=t1 - t0, first_log_mel=t2 - t1, second_log_mel=t() - t2)))")
    for name, cache in [("first_call_s", "warm")] + [("first_call_cold_s", "cold")] * args.cold_start:
        with tempfile.TemporaryDirectory() as empty:  # a cold cache: numba compiles, as on a fresh install
            env = {**os.environ, "NUMBA_CACHE_DIR": empty} if cache == "cold" else None
            out = subprocess.run([sys.executable, "-c", code, ROOT / "src", args.clip], env=env,
                                 capture_output=True, text=True, check=True).stdout
        results[name] = costs = json.loads(out.splitlines()[-1])
        print(f"fresh process, {cache} numba cache: " + ", ".join(f"{k} {v:.2f} s" for k, v in costs.items()))
    rounds = paired_rounds(args.workers, args.runs,
                           lambda workers, _: time_extraction(workers, args.n_clips, args.clip, runs=1))
    results["clips_per_s"] = rates = {workers: max(r) for workers, r in rounds.items()}
    for workers, rate in rates.items():
        print(f"gen_spectrograms.py, {workers} worker(s), best of {args.runs}: {rate:.1f} clips/s "
              f"(x{rate / rates[args.workers[0]]:.2f} of {args.workers[0]}); "
              f"all {common.N_CLIPS:,} MTAT clips in {common.N_CLIPS / rate / 60:.1f} min", flush=True)
    return results


def forward_flops(n_tags=50, scales=common.SCALES):
    """FLOPs of one clip's forward pass (torch.utils.flop_counter: convolutions, dense layers)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        common.MSCNN(n_tags, scales=scales).eval()(torch.zeros(1, 1, common.N_MELS, common.N_FRAMES))
    return counter.get_total_flops()


def setup(device, mode, n_clips, scales):
    """(args, source, model, norm) on random log-mels: 'baseline' a plain port's, 'fast' trainer.py's."""
    host = np.random.default_rng(0).normal(-8, 2, (n_clips, common.N_MELS, common.N_FRAMES))
    norm = torch.full((common.N_MELS,), -8.0, device=device), torch.full((common.N_MELS,), 2.0, device=device)
    if mode == "baseline":
        torch.backends.cudnn.benchmark = False
        return None, host.astype(np.float32), common.MSCNN(scales=scales).to(device), norm
    args = trainer.parse_args(["--device", device.type] + ["--compile"] * (mode == "fast+compile"))
    devices.resolve_speed_choices(args, device, host.nbytes // 4)  # float16
    model = devices.parallel(devices.on_device(common.MSCNN(scales=scales), device), device, args, 1)[0]
    return args, devices.to_device_source(host.astype(np.float16), device, args.resident), model, norm


def time_mode(device, mode, steps, batch_size, eval_clips, scales=common.SCALES):
    """(seconds per training step, seconds to score eval_clips) of the mode, on setup's data."""
    torch.manual_seed(0)
    n_stored = 4 * batch_size  # a small pool of clips to draw batches from
    labels = torch.from_numpy((np.random.default_rng(1).random((n_stored, 50)) < 0.1).astype(np.float32))
    batches = np.stack([np.sort(np.random.default_rng(i).choice(n_stored, batch_size, replace=False))
                        for i in range(steps)])
    args, source, model, norm = setup(device, mode, n_stored, scales)
    optimizer = torch.optim.Adam(model.train().parameters(), lr=1e-3, fused=bool(args and args.fused_adam))
    names = {"trainer": trainer, "model": model, "optimizer": optimizer, "source": source, "norm": norm,
             "batches": batches, "device": device, "bf16": bool(args) and args.precision == "bf16"}
    step = ("trainer.train_epoch(model, optimizer, source, labels, batches, norm, bf16)" if args else
            "[trainer.train_step(model, optimizer, common.normalise(torch.from_numpy(source[rows])"
            ".to(device), *norm), labels[rows].to(device), False) for rows in batches]")
    names.update(common=common, torch=torch, labels=labels.to(device) if args else labels)
    step_s = timed(step, 3, **names)[0] / steps
    _, names["source"], names["model"], _ = setup(device, mode, eval_clips, scales)
    names.update(rows=np.arange(eval_clips), bs=args.eval_batch_size if args else 32)
    return step_s, timed("trainer.predict_rows(model, source, rows, norm, bs, device, bf16)", 2, **names)[0]


def train_benchmark(args):
    """ms/step, clips/s, TFLOP/s and scoring clips/s of each path; the paper's 40 epochs projected (s)."""
    device, scales = devices.resolve_device(args.device), tuple(sorted(set(args.scales)))
    flops = forward_flops(scales=scales)
    print(f"MSCNN, scales {' '.join(map(str, scales))}, forward: {flops / 1e9:.2f} GFLOP per clip, "
          f"training step ~3x: {3 * flops / 1e9:.2f} GFLOP per clip; device {device}", flush=True)
    results = {"device": str(device), "scales": list(scales), "forward_gflop_per_clip": flops / 1e9}
    paper_steps = len(trainer.epoch_batches(np.arange(18000), args.batch_size))  # an epoch's, 18,000 clips
    print("path           ms/step   clips/s  TFLOP/s  eval clips/s  40 epochs speed-up")
    for mode in ("baseline", "fast") + ("fast+compile",) * args.compile:
        step_s, eval_s = time_mode(device, mode, args.steps, args.batch_size, args.eval_clips, scales)
        eval_rate = args.eval_clips / eval_s
        projected_s = 40 * (paper_steps * step_s + 7863 / eval_rate)
        results[mode] = row = {"ms_per_step": 1000 * step_s, "clips_per_s": args.batch_size / step_s,
                               "tflops": 3 * flops * args.batch_size / step_s / 1e12,
                               "eval_clips_per_s": eval_rate, "projected_40_epochs_s": projected_s}
        row["speedup"] = results.get("baseline", row)["ms_per_step"] / row["ms_per_step"]
        print(f"{mode:12} {row['ms_per_step']:9.1f} {row['clips_per_s']:9.1f} {row['tflops']:8.3f} "
              f"{eval_rate:13.1f} {format_duration(projected_s):>10} {row['speedup']:7.2f}x", flush=True)
    results["speedup"] = results["fast"]["speedup"]
    return results


def format_duration(seconds):
    return f"{seconds:.0f} s" if seconds < 120 else (
        f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h")


def write_track(path, clip_path, minutes, sample_rate=44100, format=None):
    """A stereo track `minutes` long of the clip looped, written by blocks (an hour never in memory)."""
    import librosa
    clip = librosa.resample(common.load_audio(clip_path), orig_sr=common.SAMPLE_RATE, target_sr=sample_rate)
    stereo, n_samples = np.stack([clip, 0.8 * clip], axis=1), int(minutes * 60 * sample_rate)
    with soundfile.SoundFile(path, "w", sample_rate, 2, format=format) as f:
        for start in range(0, n_samples, len(stereo)):
            f.write(stereo[:n_samples - start])


def stage_seconds(task):
    """Seconds per stage of tagging task's (paths, checkpoint) as predict.py's workers do, summed."""
    torch.set_num_threads(1)  # BLAS and OpenMP: one thread already (plumbing.start_worker)
    model, tags, mean, std, _ = predict.load_checkpoint(task[1], torch.device("cpu"))
    times = dict.fromkeys(("decode", "resample", "log-mel", "network"), 0.0)
    names = dict(predict=predict, model=model, tags=tags, mean=mean, std=std)
    for path in task[0]:
        stages, names["spec"], names["duration_s"] = pipeline_seconds(path)
        stages["network"] = timed("predict.score_file(spec, duration_s, model, tags, mean, std)", **names)[0]
        times = {stage: seconds + stages[stage] for stage, seconds in times.items()}
    return times


def run_predict(label, *arguments):
    """(wall s, CPU s, peak MiB) of `python src/predict.py ARGUMENTS`, printed; via a small process."""
    code = ("import resource, subprocess as sp, sys, time; t = time.perf_counter; t0 = t(); done = "
            "sp.run(sys.argv[1:], stdout=sp.DEVNULL, stderr=sp.PIPE, text=True); wall = t() - t0; use = "
            "resource.getrusage(resource.RUSAGE_CHILDREN); print(done.returncode, wall, use.ru_utime + "
            "use.ru_stime, use.ru_maxrss, (done.stderr.strip().splitlines() or [''])[-1])")
    command = [sys.executable, "-c", code, sys.executable, ROOT / "src" / "predict.py", *map(str, arguments)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.split(maxsplit=4)
    if out[0] != "0":
        raise SystemExit(f"error: predict.py {' '.join(map(str, arguments))} failed: {' '.join(out[4:])}")
    wall, cpu, peak = float(out[1]), float(out[2]), int(out[3]) / 1024  # Linux reports KiB
    print(f"  {label}: {wall:.2f} s wall, {cpu:.2f} s CPU, peak memory {peak:.0f} MiB", flush=True)
    return wall, cpu, peak


def predict_benchmark(args):
    """predict.py on --folder or LIBRARY by --workers (medians of --runs), seconds per stage, peak MiB."""
    settings = args.predict_workers or sorted({1, predict.default_workers()})
    with tempfile.TemporaryDirectory() as tmp:
        folder, checkpoint = args.folder or Path(tmp) / "music", Path(tmp) / "best_model.pt"
        torch.manual_seed(0)  # untrained weights in trainer.py's format: predict.py's speed is the same
        norm = torch.full((common.N_MELS,), -8.0), torch.full((common.N_MELS,), 3.0)
        untrained = dict(data=dict(annotations="none (random weights, for timing)", dataset="other"),
                         split=dict(name="none", n_train=0, n_val=0, n_test=0))
        formats.save_best_model(checkpoint, common.MSCNN(50).state_dict(), [f"tag{i}" for i in range(50)],
                                norm, {}, 1, {}, untrained)
        if args.folder is None:  # LIBRARY, the lengths shuffled, each written once (write_track), then copied
            folder.mkdir()
            minutes = [m for n_files, m in LIBRARY for _ in range(n_files)]
            random.Random(0).shuffle(minutes)
            for i, m in enumerate(minutes):
                if (first := folder / f"track_{minutes.index(m):02d}.mp3").exists():
                    shutil.copyfile(first, folder / f"track_{i:02d}.mp3")
                else:
                    write_track(first, args.clip, m, format="MP3")
        paths = sorted(folder.glob("*.mp3")) if args.folder is None else [
            Path(p) for p in predict.expand_inputs([str(folder)])[0] if folder.is_dir()]
        if not paths:
            raise SystemExit(f"error: --folder {folder}: no {'/'.join(predict.AUDIO_EXTENSIONS)} files")
        hours = sum(soundfile.info(str(p)).duration for p in paths) / 3600
        print(f"folder: {len(paths)} files, {hours:.2f} h of audio{f' ({LIBRARY_TEXT})' * (not args.folder)}")
        [(_, stages)] = plumbing.pool_results(stage_seconds, [(paths, checkpoint)], 1)
        if isinstance(stages, Exception):
            raise SystemExit(f"error: timing the stages failed: {stages}")
        print("where the time goes, one thread: " + ", ".join(
            f"{stage} {s:.2f} s ({100 * s / sum(stages.values()):.0f}%)" for stage, s in stages.items()))
        results = {"stages_s": stages, "predict_runs": {}, "peak_mib": {}}
        rounds = paired_rounds(settings, args.runs, lambda workers, run: run_predict(
            f"round {run + 1}, --workers {workers}", folder, "--checkpoint", checkpoint, "--workers", workers,
            "--csv", Path(tmp) / f"tags_{workers}_{run}.csv"))
        for workers, runs in rounds.items():
            (walls, cpus, _), wall = map(list, zip(*runs)), statistics.median(r[0] for r in runs)
            results["predict_runs"][workers] = row = {
                "wall_s": wall, "tracks_per_min": len(paths) / wall * 60, "walls_s": walls, "cpus_s": cpus,
                "cpu_per_wall": statistics.median(c / w for c, w in zip(cpus, walls)),
                "speedup": statistics.median(r0[0] / r[0] for r0, r in zip(rounds[settings[0]], runs))}
            print(f"--workers {workers}, median of {args.runs}: {wall:.2f} s, {row['tracks_per_min']:.1f} "
                  f"tracks/min, CPU time {row['cpu_per_wall']:.2f} x wall time, x{row['speedup']:.2f} the "
                  f"speed of --workers {settings[0]}", flush=True)
        results["same_output"] = len({path.read_text() for path in Path(tmp).glob("tags_*.csv")}) == 1
        print("the CSVs of every setting: " + ("identical" if results["same_output"] else "DIFFERENT"))
        for minutes in args.memory_minutes:
            write_track(wav := Path(tmp) / f"long_{minutes}min.wav", args.clip, minutes)
            results["peak_mib"][minutes] = run_predict(
                f"one {minutes}-minute 44.1 kHz stereo WAV ({wav.stat().st_size >> 20} MiB), --workers 0",
                wav, "--checkpoint", checkpoint, "--workers", 0)[2]
            wav.unlink()
    return results


def paper_benchmark(args):
    """trainer.main for --epochs on --paper-clips rows: seconds per epoch, start-up, 40 epochs projected."""
    device = devices.resolve_device(args.device)
    flags = ["--epochs", str(args.epochs), "--device", device.type, "--scales", *map(str, args.scales)]
    if args.paper_clips < common.N_CLIPS:
        flags += ["--split", "random", "--train-size", str(args.paper_clips * 7 // 10), "--val-size",
                  str(args.paper_clips // 10), "--batch-size", str(args.batch_size)]
    flags += shlex.split(args.trainer_flags)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir, n = args.data_dir or Path(tmp) / "data", args.paper_clips
        if args.data_dir is None:  # random float16 log-mels, labelled by the real MTAT annotations
            t0, annotations = time.perf_counter(), FIXTURES / "annotations_final.csv.gz"
            if not annotations.is_file():
                raise SystemExit(f"error: {annotations} not found: restore tests/fixtures/")
            data_dir.mkdir(parents=True, exist_ok=True)
            csv_path = data_dir / "annotations_final.csv"
            csv_path.write_bytes(gzip.decompress(annotations.read_bytes()))
            shape, rng = (n, common.N_MELS, common.N_FRAMES), torch.Generator(device).manual_seed(0)
            spectrograms = np.lib.format.open_memmap(data_dir / "spectrograms.npy", "w+", np.float16, shape)
            for start in range(0, n, 1024):
                chunk = torch.randn((min(1024, n - start), *shape[1:]), generator=rng, device=device)
                spectrograms[start:start + 1024] = chunk.mul_(2).sub_(8).half().cpu().numpy()
            spectrograms.flush()
            torch.cuda.empty_cache()  # (no-op without CUDA) the trainer checks the GPU's free memory
            settings = formats.spectrogram_settings(n, "float16", common.read_annotations(csv_path)[3])
            plumbing.write_json(data_dir / "spectrograms.json", formats.spectrogram_meta(
                settings, note="random values written by src/benchmark.py --what paper, for timing only"))
            print(f"random spectrograms: {n:,} rows written in {time.perf_counter() - t0:.1f} s", flush=True)
        t0 = time.perf_counter()
        trainer.main(["--data-dir", str(data_dir), "--out", tmp, "--run", "paper"] + flags)
        wall_s = time.perf_counter() - t0
        with open(Path(tmp) / "paper" / "metrics.csv", newline="") as f:
            epoch_s = [float(row["seconds"]) for row in csv.DictReader(f)]
    startup_s = wall_s - sum(epoch_s)
    projected_s = startup_s + epoch_s[0] + 39 * statistics.median(epoch_s[1:])
    print(f"trainer.py {' '.join(flags)}: epochs " + ", ".join(f"{s:.1f}" for s in epoch_s)
          + f" s, start-up {startup_s:.1f} s; 40 epochs projected {format_duration(projected_s)}", flush=True)
    return {"device": str(device), "n_clips": args.paper_clips, "epoch_s": epoch_s, "startup_s": startup_s,
            "projected_40_epochs_s": projected_s}


BENCHMARKS = {"features": features_benchmark, "train": train_benchmark, "predict": predict_benchmark,
              "paper": paper_benchmark}  # --what: args -> a dict of figures
ALL = ("features", "train", "predict")  # --what all: what a CPU can run in minutes


def main(argv=None):
    args = parse_args(argv)
    print(f"machine: {os.cpu_count()} CPU cores; python {sys.version.split()[0]}", flush=True)
    return {name: BENCHMARKS[name](args) for name in (ALL if args.what == "all" else [args.what])}


if __name__ == "__main__":  # SIGTERM and SIGHUP as Ctrl-C: its temporary folders are removed
    plumbing.run_script(main, "interrupted: no figure of the unfinished benchmark was kept")
