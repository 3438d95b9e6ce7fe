"""--split folder: MTAT's folders 0-b / c / d-f with every usable clip, on the real annotations."""
import json

import numpy as np
import pytest

import common
import trainer


@pytest.fixture(scope="module")
def annotations(annotations_csv):
    return common.read_annotations(annotations_csv)


def test_folder_split_counts_rule_and_audit(annotations):
    clip_ids, _, _, mp3_paths = annotations
    train, val, test = common.folder_split(mp3_paths)
    assert (len(train), len(val), len(test)) == (18706, 1825, 5329)
    for rows in (train, val, test):
        assert rows.dtype == np.int64 and np.all(np.diff(rows) > 0)
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    # every row but the three broken clips, each on its folder's side
    left_out = sorted(set(range(len(clip_ids))) - set(train) - set(val) - set(test))
    assert clip_ids[left_out].tolist() == [35644, 55753, 57881]
    assert [mp3_paths[row] for row in left_out] == list(common.BROKEN_CLIPS)
    folder = np.array([int(path.split("/")[0], 16) for path in mp3_paths])
    assert folder[train].max() == 0xb and set(folder[val]) == {0xc} and folder[test].min() == 0xd
    # the folders keep songs and albums on one side; artists recur
    assert common.split_overlap(mp3_paths, train, val) == dict(n_clips=1825, song=0, album=0, artist=1083,
                                                               unparsed=0)
    assert common.split_overlap(mp3_paths, train, test) == dict(n_clips=5329, song=0, album=0, artist=3284,
                                                                unparsed=0)
    # the clean split is the folder split less the clips without a top-50 tag (and 3 exceptions)
    clean = common.clean_split(clip_ids)
    for part, clean_part in zip((train, val, test), clean):
        assert set(clean_part) <= set(part)


def test_folder_split_flags_and_errors():
    args = trainer.parse_args(["--split", "folder"])
    assert args.no_merge and args.n_tags == 50  # the 50 most frequent tags, unmerged, as --split clean
    with pytest.raises(SystemExit):
        trainer.parse_args(["--split", "folder", "--n-tags", "20"])
    with pytest.raises(ValueError, match=r"1 mp3_path\(s\) are not in one of MTAT's folders 0..f "
                                         r"\(e.g. 'song.mp3'\)"):
        common.folder_split(["0/a.mp3", "song.mp3", "f/b.mp3"])
    with pytest.raises(SystemExit, match=r"annotations_final.csv: 1 mp3_path.*; use --split random"):
        trainer.make_split(args, 2, mp3_paths=["g/x.mp3", "0/y.mp3"])
    parts = common.folder_split(["c/v.mp3", "0/t.mp3", "e/s.mp3", common.BROKEN_CLIPS[0]])
    assert [rows.tolist() for rows in parts] == [[1], [0], [2]]  # the broken clip is in no part


@pytest.mark.slow
def test_trainer_folder_split_on_a_small_set(small_data_dir, tmp_path, capsys):
    """The small set's paths are in MTAT's folders (row i in folder i mod 16), so the folder
    split trains end to end on it: 36 training, 3 validation, 9 test clips, with a note
    that it is not the benchmarks' split."""
    results = trainer.main(["--data-dir", str(small_data_dir), "--out", str(tmp_path), "--run", "folder",
                            "--epochs", "1", "--split", "folder", "--batch-size", "16", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "note: --split folder of 48 clips, not of all 25,863 MTAT clips" in out
    assert "split folder: 36 train / 3 val / 9 test clips" in out
    assert (results["split"], results["n_train"], results["n_val"], results["n_test"]) == ("folder", 36, 3, 9)
    assert json.loads((tmp_path / "folder" / "results.json").read_text())["merge"] is False
