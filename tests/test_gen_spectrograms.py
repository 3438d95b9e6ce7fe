"""gen_spectrograms.py: log-mel of the real clip against librosa, and the script on a small
MTAT-layout folder (real, resampled, truncated and stereo clips between an empty, a corrupt
and a missing one): rows in place, failures listed, Ctrl-C, resume and --overwrite."""
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile

import common
import gen_spectrograms

SRC = Path(__file__).resolve().parents[1] / "src"
REAL_CLIP_PATH = "e/joram-moments_of_clarity-08-solipsism-59-88.mp3"  # its mp3_path in MTAT
# the folder's rows: mp3_path and what is there (None: no file)
ROWS = [
    (REAL_CLIP_PATH, "real"),
    ("0/empty.mp3", "empty"),
    ("1/resampled_44k.mp3", "resampled"),
    ("2/random_bytes.mp3", "random"),
    ("3/truncated_10s.mp3", "truncated"),
    ("4/missing.mp3", None),
    ("5/stereo.mp3", "stereo"),
]
GOOD_ROWS = [0, 2, 4, 6]
FAILED_ROWS = [1, 3, 5]
FLOAT16_TOLERANCE = 0.05  # float16 spacing is 1/32 for |log-mel| in [32, 64)


def test_log_mel_of_real_clip_equals_librosa(mtat_clip):
    spec = common.log_mel(mtat_clip)
    assert spec.shape == (128, 628) and spec.dtype == np.float32
    assert np.isfinite(spec).all()
    audio, _ = librosa.load(mtat_clip, sr=11025)
    power = librosa.feature.melspectrogram(y=audio, sr=11025, n_fft=2048, hop_length=512,
                                           n_mels=128, power=2.0, pad_mode="reflect")
    expected = np.log(np.maximum(power, 1e-20))
    assert expected.shape == (128, 628)  # 29.12 s of audio at 11,025 Hz: 628 frames, no crop or pad
    np.testing.assert_allclose(spec, expected, rtol=1e-5, atol=1e-4)
    assert spec.max() - spec.min() > 20  # music, not a constant


# -----------------------------------------------------------------------------
# a small MTAT-layout folder
@pytest.fixture(scope="module")
def audio_variants(mtat_clip, tmp_path_factory):
    """The rows' audio files, made once: name -> path. Each good one differs from the
    others (gain, length or content), so a row in the wrong place cannot pass."""
    folder = tmp_path_factory.mktemp("variants")
    audio, sr = soundfile.read(mtat_clip, dtype="float32")  # 16 kHz mono
    names = ("real", "empty", "resampled", "random", "truncated", "stereo")
    paths = {name: folder / f"{name}.mp3" for name in names}
    shutil.copyfile(mtat_clip, paths["real"])
    paths["empty"].write_bytes(b"")
    paths["random"].write_bytes(np.random.default_rng(0).bytes(30000))
    audio_44k = librosa.resample(audio, orig_sr=sr, target_sr=44100)
    soundfile.write(paths["resampled"], 0.5 * audio_44k, 44100, format="MP3")
    soundfile.write(paths["truncated"], 0.25 * audio[:10 * sr], sr, format="MP3")
    soundfile.write(paths["stereo"], np.stack([audio, audio[::-1]], axis=1), sr, format="MP3")
    return paths


