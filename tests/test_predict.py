"""predict.py: windows, tagging real and synthetic audio, bad inputs, JSON, taggram, no skew."""
import json
import math
import os
import shutil
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import common
import gen_spectrograms
import predict
import trainer

SRC = Path(__file__).resolve().parents[1] / "src"
N_ROWS = 24  # tiny data set: 16 train / 4 val / 4 test clips


# -----------------------------------------------------------------------------
# fixtures: a checkpoint trained by the real trainer, and audio files
@pytest.fixture(scope="module")
def tiny_data(annotations_csv, mtat_clip, tmp_path_factory):
    """A data folder made by the real stage 2: the first 24 rows of the real annotations,
    the even rows' audio a copy of the real clip, the odd rows' a synthetic 20 s MP3, and
    spectrograms.npy (float32, so rows are exactly what log_mel computed) by
    gen_spectrograms.py."""
    data_dir = tmp_path_factory.mktemp("data")
    with open(annotations_csv, "rb") as src:
        lines = src.read().split(b"\r\n")
    (data_dir / "annotations_final.csv").write_bytes(b"\r\n".join(lines[:1 + N_ROWS]) + b"\r\n")
    _, _, _, mp3_paths = common.read_annotations(data_dir / "annotations_final.csv")
    for row, mp3_path in enumerate(mp3_paths):
        path = data_dir / "mp3" / mp3_path
        path.parent.mkdir(parents=True, exist_ok=True)
        if row % 2 == 0:
            shutil.copyfile(mtat_clip, path)
        else:
            sf.write(path, tone(20, 16000, base_hz=110.0 * 1.1 ** row), 16000)
    gen_spectrograms.main(["--data-dir", str(data_dir), "--workers", "2", "--dtype", "float32"])
    return data_dir


@pytest.fixture(scope="module")
def checkpoint(tiny_data, tmp_path_factory):
    """best_model.pt of a 1-epoch run of trainer.py on the tiny data (16 train clips)."""
    out = tmp_path_factory.mktemp("experiments")
    trainer.main(["--data-dir", str(tiny_data), "--out", str(out), "--run", "tiny", "--epochs", "1",
                  "--split", "random", "--train-size", "16", "--val-size", "4",
                  "--batch-size", "8", "--device", "cpu"])
    return out / "tiny" / "best_model.pt"


@pytest.fixture(scope="module")
def loaded(checkpoint):
    """(model, tag_names, norm_mean, norm_std) as predict loads them."""
    return predict.load_checkpoint(checkpoint, torch.device("cpu"))


