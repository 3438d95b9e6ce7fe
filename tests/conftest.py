"""Shared fixtures: the real MTAT files in tests/fixtures/ (or $MTAT_FIXTURES)."""
import gzip
import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
MTAT_CLIP_NAME = "joram-moments_of_clarity-08-solipsism-59-88.mp3"
MTAT_CLIP_PATH = "e/" + MTAT_CLIP_NAME  # its mp3_path in the annotations (clip_id 37386)
FIXTURES = Path(__file__).resolve().parent / "fixtures"  # committed: a clone tests alone


@pytest.fixture(scope="session", autouse=True)
def temporary_folder_in_basetemp(tmp_path_factory):
    """The system's temporary folder, for this session and the scripts it starts, is a folder
    in pytest's basetemp: what they leave there (torch.compile's cache, torchrun's logs,
    TemporaryDirectory) goes when pytest removes its folders, not into /tmp for good."""
    folder = tmp_path_factory.mktemp("tmp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(folder))
        patch.setattr(tempfile, "tempdir", str(folder))
        yield folder


def _fixture_dir():
    folder = Path(os.environ.get("MTAT_FIXTURES") or FIXTURES)
    missing = [name for name in ("annotations_final.csv.gz", MTAT_CLIP_NAME)
               if not (folder / name).is_file()]
    if missing:  # a real error, never a skip: the files are part of the repository
        pytest.fail(f"real MTAT fixtures missing in {folder}: {', '.join(missing)} "
                    "(restore tests/fixtures/ from git, or fix $MTAT_FIXTURES)")
    return folder


@pytest.fixture(scope="session")
def mtat_dir():
    """Folder holding annotations_final.csv.gz and the real clip."""
    return _fixture_dir()


@pytest.fixture(scope="session")
def annotations_csv(mtat_dir, tmp_path_factory):
    """Path of the real annotations_final.csv, unzipped once per session (read-only use)."""
    path = tmp_path_factory.mktemp("mtat") / "annotations_final.csv"
    with gzip.open(mtat_dir / "annotations_final.csv.gz") as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return path


@pytest.fixture(scope="session")
def mtat_clip(mtat_dir):
    """Path of the one real MTAT clip (16 kHz mono MP3, 29.27 s)."""
    return mtat_dir / MTAT_CLIP_NAME


def write_spectrogram_set(data_dir, n_clips, n_tags=4, seed=0, dtype="float16"):
    """Write a small data set in the stage-2 layout: annotations_final.csv (MTAT format,
    tags t0..t{n_tags-1}) and spectrograms.npy/.json, where tag k is a loud band in mel
    bands [20k+8, 20k+16) on a noise floor, so a network can learn every tag.

    Returns labels, uint8 ndarray (n_clips, n_tags).
    """
    import json

    import numpy as np

    import common
    import formats

    rng = np.random.default_rng(seed)
    labels = (rng.random((n_clips, n_tags)) < 0.4).astype(np.uint8)
    labels[np.arange(n_clips), rng.integers(0, n_tags, n_clips)] = 1  # no clip without a tag
    spectrograms = rng.normal(-8.0, 1.0, (n_clips, common.N_MELS, common.N_FRAMES))
    for k in range(n_tags):
        spectrograms[labels[:, k] == 1, 20 * k + 8:20 * k + 16, :] += 4.0
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    np.save(data_dir / "spectrograms.npy", spectrograms.astype(dtype))
    mp3_paths = [f"{i % 16:x}/clip-{i}.mp3" for i in range(n_clips)]
    meta = formats.spectrogram_meta(
        formats.spectrogram_settings(n_clips, dtype, mp3_paths))  # as stage 2 writes it
    (data_dir / "spectrograms.json").write_text(json.dumps(meta))
    header = ["clip_id"] + [f"t{k}" for k in range(n_tags)] + ["mp3_path"]
    lines = ["\t".join(f'"{v}"' for v in header)]
    for i in range(n_clips):
        fields = [str(i)] + [str(v) for v in labels[i]] + [mp3_paths[i]]
        lines.append("\t".join(f'"{v}"' for v in fields))
    (data_dir / "annotations_final.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode())
    return labels


# A small learnable set shared by the training tests: 48 clips, 32 train (two steps of 16
# per epoch), 8 validation, 8 test; and one uninterrupted two-epoch run on it.
SMALL_RUN_ARGS = ["--split", "random", "--train-size", "32", "--val-size", "8", "--batch-size", "16",
                  "--n-tags", "4", "--no-merge", "--device", "cpu"]


@pytest.fixture(scope="session")
def small_data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("spectrograms")
    write_spectrogram_set(path, 48, n_tags=4, seed=0)
    return path


@pytest.fixture(scope="session")
def small_run(small_data_dir, tmp_path_factory):
    """(run folder, results dict) of `trainer.py --epochs 2` on small_data_dir."""
    import trainer

    out = tmp_path_factory.mktemp("experiments")
    results = trainer.main(["--data-dir", str(small_data_dir), "--out", str(out), "--run", "full",
                            "--epochs", "2"] + SMALL_RUN_ARGS)
    return out / "full", results