def make_folder(data_dir, annotations_csv, audio_variants):
    """data_dir/annotations_final.csv (the real header, ROWS) and data_dir/mp3/."""
    with open(annotations_csv, "rb") as f:
        header = f.readline().rstrip(b"\r\n").decode()
    n_tags = len(header.split("\t")) - 2
    lines = [header]
    for row, (mp3_path, variant) in enumerate(ROWS):
        tags = ["1" if tag == row else "0" for tag in range(n_tags)]
        lines.append("\t".join(f'"{v}"' for v in [str(1000 + row)] + tags + [mp3_path]))
        if variant is not None:
            (data_dir / "mp3" / mp3_path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(audio_variants[variant], data_dir / "mp3" / mp3_path)
    (data_dir / "annotations_final.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode())
    return data_dir


def expected_rows(data_dir):
    """common.log_mel of each good row's file: {row: (128, 628) float32}."""
    return {row: common.log_mel(data_dir / "mp3" / ROWS[row][0]) for row in GOOD_ROWS}


def check_output(data_dir, expected, dtype, atol):
    """The finished pair: shape, dtype, every good row in its place, failures zeros and listed."""
    meta = json.loads((data_dir / "spectrograms.json").read_text())
    rows = np.load(data_dir / "spectrograms.npy")
    assert rows.shape == (len(ROWS), 128, 628) and rows.dtype == dtype
    for row, spec in expected.items():
        np.testing.assert_allclose(rows[row].astype(np.float32), spec, rtol=0, atol=atol,
                                   err_msg=f"row {row}")
    for row in FAILED_ROWS:
        assert not rows[row].any()
    assert [f["row"] for f in meta["failed"]] == FAILED_ROWS
    assert [f["clip_id"] for f in meta["failed"]] == [1000 + r for r in FAILED_ROWS]
    assert [f["path"] for f in meta["failed"]] == [ROWS[r][0] for r in FAILED_ROWS]
    assert all(f["error"] for f in meta["failed"])
    assert {k: meta[k] for k in common.feature_params()} == common.feature_params()
    assert meta["n_clips"] == len(ROWS) and meta["dtype"] == dtype
    assert set(meta["versions"]) == {"librosa", "numpy", "soundfile"}
    assert not (data_dir / "spectrograms.partial.npy").exists()
    assert not (data_dir / "spectrograms.progress.json").exists()
    return rows, meta


def test_expected_rows_are_distinguishable(tmp_path, annotations_csv, audio_variants):
    expected = expected_rows(make_folder(tmp_path, annotations_csv, audio_variants))
    for a in GOOD_ROWS:
        for b in GOOD_ROWS:
            if a < b:
                assert np.abs(expected[a] - expected[b]).max() > 1.0, (a, b)
    # the 10 s clip is padded with the value of silence, log(1e-20)
    assert np.allclose(expected[4][:, 300:], np.log(1e-20))
    assert not np.allclose(expected[4][:, :200], np.log(1e-20))


@pytest.mark.slow
def test_script_with_two_workers(tmp_path, annotations_csv, audio_variants):
    data_dir = make_folder(tmp_path, annotations_csv, audio_variants)
    run = subprocess.run([sys.executable, str(SRC / "gen_spectrograms.py"),
                          "--data-dir", str(data_dir), "--workers", "2"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "3 failed" in run.stdout and "clips/s" in run.stdout
    assert "Traceback" not in run.stderr
    _, meta = check_output(data_dir, expected_rows(data_dir), "float16", FLOAT16_TOLERANCE)
    errors = {f["row"]: f["error"] for f in meta["failed"]}
    assert errors[1] == "empty file (0 bytes)"
    assert errors[5] == "no such file"
    assert "missing.mp3" in run.stderr  # failures are reported as they happen too


@pytest.mark.slow
def test_limit_then_all_computes_only_missing_rows(tmp_path, annotations_csv, audio_variants,
                                                   capsys):
    data_dir = make_folder(tmp_path, annotations_csv, audio_variants)
    args = ["--data-dir", str(data_dir), "--workers", "2", "--dtype", "float32"]
    first = gen_spectrograms.main(args + ["--limit", "3"])
    assert first["n_clips"] == 3 and first["n_computed"] == 3 and first["n_failed"] == 1
    assert np.load(data_dir / "spectrograms.npy").shape == (3, 128, 628)
    real_spec = common.log_mel(data_dir / "mp3" / REAL_CLIP_PATH)

    # new audio for a done row: a rerun that recomputed it would change the row
    shutil.copyfile(audio_variants["truncated"], data_dir / "mp3" / REAL_CLIP_PATH)
    second = gen_spectrograms.main(args)
    assert second["n_computed"] == 4 and second["n_failed"] == 3
    expected = expected_rows(data_dir)
    expected[0] = real_spec
    check_output(data_dir, expected, "float32", 1e-4)

    # finished: nothing to do, the file untouched
    mtime = os.stat(data_dir / "spectrograms.npy").st_mtime_ns
    assert gen_spectrograms.main(args)["n_computed"] == 0
    assert os.stat(data_dir / "spectrograms.npy").st_mtime_ns == mtime
    assert "already complete" in capsys.readouterr().out

    # other settings would replace the finished file: refused without --overwrite
    with pytest.raises(SystemExit, match="--overwrite"):
        gen_spectrograms.main(args[:-1] + ["float16"])

    third = gen_spectrograms.main(args + ["--overwrite"])
    assert third["n_computed"] == 7
    check_output(data_dir, expected_rows(data_dir), "float32", 1e-4)  # row 0 is now the new audio


class InterruptAfter3(gen_spectrograms.tqdm):
    """A progress bar that presses Ctrl-C after 3 clips are done."""

    def update(self, n=1):
        super().update(n)
        if self.n - self.initial >= 3:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_interrupted_run_resumes(tmp_path, annotations_csv, audio_variants, monkeypatch):
    data_dir = make_folder(tmp_path, annotations_csv, audio_variants)
    args = ["--data-dir", str(data_dir), "--workers", "2", "--dtype", "float32"]
    with monkeypatch.context() as patch:
        patch.setattr(gen_spectrograms, "tqdm", InterruptAfter3)
        with pytest.raises(SystemExit) as stop:
            gen_spectrograms.main(args)
    assert stop.value.code == 130
    assert not (data_dir / "spectrograms.json").exists()
    assert not (data_dir / "spectrograms.npy").exists()
    progress = json.loads((data_dir / "spectrograms.progress.json").read_text())
    done = progress["done"]
    assert len(done) == 3 and progress["n_clips"] == 7
    assert sorted(f["row"] for f in progress["failed"]) == sorted(set(done) & set(FAILED_ROWS))

    expected = expected_rows(data_dir)
    for row in set(done) & set(GOOD_ROWS):  # done rows get new audio: must not be recomputed
        other = ROWS[4 if row != 4 else 2][0]
        shutil.copyfile(data_dir / "mp3" / other, data_dir / "mp3" / ROWS[row][0])
    resumed = gen_spectrograms.main(args)
    assert resumed["n_computed"] == 4
    check_output(data_dir, expected, "float32", 1e-4)


def children_of(pid):
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


def gone(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] in ("Z", "X")
    except OSError:
        return True


@pytest.mark.slow
@pytest.mark.parametrize("signum, to_group", [(signal.SIGINT, True), (signal.SIGTERM, False),
                                              (signal.SIGHUP, False)])
def test_ctrl_c_or_sigterm_stops_workers_and_keeps_progress(tmp_path, annotations_csv, audio_variants,
                                                            signum, to_group):
    """Ctrl-C (SIGINT to the script and its workers, as a terminal sends it), or SIGTERM /
    SIGHUP to the main process alone (kill, a closed terminal): progress saved, no worker
    left, no temporary file, exit 128 + the signal, one line; a rerun resumes."""
    # 40 rows, so the run is still going when the first failure (row 1) is reported
    data_dir = make_folder(tmp_path, annotations_csv, audio_variants)
    csv_path = data_dir / "annotations_final.csv"
    lines = csv_path.read_bytes().split(b"\r\n")
    csv_path.write_bytes(b"\r\n".join(lines[:1] + lines[1:8] * 6) + b"\r\n")
    command = [sys.executable, str(SRC / "gen_spectrograms.py"), "--data-dir", str(data_dir),
               "--workers", "2"]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen, workers = [], []
    for line in proc.stderr:  # tqdm redraws with '\r'; failures come as whole lines
        seen.append(line)
        if line.startswith("failed: row"):
            workers = children_of(proc.pid)
            os.killpg(proc.pid, signum) if to_group else os.kill(proc.pid, signum)
            break
    rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == 128 + signum, "".join(seen) + rest
    assert rest.strip().splitlines()[-1].startswith("interrupted: ") and "Traceback" not in rest
    assert workers and all(gone(pid) for pid in workers)
    progress = json.loads((data_dir / "spectrograms.progress.json").read_text())
    assert 1 <= len(progress["done"]) < 42
    assert not (data_dir / "spectrograms.json").exists()
    assert not list(data_dir.glob("*.tmp"))
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0 and "resuming" in rerun.stderr, rerun.stderr


def test_reads_gzipped_annotations_where_the_csv_is_absent(tmp_path, annotations_csv, audio_variants):
    data_dir = make_folder(tmp_path, annotations_csv, audio_variants)
    csv_path = data_dir / "annotations_final.csv"
    with open(csv_path, "rb") as src, gzip.open(data_dir / "annotations_final.csv.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    csv_path.unlink()
    done = gen_spectrograms.main(["--data-dir", str(data_dir), "--limit", "2", "--workers", "1",
                                  "--dtype", "float32"])
    assert done["n_clips"] == 2 and done["n_failed"] == 1  # the real clip, then the empty file
    np.testing.assert_allclose(np.load(data_dir / "spectrograms.npy")[0],
                               common.log_mel(data_dir / "mp3" / REAL_CLIP_PATH), rtol=0, atol=1e-4)


def test_missing_annotations_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="get_data.py") as stop:
        gen_spectrograms.main(["--data-dir", str(tmp_path)])
    assert str(tmp_path / "annotations_final.csv") in str(stop.value.code)


@pytest.mark.slow
def test_benchmark_of_features_runs(mtat_clip, capsys):
    import benchmark

    stages = benchmark.time_log_mel(mtat_clip, repeats=2)
    assert set(stages) == {"decode", "resample", "mel", "total"}
    assert all(0 < seconds < 60 for seconds in stages.values())
    assert benchmark.time_extraction(2, 4, mtat_clip, runs=1) > 0
    assert "2 worker(s)" in capsys.readouterr().out


def test_benchmark_times_the_pipelines_own_stages(mtat_clip, monkeypatch):
    """benchmark.py holds no copy of the feature pipeline: each stage it times is common's own
    function (decode, resample, log_mel_frames, wrapped here to count their calls), and what the
    stages give is common.log_mel's spectrogram and read_log_mel's duration."""
    import benchmark

    calls = dict.fromkeys(("decode", "resample", "log_mel_frames"), 0)

    def counting(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    expected, duration_s = common.read_log_mel(mtat_clip)
    for name in calls:
        monkeypatch.setattr(common, name, counting(name, getattr(common, name)))
    seconds, spec, duration = benchmark.pipeline_seconds(mtat_clip)
    assert set(seconds) == {"decode", "resample", "log-mel"} and all(s > 0 for s in seconds.values())
    # the Timer runs each stage's statement after its warm-up runs; decode once more for the sample rate
    assert calls["resample"] == calls["log_mel_frames"] == calls["decode"] - 1 >= 1
    np.testing.assert_array_equal(spec, expected)
    assert duration == duration_s
    stages = benchmark.time_log_mel(mtat_clip, repeats=1)
    assert list(stages) == ["decode", "resample", "mel", "total"] and calls["resample"] > 3
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--what", "features", "--repeats", "0"])
