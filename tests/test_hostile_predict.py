"""predict.py on a hostile library: names that are not UTF-8 or start like a spreadsheet formula, an
output that names an input, a file named twice, a FIFO, a file it may not read, a format only ffmpeg
decodes, a checkpoint replaced while it is read; and --quiet. Each through the real script, with the
small run's checkpoint and copies of the real MTAT clip."""
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import SRC

import predict

BAD_NAME = b"bad\xff\xfe.wav"  # not UTF-8: Python holds it as "bad\udcff\udcfe.wav"


@pytest.fixture
def checkpoint(small_run):
    return small_run[0] / "best_model.pt"


@pytest.fixture
def song(mtat_clip, tmp_path):
    path = tmp_path / "song.mp3"
    shutil.copyfile(mtat_clip, path)
    return path


def tag(argv, capsys):
    """predict.main(argv) in this process -> (exit code or message, stdout, stderr)."""
    try:
        predict.main([str(a) for a in argv] + ["--workers", "0"])
        code = 0
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def headers(stdout):  # the file each printed block is about
    return [line.split("  (")[0] for line in stdout.splitlines() if not line.startswith(" ")]


def csv_rows(path):
    with open(path, newline="", encoding="utf-8") as f:  # strict: the file is UTF-8, whatever the names
        return {row["path"]: row for row in csv.DictReader(f)}


def test_a_name_that_is_not_utf8_is_tagged_saved_and_resumed(checkpoint, song, tmp_path, capsys):
    music = tmp_path / "music"
    music.mkdir()
    shutil.copyfile(song, music / "good.mp3")
    bad = os.path.join(os.fsencode(str(music)), BAD_NAME)
    shutil.copyfile(song, bad)  # MP3 bytes: soundfile reads a file by what it holds
    bad_str = os.fsdecode(bad)
    out = {flag: tmp_path / f"tags.{ext}" for flag, ext in (("--csv", "csv"), ("--json", "json"),
                                                            ("--embeddings", "npz"))}
    argv = [music, "--checkpoint", checkpoint, *[x for pair in out.items() for x in pair]]
    code, stdout, stderr = tag(argv, capsys)
    assert code == 0, stderr
    assert f"{music}/bad\\udcff\\udcfe.wav  (29" in stdout  # printed, escaped, to a strict UTF-8 stdout
    rows = csv_rows(out["--csv"])
    escaped = f"{music}/bad\\xff\\xfe.wav"  # the CSV keeps the name's bytes as \xNN
    assert list(rows) == [escaped, f"{music}/good.mp3"]
    assert rows[escaped]["error"] == "" and rows[escaped]["windows"] == "1"
    assert rows[escaped]["duration_s"] == rows[f"{music}/good.mp3"]["duration_s"]
    assert list(json.loads(out["--json"].read_text())) == [bad_str, f"{music}/good.mp3"]
    with np.load(out["--embeddings"]) as npz:
        assert list(npz["paths"]) == [bad_str, f"{music}/good.mp3"]
        np.testing.assert_array_equal(npz["embeddings"][0], npz["embeddings"][1])
    assert predict.cell_text(escaped) == bad_str and os.path.isfile(os.fsencode(bad_str))

    code, stdout, stderr = tag(argv + ["--resume"], capsys)  # every output read back to the same paths
    assert code == 0 and "resuming: 2 file(s) already tagged in the outputs, 0 to tag" in stderr
    assert list(csv_rows(out["--csv"])) == [escaped, f"{music}/good.mp3"]


@pytest.mark.slow
def test_a_name_that_is_not_utf8_prints_to_a_strict_stdout(checkpoint, song, tmp_path):
    bad = os.path.join(os.fsencode(str(tmp_path)), BAD_NAME)
    shutil.copyfile(song, bad)
    missing = os.path.join(os.fsencode(str(tmp_path)), b"gone\xff.wav")
    done = subprocess.run([sys.executable, SRC / "predict.py", bad, missing, "--checkpoint", checkpoint,
                           "--csv", tmp_path / "tags.csv", "--taggram", tmp_path / "t.png"],
                          capture_output=True, timeout=300,
                          env=dict(os.environ, PYTHONIOENCODING="utf-8:strict"))
    assert done.returncode == 1 and b"Traceback" not in done.stderr, done.stderr.decode(errors="replace")
    assert done.stdout.startswith(f"{tmp_path}/bad\\udcff\\udcfe.wav  (29".encode())
    assert f"error: {tmp_path}/gone\\udcff.wav: no such file".encode() in done.stderr
    assert list(csv_rows(tmp_path / "tags.csv")) == [f"{tmp_path}/bad\\xff\\xfe.wav",
                                                     f"{tmp_path}/gone\\xff.wav"]
    assert (tmp_path / "t_bad\udcff\udcfe.png").read_bytes()[:4] == b"\x89PNG"  # its title escaped


