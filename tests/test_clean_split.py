"""The clean split, the leakage audit and the fixed splits, on the real MTAT annotations."""
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import common
import formats
import report
import trainer
from conftest import ROOT, SRC

# Listed nowhere although the rule of src/splits/README.md puts them in training.
CLEAN_EXCEPTIONS = [29, 11268, 11269, 35644, 55753, 57881]


@pytest.fixture(scope="module")
def annotations(annotations_csv):
    return common.read_annotations(annotations_csv)


def test_clean_split_counts_disjoint_and_song_disjoint(annotations):
    clip_ids, _, _, mp3_paths = annotations
    train, val, test = common.clean_split(clip_ids)
    assert (len(train), len(val), len(test)) == (15244, 1529, 4332)
    for rows in (train, val, test):
        assert rows.dtype == np.int64 and np.all(np.diff(rows) > 0)  # sorted rows, no repeats
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    for rows in (val, test):
        overlap = common.split_overlap(mp3_paths, train, rows)
        assert overlap["song"] == 0 and overlap["album"] == 0 and overlap["unparsed"] == 0
    # the rows are the listed clips
    listed = np.loadtxt(common.SPLITS_DIR / "mtat_clean_test.txt", dtype=np.int64)
    assert np.array_equal(np.sort(clip_ids[test]), listed)


def test_clean_lists_follow_the_rule_of_their_readme(annotations):
    """Folders 0..b train, c valid, d..f test; clips with one of the 50 most frequent
    unmerged tags; the training list lacks exactly the 6 known exceptions."""
    clip_ids, tags, tag_names, mp3_paths = annotations
    top50, _ = common.top_tags(tags, tag_names, 50)
    tagged = top50.sum(axis=1) > 0
    folder = np.array([int(path.split("/")[0], 16) for path in mp3_paths])
    rule = {"train": tagged & (folder <= 0xb), "valid": tagged & (folder == 0xc),
            "test": tagged & (folder >= 0xd)}
    for part, selected in rule.items():
        listed = np.loadtxt(common.SPLITS_DIR / f"mtat_clean_{part}.txt", dtype=np.int64)
        assert np.all(np.diff(listed) > 0)  # ascending, no repeats
        expected = sorted(set(clip_ids[selected]) - (set(CLEAN_EXCEPTIONS) if part == "train" else set()))
        assert listed.tolist() == expected, part
    assert rule["train"][np.isin(clip_ids, CLEAN_EXCEPTIONS)].all()  # the exceptions do meet the rule


def test_clean_split_names_missing_clips(annotations):
    clip_ids = annotations[0]
    kept = ~np.isin(clip_ids, [39, 40, 44])  # the first three listed training clips dropped
    with pytest.raises(ValueError, match=r"lack 3 of the clean split's 21,105 clips \(clip ids 39, 40, 44\)"):
        common.clean_split(clip_ids[kept])


def test_split_overlap_on_hand_made_annotations():
    paths = ["0/art_a-alb_1-01-song_x-0-29.mp3",      # 0 train
             "0/art_a-alb_1-01-song_x-30-59.mp3",     # 1 eval: same song
             "1/art_a-alb_1-02-song_y-0-29.mp3",      # 2 eval: same album, other song
             "2/art_a-alb_2-01-song_z-0-29.mp3",      # 3 eval: same artist, other album
             "3/art_b-alb_1-01-song_x-0-29.mp3",      # 4 eval: other artist, same album/song names
             "4/various_artists-mix-03-tune-0-29.mp3",  # 5 train: a compilation
             "5/various_artists-best_of-07-other-0-29.mp3",  # 6 eval: only the "artist"
             "6/synthetic-000010.mp3",                # 7 eval: does not parse
             "7/art_c-alb_9-01-title_with-dash-0-29.mp3"]  # 8 eval: 7 fields, song key still exact
    counts = common.split_overlap(paths, [0, 5], [1, 2, 3, 4, 6, 7, 8])
    assert counts == dict(n_clips=7, song=1, album=2, artist=4, unparsed=1)
    assert common.parse_mp3_path(paths[8]) == ("art_c-alb_9-01-title_with-dash", "art_c-alb_9", "art_c")
    assert common.parse_mp3_path("a/x-y-1-t-0-end.mp3") is None
    assert common.split_overlap(paths, [], [1, 2]) == dict(n_clips=2, song=0, album=0, artist=0, unparsed=0)


