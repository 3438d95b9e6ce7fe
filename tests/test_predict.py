"""predict.py: windows, tagging real and synthetic audio, bad inputs, JSON, taggram, no skew;
at library scale: blocks = whole file, folders, CSV, embeddings, the decoder pool, resume."""
import csv
import hashlib
import json
import math
import os
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
    return predict.load_checkpoint(checkpoint, torch.device("cpu"))[:4]


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
        assert set(entry) == {"tags", "windows", "duration_s", "checkpoint_sha256", "format_version"}
        assert entry["format_version"] == predict.OUTPUT_FORMAT
        assert entry["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
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
    assert errors[0].startswith("model: trained on other data (") and errors[1].startswith("warning: ")
    errors = errors[2:]
    reasons = {missing: "no such file", empty: "empty file", text: "cannot decode audio"}
    for path, reason in reasons.items():
        lines = [line for line in errors if str(path) in line]
        assert len(lines) == 1 and lines[0].startswith(f"error: {path}: {reason}")
    assert errors[3:] == [f"wrote {json_path}"]  # one line each: no decoder chatter, no traceback
    assert str(mtat_clip) in captured.out  # the good file is still tagged
    saved = json.loads(json_path.read_text())
    assert set(saved) == set(paths)
    assert saved[str(mtat_clip)]["windows"] == 1
    assert all(set(saved[p]) == {"error", "checkpoint_sha256", "format_version"} and p in saved[p]["error"]
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


def test_progress_bar_past_a_handful_of_files(checkpoint, short_flac, tmp_path, capsys):
    copies = [tmp_path / f"{i}.flac" for i in range(5)]  # five files: one named five times is tagged once
    for copy in copies:
        shutil.copyfile(short_flac, copy)
    predict.main(list(map(str, copies)) + ["--checkpoint", str(checkpoint), "--top", "1"])
    captured = capsys.readouterr()
    assert "5/5" in captured.err and "file" in captured.err
    assert captured.out.count(str(tmp_path)) == 5


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
    assert done.stderr.splitlines()[2:] == [f"error: {missing}: no such file",
                                            f"error: 1 of 2 files could not be tagged ({missing})"]


# -----------------------------------------------------------------------------
# at library scale: blocks, folders, CSV, embeddings, the decoder pool, resume
@pytest.mark.parametrize("sample_rate,channels,seconds,block_s", [
    (8000, 1, 40, 7), (11025, 1, 31, 5), (16000, 2, 45, 10), (22050, 1, 33, 3), (44100, 2, 75, 7),
    (48000, 2, 62, 30)])
def test_blocks_equal_the_whole_file(tmp_path, sample_rate, channels, seconds, block_s):
    """common.read_log_mel in blocks of block_s seconds gives the frames, and the length, of
    the same file decoded, resampled and framed whole (block_s None: one call per stage, as
    librosa.load + melspectrogram compute it), at rates needing resampling and not.

    Tolerance: the decoded samples and soxr's streamed output are the one-shot ones, but the
    mel projection (a BLAS product) may round in float32 otherwise for a block than for the
    whole file: a relative 1e-6 of the power at most, 1e-5 in log units here."""
    path = tmp_path / f"tone_{sample_rate}.wav"
    sf.write(path, tone(seconds, sample_rate, channels=channels), sample_rate)
    whole, whole_s = common.read_log_mel(path, block_s=None)
    blocks, blocks_s = common.read_log_mel(path, block_s=block_s)
    assert blocks.shape == whole.shape == (128, 1 + math.ceil(seconds * 11025) // 512)
    assert blocks.dtype == np.float32 and blocks_s == whole_s
    np.testing.assert_allclose(blocks, whole, rtol=0, atol=1e-5)


def test_blocks_equal_the_whole_file_on_real_mtat_audio(loaded, mtat_clip):
    """The real MP3 in blocks of 5 s and whole: the same frames within float32 rounding of
    the mel projection (up to 3e-3 in log units in its near-empty top band, power e^-24;
    <= 1e-4 where the power is above e^-10), the same scores within 1e-4; and whole, it is
    what librosa.load + librosa.feature.melspectrogram (reflection padding, the original's) give,
    bit for bit."""
    import librosa

    model, tag_names, mean, std = loaded
    whole, _ = common.read_log_mel(mtat_clip, block_s=None)
    blocks, _ = common.read_log_mel(mtat_clip, block_s=5)
    np.testing.assert_allclose(blocks, whole, rtol=0, atol=3e-3)
    assert np.abs(blocks - whole)[whole > -10].max() <= 1e-4 and (whole > -10).mean() > 0.98
    probs = [common.score(model, torch.from_numpy(common.fit_frames(spec)[None]), mean, std).numpy()
             for spec in (blocks, whole)]
    np.testing.assert_allclose(probs[0], probs[1], rtol=0, atol=1e-4)
    audio, _ = librosa.load(mtat_clip, sr=11025)
    mel = librosa.feature.melspectrogram(y=audio, sr=11025, n_fft=2048, hop_length=512, n_mels=128,
                                         pad_mode="reflect")
    assert np.array_equal(np.log(np.maximum(mel, 1e-20)).astype(np.float32), whole)
    assert np.array_equal(common.log_mel(mtat_clip), whole)  # 628 frames: one window


def test_tag_file_scores_the_training_features(loaded, long_stereo):
    """What tag_file (and main) score: the whole file's training features, window by window."""
    model, tag_names, mean, std = loaded
    result = predict.tag_file(long_stereo, model, tag_names, mean, std)
    np.testing.assert_allclose(result["window_probs"], probs_of(loaded, long_stereo), atol=1e-6)


def probs_of(loaded, path):
    """Window probabilities of the whole-file path (the reference), (K, n_tags)."""
    model, _, mean, std = loaded
    spec = common.read_log_mel(path, block_s=None)[0]
    starts = predict.window_starts(spec.shape[1], 314)
    windows = torch.from_numpy(np.stack([common.fit_frames(spec[:, s:]) for s in starts]))
    with torch.no_grad():
        return torch.sigmoid(model(common.normalise(windows, mean, std))).numpy()


def test_embedding_through_the_last_layer_gives_the_logits(loaded, long_stereo):
    model, tag_names, mean, std = loaded
    result = predict.tag_file(long_stereo, model, tag_names, mean, std)
    emb = result["window_embeddings"]
    assert emb.shape == (5, 500) and emb.dtype == np.float32 and emb.min() >= 0  # after the ReLU
    assert (emb == 0).mean() < 0.9  # not a dead layer: the test below means something
    np.testing.assert_allclose(result["embedding"], emb.mean(axis=0), rtol=1e-6)
    with torch.no_grad():
        logits = model.head[-1](torch.from_numpy(emb)).numpy()
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), result["window_probs"], atol=1e-6)
    # and the model's own forward pass on the windows gives those logits
    spec = common.read_log_mel(long_stereo, block_s=None)[0]
    windows = np.stack([common.fit_frames(spec[:, s:]) for s in result["starts"]])
    with torch.no_grad():
        forward = model(common.normalise(torch.from_numpy(windows), mean, std)).numpy()
    np.testing.assert_allclose(logits, forward, atol=1e-4)
    np.testing.assert_allclose(result["window_start_s"], result["starts"] * 512 / 11025)


@pytest.fixture(scope="module")
def library(tmp_path_factory, mtat_clip):
    """A music folder: nested files of several formats, rates and lengths, a text file
    named .mp3, a WAV with a NaN sample, a non-audio file and a hidden folder (both
    skipped). Returns (folder, the audio paths predict should find, in order)."""
    root = tmp_path_factory.mktemp("library") / "music"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a").mkdir()
    (root / ".cache").mkdir()
    sf.write(root / "b" / "deep" / "long.flac", tone(40, 22050, channels=2), 22050)
    sf.write(root / "b" / "short.wav", tone(4, 44100), 44100)
    sf.write(root / "a" / "third.ogg", tone(12, 16000, base_hz=330.0), 16000)
    shutil.copyfile(mtat_clip, root / "a" / "clip.MP3")
    (root / "a" / "notes.mp3").write_text("not music\n" * 50)
    nan = tone(3, 8000)
    nan[12345] = np.nan
    sf.write(root / "b" / "nan.wav", nan, 8000, subtype="FLOAT")
    (root / "cover.jpg").write_bytes(b"\xff\xd8\xff" + b"0" * 100)
    sf.write(root / ".cache" / "hidden.wav", tone(1, 8000), 8000)
    found = [root / "a" / "clip.MP3", root / "a" / "notes.mp3", root / "a" / "third.ogg",
             root / "b" / "deep" / "long.flac", root / "b" / "nan.wav", root / "b" / "short.wav"]
    return root, [str(p) for p in found]


def test_folder_with_nested_and_bad_files(checkpoint, loaded, library, short_flac, tmp_path,
                                          capsys):
    root, found = library
    out = {name: tmp_path / f"tags.{name}" for name in ("csv", "json", "npz")}
    args = [str(short_flac), str(root), "--checkpoint", str(checkpoint), "--workers", "2",
            "--csv", str(out["csv"]), "--json", str(out["json"]), "--embeddings", str(out["npz"]),
            "--per-window", "--top", "1"]
    with pytest.raises(SystemExit) as exit_info:
        predict.main(args)
    assert str(exit_info.value.code).startswith("error: 2 of 7 files could not be tagged")
    order = [str(short_flac)] + found
    bad = {found[1]: "cannot decode audio", found[4]: "decodes, but its samples are not all "
           "finite (NaN or inf, first at 1.5 s)"}
    captured = capsys.readouterr()
    assert [line.split("  (")[0] for line in captured.out.splitlines()[::2]] == [
        p for p in order if p not in bad]
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert errors[0].startswith(f"error: {found[1]}: cannot decode audio")
    assert errors[1].startswith(f"error: {found[4]}: {bad[found[4]]}")
    assert len(errors) == 2 and "Traceback" not in captured.err

    saved_json = json.loads(out["json"].read_text())
    assert list(saved_json) == order
    with open(out["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    tag_names = torch.load(checkpoint, weights_only=True)["tag_names"]
    assert list(rows[0]) == ["path", "duration_s", "windows"] + tag_names + ["error", "checkpoint_sha256",
                                                                             "format_version"]
    assert {row["format_version"] for row in rows} == {str(predict.OUTPUT_FORMAT)}
    sha256 = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert {row["checkpoint_sha256"] for row in rows} == {sha256}
    assert [row["path"] for row in rows] == order
    windows = {str(short_flac): 1, found[0]: 1, found[2]: 1, found[3]: 2, found[5]: 1}
    for row in rows:
        entry = saved_json[row["path"]]
        if row["path"] in bad:
            assert row["error"].startswith(row["path"] + ": " + bad[row["path"]][:20])
            assert entry == {"error": row["error"], "checkpoint_sha256": sha256, "format_version": 1}
            assert all(row[k] == "" for k in ["duration_s", "windows"] + tag_names)
            continue
        assert row["error"] == ""
        assert int(row["windows"]) == windows[row["path"]] == entry["windows"]
        assert float(row["duration_s"]) == pytest.approx(entry["duration_s"], abs=1e-3)
        probs = dict(entry["tags"])
        assert [float(row[t]) for t in tag_names] == pytest.approx([probs[t] for t in tag_names],
                                                                   abs=1e-6)

    npz = np.load(out["npz"])
    good = [p for p in order if p not in bad]
    assert sorted(npz.files) == sorted(["paths", "tag_names", "embeddings", "duration_s", "windows",
                                        "window_embeddings", "window_file", "window_start_s",
                                        "checkpoint_sha256", "format_version"])
    assert set(npz["checkpoint_sha256"]) == {sha256}
    assert list(npz["paths"]) == good and list(npz["tag_names"]) == tag_names
    assert npz["embeddings"].shape == (5, 500) and npz["embeddings"].dtype == np.float32
    assert list(npz["windows"]) == [windows[p] for p in good]
    assert npz["window_embeddings"].shape == (6, 500)
    assert list(npz["window_file"]) == [0, 1, 2, 3, 3, 4]
    long_spec_frames = 1 + math.ceil(40 * 11025) // 512
    assert npz["window_start_s"][4] == pytest.approx((long_spec_frames - 628) * 512 / 11025)
    for i, path in enumerate(good):
        rows_i = npz["window_file"] == i
        np.testing.assert_allclose(npz["embeddings"][i], npz["window_embeddings"][rows_i].mean(0),
                                   rtol=1e-5, atol=1e-6)
    model, _, mean, std = loaded
    alone = predict.tag_file(found[3], model, tag_names, mean, std)  # in process, by itself
    np.testing.assert_allclose(npz["window_embeddings"][3:5], alone["window_embeddings"], atol=1e-5)
    assert not list(tmp_path.glob("*.tmp"))


def test_input_order_kept_with_two_workers(checkpoint, loaded, long_stereo, short_flac, mtat_clip,
                                           tmp_path, capsys):
    """The long file first: the short ones finish decoding before it, yet come out after it; a file
    named again is tagged once; and each file's scores are those it gets alone, in this process."""
    model, tag_names, mean, std = loaded
    order = [str(long_stereo), str(short_flac), str(mtat_clip), str(short_flac), str(long_stereo)]
    json_path = tmp_path / "tags.json"
    results = predict.main(order + ["--checkpoint", str(checkpoint), "--workers", "2",
                                    "--batch-size", "4", "--json", str(json_path), "--top", "1"])
    headers = capsys.readouterr().out.splitlines()[::2]
    assert [line.split("  (")[0] for line in headers] == order[:3]
    assert list(json.loads(json_path.read_text())) == order[:3]
    for path in order[:3]:
        alone = predict.tag_file(path, model, tag_names, mean, std)
        np.testing.assert_allclose(results[path]["window_probs"], alone["window_probs"], atol=1e-5)


def test_same_output_with_any_number_of_workers(checkpoint, loaded, long_stereo, short_flac,
                                                mtat_clip, tmp_path, monkeypatch):
    """1 and 2 workers write the same CSV and JSON, byte for byte, and the same embeddings
    (--per-window), array for array: on a CPU a file's windows are scored in batches of
    their own with one thread, whichever worker scores them, and this process scores
    nothing. --workers 0 scores here, with this process's threads, left as they were: the
    numbers of tag_file, within float rounding of the workers'."""
    shutil.copyfile(long_stereo, tmp_path / "again.wav")  # copies: a file named twice is tagged once
    shutil.copyfile(short_flac, tmp_path / "again.flac")
    inputs = [str(p) for p in (long_stereo, short_flac, mtat_clip, tmp_path / "missing.wav",
                               tmp_path / "again.wav", tmp_path / "again.flac")]
    main_pid, scored_here = os.getpid(), []
    score = common.score

    def recording(*args, **kwargs):
        if os.getpid() == main_pid:
            scored_here.append(len(args[1]))
        return score(*args, **kwargs)

    monkeypatch.setattr(common, "score", recording)
    threads = torch.get_num_threads()
    outputs = {}
    for workers in (0, 1, 2):
        out = {key: tmp_path / f"{workers}{suffix}" for key, suffix in
               (("csv", ".csv"), ("json", ".json"), ("npz", ".npz"))}
        scored_here.clear()
        with pytest.raises(SystemExit, match="1 of 6 files could not be tagged"):
            predict.main(inputs + ["--checkpoint", str(checkpoint), "--workers", str(workers),
                                   "--batch-size", "2", "--csv", str(out["csv"]), "--json",
                                   str(out["json"]), "--embeddings", str(out["npz"]), "--per-window"])
        assert (len(scored_here) > 0) == (workers == 0)
        assert torch.get_num_threads() == threads
        outputs[workers] = out
    for key in ("csv", "json"):
        assert outputs[2][key].read_bytes() == outputs[1][key].read_bytes(), key
    npz1, npz2, npz0 = (np.load(outputs[workers]["npz"]) for workers in (1, 2, 0))
    assert npz1.files == npz2.files == npz0.files
    for array in npz1.files:
        assert np.array_equal(npz2[array], npz1[array]), array
    np.testing.assert_allclose(npz0["window_embeddings"], npz1["window_embeddings"], atol=1e-5)
    json0, json1 = (json.loads(outputs[workers]["json"].read_text()) for workers in (0, 1))
    assert list(json0) == list(json1) and json0[inputs[3]] == json1[inputs[3]]  # the error too
    for path in inputs[:3]:
        assert json0[path]["windows"] == json1[path]["windows"]
        assert dict(json0[path]["tags"]) == pytest.approx(dict(json1[path]["tags"]), abs=1e-5)
    model, tag_names, mean, std = loaded
    alone = predict.tag_file(long_stereo, model, tag_names, mean, std, batch_size=2)
    assert np.array_equal(npz0["window_embeddings"][npz0["window_file"] == 0], alone["window_embeddings"])


def test_scoring_here_as_on_a_gpu_runs_on_a_cpu(loaded, long_stereo, short_flac, mtat_clip, tmp_path):
    """The GPU's arrangement, workers that decode and this process that scores (with the same
    score_file), checked on the CPU: input order, an error passed through in its place, and
    each file's scores those it gets alone."""
    model, tag_names, mean, std = loaded
    paths = [str(long_stereo), str(short_flac), str(tmp_path / "missing.wav"), str(mtat_clip)]
    tagged = list(predict.tag_all(paths, 2, model, tag_names, mean, std, 314, 4, score_here=True))
    assert [path for path, _ in tagged] == paths
    assert isinstance(tagged[2][1], ValueError) and "no such file" in str(tagged[2][1])
    for path, result in tagged[:2] + tagged[3:]:
        alone = predict.tag_file(path, model, tag_names, mean, std)
        assert result["windows"] == alone["windows"]
        np.testing.assert_allclose(result["window_probs"], alone["window_probs"], atol=1e-5)
        np.testing.assert_allclose(result["embedding"], alone["embedding"], atol=1e-5)


def same_rows(csv_text, expected_text):
    """The same CSV rows; probabilities within 1e-5 (a batch holding other windows rounds
    the network's sums differently)."""
    rows, expected = (list(csv.reader(text.splitlines())) for text in (csv_text, expected_text))
    assert [row[:3] + row[-3:] for row in rows] == [row[:3] + row[-3:] for row in expected]
    np.testing.assert_allclose(np.array([row[3:-3] for row in rows[1:]], float),
                               np.array([row[3:-3] for row in expected[1:]], float), atol=1e-5)


def test_resume_skips_what_the_outputs_hold(checkpoint, library, tmp_path, capsys):
    root, found = library
    good = [found[i] for i in (0, 2, 3, 5)]
    csv_path, npz_path = tmp_path / "tags.csv", tmp_path / "emb.npz"
    base = ["--checkpoint", str(checkpoint), "--csv", str(csv_path), "--workers", "2", "--top", "1"]
    predict.main(good + base + ["--embeddings", str(npz_path)])
    full_csv, full_npz = csv_path.read_text(), dict(np.load(npz_path))
    capsys.readouterr()
    # an interrupted run: the first two files saved, the third failed (retried on resume)
    lines = full_csv.splitlines(keepends=True)
    n_tags = len(lines[0].split(",")) - 6
    sha256 = lines[1].rstrip().rsplit(",", 2)[1]
    csv_path.write_text("".join(lines[:3]) + f"{good[2]},,," + "," * n_tags + f"decoder died,{sha256},1\r\n")
    json_path = tmp_path / "tags.json"
    json_path.write_text('{"a.mp3": ')  # cut short: refused in one line
    with pytest.raises(SystemExit, match=f"error: --resume: cannot read {json_path} "):
        predict.main(good + base + ["--json", str(json_path), "--resume"])
    predict.main(good + base + ["--resume"])
    captured = capsys.readouterr()
    assert "resuming: 2 file(s) already tagged in the outputs, 2 to tag" in captured.err
    assert [line.split("  (")[0] for line in captured.out.splitlines()[::2]] == good[2:]
    same_rows(csv_path.read_text(), full_csv)
    # with two outputs, a file is skipped only when both hold it: the .npz has only 2
    first_two = {k: full_npz[k][:2] for k in ("paths", "embeddings", "duration_s", "windows")}
    np.savez(npz_path, **dict(full_npz, **first_two))
    predict.main(good + base + ["--embeddings", str(npz_path), "--resume"])
    assert "2 file(s) already tagged in the outputs, 2 to tag" in capsys.readouterr().err
    resumed = np.load(npz_path)
    assert list(resumed["paths"]) == good
    np.testing.assert_allclose(resumed["embeddings"], full_npz["embeddings"], atol=1e-6)
    same_rows(csv_path.read_text(), full_csv)
    predict.main(good + base + ["--resume"])  # nothing left: nothing tagged, outputs kept
    assert "4 file(s) already tagged in the outputs, 0 to tag" in capsys.readouterr().err
    same_rows(csv_path.read_text(), full_csv)


def test_interrupted_run_saves_what_it_tagged(checkpoint, library, tmp_path, monkeypatch, capsys):
    """Ctrl-C while the third file is printed: the CSV holds the first three (a file is
    kept as soon as it is tagged), valid, and --resume tags the rest, ending with the
    uninterrupted run's rows."""
    _, found = library
    good = [found[i] for i in (0, 2, 3, 5)]
    csv_path = tmp_path / "tags.csv"
    args = good + ["--checkpoint", str(checkpoint), "--csv", str(csv_path), "--workers", "0"]
    predict.main(args)
    full_csv = csv_path.read_text()
    csv_path.unlink()
    printed = []

    def format_then_interrupt(path, result, top):  # Ctrl-C while the third file is printed
        printed.append(path)
        if len(printed) == 3:
            raise KeyboardInterrupt
        return f"{path}: tagged"

    monkeypatch.setattr(predict, "format_tags", format_then_interrupt)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        predict.main(args)
    assert stopped.value.code == 130  # 128 + SIGINT, as a shell reports Ctrl-C
    assert capsys.readouterr().err.strip().endswith(
        "interrupted; the files tagged so far are saved; rerun with --resume to tag the rest")
    with open(csv_path, newline="") as f:
        assert [row[0] for row in csv.reader(f)][1:] == good[:3]
    monkeypatch.undo()
    capsys.readouterr()
    predict.main(args + ["--resume"])
    assert "3 file(s) already tagged in the outputs, 1 to tag" in capsys.readouterr().err
    same_rows(csv_path.read_text(), full_csv)


class NotAWeight:
    """An object torch.load(weights_only=True) refuses to unpickle."""


def test_short_audio_nan_audio_and_checkpoint_folders(checkpoint, tmp_path, recwarn, capsys):
    """No librosa warning on audio shorter than n_fft; a file with a NaN
    sample is called that, not undecodable; a run folder stands for its best_model.pt and a
    folder without one is called a folder; a checkpoint error is one whole line."""
    tiny = tmp_path / "tiny.wav"
    sf.write(tiny, tone(0.01, 44100), 44100)  # 111 samples at 11,025 Hz, n_fft is 2048
    results = predict.main([str(tiny), "--checkpoint", str(checkpoint.parent), "--workers", "0"])
    assert results[str(tiny)]["windows"] == 1
    assert not [w for w in recwarn if "too large" in str(w.message)]
    inf = tmp_path / "inf.flac"
    samples = tone(2, 16000)
    samples[20000:] = np.inf  # FLAC is integer: clipped, so it decodes and is finite
    sf.write(inf, samples, 16000)
    inf_wav = tmp_path / "inf.wav"
    samples = tone(2, 16000)
    samples[24000] = -np.inf
    sf.write(inf_wav, samples, 16000, subtype="DOUBLE")
    with pytest.raises(SystemExit, match="1 of 2 files"):
        predict.main([str(inf), str(inf_wav), "--checkpoint", str(checkpoint), "--workers", "0"])
    assert (f"error: {inf_wav}: decodes, but its samples are not all finite (NaN or inf, first "
            "at 1.5 s)") in capsys.readouterr().err
    empty_run = tmp_path / "run"
    empty_run.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        predict.main([str(tiny), "--checkpoint", str(empty_run)])
    assert str(exit_info.value.code).startswith(f"error: checkpoint {empty_run} is a folder with "
                                                "no best_model.pt in it")
    unsafe = tmp_path / "unsafe.pt"  # torch's weights_only refusal is a paragraph
    torch.save({"state_dict": {}, "x": NotAWeight()}, unsafe)
    with pytest.raises(SystemExit) as exit_info:
        predict.main([str(tiny), "--checkpoint", str(unsafe)])
    message = str(exit_info.value.code)
    assert message == (f"error: {unsafe}: not a PyTorch checkpoint of this project "
                       "(weights-only loading refused it: Unsupported global: GLOBAL "
                       "test_predict.NotAWeight was not an allowed global by default); pass the "
                       "best_model.pt of a run trained with src/trainer.py, or a folder of src/export.py")


@pytest.mark.slow
def test_a_killed_decoder_does_not_hang_the_run(checkpoint, long_stereo, tmp_path):
    """kill -9 of a decoder (what the OOM killer does) while predict.py tags 8 files with 2
    decoders: the run ends in bounded time, says so in one line, and every row is right."""
    folder = tmp_path / "music"
    folder.mkdir()
    for i in range(8):
        shutil.copyfile(long_stereo, folder / f"track{i}.wav")
    csv_path = tmp_path / "tags.csv"
    run = subprocess.Popen([sys.executable, str(SRC / "predict.py"), str(folder),
                            "--checkpoint", str(checkpoint), "--workers", "2",
                            "--csv", str(csv_path), "--top", "1"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children_file = Path(f"/proc/{run.pid}/task/{run.pid}/children")
    deadline, killed = time.monotonic() + 60, None
    while killed is None and time.monotonic() < deadline and run.poll() is None:
        children = children_file.read_text().split() if children_file.exists() else []
        if children:
            killed = int(children[0])
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.02)
    out, err = run.communicate(timeout=120)  # a hang fails here
    assert killed is not None, "no decoder process seen"
    assert run.returncode == 0, err
    assert "a worker process died (killed: out of memory? kill -9?) with " in err
    assert "in flight; computing them again, one at a time, in a fresh pool" in err
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    assert [row[0] for row in rows[1:]] == [str(folder / f"track{i}.wav") for i in range(8)]
    assert all(row[1:] == rows[1][1:] for row in rows[1:]) and rows[1][-3] == ""
