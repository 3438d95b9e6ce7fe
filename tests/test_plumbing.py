"""plumbing.py's mechanisms on their own and through the real scripts: temporary files of
their own, locks that follow no symbolic link, a full disk while locking, the worker pool's
clean-up, and the helpers the scripts share (signals, numeric flags, hashes, matplotlib)."""
import argparse
import errno
import gzip
import hashlib
import multiprocessing
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
from conftest import SMALL_RUN_ARGS, SRC

import formats
import gen_spectrograms
import get_data
import plumbing


def one_line(stderr):
    """The only line of stderr, after checking that there is no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def no_file_larger_than_zero():
    """preexec_fn: every file the subprocess writes is limited to 0 bytes (RLIMIT_FSIZE, SIGXFSZ
    ignored: a write fails with EFBIG), as on a full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))


# -----------------------------------------------------------------------------
# atomic_write: a temporary file of its own, never through a symbolic link
def test_atomic_write_gives_a_new_file_the_mode_open_gives(tmp_path):
    with open(tmp_path / "plain.txt", "w") as f:
        f.write("x")
    with plumbing.atomic_write(tmp_path / "atomic.txt") as f:
        f.write("x")
    mode = os.stat(tmp_path / "atomic.txt").st_mode & 0o777
    assert mode == os.stat(tmp_path / "plain.txt").st_mode & 0o777 == 0o666 & ~plumbing.UMASK
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atomic.txt", "plain.txt"]


def test_atomic_writes_of_one_file_at_once_each_have_their_temporary_file(tmp_path):
    target = tmp_path / "out.json"
    with plumbing.atomic_write(target) as outer:
        outer.write("outer")
        with plumbing.atomic_write(target) as inner:  # one fixed <name>.tmp: both wrote into it
            inner.write("inner")
            temporary = sorted(p.name for p in tmp_path.iterdir())
        assert target.read_text() == "inner"
    assert target.read_text() == "outer"
    assert len(temporary) == 2 and all(name.startswith("out.json.") and name.endswith(".tmp")
                                       for name in temporary)
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_write_never_writes_through_a_symbolic_link(tmp_path):
    users_file = tmp_path / "elsewhere" / "thesis.txt"
    users_file.parent.mkdir()
    users_file.write_bytes(b"a user's file\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json.tmp").symlink_to(users_file)  # where a fixed temporary name was
    (out / "results.json").symlink_to(users_file)
    plumbing.write_json(out / "results.json", {"epoch": 1})
    assert users_file.read_bytes() == b"a user's file\n"
    assert not (out / "results.json").is_symlink()  # the link itself was replaced
    assert plumbing.read_json(out / "results.json") == {"epoch": 1}
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.json.tmp"]


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_full_disk_in_atomic_write_is_one_line_and_keeps_the_previous_file(tmp_path, wrapped):
    target = tmp_path / "last.pt"
    target.write_bytes(b"the previous epoch's")
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(SystemExit) as stop, plumbing.atomic_write(target, "wb") as f:
        f.write(b"half")
        if not wrapped:
            raise full
        raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from full  # as torch.save
    assert str(stop.value).startswith(f"error: cannot write {target}: No space left on device; ")
    assert str(stop.value).endswith(" MiB free there; the previous last.pt, if any, is unchanged")
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert target.read_bytes() == b"the previous epoch's"


# -----------------------------------------------------------------------------
# hold_lock: no symbolic link followed; a full disk while locking leaves nothing
def test_a_symbolic_link_at_a_lock_is_refused_and_its_target_untouched(tmp_path):
    users_file = tmp_path / "notes.txt"
    users_file.write_bytes(b"a user's notes\n")
    (tmp_path / "out.csv.lock").symlink_to(users_file)
    with pytest.raises(SystemExit) as stop:
        plumbing.hold_lock(tmp_path / "out.csv.lock", tmp_path / "out.csv", "pass another --csv")
    assert str(stop.value) == (f"error: {tmp_path / 'out.csv.lock'} is a symbolic link, not a lock file of "
                               "this program; remove it")
    assert users_file.read_bytes() == b"a user's notes\n"
    assert (tmp_path / "out.csv.lock").is_symlink() and not plumbing.held_locks


