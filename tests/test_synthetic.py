"""The synthetic demo set: MTAT's exact file format, decodable clips, determinism, tags
that merge like MTAT's and that can be heard (level, tempo, voice pitch)."""
import re

import librosa
import numpy as np
import pytest

import common
import synthetic

N_CLIPS = 16


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("synthetic")
    synthetic.write_synthetic_mtat(data_dir, N_CLIPS, seed=0, progress=False)
    return data_dir


@pytest.fixture(scope="module")
def demo_tags(demo_dir):
    """The demo set's tags after merging synonyms and keeping the top 50."""
    _, tags, tag_names, _ = common.load_tags(demo_dir / "annotations_final.csv")
    return tags, tag_names


def column(tags, tag_names, name):
    return tags[:, tag_names.index(name)].astype(bool)


def test_header_is_byte_identical_to_real_mtat(demo_dir, annotations_csv):
    with open(annotations_csv, "rb") as f:
        real_header = f.readline()
    with open(demo_dir / "annotations_final.csv", "rb") as f:
        header = f.readline()
    assert header == real_header
    assert header.endswith(b'"mp3_path"\r\n')


def test_rows_are_quoted_tab_separated_crlf(demo_dir):
    data = (demo_dir / "annotations_final.csv").read_bytes()
    lines = data.split(b"\r\n")
    assert lines[-1] == b"" and len(lines) == N_CLIPS + 2  # header, rows, final CRLF
    assert data.count(b"\n") == data.count(b"\r\n") and b"\r\r" not in data
    for line in lines[1:-1]:
        fields = line.split(b"\t")
        assert len(fields) == 190
        assert all(re.fullmatch(rb'"[^"\t]*"', f) for f in fields)
        assert all(f in (b'"0"', b'"1"') for f in fields[1:-1])


def test_read_annotations_like_the_real_file(demo_dir, annotations_csv):
    csv_path = demo_dir / "annotations_final.csv"
    clip_ids, tags, tag_names, mp3_paths = common.read_annotations(csv_path)
    _, real_tags, real_names, _ = common.read_annotations(annotations_csv)
    assert tag_names == real_names == synthetic.MTAT_TAG_NAMES
    assert tags.shape == (N_CLIPS, real_tags.shape[1]) == (N_CLIPS, 188)
    assert tags.dtype == real_tags.dtype and set(np.unique(tags)) == {0, 1}
    assert clip_ids.tolist() == list(range(1, N_CLIPS + 1))
    assert all(re.fullmatch(r"[0-9a-f]/synthetic-\d{6}\.mp3", p) for p in mp3_paths)
    assert {p[0] for p in mp3_paths} == set("0123456789abcdef")  # all 16 MTAT folders
    assert (tags.sum(axis=1) >= 3).all()  # every clip has an instrument, style and voice tag


def test_clips_decode_to_full_length_spectrograms(demo_dir):
    _, _, _, mp3_paths = common.read_annotations(demo_dir / "annotations_final.csv")
    for mp3_path in mp3_paths:
        path = demo_dir / "mp3" / mp3_path
        info = synthetic.sf.info(path)
        assert (info.samplerate, info.channels, info.format) == (16000, 1, "MP3")
        assert 29.1 <= info.duration <= 29.3
        spec = common.log_mel(path, n_frames=None)  # uncropped: no padding may be needed
        assert spec.shape[0] == 128 and spec.shape[1] >= common.N_FRAMES
        assert np.isfinite(spec).all() and spec.std() > 1
        assert common.fit_frames(spec).shape == (128, 628)
    assert not list(demo_dir.rglob("*.tmp"))


def test_same_seed_gives_identical_bytes(demo_dir, tmp_path):
    synthetic.write_synthetic_mtat(tmp_path, N_CLIPS, seed=0, progress=False, workers=1)
    assert (tmp_path / "annotations_final.csv").read_bytes() == \
        (demo_dir / "annotations_final.csv").read_bytes()
    mp3s = sorted(p.relative_to(demo_dir) for p in (demo_dir / "mp3").rglob("*.mp3"))
    assert len(mp3s) == N_CLIPS
    for mp3 in mp3s:
        assert (tmp_path / mp3).read_bytes() == (demo_dir / mp3).read_bytes(), mp3


def test_clip_depends_only_on_seed_and_id(demo_dir, tmp_path):
    synthetic.write_synthetic_mtat(tmp_path / "same", 3, seed=0, progress=False)
    synthetic.write_synthetic_mtat(tmp_path / "other", 3, seed=1, progress=False)
    demo_lines = (demo_dir / "annotations_final.csv").read_bytes().split(b"\r\n")
    assert (tmp_path / "same" / "annotations_final.csv").read_bytes().split(b"\r\n")[:4] == \
        demo_lines[:4]
    other_lines = (tmp_path / "other" / "annotations_final.csv").read_bytes().split(b"\r\n")
    assert other_lines[0] == demo_lines[0] and other_lines[1:4] != demo_lines[1:4]
    for clip_id in (1, 2, 3):
        mp3 = synthetic.clip_path(clip_id)
        demo_audio = (demo_dir / "mp3" / mp3).read_bytes()
        assert (tmp_path / "same" / "mp3" / mp3).read_bytes() == demo_audio
        assert (tmp_path / "other" / "mp3" / mp3).read_bytes() != demo_audio