def test_an_output_that_is_an_input_is_refused_before_any_work(checkpoint, song, tmp_path, capsys):
    before = song.read_bytes()
    other, spelt = tmp_path / "x.csv", tmp_path / "." / ".." / tmp_path.name / "song.mp3"
    cases = [
        (["--csv", song], f"error: --csv {song}: the same file as the audio file {song}, which it would "
                          f"overwrite; name another file for --csv"),
        (["--csv", spelt], f"error: --csv {spelt}: the same file as the audio file {song}"),
        (["--json", checkpoint], f"error: --json {checkpoint}: the same file as the checkpoint {checkpoint}"),
        (["--csv", other, "--json", other], f"error: --csv {other}: the same file as --json {other}, "),
        (["--taggram", song], f"error: --taggram {song}: the same file as the audio file {song}"),
    ]
    for flags, message in cases:
        code, stdout, _ = tag([song, "--checkpoint", checkpoint, *flags], capsys)
        assert str(code).startswith(message), (flags, code)
        assert stdout == "" and song.read_bytes() == before
    hard = tmp_path / "hard.mp3"
    os.link(song, hard)  # one file under two names
    code, _, _ = tag([song, "--checkpoint", checkpoint, "--json", hard], capsys)
    assert str(code).startswith(f"error: --json {hard}: the same file as the audio file {song}")
    assert song.read_bytes() == before and not other.exists()


def test_a_file_named_twice_is_tagged_once(checkpoint, song, tmp_path, monkeypatch, capsys):
    (tmp_path / "m").mkdir()
    shutil.move(song, tmp_path / "m" / "ok.mp3")
    shutil.copyfile(tmp_path / "m" / "ok.mp3", tmp_path / "m" / "other.mp3")
    monkeypatch.chdir(tmp_path)
    code, stdout, _ = tag(["m/ok.mp3", "./m/ok.mp3", "m", "--checkpoint", checkpoint, "--csv", "t.csv"],
                          capsys)
    assert code == 0
    assert headers(stdout) == ["m/ok.mp3", "m/other.mp3"]
    assert list(csv_rows(tmp_path / "t.csv")) == ["m/ok.mp3", "m/other.mp3"]


NO_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]  # root, held to permissions


@pytest.mark.slow
def test_a_file_it_may_not_read_says_permission_denied(checkpoint, song, tmp_path):
    os.chmod(song, 0)
    command = [sys.executable, SRC / "predict.py", song, "--checkpoint", checkpoint]
    if os.geteuid() == 0:  # root reads any file: it runs without that capability
        if not shutil.which("setpriv") or subprocess.run(NO_DAC + ["true"]).returncode != 0:
            pytest.skip("root reads a file whatever its permissions, and setpriv cannot drop that here")
        command = NO_DAC + command
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert f"error: {song}: cannot be read (permission denied)\n" in done.stderr
    assert done.stderr.endswith(f"error: 1 of 1 files could not be tagged ({song})\n")


def test_a_file_that_is_not_audio_says_it_cannot_be_decoded(checkpoint, song, tmp_path, capsys):
    notes = tmp_path / "notes.mp3"
    notes.write_text("shopping list\n" * 100)
    code, _, stderr = tag([notes, song, "--checkpoint", checkpoint], capsys)
    line = next(line for line in stderr.splitlines() if line.startswith("error: "))
    assert line.startswith(f"error: {notes}: cannot decode audio (") and "permission" not in line
    assert line.endswith("; not audio, or damaged") == bool(shutil.which("ffmpeg"))
    assert str(code).startswith(f"error: 1 of 2 files could not be tagged ({notes})")


def test_names_that_start_like_a_formula_are_quoted_in_the_csv(checkpoint, song, tmp_path, monkeypatch,
                                                              capsys):
    names = ["+x.mp3", "-x.mp3", "=cmd.mp3", "@x.mp3"]
    for name in names:
        shutil.copyfile(song, tmp_path / name)
    (tmp_path / "=bad.mp3").write_text("not audio\n" * 100)
    song.unlink()
    monkeypatch.chdir(tmp_path)
    argv = [".", "--checkpoint", checkpoint, "--csv", "t.csv", "--json", "t.json"]
    code, _, _ = tag(argv, capsys)
    assert str(code).startswith("error: 1 of 5 files could not be tagged (=bad.mp3)")
    lines = (tmp_path / "t.csv").read_text().splitlines()[1:]
    assert [line.split(",")[0] for line in lines] == ["'+x.mp3", "'-x.mp3", "'=bad.mp3", "'=cmd.mp3",
                                                      "'@x.mp3"]
    assert "\"'=bad.mp3: cannot decode audio (" in lines[2]  # the error cell too
    assert list(json.loads((tmp_path / "t.json").read_text())) == sorted(names + ["=bad.mp3"])
    code, _, stderr = tag(argv + ["--resume"], capsys)  # read back to the real names
    assert "resuming: 4 file(s) already tagged in the outputs, 1 to tag" in stderr
    assert (tmp_path / "t.csv").read_text().splitlines()[1:] == lines


