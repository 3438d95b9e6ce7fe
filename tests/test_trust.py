"""Trust: no wrong result with exit 0, no tagging run lost, one writer per output. Each
case goes through the real scripts (main(argv) in this process, or a subprocess): a source
that no longer matches what a file was made from, two writers of one output, a signal at a
bad moment, an output place that cannot be written, damaged inputs, values that are not
finite, symbolic link loops."""
import contextlib
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import SMALL_RUN_ARGS, SRC, write_spectrogram_set

import gen_spectrograms
import predict
import report
import trainer


def one_line(stderr):
    """The last line of stderr, after checking that there is no traceback."""
    assert "Traceback" not in stderr, stderr
    return stderr.strip().splitlines()[-1]


def copy_data(source, target):
    """A copy of a data folder's annotations and spectrograms (the originals stay intact)."""
    target.mkdir(parents=True)
    for name in ("annotations_final.csv", "spectrograms.npy", "spectrograms.json"):
        shutil.copyfile(source / name, target / name)
    return target


def tone(seconds, sample_rate=16000, hz=220.0):
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return (0.4 * np.sin(2 * np.pi * hz * t) + 0.01 * np.random.default_rng(0).normal(size=t.size)).astype(
        np.float32)


def script(name, *argv):
    return [sys.executable, str(SRC / name), *map(str, argv)]


UNBUFFERED = dict(os.environ, PYTHONUNBUFFERED="1")


def wait_for(condition, proc, seconds=120, poll_s=0.01):
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(poll_s)


def alive(pid):
    """False once the process has exited (a zombie not yet reaped counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def children(pid):
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


@pytest.fixture(scope="module")
def unshare_works():
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True,
        check=False).returncode == 0


@pytest.fixture
def read_only(unshare_works):
    """run(folder, command) -> the command's CompletedProcess with `folder` read-only: for
    a user, its permission bits (restored after); for root, whom they do not stop, a
    read-only bind mount in a mount namespace of the command's own."""
    restore = []

    def run(folder, command, **kwargs):
        if os.geteuid() != 0:
            restore.append((folder, folder.stat().st_mode))
            folder.chmod(0o555)
        elif unshare_works:
            command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                       'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"',
                       str(folder)] + command
        else:
            pytest.skip("root, and no user namespace to mount a folder read-only in")
        return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False, **kwargs)

    yield run
    for folder, mode in restore:
        folder.chmod(mode)


# -----------------------------------------------------------------------------
# Provenance: what each file was made from, recorded and checked
def test_spectrograms_of_reordered_or_replaced_annotations_are_refused(small_data_dir, tmp_path):
    for change in ("reordered", "replaced"):
        data_dir = copy_data(small_data_dir, tmp_path / change)
        csv_path = data_dir / "annotations_final.csv"
        header, *rows = csv_path.read_bytes().split(b"\r\n")[:-1]
        if change == "reordered":
            rows = rows[::-1]
        else:  # another data set of as many clips
            rows = [row.replace(b"clip-", b"other-") for row in rows]
        csv_path.write_bytes(b"\r\n".join([header] + rows) + b"\r\n")
        with pytest.raises(SystemExit) as stop:  # trained on other clips' labels, it scored 0.54
            trainer.main(["--data-dir", str(data_dir), "--out", str(tmp_path / "exp"), "--run", change,
                          "--epochs", "1"] + SMALL_RUN_ARGS)
        message = str(stop.value)
        assert message.startswith(f"error: {data_dir / 'spectrograms.npy'} no longer matches {csv_path}: "
                                  "its 48 rows were made from other annotation rows"), message
        assert message.endswith(f"python src/gen_spectrograms.py --data-dir {data_dir} --overwrite")
        assert not (tmp_path / "exp" / change).exists()  # nothing trained, nothing left


def test_checkpoints_and_results_record_their_provenance(small_run, small_data_dir):
    run_dir, results = small_run
    best = torch.load(run_dir / "best_model.pt", weights_only=True)
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert best["provenance"] == last["provenance"] == results["provenance"]
    data, split = results["provenance"]["data"], results["provenance"]["split"]
    assert data["dataset"] == "other" and data["n_clips"] == 48 and data["dtype"] == "float16"
    assert data["annotations"] == str(small_data_dir / "annotations_final.csv")
    meta = json.loads((small_data_dir / "spectrograms.json").read_text())
    assert data["mp3_paths_md5"] == meta["mp3_paths_md5"]
    assert (split["name"], split["n_train"], split["n_val"], split["n_test"]) == ("random", 32, 8, 8)
    assert re.fullmatch(r"[0-9a-f]{32}", split["rows_md5"]) and split["split_seed"] == 1337


