"""One command for a session with a lent CUDA GPU: the CUDA tests, the training benchmark
(eager and --compile) and the paper's run timed at full size, every figure in one JSON
file. It fits one 10-minute call of the device tool with room for installs (docs/gpu.md).

    python3 src/gpu_session.py                                     # on the GPU machine
    python3 src/gpu_session.py --parts benchmark paper_run_fp32    # a second call: the rest
    python3 src/gpu_session.py --device cpu --tiny --no-compile    # dry run on a CPU (CI)

The parts, in this order; each but `data` is a subprocess with its own time limit, so a
hang or a crash in one leaves the others' figures, and the file is rewritten after each:

  data               random float16 spectrograms (normal, mean -8, std 2) for all 25,863
                     MTAT rows (18,000 train + 2,000 validation + 5,863 test, the paper's
                     split), written to disk on this machine beside the real annotations
                     (tests/fixtures/annotations_final.csv.gz); 4.2 GB
  paper_run          trainer.py --split paper with its defaults for --epochs epochs: from
                     spectrograms on disk, validation and test scored every epoch, as the
                     paper's run; projected to 40 epochs (see project_40_epochs)
  cuda_tests         pytest tests/test_cuda.py: each test's outcome, seconds and the
                     differences it measured
  paper_run_fp32     paper_run without the GPU's choices (--precision fp32 --no-fused-adam
                     --no-resident --no-cudnn-benchmark): the trainer's own baseline
  benchmark          benchmark.py --what train (--compile): ms/step, clips/s, TFLOP/s and
                     scoring rate of the baseline (plain fp32 port), the fast path and
                     fast+compile, each projected to the paper's 40 epochs
  paper_run_compile  paper_run with --compile

A part that would start with less than 30 s of --budget-s left is skipped and says so; a
second call with --parts runs it. Exit status 1 when any part failed or timed out.
"""
import argparse
import csv
import gzip
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import torch

import common
from benchmark import format_duration

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["data", "paper_run", "cuda_tests", "paper_run_fp32", "benchmark", "paper_run_compile"]
CAP_S = dict(paper_run=150, cuda_tests=300, paper_run_fp32=150, benchmark=180, paper_run_compile=180)
TEST_CAP_S = 150  # per CUDA test, where pytest-timeout is installed (the GPU machine has it)
MIN_PART_S = 30  # a part is not started with less time than this left
FP32_FLAGS = ["--precision", "fp32", "--no-fused-adam", "--no-resident", "--no-cudnn-benchmark"]
# sizes: the paper's, or --tiny's for a dry run of everything on a CPU in under a minute
FULL = dict(n_clips=common.N_CLIPS, split=[], steps=100, batch_size=32, eval_clips=7863)
TINY = dict(n_clips=24, split=["--split", "random", "--train-size", "8", "--val-size", "8", "--batch-size", "8"],
            steps=1, batch_size=2, eval_clips=4)
