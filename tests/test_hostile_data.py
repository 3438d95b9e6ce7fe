"""Hostile inputs to the data stages, through the real scripts: get_data.py --synthetic over other data,
a zip member that fails its CRC, a mirror whose body never ends; annotations with a tag column named
twice or a clip id that is no int64; state files that are JSON but not sane; a kill inside
gen_spectrograms.py's finish; a FIFO or an unreadable clip. Each ends in one line naming the file, or
is recovered from."""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import soundfile

import gen_spectrograms
import get_data
import plumbing
import test_get_data
import trainer
from conftest import SMALL_RUN_ARGS, SRC, write_spectrogram_set
from test_get_data import Handler, md5, run, serve, split3, zip_bytes

# test_get_data's fixtures: the loopback server, the small MTAT-shaped set, no real host
server, small, loopback_only = test_get_data.server, test_get_data.small, test_get_data.loopback_only

N_CLIPS = 4


# -----------------------------------------------------------------------------
# get_data.py
def test_synthetic_refuses_other_annotations_unless_overwrite(tmp_path):
    (tmp_path / "annotations_final.csv.gz").write_bytes(b"a user's own annotations")
    (tmp_path / "annotations_final.csv").write_bytes(b"a user's own annotations")
    message = run(tmp_path, "--synthetic", "1")
    assert message == (f"error: {tmp_path} holds other annotations (annotations_final.csv), which "
                       "--synthetic would replace; choose another --data-dir (default for --synthetic: "
                       "data/demo), or pass --overwrite")
    assert (tmp_path / "annotations_final.csv").read_bytes() == b"a user's own annotations"
    assert not (tmp_path / "mp3").exists() and not (tmp_path / "synthetic.json").exists()
    (tmp_path / "annotations_final.csv").unlink()
    assert "holds other annotations (annotations_final.csv.gz)" in run(tmp_path, "--synthetic", "1")

    assert run(tmp_path, "--synthetic", "1", "--overwrite") == ""
    written = (tmp_path / "annotations_final.csv").read_bytes()
    assert b"synthetic-000001.mp3" in written
    # a folder holding an earlier --synthetic set (its synthetic.json matches) is written again
    (tmp_path / "annotations_final.csv.gz").unlink()
    assert run(tmp_path, "--synthetic", "2") == ""
    assert b"synthetic-000002.mp3" in (tmp_path / "annotations_final.csv").read_bytes()
    # the same set with its annotations edited since is the user's now
    (tmp_path / "annotations_final.csv").write_bytes(written.replace(b'"0"', b'"1"', 1))
    assert "holds other annotations" in run(tmp_path, "--synthetic", "2")


def test_a_zip_member_failing_its_crc_is_one_line_and_leaves_nothing_half_written(server, small, tmp_path,
                                                                                   monkeypatch):
    archive = bytearray(zip_bytes(small["clips"]))
    name = list(small["clips"])[2]
    at = archive.index(small["clips"][name])  # stored: the member's bytes are in the zip as they are
    archive[at + 100] ^= 0xFF
    monkeypatch.setitem(get_data.MD5, "mp3.zip", md5(archive))  # the parts pass their MD5, as after a copy
    server.files.update({"annotations_final.csv": small["annotations"], **split3(bytes(archive))})
    message = run(tmp_path, "--base-url", server.url, "--keep-archives")
    assert message == (f"error: mp3.zip (mp3.zip.001 + mp3.zip.002 + mp3.zip.003): its member {name} is "
                       f"damaged (Bad CRC-32 for file '{name}'); rerun: the parts are checked again, and "
                       "downloaded again if damaged")
    assert not (tmp_path / "mp3" / name).exists()
    assert not list(tmp_path.rglob("*.part"))
    assert not (tmp_path / get_data.VERIFIED).exists()  # the next run hashes the parts again


class EndlessHandler(Handler):
    """server.endless: a name whose body has no Content-Length and goes on (64 MiB here, not forever: a
    client that does not stop gets to the end, and fails on what it got)."""

    def do_GET(self):
        if self.path.lstrip("/") != self.server.endless:
            return super().do_GET()
        self.server.requests.append((self.server.endless, self.headers.get("Range")))
        self.send_response(200)
        self.end_headers()
        try:
            for _ in range(1024):
                self.wfile.write(b"x" * 65536)
        except OSError:  # the client hung up
            pass


@pytest.mark.parametrize("name", ["annotations_final.csv", "mp3.zip.002"])
def test_a_mirror_whose_body_never_ends_is_cut_at_the_files_size(server, small, tmp_path, monkeypatch, name):
    serve(server, small)
    server.RequestHandlerClass, server.endless = EndlessHandler, name
    if name != "annotations_final.csv":  # the annotations' limit is the size of MTAT's, as in use
        monkeypatch.setitem(get_data.MAX_BYTES, name, 50_000)
    message = run(tmp_path, "--base-url", server.url)
    limit = get_data.MAX_BYTES[name]
    assert message == (f"error: could not download {name}: {server.url}{name}: 127.0.0.1 sends more than "
                       f"the {limit:,} bytes of {name}: not MTAT's file. Check the network or point "
                       "--base-url at a mirror; a rerun resumes the download")
    assert not (tmp_path / (name + ".part")).exists() and not (tmp_path / name).exists()


