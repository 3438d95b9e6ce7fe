"""Faults a long real run meets, through the real scripts: a worker killed by
kill -9 (or the OOM killer), a full disk, a split that cannot be scored, a diverging run,
and damaged files. Each must end in one clear line or finish, never hang or leave a
half-written file."""
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

import common
import formats
import plumbing
import gen_spectrograms
import get_data
import trainer
from conftest import SMALL_RUN_ARGS, SRC

N_CLIPS = 16
CLIP_SECONDS = 29  # as MTAT's
TOLERANCE = 1e-4  # float32 rows: the workers' log-mel against the test's


def one_line_error(stderr):
    """The last line of stderr, after checking that there is no traceback."""
    assert "Traceback" not in stderr, stderr
    return stderr.strip().splitlines()[-1]


# -----------------------------------------------------------------------------
# a small MTAT-layout folder: the real header, N_CLIPS distinct WAV clips
def make_clips_folder(data_dir, annotations_csv, n_clips=N_CLIPS):
    with open(annotations_csv, "rb") as f:
        header = f.readline().rstrip(b"\r\n").decode()
    n_tags = len(header.split("\t")) - 2
    rng = np.random.default_rng(12)
    t = np.arange(CLIP_SECONDS * 16000) / 16000
    lines = [header]
    for row in range(n_clips):  # a tone of its own over noise: rows cannot be confused
        audio = 0.3 * np.sin(2 * np.pi * (110 + 60 * row) * t) + 0.05 * rng.normal(size=t.size)
        mp3_path = f"{row % 16:x}/clip-{row}.wav"
        (data_dir / "mp3" / mp3_path).parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(data_dir / "mp3" / mp3_path, audio.astype(np.float32), 16000)
        tags = ["1" if tag == row else "0" for tag in range(n_tags)]
        lines.append("\t".join(f'"{v}"' for v in [str(2000 + row)] + tags + [mp3_path]))
    (data_dir / "annotations_final.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode())
    return data_dir


@pytest.fixture(scope="module")
def clips_dir(annotations_csv, tmp_path_factory):
    return make_clips_folder(tmp_path_factory.mktemp("clips"), annotations_csv)


@pytest.fixture(scope="module")
def expected_rows(clips_dir):
    """common.log_mel of every clip, in row order: (N_CLIPS, 128, 628) float32."""
    paths = common.read_annotations(clips_dir / "annotations_final.csv")[3]
    return np.stack([common.log_mel(clips_dir / "mp3" / path) for path in paths])


def fresh_copy(clips_dir, tmp_path):
    shutil.copytree(clips_dir, tmp_path / "data")
    return tmp_path / "data"


def check_rows(data_dir, expected_rows, failed_rows=()):
    """Every row in its place (failed ones zeros and listed), and nothing left over."""
    rows = np.load(data_dir / "spectrograms.npy")
    meta = json.loads((data_dir / "spectrograms.json").read_text())
    assert rows.shape == expected_rows.shape
    for row in range(len(rows)):
        if row in failed_rows:
            assert not rows[row].any()
        else:
            np.testing.assert_allclose(rows[row], expected_rows[row], rtol=0, atol=TOLERANCE,
                                       err_msg=f"row {row}")
    assert [f["row"] for f in meta["failed"]] == sorted(failed_rows)
    assert sorted(p.name for p in data_dir.iterdir()) == [
        "annotations_final.csv", "mp3", "spectrograms.json", "spectrograms.npy"]
    return meta


def gen_command(data_dir, *extra):
    return [sys.executable, str(SRC / "gen_spectrograms.py"), "--data-dir", str(data_dir),
            "--workers", "2", "--dtype", "float32", *extra]


def workers_of(pid):
    """Pids of the worker processes of `pid`: its children running the same command (forked)."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        command = f.read()
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            children += (task / "children").read_text().split()
    found = []
    for child in children:
        with contextlib.suppress(OSError), open(f"/proc/{child}/cmdline", "rb") as f:
            if f.read() == command:
                found.append(int(child))
    return found


def alive(pid):
    """False once the process has exited (a zombie not yet reaped counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# -----------------------------------------------------------------------------
# 1. a dead worker
@pytest.mark.slow
def test_killed_worker_is_noticed_and_the_run_completes(clips_dir, expected_rows, tmp_path):
    data_dir = fresh_copy(clips_dir, tmp_path)
    proc = subprocess.Popen(gen_command(data_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        # both workers up (the warm-up may fork a short-lived helper that looks the same
        # until it calls exec) and a first row written: the workers are busy with clips
        partial = data_dir / "spectrograms.partial.npy"
        while len(workers_of(proc.pid)) < 2 or not np.load(partial, mmap_mode="r")[:2].any():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        os.kill(workers_of(proc.pid)[0], signal.SIGKILL)  # as the OOM killer does
        out, err = proc.communicate(timeout=120)  # multiprocessing.Pool waited here forever
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "a worker process died" in err and "Traceback" not in err
    assert f"{N_CLIPS} clips" in out and "0 failed" in out
    check_rows(data_dir, expected_rows)
    rerun = subprocess.run(gen_command(data_dir), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0 and "already complete" in rerun.stdout


# The workers fork from a process whose common.log_mel kills its own process for some clips:
# a clip that crashes its decoder, or a machine that is out of memory.
KILLING_LOG_MEL = """
import os, signal, sys
sys.path.insert(0, {src!r})
import common, gen_spectrograms
log_mel = common.log_mel
def killing_log_mel(path, *args, **kwargs):
    if {condition}:
        os.kill(os.getpid(), signal.SIGKILL)
    return log_mel(path, *args, **kwargs)
common.log_mel = killing_log_mel
gen_spectrograms.main(sys.argv[1:])
"""


def run_with_killing_log_mel(condition, data_dir):
    code = KILLING_LOG_MEL.format(src=str(SRC), condition=condition)
    return subprocess.run([sys.executable, "-c", code] + gen_command(data_dir)[2:],
                          capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_clip_that_kills_its_worker_again_is_listed_as_failed(clips_dir, expected_rows,
                                                              tmp_path):
    data_dir = fresh_copy(clips_dir, tmp_path)
    run = run_with_killing_log_mel("str(path).endswith('/clip-5.wav')", data_dir)
    assert run.returncode == 0, run.stderr
    assert "failed: row 5, 5/clip-5.wav: its worker process died twice" in run.stderr
    meta = check_rows(data_dir, expected_rows, failed_rows=[5])
    assert "died twice" in meta["failed"][0]["error"]


@pytest.mark.slow
def test_workers_that_always_die_stop_the_run_in_one_line_and_a_rerun_completes(
        clips_dir, expected_rows, tmp_path):
    data_dir = fresh_copy(clips_dir, tmp_path)
    run = run_with_killing_log_mel("'/mp3/' in str(path)", data_dir)
    assert run.returncode == 1, run.stderr
    line = one_line_error(run.stderr)
    assert line.startswith("error: worker processes keep dying") and "in flight: row 0 (0/clip-0.wav)" in line
    assert "rerun the same command to resume" in line
    progress = json.loads((data_dir / "spectrograms.progress.json").read_text())
    assert progress["done"] == [] and progress["failed"] == []  # no clip blamed for it
    rerun = subprocess.run(gen_command(data_dir), capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr
    check_rows(data_dir, expected_rows)


@pytest.mark.slow
def test_progress_is_saved_on_a_timer_and_a_killed_run_resumes(clips_dir, expected_rows,
                                                              tmp_path):
    data_dir = fresh_copy(clips_dir, tmp_path)
    code = KILLING_LOG_MEL.format(src=str(SRC), condition="str(path).endswith('/clip-3.wav')")
    code = code.replace("os.kill(os.getpid(), signal.SIGKILL)", "signal.pause()")  # hangs
    proc = subprocess.Popen([sys.executable, "-c", code] + gen_command(data_dir)[2:],
                            stderr=subprocess.DEVNULL, start_new_session=True)
    progress = data_dir / "spectrograms.progress.json"
    try:
        deadline = time.monotonic() + 120
        while not (progress.is_file() and len(json.loads(progress.read_text())["done"])
                   == N_CLIPS - 1):  # saved with no result arriving after the last one
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        workers = workers_of(proc.pid)
        assert len(workers) == 2
        os.kill(proc.pid, signal.SIGKILL)  # the main process only, as the OOM killer may
        proc.wait()
        deadline = time.monotonic() + 10
        while any(map(alive, workers)):  # no orphan waits for work
            assert time.monotonic() < deadline, "workers outlived the main process"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert 3 not in json.loads(progress.read_text())["done"]
    rerun = subprocess.run(gen_command(data_dir), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{N_CLIPS - 1} clips of {N_CLIPS} clips, float32 done" in rerun.stderr
    assert "computed 1 clips" in rerun.stdout
    check_rows(data_dir, expected_rows)


def square_or_die(task):
    """A pool task: (value, marker) -> value ** 2, after killing its own process (as the OOM
    killer would) while the marker file exists; marker 'once' removes itself first."""
    value, marker = task
    if marker and os.path.exists(marker):
        if marker.endswith("once"):
            os.unlink(marker)
        os.kill(os.getpid(), signal.SIGKILL)
    return value ** 2


def test_pool_retries_a_dead_workers_tasks_alone_and_keeps_order(tmp_path, capsys):
    """plumbing.pool_results, the pool of gen_spectrograms.py and predict.py: a task that
    killed its worker once is run again and gives its result; one that kills it every time
    is yielded as WorkerDied, alone; the others' results come in task order, and workers
    that die whatever they run stop it with WorkersKeepDying."""
    once, always = tmp_path / "die-once", tmp_path / "die-always"
    once.touch()
    always.touch()
    tasks = [(i, str(once) if i == 3 else str(always) if i == 6 else None) for i in range(10)]
    results = list(plumbing.pool_results(square_or_die, tasks, 2, ordered=True, ahead=2,
                                         describe=lambda task: f"task {task[0]}"))
    assert [index for index, _ in results] == list(range(10))
    assert [r for i, r in results if i != 6] == [i ** 2 for i in range(10) if i != 6]
    assert isinstance(results[6][1], plumbing.WorkerDied)
    assert "a worker process died" in capsys.readouterr().err
    with pytest.raises(plumbing.WorkersKeepDying) as dying:
        list(plumbing.pool_results(square_or_die, [(i, str(always)) for i in range(4)], 2))
    assert dying.value.tasks and set(dying.value.tasks) <= {0, 1, 2, 3}


# -----------------------------------------------------------------------------
# 2. a full disk
@contextlib.contextmanager
def small_disk(folder, n_bytes, copied_bytes=0):
    """A folder with room for n_bytes more than the copied_bytes the test puts there: a
    tmpfs of their sum when this process may mount one (root), and the preexec_fn for a
    subprocess writing there: None on tmpfs, else one that limits every file the
    subprocess writes to n_bytes (RLIMIT_FSIZE, SIGXFSZ ignored: writes fail with EFBIG)."""
    folder.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={copied_bytes + n_bytes}", "tmpfs",
                              str(folder)], capture_output=True).returncode == 0

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))

    try:
        yield None if mounted else limit_file_size
    finally:
        if mounted:
            subprocess.run(["umount", "--lazy", str(folder)], check=True)  # even if a hung writer holds it


@pytest.mark.slow
@pytest.mark.parametrize("body, code, err", [
    ("print('tagged')", 0, ""),
    ("raise SystemExit('error: x.csv: read-only; pass another --csv')", 1,
     "error: x.csv: read-only; pass another --csv\n"),
    ("raise SystemExit(3)", 3, ""),
])
def test_quick_exit_says_what_main_said_and_leaves_no_lock(tmp_path, body, code, err):
    """run_script(quick_exit=True), predict.py's ending: main's output flushed, its
    SystemExit's line and status kept, its locks released (the lock file removed), and no
    interpreter teardown (an atexit handler that would run in one does not)."""
    script = tmp_path / "script.py"
    script.write_text(f"""import atexit, sys
sys.path.insert(0, {str(SRC)!r})
import plumbing
def main():
    plumbing.hold_lock({str(tmp_path / 'out.lock')!r}, 'out', 'pass another --out')
    print('working', end='')  # no newline: still in stdout's buffer when main ends
    {body}
atexit.register(lambda: print('teardown', file=sys.stderr))
plumbing.run_script(main, 'interrupted', quick_exit=True)
""")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (code, err)
    assert done.stdout.startswith("working")
    assert not (tmp_path / "out.lock").exists()


def test_full_disk_is_refused_before_spectrograms_are_computed(clips_dir, tmp_path):
    clips_bytes = sum(f.stat().st_size for f in clips_dir.rglob("*") if f.is_file())
    needed = N_CLIPS * 128 * 628 * 4
    with small_disk(tmp_path / "disk", needed // 2, copied_bytes=clips_bytes) as preexec_fn:
        shutil.copytree(clips_dir, tmp_path / "disk" / "data")
        run = subprocess.run(gen_command(tmp_path / "disk" / "data"), capture_output=True,
                             text=True, timeout=120, preexec_fn=preexec_fn)
        left = sorted(p.name for p in (tmp_path / "disk" / "data").iterdir())
    assert run.returncode == 1
    line = one_line_error(run.stderr)
    assert line.startswith("error: cannot reserve 4.9 MiB for ") and "free there" in line
    assert left == ["annotations_final.csv", "mp3"]  # no partial or temporary file


@pytest.mark.slow
def test_full_disk_while_saving_a_checkpoint_is_one_line(small_data_dir, tmp_path):
    # best_model.pt (11 MiB) fits in 20 MiB, last.pt (34 MiB, with Adam's moments) does not
    with small_disk(tmp_path / "disk", 20 * 2**20) as preexec_fn:
        run = subprocess.run([sys.executable, str(SRC / "trainer.py"), "--data-dir", str(small_data_dir),
                              "--out", str(tmp_path / "disk"), "--run", "r", "--epochs", "1"]
                             + SMALL_RUN_ARGS, capture_output=True, text=True, timeout=300,
                             preexec_fn=preexec_fn)
        left = sorted(p.name for p in (tmp_path / "disk" / "r").iterdir())
        model, checkpoint = formats.load_model(tmp_path / "disk" / "r" / "best_model.pt")
    assert run.returncode == 1
    line = one_line_error(run.stderr)
    assert line.startswith(f"error: cannot write {tmp_path / 'disk' / 'r' / 'last.pt'}: ")
    assert "the previous last.pt, if any, is unchanged" in line
    assert left == ["best_model.pt", "test_scores.npz"]  # no last.pt.tmp
    assert checkpoint["epoch"] == 1


@pytest.mark.slow
def test_full_disk_while_synthesising_the_demo_set_is_one_line(tmp_path):
    # a clip is ~100 kB: the disk fills after a few of them
    with small_disk(tmp_path / "disk", 300_000) as preexec_fn:
        run = subprocess.run([sys.executable, str(SRC / "get_data.py"), "--synthetic", "12",
                              "--data-dir", str(tmp_path / "disk" / "demo")],
                             capture_output=True, text=True, timeout=300, preexec_fn=preexec_fn)
        left = [p.name for p in (tmp_path / "disk" / "demo").rglob("*") if p.is_file()]
    assert run.returncode == 1
    line = one_line_error(run.stderr)
    assert line.startswith("error: cannot write ") and ".mp3: " in line
    assert not [name for name in left if not name.endswith(".mp3")]  # no .tmp, no annotations


# -----------------------------------------------------------------------------
# 3. a split that cannot be scored
@pytest.mark.parametrize("sizes, name", [(("32", "1"), "validation set (1 clip)"),
                                         (("39", "8"), "test set (1 clip)")])
def test_unscorable_split_is_refused_before_training(small_data_dir, tmp_path, sizes, name):
    args = list(SMALL_RUN_ARGS)
    args[args.index("--train-size") + 1], args[args.index("--val-size") + 1] = sizes
    with pytest.raises(SystemExit, match=re.escape(f"the {name} has no tag with both positive")) as stop:
        trainer.main(["--data-dir", str(small_data_dir), "--out", str(tmp_path), "--run", "r",
                      "--epochs", "1"] + args)
    assert "choose a" in str(stop.value)
    assert not (tmp_path / "r").exists()  # refused before anything was trained or written


# -----------------------------------------------------------------------------
# 4. divergence
@pytest.mark.slow
def test_diverging_run_stops_before_saving_and_says_so(small_data_dir, tmp_path):
    # lr 1e4: the loss stays finite, batch norm's running variance becomes inf in epoch 1
    with pytest.raises(SystemExit) as stop:
        trainer.main(["--data-dir", str(small_data_dir), "--out", str(tmp_path), "--run", "r",
                      "--epochs", "2", "--lr", "1e4"] + SMALL_RUN_ARGS)
    message = str(stop.value)  # here the running variance; elsewhere the loss could go first
    assert re.match(r"error: (the weights became non-finite \(.*running_var|training loss became "
                    r"nan).* in epoch 1; stopped before saving it; no checkpoint was written to ",
                    message), message
    assert "intact" not in message and message.endswith("Try a lower --lr")
    assert not (tmp_path / "r").exists()  # nothing was written: the run folder made for it is gone too


def test_load_model_refuses_a_checkpoint_with_non_finite_tensors(tmp_path):
    state_dict = common.MSCNN(4).state_dict()
    state_dict["head.0.running_var"][7] = float("inf")
    formats.save_best_model(tmp_path / "poisoned.pt", state_dict, ["a", "b", "c", "d"],
                            (torch.zeros(128), torch.ones(128)), {}, 3, {}, None)
    with pytest.raises(ValueError, match=r"poisoned.pt: holds non-finite values \(NaN or inf\) "
                                         r"in head.0.running_var; the run that wrote it diverged"):
        formats.load_model(tmp_path / "poisoned.pt")


class NotAllowed:
    """A class torch.load(weights_only=True) refuses to unpickle."""


def test_checkpoint_errors_are_whole_sentences(tmp_path):
    torch.save({"x": NotAllowed()}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError) as caught:
        formats.load_model(tmp_path / "pickled.pt")
    message = str(caught.value)
    assert message.endswith("(weights-only loading refused it: Unsupported global: GLOBAL "
                            "test_faults.NotAllowed was not an allowed global by default)")
    torch.save({"x": torch.zeros(3)}, tmp_path / "cut.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "cut.pt").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cut.pt: not a PyTorch checkpoint of this project \(.+\)$"):
        formats.load_model(tmp_path / "cut.pt")


# -----------------------------------------------------------------------------
# 5. damaged files
def test_trainer_names_a_damaged_spectrogram_file_and_the_fix(small_data_dir, tmp_path):
    for name in ("annotations_final.csv", "spectrograms.npy", "spectrograms.json"):
        shutil.copyfile(small_data_dir / name, tmp_path / name)
    npy = tmp_path / "spectrograms.npy"
    os.truncate(npy, npy.stat().st_size - 2**20)  # truncate -s -1M
    with pytest.raises(SystemExit) as stop:
        trainer.main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "exp")] + SMALL_RUN_ARGS)
    assert str(stop.value).startswith(f"error: {npy} is damaged: ")
    assert "cut short" in str(stop.value)
    assert f"python src/gen_spectrograms.py --data-dir {tmp_path}: it recomputes" in str(stop.value)

    (tmp_path / "spectrograms.json").write_text('{"n_clips": 48, "dtype": "flo')
    with pytest.raises(SystemExit, match=r"spectrograms.json is not valid JSON \(.*\); compute the "
                                         r"spectrograms again: .* --overwrite$"):
        trainer.main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "exp")] + SMALL_RUN_ARGS)