def test_synonyms_merge_into_mtat_names(demo_dir, demo_tags):
    _, raw, raw_names, _ = common.read_annotations(demo_dir / "annotations_final.csv")
    tags, tag_names = demo_tags
    used = {name for name, count in zip(raw_names, raw.sum(axis=0)) if count}
    assert {"drum", "drums"} <= used  # both spellings, so the merge is exercised
    assert len(used & {"no vocals", "no voice", "instrumental", "no singer"}) >= 2
    assert used <= {s for spellings in synthetic.SPELLINGS.values() for s in spellings}
    present = {name for name, count in zip(tag_names, tags.sum(axis=0)) if count}
    assert len(present) >= 12
    assert present <= set(synthetic.SPELLINGS)  # every positive tag under its merged name
    assert {"drum", "no singer", "vocal", "beat", "fast", "slow"} <= present
    assert not {"drums", "no vocals", "no voice", "guitars", "woman"} & set(tag_names)
    either = raw[:, raw_names.index("drum")] | raw[:, raw_names.index("drums")]
    assert (column(tags, tag_names, "drum") == either).all()
    # co-occurrence: techno is drums + synth, a singer is a man or a woman, never both
    techno = column(tags, tag_names, "techno")
    assert techno.any() and (column(tags, tag_names, "drum") | ~techno).all()
    assert (column(tags, tag_names, "synth") | ~techno).all()
    vocal = column(tags, tag_names, "vocal")
    male, female = column(tags, tag_names, "male"), column(tags, tag_names, "female")
    assert (vocal == (male ^ female)).all()
    assert (vocal != column(tags, tag_names, "no singer")).all()


def test_loud_clips_are_louder_than_quiet_ones(demo_dir, demo_tags):
    tags, tag_names = demo_tags
    _, _, _, mp3_paths = common.read_annotations(demo_dir / "annotations_final.csv")
    rms_db = np.array([10 * np.log10(np.mean(common.load_audio(demo_dir / "mp3" / p) ** 2))
                       for p in mp3_paths])
    loud, quiet = column(tags, tag_names, "loud"), column(tags, tag_names, "quiet")
    assert loud.sum() >= 2 and quiet.sum() >= 2
    normal = ~loud & ~quiet
    assert rms_db[quiet].max() + 10 < rms_db[normal].min()
    assert rms_db[normal].max() + 3 < rms_db[loud].min()


def test_fast_clips_have_more_onsets_than_slow_ones(demo_dir, demo_tags):
    tags, tag_names = demo_tags
    _, _, _, mp3_paths = common.read_annotations(demo_dir / "annotations_final.csv")
    fast, slow = column(tags, tag_names, "fast"), column(tags, tag_names, "slow")
    assert fast.sum() >= 2 and slow.sum() >= 2 and not (fast & slow).any()

    def onsets_per_second(row):
        audio = common.load_audio(demo_dir / "mp3" / mp3_paths[row])
        return len(librosa.onset.onset_detect(y=audio, sr=common.SAMPLE_RATE)) / 29.15

    fast_rate = np.mean([onsets_per_second(row) for row in np.flatnonzero(fast)])
    slow_rate = np.mean([onsets_per_second(row) for row in np.flatnonzero(slow)])
    assert fast_rate > 1.5 * slow_rate


def test_female_voice_sings_an_octave_above_male():
    rng = np.random.default_rng(0)
    onsets = np.arange(10) * 8000  # a note every 0.5 s
    f0 = {}
    for female in (False, True):
        timbre = synthetic.TIMBRES["female" if female else "male"]
        notes = synthetic.melody(rng, 10, 48, synthetic.MAJOR, timbre["low"], timbre["high"])
        voice = synthetic.render_voice(onsets, notes, female, rng)
        assert voice.shape == (synthetic.CLIP_SAMPLES,) and np.isfinite(voice).all()
        f0[female] = np.median(librosa.yin(voice[:80000], fmin=60, fmax=500, sr=16000))
    assert 85 < f0[False] < 170 and 170 < f0[True] < 340


def test_interrupted_run_leaves_no_annotations(tmp_path, monkeypatch):
    synthetic.write_synthetic_mtat(tmp_path, 2, seed=0, progress=False)
    assert (tmp_path / "annotations_final.csv").is_file()
    clean, calls = synthetic.synthesise_clip, []

    def fails_on_clip_4(rng):  # e.g. a full disk or Ctrl-C half way
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("interrupted")
        return clean(rng)

    monkeypatch.setattr(synthetic, "synthesise_clip", fails_on_clip_4)
    with pytest.raises(RuntimeError, match="interrupted"):
        synthetic.write_synthetic_mtat(tmp_path, 8, seed=0, progress=False, workers=1)
    assert not (tmp_path / "annotations_final.csv").exists()  # the old one is gone too
    assert not list(tmp_path.rglob("*.tmp"))
    assert len(calls) < 8  # the clips after the failure were not even started