def test_gen_spectrograms_refuses_a_symbolic_link_at_its_lock(tmp_path):
    data_dir = tmp_path / "data"
    (data_dir / "mp3").mkdir(parents=True)
    (data_dir / "annotations_final.csv").write_bytes(b'"clip_id"\t"a"\t"mp3_path"\r\n"1"\t"1"\t"0/x.wav"\r\n')
    users_file = tmp_path / "notes.txt"
    users_file.write_bytes(b"a user's notes\n")
    (data_dir / "spectrograms.lock").symlink_to(users_file)
    with pytest.raises(SystemExit, match="spectrograms.lock is a symbolic link, not a lock file of this "):
        gen_spectrograms.main(["--data-dir", str(data_dir), "--workers", "1"])
    assert users_file.read_bytes() == b"a user's notes\n"
    assert sorted(p.name for p in data_dir.iterdir()) == ["annotations_final.csv", "mp3", "spectrograms.lock"]


def test_taking_holding_and_releasing_a_lock(tmp_path):
    lock = tmp_path / "run" / ".lock"
    lock.parent.mkdir()
    plumbing.hold_lock(lock, "the run", "choose another --run", remove_empty_folder=True)
    try:
        assert lock.read_text().startswith(f"pid {os.getpid()} (")
        plumbing.hold_lock(lock, "the run", "choose another --run")  # held already: nothing to do
        code = (f"import sys; sys.path.insert(0, {str(SRC)!r}); import plumbing; "
                f"plumbing.hold_lock({str(lock)!r}, 'the run', 'choose another --run')")
        taken = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                               check=False)
        assert taken.returncode == 1
        assert one_line(taken.stderr).startswith(f"error: the run is being written by pid {os.getpid()} (")
    finally:
        plumbing.release_lock(lock)
    assert not lock.parent.exists()  # the folder held only the lock


LOCK_ON_A_FULL_DISK = """
import sys
sys.path.insert(0, {src!r})
import plumbing
plumbing.check_folder({folder!r}, "--out")  # creates a file: no byte to write
plumbing.hold_lock({lock!r}, "the run folder", "choose another --run", remove_empty_folder=True)
print("locked")
"""