@pytest.mark.slow
def test_a_fifo_and_a_format_no_decoder_here_reads_are_rows_with_their_reasons(checkpoint, song, tmp_path):
    music = tmp_path / "music"
    music.mkdir()
    os.mkfifo(music / "song.wav")  # opening it would wait for a writer forever
    os.mkfifo(tmp_path / "pipe.wav")
    (music / "voice.m4a").write_text("not audio either\n" * 100)
    shutil.move(song, music / "real.mp3")
    no_ffmpeg = tmp_path / "bin"  # PATH without ffmpeg: audioread has no decoder for .m4a
    no_ffmpeg.mkdir()
    done = subprocess.run([sys.executable, SRC / "predict.py", music, tmp_path / "pipe.wav", "--checkpoint",
                           checkpoint, "--csv", tmp_path / "t.csv", "--workers", "2"], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PATH=str(no_ffmpeg)))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    rows = csv_rows(tmp_path / "t.csv")
    assert list(rows) == [str(music / "real.mp3"), str(music / "song.wav"), str(music / "voice.m4a"),
                          str(tmp_path / "pipe.wav")]
    assert rows[str(music / "real.mp3")]["error"] == ""
    for fifo in (music / "song.wav", tmp_path / "pipe.wav"):
        assert rows[str(fifo)]["error"] == f"{fifo}: not a regular file"
        assert f"error: {fifo}: not a regular file\n" in done.stderr
    assert rows[str(music / "voice.m4a")]["error"].startswith(f"{music / 'voice.m4a'}: cannot decode audio")
    assert rows[str(music / "voice.m4a")]["error"].endswith(": install ffmpeg")


def test_an_m4a_in_a_folder_is_tagged(checkpoint, song, tmp_path, capsys):
    music = tmp_path / "music"
    music.mkdir()
    shutil.copyfile(song, music / "song.m4a")  # MP3 bytes: what matters is that the walk lists it
    expected = {str(music / "song.m4a"): "1"}
    if shutil.which("ffmpeg"):  # AAC, which only audioread decodes, under a name that is not UTF-8
        subprocess.run(["ffmpeg", "-loglevel", "error", "-i", song, "-t", "5", "-c:a", "aac",
                        os.path.join(os.fsencode(str(music)), b"aac\xff.m4a")], check=True, timeout=120)
        expected[f"{music}/aac\\xff.m4a"] = "1"
    code, _, stderr = tag([music, "--checkpoint", checkpoint, "--csv", tmp_path / "t.csv"], capsys)
    assert code == 0, stderr
    assert {path: row["windows"] for path, row in csv_rows(tmp_path / "t.csv").items()} == expected


def test_the_checkpoint_is_read_once(checkpoint, song, tmp_path, monkeypatch, capsys):
    """Replaced right after it is loaded: the rows name the bytes that were loaded, not the new file."""
    copy = tmp_path / "best_model.pt"
    shutil.copyfile(checkpoint, copy)
    loaded_sha256 = hashlib.sha256(copy.read_bytes()).hexdigest()
    load, replaced = torch.load, []

    def load_then_replace(*args, **kwargs):
        result = load(*args, **kwargs)
        if not replaced:
            torch.save(dict(result, note="another checkpoint"), tmp_path / "new.pt")
            os.replace(tmp_path / "new.pt", copy)
            replaced.append(hashlib.sha256(copy.read_bytes()).hexdigest())
        return result

    monkeypatch.setattr(torch, "load", load_then_replace)
    code, _, _ = tag([song, "--checkpoint", copy, "--csv", tmp_path / "t.csv"], capsys)
    assert code == 0 and replaced and replaced[0] != loaded_sha256
    assert [row["checkpoint_sha256"] for row in csv_rows(tmp_path / "t.csv").values()] == [loaded_sha256]


def test_quiet_prints_only_errors_and_summaries(checkpoint, song, tmp_path, capsys):
    missing = tmp_path / "missing.mp3"
    argv = [song, missing, "--checkpoint", checkpoint, "--csv", tmp_path / "t.csv"]
    code, stdout, _ = tag(argv, capsys)
    assert stdout.startswith(f"{song}  (29")
    code, stdout, stderr = tag(argv + ["--quiet"], capsys)
    assert stdout == ""
    assert f"error: {missing}: no such file\n" in stderr and f"wrote {tmp_path / 't.csv'}\n" in stderr
    assert str(code).startswith("error: 1 of 2 files could not be tagged")
    assert list(csv_rows(tmp_path / "t.csv")) == [str(song), str(missing)]
