"""Tags, split and metrics on the real MTAT annotations."""
import subprocess
import sys

import numpy as np
import pytest

import common
from conftest import SRC


@pytest.fixture(scope="module")
def annotations(annotations_csv):
    return common.read_annotations(annotations_csv)


def test_read_annotations_real_file(annotations):
    clip_ids, tags, tag_names, mp3_paths = annotations
    assert clip_ids.dtype == np.int64 and tags.dtype == np.uint8
    assert tags.shape == (25863, 188) and len(tag_names) == 188 and len(mp3_paths) == 25863
    assert set(np.unique(tags)) == {0, 1}
    assert tag_names[:3] == ["no voice", "singer", "duet"]
    row = clip_ids.tolist().index(37386)  # the fixture clip: tagged 'no singer' and 'techno'
    assert mp3_paths[row] == "e/joram-moments_of_clarity-08-solipsism-59-88.mp3"
    assert sorted(np.array(tag_names)[tags[row] == 1]) == ["no singer", "techno"]
    assert mp3_paths[-1].endswith("0-29.mp3") and not mp3_paths[-1].endswith("\r")


def test_read_annotations_rejects_other_files(tmp_path):
    bad = tmp_path / "x.csv"
    bad.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="x.csv"):
        common.read_annotations(bad)


def test_read_annotations_reads_the_gzip_as_shipped_and_names_a_damaged_one(annotations, mtat_dir, tmp_path):
    shipped = mtat_dir / "annotations_final.csv.gz"
    for got, expected in zip(common.read_annotations(shipped), annotations):
        np.testing.assert_array_equal(got, expected)
    damaged = tmp_path / "annotations_final.csv.gz"
    damaged.write_bytes(shipped.read_bytes()[:5000])  # cut short
    with pytest.raises(ValueError, match=f"^{damaged}: neither UTF-8 text nor an intact gzip .*"
                                         "give MTAT's annotations_final.csv or a gzip of it$"):
        common.read_annotations(damaged)
    binary = tmp_path / "spectrograms.npy"
    binary.write_bytes(b"\x93NUMPY\x01\x00v\x00")
    with pytest.raises(ValueError, match=f"^{binary}: neither UTF-8 text"):
        common.read_annotations(binary)


def test_merged_columns_are_or_of_members(annotations):
    _, tags, tag_names, _ = annotations
    merged, merged_names = common.merge_synonyms(tags, tag_names)
    assert merged.shape == (25863, 135) and len(merged_names) == 135
    def column(name):
        return tags[:, tag_names.index(name)]
    for group in (["drum", "drums"], ["classical", "clasical", "classic"],
                  ["female", "female singer", "female singing", "female vocals", "female voice",
                   "woman", "woman singing", "women"],
                  ["no singer", "no singing", "no vocal", "no vocals", "no voice", "no voices",
                   "instrumental"]):
        expected = np.max([column(m) for m in group], axis=0)
        assert np.array_equal(merged[:, merged_names.index(group[0])], expected)
        assert all(m not in merged_names for m in group[1:])
        assert expected.sum() > column(group[0]).sum()  # the merge really added clips
    # a tag in no group is untouched
    assert np.array_equal(merged[:, merged_names.index("techno")], column("techno"))


def test_top_50_in_order(annotations):
    _, tags, tag_names, _ = annotations
    top, names = common.top_tags(*common.merge_synonyms(tags, tag_names), n=50)
    assert names[:10] == ["guitar", "classical", "slow", "techno", "string", "vocal", "electro",
                          "drum", "no singer", "rock"]
    assert names[-3:] == ["foreign", "trance", "folk"]
    counts = top.sum(axis=0, dtype=np.int64)
    assert counts[0] == 4861 and counts[-1] == 243 and np.all(np.diff(counts) <= 0)


def test_top_tags_ties_are_stable():
    tags = np.array([[1, 1, 0, 1], [0, 1, 1, 1]], dtype=np.uint8)
    _, names = common.top_tags(tags, ["a", "b", "c", "d"], n=3)
    assert names == ["b", "d", "a"]


def test_paper_split_sizes_and_disjoint():
    train, val, test = common.paper_split()
    assert (len(train), len(val), len(test)) == (18000, 2000, 5863)
    assert np.array_equal(np.sort(np.concatenate([train, val, test])), np.arange(25863))
    # the replayed draws matter: without them the shuffle, and so the split, differs
    order = np.arange(25863)
    np.random.RandomState(1337).shuffle(order)
    assert not np.array_equal(np.sort(order[:2000]), val)


def test_paper_split_deterministic_across_processes():
    code = ("import common, hashlib; t, v, s = common.paper_split(); "
            "print(hashlib.md5(t.tobytes() + v.tobytes() + s.tobytes()).hexdigest())")
    out = [subprocess.run([sys.executable, "-c", code], cwd=SRC, capture_output=True, text=True,
                          check=True).stdout for _ in range(2)]
    train, val, test = common.paper_split()
    import hashlib
    assert out[0] == out[1] == hashlib.md5(
        train.tobytes() + val.tobytes() + test.tobytes()).hexdigest() + "\n"


def test_random_split():
    train, val, test = common.random_split(100, 70, 10, seed=3)
    assert (len(train), len(val), len(test)) == (70, 10, 20)
    assert np.array_equal(np.sort(np.concatenate([train, val, test])), np.arange(100))
    assert np.array_equal(common.random_split(100, 70, 10, seed=3)[1], val)
    assert not np.array_equal(common.random_split(100, 70, 10, seed=4)[1], val)
    with pytest.raises(ValueError):
        common.random_split(100, 90, 10)


def test_metrics_macro_over_scorable_tags():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(0)
    y = (rng.random((200, 4)) < 0.3).astype(int)
    y[:, 3] = 0  # a tag with one class only: skipped
    scores = y + rng.normal(0, 0.8, y.shape)
    per_tag = common.roc_auc(y, scores, per_tag=True)
    assert np.isnan(per_tag[3]) and np.isfinite(per_tag[:3]).all()
    assert common.roc_auc(y, scores) == pytest.approx(roc_auc_score(y[:, :3], scores[:, :3], average="macro"))
    assert common.pr_auc(y, scores) == pytest.approx(
        average_precision_score(y[:, :3], scores[:, :3], average="macro"))
    assert np.isnan(common.roc_auc(np.zeros((5, 2)), np.zeros((5, 2))))