BENCHMARK_CODE = ("import json, sys; sys.path.insert(0, sys.argv[1]); import benchmark; "
                  "print('FIGURES ' + json.dumps(benchmark.main(sys.argv[2:])['train']))")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda | cpu | auto (default: cuda)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS, metavar="PART",
                   help=f"parts to run, in the order above: {' '.join(PARTS)} (default: all); "
                        "data is made whenever a paper run needs it")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs of each paper run, projected to 40 (default: 3; --tiny: 2)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time --compile: benchmark.py --compile and paper_run_compile (default: on)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny sizes (24 clips, --split random, 1 benchmark step of 2 clips): "
                        "a dry run of the parts that need no GPU, for CI")
    p.add_argument("--budget-s", type=float, default=540,
                   help="seconds for all parts; later parts are skipped when it runs out "
                        "(default: 540, one 10-minute device call less room for installs)")
    p.add_argument("--out-file", type=Path, default=None,
                   help="the figures (JSON; the full log beside it, .log) (default: "
                        "$OUT/gpu_session.json when $OUT is set, else experiments/gpu_session.json)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="where the data and runs go, removed at the end (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = 2 if args.tiny else 3
    if args.epochs < 2:
        p.error("--epochs must be at least 2: the first epoch pays the start-up costs")
    if args.work_dir is not None and not args.work_dir.is_dir():
        p.error(f"--work-dir {args.work_dir} is not an existing folder")
    if args.out_file is None:
        out = os.environ.get("OUT")
        args.out_file = (Path(out) if out else ROOT / "experiments") / "gpu_session.json"
    if not args.compile:
        args.parts = [part for part in args.parts if part != "paper_run_compile"]
    return args


# -----------------------------------------------------------------------------
# data
def write_random_spectrograms(data_dir, n_clips, device, seed=0, chunk_rows=1024):
    """DATA/spectrograms.npy (+ .json) as gen_spectrograms.py writes them, but random:
    float16 (n_clips, N_MELS, N_FRAMES), normal with mean -8 and std 2 (about a log-mel's),
    drawn on `device` chunk by chunk and streamed to disk; and DATA/annotations_final.csv,
    the real MTAT annotations (their first n_clips rows label the rows).
    Returns the bytes of the .npy file."""
    data_dir.mkdir(parents=True, exist_ok=True)
    annotations = Path(os.environ.get("MTAT_FIXTURES") or ROOT / "tests" / "fixtures") / "annotations_final.csv.gz"
    if not annotations.is_file():
        raise SystemExit(f"error: {annotations} not found: the real MTAT annotations label the random "
                         "spectrograms; restore tests/fixtures/ from git (or fix $MTAT_FIXTURES)")
    with gzip.open(annotations) as src, \
            common.atomic_write(data_dir / "annotations_final.csv", "wb") as dst:
        shutil.copyfileobj(src, dst)
    shape = (n_clips, common.N_MELS, common.N_FRAMES)
    generator = torch.Generator(device).manual_seed(seed)
    with common.atomic_write(data_dir / "spectrograms.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, dict(descr=np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                                                     fortran_order=False, shape=shape))
        for start in range(0, n_clips, chunk_rows):
            rows = min(chunk_rows, n_clips - start)
            chunk = torch.randn((rows,) + shape[1:], generator=generator, device=device)
            f.write(chunk.mul_(2).sub_(8).half().cpu().numpy().tobytes())
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the GPU's memory is the runs' (the trainer checks what is free)
    meta = dict(common.feature_params(), dtype="float16", n_clips=n_clips, shape=list(shape), failed=[],
                note="random values written by src/gpu_session.py, for timing only")
    with common.atomic_write(data_dir / "spectrograms.json") as f:
        f.write(json.dumps(meta, indent=1) + "\n")
    return (data_dir / "spectrograms.npy").stat().st_size


# -----------------------------------------------------------------------------
# parts
def run_logged(command, timeout_s, log_path):
    """Run command (a list) from the repository root, its output appended to log_path.

    Returns (status, seconds, output): status 'ok' (exit 0), 'failed' (another exit) or
    'timeout' (its whole process group killed after timeout_s)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(map(str, command))}\n")
        log.flush()
        proc = subprocess.Popen([str(c) for c in command], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout_s)
            status = "ok" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun's and pytest's children too
            output, _ = proc.communicate()
            status = "timeout"
        log.write(output)
    return status, time.perf_counter() - started, output


def project_40_epochs(wall_s, epoch_s):
    """The 40-epoch time of a run timed for len(epoch_s) epochs: its start-up (the wall
    time outside the epochs: imports, data, upload, band statistics, checkpoints), its
    first epoch (which pays cuDNN's autotuning and compilation) and 39 epochs at the
    median of the others. Checkpoint writes are counted once per timed epoch, not 40."""
    startup_s = wall_s - sum(epoch_s)
    return startup_s, startup_s + epoch_s[0] + 39 * statistics.median(epoch_s[1:])


def paper_run(name, extra_flags, data_dir, work_dir, args, sizes, device, timeout_s, log_path):
    """trainer.py on the session's data for args.epochs epochs; its figures."""
    command = [sys.executable, ROOT / "src" / "trainer.py", "--data-dir", data_dir, "--out", work_dir / "runs",
               "--run", name, "--epochs", str(args.epochs), "--device", device.type] + sizes["split"] + extra_flags
    status, seconds, output = run_logged(command, timeout_s, log_path)
    figures = dict(status=status, command=" ".join(map(str, command[1:])).replace(str(ROOT) + "/", ""),
                   wall_s=round(seconds, 2))
    if status != "ok":
        return dict(figures, output_tail=output[-2000:])
    run_dir = work_dir / "runs" / name
    with open(run_dir / "metrics.csv", newline="") as f:
        epoch_s = [float(row["seconds"]) for row in csv.DictReader(f)]
    saved = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["args"]
    startup_s, projected_s = project_40_epochs(seconds, epoch_s)
    results = json.loads((run_dir / "results.json").read_text())
    return dict(figures, epoch_s=epoch_s, startup_s=round(startup_s, 2), projected_40_epochs_s=round(projected_s, 1),
                choices={k: saved[k] for k in ("precision", "fused_adam", "resident", "cudnn_benchmark", "compile")},
                val_roc_auc=results["val_roc_auc"])


def cuda_tests(work_dir, timeout_s, log_path):
    """pytest tests/test_cuda.py; per test: outcome, seconds, message, measured properties."""
    xml_path = work_dir / "cuda_tests.xml"
    command = [sys.executable, "-m", "pytest", "-v", "-rA", "-p", "no:cacheprovider", "-o", "junit_family=xunit1",
               f"--junitxml={xml_path}", f"--basetemp={work_dir / 'pytest'}", "tests/test_cuda.py"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        command.append(f"--timeout={TEST_CAP_S}")  # a hung test fails alone; the others still report
    status, seconds, output = run_logged(command, timeout_s, log_path)
    figures = dict(status=status, seconds=round(seconds, 1))
    if not xml_path.is_file():  # pytest was killed before writing it: the outcomes it printed
        tests = [dict(name=name, outcome=outcome.lower())
                 for name, outcome in re.findall(r"::(\w+) (PASSED|FAILED|SKIPPED|ERROR)", output)]
        figures["output_tail"] = output[-2000:]
    else:
        tests = junit_outcomes(xml_path)
    counts = {outcome: sum(t["outcome"] == outcome for t in tests)
              for outcome in ("passed", "failed", "error", "skipped")}
    return dict(figures, **counts, tests=tests)


def junit_outcomes(xml_path):
    """Per test of a junit XML file: name, outcome, seconds, message, measured properties."""
    tests = []
    for case in ElementTree.parse(xml_path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome, message = {"failure": "failed"}.get(child.tag, child.tag), child.get("message", "")
        properties = {p.get("name"): number_or_text(p.get("value")) for p in case.iter("property")}
        tests.append(dict(name=case.get("name"), outcome=outcome, seconds=float(case.get("time", 0)),
                          message=message[:500], measured=properties))
    return tests


def number_or_text(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def benchmark(args, sizes, device, timeout_s, log_path):
    """benchmark.py --what train on the session's device; its figures."""
    flags = ["--what", "train", "--device", device.type, "--steps", str(sizes["steps"]),
             "--batch-size", str(sizes["batch_size"]), "--eval-clips", str(sizes["eval_clips"])]
    flags += ["--compile"] if args.compile else []
    status, seconds, output = run_logged([sys.executable, "-c", BENCHMARK_CODE, ROOT / "src"] + flags,
                                         timeout_s, log_path)
    lines = [line for line in output.splitlines() if line.startswith("FIGURES ")]
    if status != "ok" or not lines:
        return dict(status="failed" if status == "ok" else status, seconds=round(seconds, 1),
                    output_tail=output[-2000:])
    return dict(status=status, seconds=round(seconds, 1), command="src/benchmark.py " + " ".join(flags),
                **json.loads(lines[-1][len("FIGURES "):]))


def machine(device):
    """What the figures were measured on."""
    info = dict(python=platform.python_version(), torch=torch.__version__, cpu_cores=os.cpu_count(),
                device=str(device))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count, cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def summary_line(name, part):
    """One line of the table printed at the end."""
    if name == "cuda_tests" and "tests" in part:
        bad = [t["name"] for t in part["tests"] if t["outcome"] in ("failed", "error")]
        return (f"{part['passed']} passed, {part['failed'] + part['error']} failed, {part['skipped']} skipped"
                + (f": {', '.join(bad)}" if bad else ""))
    if part["status"] != "ok":
        tail = (part.get("output_tail") or "").strip().splitlines()
        return part.get("reason") or (tail[-1] if tail else "")
    if name == "data":
        return f"{part['rows']:,} rows, {part['gib']} GiB, written in {part['seconds']} s"
    if name.startswith("paper_run"):
        return (f"40 epochs projected {format_duration(part['projected_40_epochs_s'])}; epochs "
                + ", ".join(f"{s:.1f}" for s in part["epoch_s"]) + f" s; start-up {part['startup_s']:.1f} s")
    modes = [m for m in ("baseline", "fast", "fast+compile") if m in part]
    return "; ".join(f"{m} {part[m]['ms_per_step']:.1f} ms/step, 40 epochs "
                     f"{format_duration(part[m]['projected_40_epochs_s'])}" for m in modes)


def main(argv=None):
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    sizes = TINY if args.tiny else FULL
    started = time.perf_counter()
    deadline = started + args.budget_s
    args.out_file.parent.mkdir(parents=True, exist_ok=True)
    log_path = args.out_file.with_suffix(".log")
    log_path.write_text(f"gpu_session.py {' '.join(argv if argv is not None else sys.argv[1:])}\n")
    work_dir = Path(tempfile.mkdtemp(prefix="gpu_session_", dir=args.work_dir))
    figures = dict(started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), machine=machine(device),
                   settings=dict(tiny=args.tiny, epochs=args.epochs, compile=args.compile, budget_s=args.budget_s,
                                 n_clips=sizes["n_clips"]), parts={})
    parts = figures["parts"]

    def save():
        figures["total_s"] = round(time.perf_counter() - started, 1)
        with common.atomic_write(args.out_file) as f:
            f.write(json.dumps(figures, indent=1) + "\n")

    print(f"gpu_session: {figures['machine']}; figures to {args.out_file}", flush=True)
    data_dir = work_dir / "data"
    wanted = [part for part in PARTS if part in args.parts and part != "data"]  # in this order
    try:
        if "data" in args.parts or any(part.startswith("paper_run") for part in wanted):
            t0 = time.perf_counter()
            n_bytes = write_random_spectrograms(data_dir, sizes["n_clips"], device)
            parts["data"] = dict(status="ok", rows=sizes["n_clips"], gib=round(n_bytes / 2**30, 2),
                                 seconds=round(time.perf_counter() - t0, 1))
            print(f"data: {summary_line('data', parts['data'])}", flush=True)
            save()
        for name in wanted:
            left_s = deadline - time.perf_counter()
            if left_s < (MIN_PART_S if not args.tiny else 1):
                parts[name] = dict(status="skipped", reason=f"time budget: {left_s:.0f} s of --budget-s left; "
                                                            f"run it with --parts {name}")
            elif name == "cuda_tests":
                parts[name] = cuda_tests(work_dir, min(CAP_S[name], left_s), log_path)
            elif name == "benchmark":
                parts[name] = benchmark(args, sizes, device, min(CAP_S[name], left_s), log_path)
            else:
                extra = dict(paper_run=[], paper_run_compile=["--compile"], paper_run_fp32=FP32_FLAGS)[name]
                parts[name] = paper_run(name, extra, data_dir, work_dir, args, sizes, device,
                                        min(CAP_S[name], left_s), log_path)
            print(f"{name}: {parts[name]['status']}: {summary_line(name, parts[name])}", flush=True)
            save()
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    runs = {name: part["projected_40_epochs_s"] for name, part in parts.items()
            if name.startswith("paper_run") and part["status"] == "ok"}
    if runs:
        best = min(runs, key=runs.get)
        figures["best"] = dict(run=best, projected_40_epochs_s=runs[best], target_s=60, meets_target=runs[best] <= 60)
        if "paper_run_fp32" in runs:
            figures["best"]["speedup_vs_paper_run_fp32"] = round(runs["paper_run_fp32"] / runs[best], 2)
        if parts.get("benchmark", {}).get("status") == "ok":
            baseline = parts["benchmark"]["baseline"]["projected_40_epochs_s"]
            figures["best"]["speedup_vs_benchmark_baseline"] = round(baseline / runs[best], 2)
    save()
    print(f"\n{'part':18} {'status':8} figures  (all in {args.out_file})")
    for name, part in parts.items():
        print(f"{name:18} {part['status']:8} {summary_line(name, part)}")
    if "best" in figures:
        print(f"best: {figures['best']}")
    failed = [name for name, part in parts.items() if part["status"] in ("failed", "timeout")]
    if failed:
        raise SystemExit(f"error: {', '.join(failed)} did not finish well; see {log_path}")
    return figures


if __name__ == "__main__":
    main()
