"""Shared fixtures: the real MTAT files from ../shared/mtat (or $MTAT_FIXTURES)."""
import gzip
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
MTAT_CLIP_NAME = "joram-moments_of_clarity-08-solipsism-59-88.mp3"
MTAT_CLIP_PATH = "e/" + MTAT_CLIP_NAME  # its mp3_path in the annotations (clip_id 37386)


def _fixture_dir():
    for candidate in (os.environ.get("MTAT_FIXTURES"), ROOT.parent / "shared" / "mtat"):
        if candidate and (Path(candidate) / "annotations_final.csv.gz").is_file():
            return Path(candidate)
    message = "real MTAT fixtures not found in ../shared/mtat or $MTAT_FIXTURES"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (required under CI)")
    pytest.skip(message)


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