def test_seed_never_moves_the_split(annotations):
    clip_ids = annotations[0]
    paper = common.paper_split()
    for seed in ("1337", "5"):
        args = trainer.parse_args(["--seed", seed])
        assert all(np.array_equal(a, b)
                   for a, b in zip(trainer.make_split(args, common.N_CLIPS, clip_ids), paper))
        args = trainer.parse_args(["--split", "clean", "--seed", seed])
        assert all(np.array_equal(a, b) for a, b in zip(trainer.make_split(args, common.N_CLIPS, clip_ids),
                                                        common.clean_split(clip_ids)))
    random_args = ["--split", "random", "--train-size", "70", "--val-size", "10"]
    default = trainer.make_split(trainer.parse_args(random_args), 100)
    assert np.array_equal(default[1], common.random_split(100, 70, 10, seed=1337)[1])  # what demo.sh draws
    assert np.array_equal(trainer.make_split(trainer.parse_args(random_args + ["--seed", "5"]), 100)[1],
                          default[1])
    moved = trainer.make_split(trainer.parse_args(random_args + ["--split-seed", "5"]), 100)
    assert not np.array_equal(moved[1], default[1])


def test_clean_split_flags_and_errors(annotations):
    args = trainer.parse_args(["--split", "clean"])
    assert args.no_merge and args.n_tags == 50
    with pytest.raises(SystemExit):
        trainer.parse_args(["--split", "clean", "--n-tags", "20"])
    with pytest.raises(SystemExit, match="--split clean needs all 25863 MTAT clips, the data has 25862"):
        trainer.make_split(args, 25862, annotations[0][:25862])


def test_split_table_in_docs_matches_the_real_annotations(mtat_dir, capsys):
    """docs/results.md states the split sizes and leakage figures; they are recomputed here,
    by the README's command on the gzipped annotations that ship in tests/fixtures/."""
    table = report.main(["--splits", str(mtat_dir / "annotations_final.csv.gz")])
    assert capsys.readouterr().out == table
    assert "| paper | test | 5,863 | 5,591 (95.4%) | 5,862 (>99.9%) | 5,863 (100.0%) |" in table
    assert "| clean | test | 4,332 | 0 (0.0%) | 0 (0.0%) | 2,680 (61.9%) |" in table
    assert table in (ROOT / "docs" / "results.md").read_text(), \
        "docs/results.md's split table differs from: python src/report.py --splits ANNOTATIONS\n" + table


REAL_SPLIT_LINES = {
    "clean": ["split clean: 15,244 train / 1,529 val / 4,332 test clips",
              "leakage audit, val: of 1,529 clips, 0 (0.00%) share a song with a training clip, "
              "0 (0.00%) an album, 914 (59.78%) an artist",
              "leakage audit, test: of 4,332 clips, 0 (0.00%) share a song with a training clip, "
              "0 (0.00%) an album, 2,680 (61.87%) an artist"],
    "folder": ["split folder: 18,706 train / 1,825 val / 5,329 test clips",
               "leakage audit, val: of 1,825 clips, 0 (0.00%) share a song with a training clip, "
               "0 (0.00%) an album, 1,083 (59.34%) an artist",
               "leakage audit, test: of 5,329 clips, 0 (0.00%) share a song with a training clip, "
               "0 (0.00%) an album, 3,284 (61.63%) an artist"]}


@pytest.mark.slow
@pytest.mark.parametrize("split", ["clean", "folder"])
def test_trainer_fixed_split_on_real_annotations(annotations_csv, tmp_path, split):
    """trainer.py --split clean and --split folder, by subprocess, on the real annotations and
    a spectrogram file of all 25,863 rows: a sparse file (zeros, 4.2 GB apparent, no disk
    used). The run goes through argument parsing, the unmerged top-50 tags, the row-count
    check, the split and its leakage audit; it is stopped once the audit is printed, before
    training (an epoch of 15,244 clips takes far too long on a CPU). The rest of the path is
    shared with the other splits and tested on small sets in test_trainer.py."""
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(annotations_csv, data / "annotations_final.csv")
    shape = (common.N_CLIPS, common.N_MELS, common.N_FRAMES)
    np.lib.format.open_memmap(data / "spectrograms.npy", mode="w+", dtype=np.float16, shape=shape).flush()
    mp3_paths = common.read_annotations(annotations_csv)[3]
    (data / "spectrograms.json").write_text(json.dumps(formats.spectrogram_meta(
        formats.spectrogram_settings(shape[0], "float16", mp3_paths))))
    assert os.stat(data / "spectrograms.npy").st_blocks * 512 < 2 ** 20  # sparse: no real disk
    proc = subprocess.Popen([sys.executable, str(SRC / "trainer.py"), "--data-dir", str(data), "--out",
                             str(tmp_path / "exp"), "--run", split, "--split", split, "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith("leakage audit, test") or line.startswith("error"):
                break
    finally:
        proc.kill()
        proc.wait()
        watchdog.cancel()
    output = "\n".join(lines)
    for line in REAL_SPLIT_LINES[split]:
        assert line in output, output
    assert "note: --split folder" not in output  # all of MTAT: the benchmarks' split