def tone(seconds, sample_rate, channels=1, base_hz=220.0):
    """A major chord with a slow tremolo and a little noise: (n, channels) float32."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    mono = sum(np.sin(2 * np.pi * base_hz * r * t) for r in (1.0, 1.26, 1.5)) / 3
    mono *= 0.5 + 0.4 * np.sin(2 * np.pi * 0.25 * t)
    rng = np.random.default_rng(1)
    columns = [mono * (0.8 + 0.2 * c) + 0.01 * rng.standard_normal(t.size) for c in range(channels)]
    return np.stack(columns, axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def long_stereo(tmp_path_factory):
    """75 s, stereo, 44.1 kHz WAV."""
    path = tmp_path_factory.mktemp("audio") / "long_stereo.wav"
    sf.write(path, tone(75, 44100, channels=2), 44100)
    return path


@pytest.fixture(scope="module")
def short_flac(tmp_path_factory):
    """3 s, mono, 22.05 kHz FLAC: shorter than one window."""
    path = tmp_path_factory.mktemp("audio") / "short.flac"
    sf.write(path, tone(3, 22050), 22050)
    return path


def expected_windows(n_frames, hop=common.N_FRAMES // 2):
    return 1 if n_frames <= common.N_FRAMES else 1 + math.ceil((n_frames - common.N_FRAMES) / hop)


# -----------------------------------------------------------------------------
# windows
@pytest.mark.parametrize("n_frames,hop", [(1, 314), (627, 314), (628, 314), (629, 314),
                                          (942, 314), (943, 314), (1616, 314), (1616, 628),
                                          (5000, 100), (700, 1)])
def test_window_starts_cover_every_frame(n_frames, hop):
    starts = predict.window_starts(n_frames, hop)
    assert len(starts) == expected_windows(n_frames, hop)
    assert starts[0] == 0 and starts[-1] == max(0, n_frames - common.N_FRAMES)
    assert np.all(np.diff(starts)[:-1] == hop) and np.all(np.diff(starts) > 0)
    assert np.all(np.diff(starts) <= hop)  # no gap: each window starts inside the previous one
    covered = np.zeros(n_frames, bool)
    for s in starts:
        covered[s:s + common.N_FRAMES] = True
    assert covered.all()


# -----------------------------------------------------------------------------
# tagging
def check_tags(result, tag_names):
    """All tags once, sorted by probability, probabilities in [0, 1] = the window mean."""
    names = [name for name, _ in result["tags"]]
    probs = np.array([p for _, p in result["tags"]])
    assert sorted(names) == sorted(tag_names) and len(names) == len(tag_names)
    assert np.all((probs >= 0) & (probs <= 1)) and np.all(np.diff(probs) <= 0)
    mean = result["window_probs"].mean(axis=0)
    np.testing.assert_allclose(probs, [mean[tag_names.index(n)] for n in names], rtol=1e-6)


def test_real_mtat_clip_is_one_window(loaded, mtat_clip):
    model, tag_names, mean, std = loaded
    assert len(tag_names) == 50
    result = predict.tag_file(mtat_clip, model, tag_names, mean, std)
    assert result["windows"] == 1 and result["window_probs"].shape == (1, 50)
    assert result["duration_s"] == pytest.approx(29.12, abs=0.01)
    check_tags(result, tag_names)


def test_long_stereo_file_is_cut_into_windows(loaded, long_stereo):
    model, tag_names, mean, std = loaded
    result = predict.tag_file(long_stereo, model, tag_names, mean, std)
    n_samples = math.ceil(75 * 44100 * common.SAMPLE_RATE / 44100)  # after resampling
    n_frames = 1 + n_samples // common.HOP_LENGTH  # 1616
    assert result["windows"] == expected_windows(n_frames) == 5
    assert result["duration_s"] == pytest.approx(75.0, abs=1e-3)
    assert list(result["starts"]) == [0, 314, 628, 942, n_frames - common.N_FRAMES]
    check_tags(result, tag_names)
    # windows differ (the tremolo), so the mean is not just any one of them
    assert np.ptp(result["window_probs"], axis=0).max() > 0
    wide = predict.tag_file(long_stereo, model, tag_names, mean, std, hop_frames=628, batch_size=2)
    assert wide["windows"] == expected_windows(n_frames, 628) == 3
    np.testing.assert_allclose(wide["window_probs"], result["window_probs"][[0, 2, 4]], atol=1e-5)


def test_short_file_is_padded_like_log_mel(loaded, short_flac):
    model, tag_names, mean, std = loaded
    result = predict.tag_file(short_flac, model, tag_names, mean, std)
    assert result["windows"] == 1 and result["duration_s"] == pytest.approx(3.0, abs=1e-3)
    padded = common.log_mel(short_flac)  # 128 x 628, silence after 3 s
    assert np.all(padded[:, 100:] == np.float32(np.log(common.LOG_FLOOR)))
    x = common.normalise(torch.from_numpy(padded)[None], mean, std)
    with torch.no_grad():
        expected = torch.sigmoid(model(x))[0].numpy()
    np.testing.assert_allclose(result["window_probs"][0], expected, rtol=1e-5, atol=1e-6)


def test_no_skew_with_the_training_features(loaded, mtat_clip, tiny_data):
    """predict's probabilities for the real clip are the model's output on the row that
    gen_spectrograms.py stored for it (row 0), normalised by the checkpoint's statistics."""
    model, tag_names, mean, std = loaded
    result = predict.tag_file(mtat_clip, model, tag_names, mean, std)
    row = torch.from_numpy(np.load(tiny_data / "spectrograms.npy")[:1])
    with torch.no_grad():
        expected = torch.sigmoid(model(common.normalise(row, mean, std)))[0].numpy()
    np.testing.assert_allclose(result["window_probs"][0], expected, rtol=1e-5, atol=1e-6)
    # gen_spectrograms' default float16 storage moves the probabilities by rounding only
    with torch.no_grad():
        expected16 = torch.sigmoid(model(common.normalise(row.half(), mean, std)))[0].numpy()
    np.testing.assert_allclose(result["window_probs"][0], expected16, atol=5e-3)