def test_a_full_disk_while_locking_is_one_line_and_leaves_no_lock_nor_folder(tmp_path):
    folder = tmp_path / "out" / "run"
    code = LOCK_ON_A_FULL_DISK.format(src=str(SRC), folder=str(folder), lock=str(folder / ".lock"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          preexec_fn=no_file_larger_than_zero, check=False)
    assert (done.returncode, done.stdout) == (1, "")
    line = one_line(done.stderr)
    assert line.startswith(f"error: cannot lock the run folder: cannot write {folder / '.lock'}: File too "
                           "large; ")
    assert line.endswith(" MiB free there; free some space there, or choose another --run")
    assert not folder.exists() and (tmp_path / "out").is_dir()


@pytest.mark.slow
def test_trainer_on_a_full_disk_leaves_no_run_folder_holding_only_its_lock(small_data_dir, tmp_path):
    done = subprocess.run([sys.executable, str(SRC / "trainer.py"), "--data-dir", str(small_data_dir),
                           "--out", str(tmp_path / "out"), "--run", "r", "--epochs", "1", *SMALL_RUN_ARGS],
                          capture_output=True, text=True, timeout=300, preexec_fn=no_file_larger_than_zero,
                          check=False)
    assert done.returncode == 1
    assert one_line(done.stderr).startswith("error: cannot lock the run folder ")
    assert list((tmp_path / "out").iterdir()) == []


# -----------------------------------------------------------------------------
# the worker pool: closing it kills its workers, and no other child of this process
def slow_square(value):
    time.sleep(value)
    return value ** 2


def test_closing_the_pool_kills_its_workers_and_spares_other_children():
    other = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    other.start()
    try:
        results = plumbing.pool_results(slow_square, [0, 60, 60], 3, ordered=True)
        assert next(results) == (0, 0)
        workers = [p for p in multiprocessing.active_children() if p is not other]
        assert len(workers) == 3
        start = time.monotonic()
        results.close()  # as a Ctrl-C in the caller does: the tasks of 60 s are not waited for
        assert time.monotonic() - start < 10
        assert not any(worker.is_alive() for worker in workers)
        assert other.is_alive()
    finally:
        other.kill()
        other.join()


# -----------------------------------------------------------------------------
# the helpers the scripts share
@pytest.mark.parametrize("interrupt, code", [(KeyboardInterrupt(), 130),
                                             (plumbing.Interrupted(signal.SIGTERM), 143),
                                             (plumbing.Interrupted(signal.SIGHUP), 129)])
def test_exit_interrupted_says_its_line_and_exits_with_128_plus_the_signal(interrupt, code, capsys):
    with pytest.raises(SystemExit) as stop:
        plumbing.exit_interrupted(interrupt, "interrupted: rerun the same command to resume")
    assert stop.value.code == code
    assert capsys.readouterr().err == "interrupted: rerun the same command to resume\n"


@pytest.mark.parametrize("value, error", [("3", None), ("1", None), ("0", "must be at least 1, got 0"),
                                          ("-5", "must be at least 1, got -5"),
                                          ("2.5", "not an integer: '2.5'"), ("x", "not an integer: 'x'")])
def test_at_least_checks_an_integer_flag_when_it_is_parsed(value, error, capsys):
    parser = argparse.ArgumentParser(prog="script.py")
    parser.add_argument("--workers", type=plumbing.at_least(1))
    if error is None:
        assert parser.parse_args(["--workers", value]).workers == int(value)
        return
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--workers", value])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"script.py: error: argument --workers: {error}"


def test_trainer_eval_batch_size_is_checked_when_parsed(tmp_path, capsys):
    import trainer

    with pytest.raises(SystemExit) as stop:  # before the data: the folder does not exist
        trainer.main(["--data-dir", str(tmp_path / "nowhere"), "--eval-batch-size=0"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        ": error: argument --eval-batch-size: must be at least 1, got 0")


def test_file_digest_of_one_file_of_several_and_of_gzip_content(tmp_path, capsys):
    parts = [tmp_path / f"part{i}" for i in range(3)]
    for i, part in enumerate(parts):
        part.write_bytes(bytes([i]) * (700_000 * (i + 1)))  # across the 1 MiB reads
    whole = b"".join(part.read_bytes() for part in parts)
    assert plumbing.file_digest(parts[0]) == hashlib.md5(parts[0].read_bytes()).hexdigest()
    assert plumbing.file_digest(str(parts[1]), "sha256") == hashlib.sha256(parts[1].read_bytes()).hexdigest()
    assert capsys.readouterr().err == ""  # no bar unless asked for
    assert plumbing.file_digest(parts, progress="md5 part0") == hashlib.md5(whole).hexdigest()
    assert "md5 part0: 100%" in capsys.readouterr().err
    with gzip.open(tmp_path / "whole.gz", "wb") as f:
        f.write(whole)
    assert plumbing.file_digest(tmp_path / "whole.gz") == hashlib.md5(whole).hexdigest()


def test_import_pyplot_draws_into_files_or_is_none_without_matplotlib(monkeypatch):
    pyplot = plumbing.import_pyplot()
    assert pyplot.get_backend().lower() == "agg"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert plumbing.import_pyplot() is None


def test_get_data_starts_without_torch():
    code = f"import sys; sys.path.insert(0, {str(SRC)!r}); import get_data; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          check=True)
    assert done.stdout == "False\n"
    assert formats.MTAT_ANNOTATIONS_MD5 == get_data.MD5[get_data.ANNOTATIONS]  # written once, in get_data