# -----------------------------------------------------------------------------
# the annotations: tag names, clip ids
def edit_annotations(data_dir, old, new, count=1):
    path = data_dir / "annotations_final.csv"
    path.write_bytes(path.read_bytes().replace(old.encode(), new.encode(), count))
    return path


@pytest.mark.parametrize("merge", [False, True])
def test_a_tag_column_named_twice_is_refused(tmp_path, merge):
    write_spectrogram_set(tmp_path / "data", 48, n_tags=4)
    csv_path = edit_annotations(tmp_path / "data", '"t2"', '"t1"' if not merge else '"beat"')
    if merge:  # the synonyms beat and beats are ORed into one tag; a raw name twice is another matter
        edit_annotations(tmp_path / "data", '"t1"', '"beat"')
    twice = "'beat'" if merge else "'t1'"
    args = ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "runs"), "--epochs", "1"]
    args += [a for a in SMALL_RUN_ARGS if a != "--no-merge"] if merge else SMALL_RUN_ARGS
    with pytest.raises(SystemExit) as exit_info:
        trainer.main(args)
    assert str(exit_info.value) == (
        f"error: {csv_path}: the header names the tag(s) {twice} more than once; give each tag column a name "
        f"of its own; restore the file (python src/get_data.py --data-dir {tmp_path / 'data'} for MTAT) or "
        "correct it")


def make_clips(data_dir, n_clips=N_CLIPS, first_id="0"):
    """data_dir/annotations_final.csv (tags a, b) and n_clips short WAV clips, each a tone of its own."""
    t = np.arange(16000) / 16000
    lines = ['"clip_id"\t"a"\t"b"\t"mp3_path"']
    for row in range(n_clips):
        path = f"{row:x}/clip-{row}.wav"
        (data_dir / "mp3" / path).parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(data_dir / "mp3" / path, (0.3 * np.sin(2 * np.pi * (200 + 90 * row) * t)), 16000)
        lines.append(f'"{first_id if row == 0 else row}"\t"{row % 2}"\t"1"\t"{path}"')
    (data_dir / "annotations_final.csv").write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    return data_dir


def gen(data_dir, *extra):
    args = ["--data-dir", str(data_dir), "--workers", "1", "--dtype", "float32", *extra]
    return gen_spectrograms.main(args)


@pytest.mark.parametrize("clip_id", ["99999999999999999999", "٣"])
def test_a_clip_id_that_is_no_int64_is_named_with_its_line(tmp_path, clip_id):
    data_dir = make_clips(tmp_path / "data", first_id=clip_id)
    csv_path = data_dir / "annotations_final.csv"
    with pytest.raises(SystemExit) as exit_info:
        gen(data_dir)
    assert str(exit_info.value) == (f"error: {csv_path}: line 2: clip_id {clip_id!r} is not an integer of "
                                    "digits 0-9 within int64 (MTAT's are below 60000); download it again: "
                                    "python src/get_data.py")
    write_spectrogram_set(tmp_path / "set", 48, n_tags=4)
    edit_annotations(tmp_path / "set", '"5"', f'"{clip_id}"')
    with pytest.raises(SystemExit, match=r"annotations_final.csv: line 7: clip_id .* not an integer .*rest"):
        trainer.main(["--data-dir", str(tmp_path / "set"), "--out", str(tmp_path / "runs"), "--epochs", "1",
                      *SMALL_RUN_ARGS])