def test_dataset_is_mtat_synthetic_or_other(annotations_csv, tmp_path):
    import formats
    import plumbing
    import synthetic

    assert formats.dataset_of(annotations_csv, plumbing.file_digest(annotations_csv)) == "MTAT"
    synthetic.write_synthetic_mtat(tmp_path, 2, seed=0, progress=False)
    csv_path = tmp_path / "annotations_final.csv"
    assert formats.dataset_of(csv_path, plumbing.file_digest(csv_path)) == "synthetic"
    csv_path.write_bytes(csv_path.read_bytes().replace(b'"1"\t"', b'"0"\t"', 1))  # one label changed
    assert formats.dataset_of(csv_path, plumbing.file_digest(csv_path)) == "other"


def test_resume_on_other_data_is_refused(small_run, tmp_path):
    run_dir, _ = small_run
    shutil.copytree(run_dir, tmp_path / "exp" / "full")
    other = tmp_path / "other"
    write_spectrogram_set(other, 48, n_tags=4, seed=1)  # same shape, other clips: loss 1.1 -> 6.2
    with pytest.raises(SystemExit) as stop:
        trainer.main(["--data-dir", str(other), "--out", str(tmp_path / "exp"), "--run", "full", "--resume",
                      "--epochs", "3"] + SMALL_RUN_ARGS)
    message = str(stop.value)
    assert message.startswith(f"error: cannot resume {tmp_path / 'exp' / 'full'}: it was trained on ")
    assert "this command gives it other data (annotations_md5 " in message
    assert message.endswith("pass the --data-dir it was trained on, or start a new --run")
    assert torch.load(tmp_path / "exp" / "full" / "last.pt", weights_only=True)["epoch"] == 2  # untouched


def test_resume_on_another_split_is_refused(small_run):
    import formats

    run_dir, results = small_run
    saved = results["provenance"]
    moved = dict(saved, split=dict(saved["split"], rows_md5="0" * 32))
    with pytest.raises(SystemExit, match=r"this command gives it another split \(rows_md5 "):
        formats.check_same_provenance(saved, moved, run_dir)
    formats.check_same_provenance(saved, json.loads(json.dumps(saved)), run_dir)  # the same: no error


@pytest.mark.parametrize("damage", ["best_model.pt", "cut short", "not a checkpoint"])
def test_damaged_last_pt_is_one_line(small_run, small_data_dir, tmp_path, damage):
    run_dir, _ = small_run
    shutil.copytree(run_dir, tmp_path / "r")
    last = tmp_path / "r" / "last.pt"
    if damage == "best_model.pt":
        shutil.copyfile(run_dir / "best_model.pt", last)
    elif damage == "cut short":
        last.write_bytes(last.read_bytes()[:1000])
    else:
        last.write_text("not a checkpoint")
    with pytest.raises(SystemExit) as stop:
        trainer.main(["--data-dir", str(small_data_dir), "--out", str(tmp_path),
                      "--run", "r", "--resume", "--epochs", "3"] + SMALL_RUN_ARGS)
    message = str(stop.value)
    assert message.startswith(f"error: {last}: not a last.pt of trainer.py"), message
    assert "\n" not in message and message.endswith("restore it from a copy, or start a new --run")
    if damage == "best_model.pt":
        assert "but a best_model.pt (missing model, optimizer" in message