@pytest.mark.slow
def test_gen_spectrograms_recomputes_the_rows_of_a_cut_short_file(clips_dir, expected_rows,
                                                                 tmp_path, capsys):
    data_dir = fresh_copy(clips_dir, tmp_path)
    args = ["--data-dir", str(data_dir), "--workers", "2", "--dtype", "float32"]
    gen_spectrograms.main(args)
    npy = data_dir / "spectrograms.npy"
    os.truncate(npy, npy.stat().st_size - 2**20)  # 1 MiB = 3.3 rows of float32
    capsys.readouterr()
    rerun = gen_spectrograms.main(args)  # used to say "already complete, nothing to do"
    assert rerun["n_computed"] == 4
    assert f"{npy} is damaged" in capsys.readouterr().err
    check_rows(data_dir, expected_rows)

    (data_dir / "spectrograms.json").write_text("{")
    with pytest.raises(SystemExit, match=r"spectrograms.json is not valid JSON .*: pass --overwrite"):
        gen_spectrograms.main(args)
    (data_dir / "spectrograms.json").unlink()
    (data_dir / "spectrograms.partial.npy").write_bytes(b"")
    (data_dir / "spectrograms.progress.json").write_text("not JSON")
    assert gen_spectrograms.main(args + ["--limit", "2"])["n_computed"] == 2
    assert "cannot be resumed" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# 6. small ones
def test_get_data_names_a_data_dir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    for data_dir, extra in ((tmp_path / "file", []), (tmp_path / "file" / "sub", ["--synthetic", "2"])):
        with pytest.raises(SystemExit, match=f"{tmp_path / 'file'} is a file, not a folder"):
            get_data.main(["--data-dir", str(data_dir)] + extra)


def test_default_workers_are_never_more_than_the_cores(capsys):
    cores = plumbing.usable_cores()
    assert gen_spectrograms.parse_args([]).workers == min(8, cores)
    assert capsys.readouterr().err == ""
    # more, asked for, is honoured (benchmark.py measures it) with a note
    assert gen_spectrograms.parse_args(["--workers", str(cores + 1)]).workers == cores + 1
    assert f"note: --workers {cores + 1} is more than the {cores} CPU cores" in capsys.readouterr().err