# -----------------------------------------------------------------------------
# the command line, in process
def test_main_prints_tags_and_writes_json(checkpoint, mtat_clip, long_stereo, tmp_path, capsys):
    json_path = tmp_path / "tags.json"
    results = predict.main([str(mtat_clip), str(long_stereo), "--checkpoint", str(checkpoint),
                            "--top", "3", "--json", str(json_path)])
    out = capsys.readouterr().out.splitlines()
    saved = json.loads(json_path.read_text())
    assert list(saved) == [str(mtat_clip), str(long_stereo)]
    for path, windows, block in ((mtat_clip, 1, out[:4]), (long_stereo, 5, out[4:8])):
        entry = saved[str(path)]
        assert set(entry) == {"tags", "windows", "duration_s"}
        assert entry["windows"] == windows and isinstance(entry["duration_s"], float)
        assert len(entry["tags"]) == 50
        assert all(isinstance(name, str) and 0 <= p <= 1 for name, p in entry["tags"])
        assert entry["tags"] == results[str(path)]["tags"]
        # header line, then the top 3 tags, probabilities aligned in one column
        assert block[0].startswith(f"{path}  (") and f"{windows} window" in block[0]
        for (name, prob), line in zip(entry["tags"][:3], block[1:]):
            assert line.split()[-1] == f"{prob:.3f}" and line.strip().startswith(name)
        assert len({len(line) for line in block[1:]}) == 1
    assert len(out) == 8
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_audio_inputs_fail_alone(checkpoint, mtat_clip, tmp_path, capsys):
    missing = tmp_path / "missing.mp3"
    empty = tmp_path / "empty.mp3"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp3"
    text.write_text("these are my notes, not music\n" * 20)
    json_path = tmp_path / "tags.json"
    paths = [str(missing), str(empty), str(mtat_clip), str(text)]
    with pytest.raises(SystemExit) as exit_info:
        predict.main(paths + ["--checkpoint", str(checkpoint), "--json", str(json_path)])
    assert exit_info.value.code not in (0, None)
    assert "3 of 4 files could not be tagged" in str(exit_info.value.code)
    captured = capsys.readouterr()
    errors = captured.err.splitlines()
    reasons = {missing: "no such file", empty: "empty file", text: "cannot decode audio"}
    for path, reason in reasons.items():
        lines = [line for line in errors if str(path) in line]
        assert len(lines) == 1 and lines[0].startswith(f"error: {path}: {reason}")
    assert errors[3:] == [f"wrote {json_path}"]  # one line each: no decoder chatter, no traceback
    assert str(mtat_clip) in captured.out  # the good file is still tagged
    saved = json.loads(json_path.read_text())
    assert set(saved) == set(paths)
    assert saved[str(mtat_clip)]["windows"] == 1
    assert all(set(saved[p]) == {"error"} and p in saved[p]["error"]
               for p in (str(missing), str(empty), str(text)))