@pytest.fixture(scope="module")
def checkpoints(small_run, tmp_path_factory):
    """Two checkpoints with the same tags: the small run's best model and one whose weights
    differ a little (another model)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    first = folder / "first.pt"
    shutil.copyfile(small_run[0] / "best_model.pt", first)
    state = torch.load(first, weights_only=True)
    name = next(k for k, v in state["state_dict"].items() if k.endswith("weight") and v.is_floating_point())
    state["state_dict"][name] += 0.01
    torch.save(state, folder / "second.pt")
    return first, folder / "second.pt"


@pytest.fixture(scope="module")
def songs(tmp_path_factory):
    """Four short WAV files of different pitches."""
    folder = tmp_path_factory.mktemp("songs")
    paths = []
    for i in range(4):
        paths.append(folder / f"song{i}.wav")
        sf.write(paths[-1], tone(6, hz=200.0 * 1.3 ** i), 16000)
    return [str(p) for p in paths]


@pytest.mark.parametrize("flag", ["--csv", "--json", "--embeddings"])
def test_predict_resume_refuses_an_output_of_another_checkpoint(checkpoints, songs, tmp_path, flag, capsys):
    first, second = checkpoints
    output = tmp_path / ("out.npz" if flag == "--embeddings" else f"out.{flag[2:]}")
    predict.main(songs[:2] + ["--checkpoint", str(first), flag, str(output), "--workers", "0"])
    written = output.read_bytes()
    with pytest.raises(SystemExit) as stop:  # same tags: it used to mix the two models' rows
        predict.main(songs + ["--checkpoint", str(second), flag, str(output), "--workers", "0", "--resume"])
    message = str(stop.value)
    assert message.startswith(
        f"error: --resume: {output} holds results of another checkpoint (SHA-256 "), message
    assert "one file would mix two models" in message
    assert output.read_bytes() == written
    capsys.readouterr()
    predict.main(songs + ["--checkpoint", str(first), flag, str(output), "--workers", "0", "--resume"])
    assert "2 file(s) already tagged in the outputs, 2 to tag" in capsys.readouterr().err


def test_predict_says_what_its_model_was_trained_on(checkpoints, songs, tmp_path, capsys):
    first, _ = checkpoints
    predict.main(songs[:1] + ["--checkpoint", str(first), "--workers", "0"])
    err = capsys.readouterr().err.splitlines()
    state = torch.load(first, weights_only=True)
    metrics = state["metrics"]
    assert err[0] == (f"model: trained on other data ({state['provenance']['data']['annotations']}), split "
                      f"random (32 / 8 / 8 clips), epoch {state['epoch']}: validation ROC-AUC "
                      f"{metrics['val_roc_auc']:.4f}, test ROC-AUC {metrics['test_roc_auc']:.4f}")
    assert err[1] == "warning: this model was trained on other data than MTAT: its tags are those data's"
    state["format_version"] += 1  # a checkpoint of another format: refused in one line
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(SystemExit,
                       match=f"error: {tmp_path / 'other.pt'}: of format 2, this code reads 1; pass"):
        predict.main(songs[:1] + ["--checkpoint", str(tmp_path / "other.pt"), "--workers", "0"])


def test_describe_training_of_mtat_and_synthetic_models(small_run, annotations_csv):
    import formats
    import plumbing

    checkpoint = torch.load(small_run[0] / "best_model.pt", weights_only=True)
    mtat = json.loads(json.dumps(checkpoint["provenance"]))
    mtat["data"].update(dataset=formats.dataset_of(annotations_csv, plumbing.file_digest(annotations_csv)))
    line, warning = formats.describe_training(dict(checkpoint, provenance=mtat))
    assert line.startswith("model: trained on MTAT (") and warning is None
    mtat["data"]["dataset"] = "synthetic"
    line, warning = formats.describe_training(dict(checkpoint, provenance=mtat))
    assert line.startswith("model: trained on a synthetic set (") and "not MTAT" in warning


# -----------------------------------------------------------------------------
# One writer per output
def test_two_trainers_on_one_run_folder(small_data_dir, tmp_path):
    command = script("trainer.py", "--data-dir", small_data_dir, "--out", tmp_path, "--run", "r",
                     "--epochs", "30", *SMALL_RUN_ARGS)
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "r" / ".lock"
    try:
        wait_for(lambda: (tmp_path / "r" / "last.pt").is_file() and "pid" in lock.read_text(), first)
        os.kill(first.pid, signal.SIGSTOP)  # holds the run folder while the second one tries
        for extra in ([], ["--resume"]):
            with pytest.raises(SystemExit) as stop:
                trainer.main(["--data-dir", str(small_data_dir), "--out", str(tmp_path), "--run", "r",
                              "--epochs", "30"] + SMALL_RUN_ARGS + extra)
            message = str(stop.value)
            assert message.startswith(f"error: the run folder {tmp_path / 'r'} is being written by pid "
                                      f"{first.pid} (trainer.py --data-dir "), message
            assert message.endswith("wait for it to finish or stop it, or choose another --run")
        os.kill(first.pid, signal.SIGKILL)  # kill -9: its lock file stays, but not its lock
    finally:
        first.kill()
        first.communicate()
    assert lock.exists()
    epochs = torch.load(tmp_path / "r" / "last.pt", weights_only=True)["epoch"] + 1
    results = trainer.main(["--data-dir", str(small_data_dir), "--out", str(tmp_path), "--run", "r",
                            "--epochs", str(epochs), "--resume"] + SMALL_RUN_ARGS)
    assert results["epoch"] >= 1 and not lock.exists()


def clips_folder(folder, n_clips, seconds=29, loud_row=None):
    """An MTAT-layout data folder: annotations with 3 tags and n_clips float WAV clips of
    their own pitch (the clip loud_row 1e25 times too loud: finite samples whose power
    overflows float32)."""
    lines = ["\t".join(f'"{v}"' for v in ["clip_id", "a", "b", "c", "mp3_path"])]
    for row in range(n_clips):
        audio = tone(seconds, hz=110.0 * 1.2 ** row)
        if row == loud_row:
            audio *= 1e25
        mp3_path = f"{row % 16:x}/clip-{row}.wav"
        (folder / "mp3" / mp3_path).parent.mkdir(parents=True, exist_ok=True)
        sf.write(folder / "mp3" / mp3_path, audio, 16000, subtype="FLOAT")
        lines.append("\t".join(f'"{v}"' for v in [row + 1, row % 2, 1 - row % 2, 0, mp3_path]))
    (folder / "annotations_final.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode())
    return folder


def test_two_gen_spectrograms_on_one_data_folder(tmp_path):
    data_dir = clips_folder(tmp_path / "data", 6)
    first = subprocess.Popen(script("gen_spectrograms.py", "--data-dir", data_dir, "--workers", "1"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = data_dir / "spectrograms.lock"
    try:
        wait_for(lambda: lock.is_file() and "pid" in lock.read_text(), first)
        os.kill(first.pid, signal.SIGSTOP)
        with pytest.raises(SystemExit) as stop:
            gen_spectrograms.main(["--data-dir", str(data_dir), "--workers", "1"])
        message = str(stop.value)
        assert message.startswith(f"error: {data_dir / 'spectrograms.npy'} is being written by pid "
                                  f"{first.pid} (gen_spectrograms.py --data-dir "), message
        assert message.endswith("use another --data-dir")
        os.kill(first.pid, signal.SIGCONT)
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, err
    assert "6 clips" in out and not lock.exists()
    assert gen_spectrograms.main(["--data-dir", str(data_dir), "--workers", "1"])["n_computed"] == 0


def test_two_predicts_on_one_output(checkpoints, songs, tmp_path):
    import plumbing

    csv_path = tmp_path / "tags.csv"
    plumbing.hold_lock(f"{csv_path}.lock", csv_path, "pass another --csv")  # as a running predict.py does
    try:
        run = subprocess.run(script("predict.py", *songs, "--checkpoint", checkpoints[0], "--csv", csv_path),
                             capture_output=True, text=True, timeout=120, check=False)
    finally:
        plumbing.release_lock(f"{csv_path}.lock")
    assert run.returncode == 1 and run.stdout == ""  # refused before the first file was tagged
    line = one_line(run.stderr)
    assert line.startswith(f"error: {csv_path} is being written by pid {os.getpid()} (")
    assert line.endswith(f"(lock {csv_path}.lock); wait for it to finish or stop it, or pass another --csv")


# -----------------------------------------------------------------------------
# Signals: SIGTERM and SIGHUP as Ctrl-C
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_during_a_checkpoint_save(small_data_dir, tmp_path, signum):
    run_dir = tmp_path / "r"
    proc = subprocess.Popen(script("trainer.py", "--data-dir", small_data_dir, "--out", tmp_path,
                                   "--run", "r", "--epochs", "40", *SMALL_RUN_ARGS),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # atomic_write's temporary files: last.pt.<random>.tmp, best_model.pt.<random>.tmp
        wait_for(lambda: any(run_dir.glob("*.pt.*.tmp")), proc, poll_s=0.0005)
        os.kill(proc.pid, signum)
        _out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, err
    assert one_line(err) == ("interrupted: the checkpoints of the last finished epoch are kept in the run "
                             "folder; continue with the same command plus --resume --run NAME")
    assert not list(run_dir.glob("*.tmp")) and not (run_dir / ".lock").exists()
    for name in ("last.pt", "best_model.pt"):
        if (run_dir / name).exists():  # whole: the previous epoch's
            torch.load(run_dir / name, weights_only=True)


def test_ctrl_c_inside_torch_save_is_an_interrupt_and_leaves_no_temporary_file(tmp_path):
    """Ctrl-C (or SIGTERM, SIGHUP) while torch.save writes: torch turns the KeyboardInterrupt
    raised in its write into a RuntimeError, which the scripts did not take for an interrupt
    (a traceback). Here the interrupt comes at the file's third write, as a signal may."""
    try:
        from plumbing import atomic_write
    except ImportError:
        from common import atomic_write

    class InterruptedAtThirdWrite:
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, data):
            self.writes += 1
            if self.writes == 3:
                raise KeyboardInterrupt
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    (tmp_path / "last.pt").write_bytes(b"the previous epoch's")
    with pytest.raises(KeyboardInterrupt), atomic_write(tmp_path / "last.pt", "wb") as f:
        torch.save({"weights": torch.zeros(100_000)}, InterruptedAtThirdWrite(f))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert (tmp_path / "last.pt").read_bytes() == b"the previous epoch's"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_predict_saves_what_it_tagged_and_ends_its_workers(checkpoints, tmp_path, signum):
    folder = tmp_path / "music"
    folder.mkdir()
    for i in range(10):
        sf.write(folder / f"track{i}.wav", tone(40, 22050, hz=150.0 + 20 * i), 22050)
    csv_path = tmp_path / "tags.csv"
    proc = subprocess.Popen(script("predict.py", folder, "--checkpoint", checkpoints[0], "--workers", "2",
                                   "--csv", csv_path, "--top", "1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=UNBUFFERED)
    try:
        assert proc.stdout.readline().startswith(str(folder / "track0.wav"))  # a first file is tagged
        workers = children(proc.pid)
        assert workers
        os.kill(proc.pid, signum)
        _out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, err  # 143 for SIGTERM, 130 for Ctrl-C
    assert one_line(err) == ("interrupted; the files tagged so far are saved; rerun with --resume to tag "
                             "the rest")
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[1][0] == str(folder / "track0.wav") and all(row[-3] == "" for row in rows[1:])
    deadline = time.monotonic() + 10
    while any(map(alive, workers)):
        assert time.monotonic() < deadline, "decoder processes outlived predict.py"
        time.sleep(0.05)
    assert not (tmp_path / "tags.csv.lock").exists()


def test_predict_saves_every_output_as_it_goes(checkpoints, songs, tmp_path, monkeypatch):
    """SAVE_EVERY_S (a minute) set to 0: when a file is printed, every output already holds
    each file before it, a failed one too."""
    outputs = {"csv": tmp_path / "t.csv", "json": tmp_path / "t.json", "embeddings": tmp_path / "t.npz"}
    missing = str(tmp_path / "missing.wav")
    order = [songs[0], missing, songs[1], songs[2]]
    seen, format_tags = {}, predict.format_tags

    def format_and_look(path, result, top):
        in_csv = [row[0] for row in csv.reader(outputs["csv"].read_text().splitlines())][1:] \
            if outputs["csv"].exists() else []
        in_json = list(json.loads(outputs["json"].read_text())) if outputs["json"].exists() else []
        in_npz = list(np.load(outputs["embeddings"])["paths"]) if outputs["embeddings"].exists() else []
        seen[path] = in_csv, in_json, in_npz
        return format_tags(path, result, top)

    monkeypatch.setattr(predict, "SAVE_EVERY_S", 0)
    monkeypatch.setattr(predict, "format_tags", format_and_look)
    with pytest.raises(SystemExit, match="1 of 4 files could not be tagged"):
        predict.main(order + ["--checkpoint", str(checkpoints[0]), "--workers", "0"]
                     + [a for flag, path in outputs.items() for a in (f"--{flag}", str(path))])
    assert seen[songs[0]] == ([], [], [])
    assert seen[songs[1]] == ([songs[0], missing], [songs[0], missing], [songs[0]])
    assert seen[songs[2]] == (order[:3], order[:3], [songs[0], songs[1]])


# -----------------------------------------------------------------------------
# Output places checked before any work
def test_predict_output_places_are_checked_before_tagging(checkpoints, songs, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    for flag, path, expected in (
            ("--csv", tmp_path,
             f"error: --csv {tmp_path} is a folder; name a file (in it, or anywhere else)"),
            ("--json", tmp_path / "a_file" / "t.json",
             f"error: --json {tmp_path / 'a_file'}: {tmp_path / 'a_file'} is a file, not a folder"),
            ("--embeddings", tmp_path / "a_file" / "deeper" / "e.npz", "is a file, not a folder")):
        with pytest.raises(SystemExit) as stop:
            predict.main(songs + ["--checkpoint", str(checkpoints[0]), flag, str(path), "--workers", "0"])
        assert expected in str(stop.value), stop.value
        assert capsys.readouterr().out == ""  # refused before the first file was tagged
    made = tmp_path / "not" / "yet" / "tags.json"  # a missing folder is made
    predict.main(songs[:1] + ["--checkpoint", str(checkpoints[0]), "--json", str(made), "--workers", "0"])
    assert list(json.loads(made.read_text())) == songs[:1]


def test_read_only_output_places_are_one_line_before_any_work(read_only, small_data_dir, small_run,
                                                            checkpoints, songs, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    run = read_only(ro, script("trainer.py", "--data-dir", small_data_dir, "--out", ro, "--run", "r",
                               "--epochs", "1", *SMALL_RUN_ARGS))
    assert run.returncode == 1 and "epoch" not in run.stdout + run.stderr.replace("--epochs", "")
    assert re.fullmatch(rf"error: --out {re.escape(str(ro))}: cannot write there \((Read-only file system|"
                        r"Permission denied)\); choose a folder you can write in", one_line(run.stderr))

    run = read_only(ro, script("predict.py", *songs, "--checkpoint", checkpoints[0], "--csv", ro / "t.csv"))
    assert run.returncode == 1 and run.stdout == ""
    assert one_line(run.stderr).startswith(f"error: --csv {ro}: cannot write there (")

    data_dir = clips_folder(tmp_path / "data", 2, seconds=2)
    run = read_only(data_dir, script("gen_spectrograms.py", "--data-dir", data_dir, "--workers", "1"))
    assert run.returncode == 1
    assert one_line(run.stderr).startswith(f"error: --data-dir {data_dir}: cannot write there (")

    run = read_only(ro, script("report.py", small_run[0], "--out", ro))
    assert run.returncode == 1 and "| run |" not in run.stdout
    assert one_line(run.stderr).startswith(f"error: --out {ro}: cannot write there (")


def test_atomic_write_in_a_read_only_folder_raises_its_first_error(read_only, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    code = (f"import sys; sys.path.insert(0, {str(SRC)!r})\n"
            "try:\n    import plumbing as module\nexcept ImportError:\n    import common as module\n"
            f"with module.atomic_write({str(ro / 'x.json')!r}) as f:\n    f.write('{{}}')\n")
    run = read_only(ro, [sys.executable, "-c", code])
    assert run.returncode == 1
    assert "During handling of the above exception" not in run.stderr, run.stderr  # no second error
    last = run.stderr.strip().splitlines()[-1]
    assert str(ro / "x.json") in last and ("Read-only file system" in last or "Permission denied" in last)


def test_trainer_out_naming_a_file(small_data_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as stop:
        trainer.main(["--data-dir", str(small_data_dir), "--out", str(tmp_path / "file"), "--epochs", "1"]
                     + SMALL_RUN_ARGS)
    assert str(stop.value) == (f"error: --out {tmp_path / 'file'}: {tmp_path / 'file'} is a file, not a "
                               "folder; name a folder (it is created if missing)")


@pytest.mark.parametrize("flag, value, interval", [("--lr", "0", "(0, inf)"), ("--lr", "-1e-3", "(0, inf)"),
                                                   ("--lr", "nan", "(0, inf)"), ("--dropout", "1", "[0, 1)"),
                                                   ("--dropout", "-0.1", "[0, 1)"),
                                                   ("--dropout", "nan", "[0, 1)")])
def test_numeric_flags_are_checked_when_parsed(flag, value, interval, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:  # before the data: the folder does not exist
        trainer.main(["--data-dir", str(tmp_path / "nowhere"), f"{flag}={value}"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f": error: argument {flag}: must be in "
                                                             f"{interval}, got {value}")


# -----------------------------------------------------------------------------
# Damaged inputs: one line naming the file and the fix
DAMAGED_ANNOTATIONS = {
    "missing column": (lambda lines: lines[:2] + [lines[2].rsplit(b"\t", 2)[0] + b'\t"x.mp3"'] + lines[3:],
                       r"line 3 has 5 fields, the header 6; the file is truncated or corrupt"),
    "non-numeric id": (lambda lines: lines[:3] + [b'"x' + lines[3][1:]] + lines[4:],
                       r"line 4: clip_id 'x2' is not an integer of digits 0-9 within int64 \(MTAT's are "
                       r"below 60000\)"),
    "byte-order mark": (lambda lines: [b"\xef\xbb\xbf" + lines[0]] + lines[1:],
                        (r"starts with a byte-order mark \(saved by a spreadsheet\?\); save it as UTF-8 "
                         r"without one")),
    "empty file": (lambda lines: [], r"empty file"),
    "value 2": (lambda lines: lines[:5] + [lines[5].replace(b'\t"1"\t', b'\t"2"\t', 1)] + lines[6:],
                r"line 6: tag 't\d' is '2', not 0 or 1"),
    "header only": (lambda lines: lines[:1], r"a header but no clip rows"),
}


@pytest.mark.parametrize("damage", list(DAMAGED_ANNOTATIONS))
def test_damaged_annotations_are_one_line(small_data_dir, tmp_path, damage):
    data_dir = copy_data(small_data_dir, tmp_path / "data")
    csv_path = data_dir / "annotations_final.csv"
    change, reason = DAMAGED_ANNOTATIONS[damage]
    lines = change(csv_path.read_bytes().split(b"\r\n")[:-1])
    csv_path.write_bytes(b"".join(line + b"\r\n" for line in lines))
    if damage == "value 2":
        assert b'"2"' in csv_path.read_bytes()
    with pytest.raises(SystemExit) as stop:
        trainer.main(["--data-dir", str(data_dir), "--out", str(tmp_path / "exp"), "--epochs", "1"]
                     + SMALL_RUN_ARGS)
    assert re.fullmatch(rf"error: {re.escape(str(csv_path))}: {reason}; restore the file \(python "
                        rf"src/get_data.py --data-dir {re.escape(str(data_dir))} for MTAT\) or correct it",
                        str(stop.value)), stop.value
    (data_dir / "mp3").mkdir()
    with pytest.raises(SystemExit) as stop:  # a header only made a 0-clip spectrogram file, exit 0
        gen_spectrograms.main(["--data-dir", str(data_dir), "--workers", "1"])
    assert re.fullmatch(rf"error: {re.escape(str(csv_path))}: {reason}; download it again: python "
                        r"src/get_data.py", str(stop.value)), stop.value


def test_report_names_damaged_run_files_and_an_out_that_is_a_file(small_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(small_run[0], run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    for key, value, said in (("val_roc_auc", None, "null, not a number"),
                             ("test_roc_auc", "0.9", '"0.9", not a number'),
                             ("seed", "x", '"x", not an integer')):
        (run_dir / "results.json").write_text(json.dumps(dict(results, **{key: value})))
        with pytest.raises(SystemExit) as stop:
            report.main([str(run_dir)])
        assert str(stop.value) == (f"error: {run_dir / 'results.json'}: {key} is {said}; the file is "
                                   "damaged: restore it, or rerun that run with trainer.py")
    (run_dir / "results.json").write_text(json.dumps(results))
    metrics = run_dir / "metrics.csv"
    good = metrics.read_text()
    lines = good.splitlines(keepends=True)
    for damaged in ("".join(lines[:1] + ["x," + lines[1].split(",", 1)[1]] + lines[2:]),  # not a number
                    good + "1,2,3\n",  # a row cut short
                    good.replace("val_roc_auc", "v", 1)):  # a column missing
        metrics.write_text(damaged)
        with pytest.raises(SystemExit) as stop:
            report.main([str(run_dir)])
        assert str(stop.value).startswith(f"error: {metrics}: line ")
        assert str(stop.value).endswith("the file is damaged: restore it, or delete it to report the run "
                                        "without its curves")
    metrics.write_text(good)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as stop:
        report.main([str(run_dir), "--out", str(tmp_path / "file")])
    assert str(stop.value) == (f"error: --out {tmp_path / 'file'}: {tmp_path / 'file'} is a file, not a "
                               "folder; name a folder (it is created if missing)")


@pytest.mark.parametrize("cut", ["mid-row", "after the path", "blank line"])
def test_predict_resume_after_a_damaged_csv(checkpoints, songs, tmp_path, capsys, cut):
    csv_path = tmp_path / "tags.csv"
    args = songs[:3] + ["--checkpoint", str(checkpoints[0]), "--csv", str(csv_path), "--workers", "0"]
    predict.main(args)
    whole = csv_path.read_text()
    damaged = dict(zip(["mid-row", "after the path", "blank line"], [
        whole[:-40], whole[:whole.index(songs[2]) + len(songs[2]) + 1], whole + "\r\n"]))[cut]
    csv_path.write_text(damaged)
    capsys.readouterr()
    predict.main(args + ["--resume"])  # it was a traceback, or a refusal: the new results lost
    err = capsys.readouterr().err
    if cut != "blank line":
        assert f"note: --resume: {csv_path}: line 4 not whole (cut short?): tagged again" in err
        assert "resuming: 2 file(s) already tagged in the outputs, 1 to tag" in err
    else:
        assert "resuming: 3 file(s) already tagged in the outputs, 0 to tag" in err
    assert [row[:3] for row in csv.reader(csv_path.read_text().splitlines())] == [
        row[:3] for row in csv.reader(whole.splitlines())]


def test_predict_resume_refuses_a_json_that_is_not_its_own(checkpoints, songs, tmp_path):
    json_path = tmp_path / "tags.json"
    json_path.write_text("[1, 2]")
    with pytest.raises(SystemExit) as stop:
        predict.main(songs + ["--checkpoint", str(checkpoints[0]), "--json", str(json_path), "--resume"])
    assert str(stop.value) == (f"error: --resume: cannot read {json_path} (ValueError: not predict.py's JSON "
                               "({path: {...}, ...})); pass another --json file, or leave out --resume")


# -----------------------------------------------------------------------------
# Values that are not finite, and symbolic link loops
def test_non_finite_spectrograms_are_called_that_not_divergence(small_data_dir, tmp_path):
    data_dir = copy_data(small_data_dir, tmp_path / "data")
    rows = np.load(data_dir / "spectrograms.npy", mmap_mode="r+")
    rows[3, 5, 7], rows[30, 0, 0] = np.nan, np.inf
    rows.flush()
    with pytest.raises(SystemExit) as stop:
        trainer.main(["--data-dir", str(data_dir), "--out", str(tmp_path / "exp"), "--epochs", "1"]
                     + SMALL_RUN_ARGS)
    assert str(stop.value) == (f"error: {data_dir / 'spectrograms.npy'} holds NaN or inf in 2 row(s) (the "
                               "first: row 3, 3/clip-3.mp3): the file is damaged; run python "
                               f"src/gen_spectrograms.py --data-dir {data_dir}: it computes those rows again")


def test_gen_spectrograms_never_calls_a_file_with_nan_complete(tmp_path, capsys):
    data_dir = clips_folder(tmp_path / "data", 4, seconds=3, loud_row=2)
    args = ["--data-dir", str(data_dir), "--workers", "1", "--dtype", "float32"]
    assert gen_spectrograms.main(args)["n_failed"] == 1  # its row was NaN, and the file "complete"
    meta = json.loads((data_dir / "spectrograms.json").read_text())
    assert [(f["row"], f["error"]) for f in meta["failed"]] == [
        (2, "its log-mel holds NaN or inf (the audio's power overflows float32)")]
    rows = np.load(data_dir / "spectrograms.npy", mmap_mode="r+")
    assert np.isfinite(rows).all() and not rows[2].any()
    expected = np.array(rows[1])
    rows[1, 10, 10] = np.inf  # damaged after it was finished
    rows.flush()
    del rows
    capsys.readouterr()
    assert gen_spectrograms.main(args)["n_computed"] == 1  # it said "already complete; nothing to do"
    assert (f"{data_dir / 'spectrograms.npy'} holds NaN or inf in 1 row(s) (the first: row 1): computing "
            "them again") in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(data_dir / "spectrograms.npy")[1], expected)
    assert json.loads((data_dir / "spectrograms.json").read_text())["failed"] == meta["failed"]


def test_symbolic_link_loops_in_a_folder_are_reported(checkpoints, songs, tmp_path, capsys):
    music, elsewhere = tmp_path / "music", tmp_path / "elsewhere"
    (music / "a").mkdir(parents=True)
    elsewhere.mkdir()
    shutil.copyfile(songs[0], music / "a" / "one.wav")
    shutil.copyfile(songs[1], elsewhere / "two.wav")
    (music / "a" / "loop").symlink_to("..")  # a folder holding it: endless
    (music / "linked").symlink_to(elsewhere)  # a linked folder is searched
    (music / "self.wav").symlink_to("self.wav")
    with pytest.raises(SystemExit) as stop:  # they were skipped without a word
        predict.main([str(music), "--checkpoint", str(checkpoints[0]), "--workers", "0"])
    assert str(stop.value).startswith("error: 2 of 4 files could not be tagged")
    captured = capsys.readouterr()
    assert (f"error: {music / 'a' / 'loop'}: a symbolic link loop (to {os.path.realpath(music)}, a folder "
            "holding it); not followed"
            in captured.err.splitlines())
    assert f"error: {music / 'self.wav'}: a symbolic link loop (self.wav); nothing to tag" in captured.err
    tagged = [line.split("  (")[0] for line in captured.out.splitlines() if not line.startswith(" ")]
    assert tagged == [str(music / "a" / "one.wav"), str(music / "linked" / "two.wav")]