# -----------------------------------------------------------------------------
# gen_spectrograms.py: its state files, and a kill while it finishes
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A folder of N_CLIPS clips and the finished spectrograms.npy/.json of an uninterrupted run."""
    data_dir = make_clips(tmp_path_factory.mktemp("finished"))
    assert gen(data_dir)["n_computed"] == N_CLIPS
    return data_dir


def copy_clips(finished, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(finished, data_dir, ignore=shutil.ignore_patterns("spectrograms*"))
    return data_dir


def same_outputs(data_dir, finished):
    assert (data_dir / "spectrograms.npy").read_bytes() == (finished / "spectrograms.npy").read_bytes()
    meta = plumbing.read_json(data_dir / "spectrograms.json")
    assert meta == plumbing.read_json(finished / "spectrograms.json")
    assert sorted(p.name for p in data_dir.iterdir()) == [
        "annotations_final.csv", "mp3", "spectrograms.json", "spectrograms.npy"]


@pytest.mark.parametrize("change", [dict(done=[0, N_CLIPS]), dict(done=["0"]), dict(done=[True]),
                                    dict(failed={"row": 0}), dict(failed=[{"row": "1", "error": "x"}]),
                                    dict(failed=[{"row": 9, "error": "x"}]), dict(n_clips="4")])
def test_a_progress_file_that_is_json_but_not_sane_is_named_and_started_over(finished, tmp_path, capsys,
                                                                             change):
    data_dir = copy_clips(finished, tmp_path)
    settings = {k: v for k, v in plumbing.read_json(finished / "spectrograms.json").items()
                if k not in ("format_version", "shape", "failed", "versions", "annotations_md5")}
    shutil.copyfile(finished / "spectrograms.npy", data_dir / "spectrograms.partial.npy")
    progress = {**settings, "done": list(range(N_CLIPS)), "failed": [], **change}
    (data_dir / "spectrograms.progress.json").write_text(json.dumps(progress))
    assert gen(data_dir)["n_computed"] == N_CLIPS
    err = capsys.readouterr().err
    assert f"{data_dir / 'spectrograms.partial.npy'} cannot be resumed" in err
    assert "spectrograms.progress.json does not hold rows of its" in err and "removing it" in err
    same_outputs(data_dir, finished)
    # beside a finished pair: nothing to compute, and nothing left behind
    shutil.copyfile(finished / "spectrograms.npy", data_dir / "spectrograms.partial.npy")
    (data_dir / "spectrograms.progress.json").write_text(json.dumps(progress))
    assert gen(data_dir)["n_computed"] == 0
    same_outputs(data_dir, finished)


@pytest.mark.parametrize("change", [dict(failed=5), dict(failed=["row 1"]), dict(failed=[{"row": 99}]),
                                    dict(n_clips="4")])
def test_a_finished_json_of_wrong_types_is_named_with_the_fix(finished, tmp_path, change):
    data_dir = copy_clips(finished, tmp_path)
    shutil.copyfile(finished / "spectrograms.npy", data_dir / "spectrograms.npy")
    meta = dict(plumbing.read_json(finished / "spectrograms.json"), **change)
    (data_dir / "spectrograms.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as exit_info:
        gen(data_dir)
    assert str(exit_info.value) == (
        f"error: {data_dir / 'spectrograms.json'} lacks n_clips, dtype or the failed rows as this code "
        "writes them; spectrograms.npy cannot be trusted without it: pass --overwrite to compute it again")
    assert gen(data_dir, "--overwrite")["n_computed"] == N_CLIPS
    same_outputs(data_dir, finished)


KILLED_AT = """
import os, pathlib, signal, sys
sys.path.insert(0, {src!r})
import gen_spectrograms, plumbing

def killing(function, name, at):  # SIGKILL at one moment of finish(): nothing after it runs
    def wrapper(path, *args, **kwargs):
        target = pathlib.Path(args[0] if at == "rename .npy" else path)
        if {moment!r} == at and target.name == name and (at != "remove progress" or target.exists()):
            os.kill(os.getpid(), signal.SIGKILL)
        return function(path, *args, **kwargs)
    return wrapper

plumbing.write_json = killing(plumbing.write_json, "spectrograms.json", "write .json")
os.replace = killing(os.replace, "spectrograms.npy", "rename .npy")
pathlib.Path.unlink = killing(pathlib.Path.unlink, "spectrograms.progress.json", "remove progress")
gen_spectrograms.main(sys.argv[1:])
"""


@pytest.mark.parametrize("moment", ["write .json", "rename .npy", "remove progress"])
@pytest.mark.parametrize("earlier", [None, "2 rows"])
def test_a_kill_at_any_moment_of_finish_loses_no_row(finished, tmp_path, moment, earlier):
    data_dir = copy_clips(finished, tmp_path)
    if earlier:  # a finished file of fewer clips that this run extends: its old .npy goes first
        assert gen(data_dir, "--limit", "2")["n_computed"] == 2
    code = KILLED_AT.format(src=str(SRC), moment=moment)
    killed = subprocess.run([sys.executable, "-c", code, "--data-dir", str(data_dir), "--workers", "1",
                             "--dtype", "float32"], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert gen(data_dir)["n_computed"] == 0
    same_outputs(data_dir, finished)


NO_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]  # root, held to permissions


@pytest.mark.slow
def test_a_fifo_or_an_unreadable_clip_is_a_failed_row_not_a_hang(tmp_path):
    """A FIFO in a clip's place would block a decoder forever; an unreadable clip is no "audio?" riddle."""
    data_dir = make_clips(tmp_path / "data")
    fifo, locked = (data_dir / "mp3" / f"{row:x}/clip-{row}.wav" for row in (1, 2))
    fifo.unlink()
    os.mkfifo(fifo)
    os.chmod(locked, 0)
    command = [sys.executable, str(SRC / "gen_spectrograms.py"), "--data-dir", str(data_dir),
               "--workers", "1"]
    if os.geteuid() == 0:  # root reads any file: it runs without that capability
        if not shutil.which("setpriv") or subprocess.run(NO_DAC + ["true"]).returncode != 0:
            pytest.skip("root reads a file whatever its permissions, and setpriv cannot drop that here")
        command = NO_DAC + command
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    failed = plumbing.read_json(data_dir / "spectrograms.json")["failed"]
    assert failed == [dict(row=1, clip_id=1, path="1/clip-1.wav", error="not a regular file"),
                      dict(row=2, clip_id=2, path="2/clip-2.wav", error="cannot be read (permission denied)")]