def test_bad_checkpoints(checkpoint, tmp_path, mtat_clip):
    random_dict = tmp_path / "random.pt"
    torch.save({"weights": torch.randn(3)}, random_dict)
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint")
    other_shape = tmp_path / "ten_tags.pt"  # every key there, weights for 10 tags, 50 names
    state = torch.load(checkpoint, weights_only=True)
    torch.save(dict(state, state_dict=common.MSCNN(n_tags=10).state_dict()), other_shape)
    for path, reason in ((tmp_path / "missing.pt", "not found"),
                         (random_dict, "missing state_dict"),
                         (text, "not a PyTorch checkpoint"),
                         (other_shape, "weights do not fit")):
        with pytest.raises(SystemExit) as exit_info:
            predict.main([str(mtat_clip), "--checkpoint", str(path)])
        message = str(exit_info.value.code)
        assert message.startswith("error: ") and str(path) in message and reason in message
        assert "\n" not in message and "trainer.py" in message


def test_default_checkpoint_is_the_newest_run(checkpoint, tmp_path, mtat_clip, capsys):
    experiments = tmp_path / "experiments"
    with pytest.raises(SystemExit, match="train one with src/trainer.py first, or pass --check"):
        predict.main([str(mtat_clip), "--experiments", str(experiments)])
    for run in ["b_old", "a_new", "c_middle"]:
        (experiments / run).mkdir(parents=True)
        (experiments / run / "best_model.pt").write_bytes(checkpoint.read_bytes())
    (experiments / "d_newer_but_empty").mkdir()  # no best_model.pt: not a candidate
    mtimes = {"b_old": 1e9, "a_new": 3e9, "c_middle": 2e9, "d_newer_but_empty": 4e9}
    for run, mtime in mtimes.items():
        os.utime(experiments / run, (mtime, mtime))
    assert predict.newest_checkpoint(experiments) == experiments / "a_new" / "best_model.pt"
    predict.main([str(mtat_clip), "--experiments", str(experiments)])
    assert f"using {experiments / 'a_new' / 'best_model.pt'}" in capsys.readouterr().err


def test_taggram_png_per_file(checkpoint, mtat_clip, long_stereo, short_flac, tmp_path):
    pytest.importorskip("matplotlib")
    one = tmp_path / "one.png"
    predict.main([str(long_stereo), "--checkpoint", str(checkpoint), "--taggram", str(one)])
    assert one.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    several = tmp_path / "many.png"
    predict.main([str(mtat_clip), str(short_flac), "--checkpoint", str(checkpoint),
                  "--taggram", str(several)])
    stem = mtat_clip.name[:-len(".mp3")]
    for png in (tmp_path / f"many_{stem}.png", tmp_path / "many_short.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not several.exists() and not list(tmp_path.glob("*.tmp"))
    same_stem = predict.taggram_paths(tmp_path / "t.png", ["a/x.mp3", "b/x.wav", "y.ogg"])
    assert [p.name for p in same_stem] == ["t_x.png", "t_x_2.png", "t_y.png"]


def test_progress_bar_past_a_handful_of_files(checkpoint, short_flac, capsys):
    predict.main([str(short_flac)] * 5 + ["--checkpoint", str(checkpoint), "--top", "1"])
    captured = capsys.readouterr()
    assert "5/5" in captured.err and "file" in captured.err
    assert captured.out.count(str(short_flac)) == 5


@pytest.mark.slow
def test_script_by_subprocess(checkpoint, mtat_clip, tmp_path):
    missing = tmp_path / "missing.wav"
    done = subprocess.run([sys.executable, str(SRC / "predict.py"), str(mtat_clip), str(missing),
                           "--checkpoint", str(checkpoint), "--top", "5"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0].startswith(str(mtat_clip)) and len(lines) == 6
    assert all(0 <= float(line.split()[-1]) <= 1 for line in lines[1:])
    assert done.stderr.splitlines() == [f"error: {missing}: no such file",
                                        f"error: 1 of 2 files could not be tagged ({missing})"]
