"""export.py: a trained run as a model folder (model.safetensors, model.json, README.md) that predict.py
reads with no pickle and tags with exactly as with the run's best_model.pt; a damaged or edited folder
refused in one line; a synthetic-data model says so; --out never clobbers what it should not."""
import csv
import hashlib
import json
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, SMALL_RUN_ARGS, SRC, write_spectrogram_set

import common
import export
import formats
import plumbing
import predict
import trainer
import uncertainty


@pytest.fixture(scope="module")
def exported(small_run, tmp_path_factory):
    """(the model folder exported from small_run, its card)."""
    out = tmp_path_factory.mktemp("models") / "small"
    return out, export.main([str(small_run[0]), "--out", str(out)])


def copy_of(folder, tmp_path):
    shutil.copytree(folder, tmp_path / folder.name)
    return tmp_path / folder.name


def tag_csv(checkpoint, clip, csv_path, capsys):
    """predict.py's CSV rows (dicts) and its stderr, tagging `clip` with `checkpoint`."""
    capsys.readouterr()
    predict.main([str(clip), "--checkpoint", str(checkpoint), "--csv", str(csv_path), "--workers", "0"])
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f)), capsys.readouterr().err.splitlines()


def test_folder_tags_as_the_run_s_checkpoint(exported, small_run, mtat_clip, tmp_path, capsys):
    folder, card = exported
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "model.json", "model.safetensors"]
    assert not list(folder.parent.glob(".*"))  # no temporary folder or lock left beside it
    from_folder, folder_err = tag_csv(folder, mtat_clip, tmp_path / "folder.csv", capsys)
    from_pt, pt_err = tag_csv(small_run[0] / "best_model.pt", mtat_clip, tmp_path / "pt.csv", capsys)
    assert [name for name in from_folder[0] if name in card["tags"]] == card["tags"]
    assert [{k: v for k, v in row.items() if k != "checkpoint_sha256"} for row in from_folder] == [
        {k: v for k, v in row.items() if k != "checkpoint_sha256"} for row in from_pt]
    # a folder's checkpoint_sha256 is its weights file's, as model.json records it; a .pt's is the file's
    weights_sha256 = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert from_folder[0]["checkpoint_sha256"] == card["weights_sha256"] == weights_sha256
    pt_sha256 = hashlib.sha256((small_run[0] / "best_model.pt").read_bytes()).hexdigest()
    assert from_pt[0]["checkpoint_sha256"] == card["source_checkpoint_sha256"] == pt_sha256
    assert folder_err[:2] == pt_err[:2]  # what it was trained on, and the warning: other data than MTAT
    assert folder_err[1].startswith("warning: this model was trained on other data than MTAT")


def test_a_folder_is_read_with_no_pickle(exported, small_run, mtat_clip, monkeypatch):
    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_pickle)
    model, checkpoint = formats.load_model(exported[0])
    assert checkpoint["tag_names"] == exported[1]["tags"] and not model.training
    results = predict.main([str(mtat_clip), "--checkpoint", str(exported[0]), "--workers", "0"])
    assert sorted(name for name, _ in results[str(mtat_clip)]["tags"]) == sorted(exported[1]["tags"])
    with pytest.raises(ValueError, match="torch.load called"):  # the .pt goes through torch.load
        formats.load_model(small_run[0] / "best_model.pt")


def test_the_card_says_what_the_model_is_and_how_it_was_made(exported, small_run, small_data_dir):
    folder, card = exported
    assert json.loads((folder / "model.json").read_text()) == card
    run_dir, results = small_run
    checkpoint = torch.load(run_dir / "best_model.pt", weights_only=True)
    assert card["format_version"] == formats.MODEL_FORMAT and card["name"] == "small"
    assert card["tags"] == checkpoint["tag_names"] and len(card["tags"]) == 4
    assert card["network"] == dict(scales=[1, 2, 3], n_tags=4)
    assert card["feature_params"] == common.feature_params()
    assert card["training_data"]["dataset"] == "other"
    assert card["training_data"]["annotations_md5"] == plumbing.file_digest(
        small_data_dir / "annotations_final.csv")
    assert {key: card["split"][key] for key in ("name", "n_train", "n_val", "n_test")} == dict(
        name="random", n_train=32, n_val=8, n_test=8)
    assert card["split"]["overlap"] == results["split_overlap"]
    assert {key: card["metrics"][key] for key in ("epoch", *formats.METRICS_COLUMNS)} == {
        key: results[key] for key in ("epoch", *formats.METRICS_COLUMNS)}
    scores = formats.read_test_scores(run_dir, results["epoch"])  # the interval report.py gives
    figure = uncertainty.bootstrap_runs(scores["labels"], [scores["scores"]])["runs"][0]
    assert [card["metrics"]["test_roc_auc_95"], card["metrics"]["test_pr_auc_95"]] == [
        [None if np.isnan(v) else v for v in figure[m][1:]] for m in ("roc", "pr")]
    # the command that trained it, read back by trainer.py, gives the run's own arguments
    words = shlex.split(card["trained_with"])
    assert words[:2] == ["python", "src/trainer.py"] and "--resume" not in words
    assert formats.json_args(trainer.parse_args(words[2:])) == checkpoint["args"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert card["code_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert card["weights_licence"] is None and "other data than MTAT" in card["warning"]
    readme = (folder / "README.md").read_text()
    assert readme.startswith("---\nlibrary_name: pytorch\nlicense: other\n")
    assert "datasets:" not in readme.split("\n---\n")[0] and 'metrics: ["roc_auc", "pr_auc"]' in readme
    assert f"python src/predict.py song.mp3 --checkpoint {folder}" in readme
    assert f"| test | {results['test_roc_auc']:.4f}" in readme
    assert "doi:10.1007/978-981-13-1592-3_60" in readme


def test_a_model_trained_on_mtat_carries_mtat_s_licence(small_run):
    model, checkpoint = formats.load_model(small_run[0] / "best_model.pt")
    checkpoint["provenance"] = json.loads(json.dumps(checkpoint["provenance"]))
    checkpoint["provenance"]["data"].update(annotations_md5=formats.MTAT_ANNOTATIONS_MD5, dataset="MTAT")
    card = export.make_card("mtat", model, checkpoint, small_run[0])
    assert card["weights_licence"].startswith("CC BY-NC-SA 3.0") and card["warning"] is None
    readme = export.model_readme(dict(card, code_commit=None), "models/mtat")
    front = readme.split("\n---\n")[0].splitlines()
    assert front[:3] == ["---", "library_name: pytorch", "license: cc-by-nc-sa-3.0"]
    assert 'datasets: ["magnatagatune"]' in front and "Warning" not in readme


def edit_card(folder, **changes):
    card = json.loads((folder / "model.json").read_text())
    for key, value in changes.items():
        card[key] = value(card[key]) if callable(value) else value
    (folder / "model.json").write_text(json.dumps(card))


@pytest.mark.parametrize("damage, expected", [
    (lambda f: edit_card(f, tags=lambda tags: tags[:-1]), "{f}: its weights do not fit the MSCNN of 3 tags"),
    (lambda f: edit_card(f, feature_params=lambda p: dict(p, n_mels=96)), "{f}: trained on features {{"),
    (lambda f: edit_card(f, format_version=2), "{f}/model.json: of format 2, this code reads 1; "),
    (lambda f: (f / "model.safetensors").unlink(), "{f}: no model.safetensors in it: not a whole model"),
    (lambda f: (f / "model.json").unlink(), "{f}: no model.json in it: not a whole model folder"),
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-100]),
     "{f}/model.safetensors: damaged or replaced (its SHA-256 is not the one model.json records); "),
    (lambda f: ((f / "model.safetensors").write_bytes(b"\0" * 16),  # with the SHA-256 of what it holds
                edit_card(f, weights_sha256=hashlib.sha256(b"\0" * 16).hexdigest())),
     "{f}: not export.py's (SafetensorError: "),
], ids=["tag-count", "n-mels", "format-version", "no-weights", "no-card", "truncated", "not-safetensors"])
def test_an_edited_or_damaged_folder_is_refused_in_one_line(exported, mtat_clip, tmp_path, damage, expected):
    folder = copy_of(exported[0], tmp_path)
    damage(folder)
    with pytest.raises(SystemExit) as stop:
        predict.main([str(mtat_clip), "--checkpoint", str(folder), "--workers", "0"])
    message = str(stop.value.code)
    assert message.startswith("error: " + expected.format(f=folder)), message
    assert "\n" not in message and message.endswith(predict.CHECKPOINT_FIX)


def test_a_damaged_folder_exits_non_zero(exported, mtat_clip, tmp_path):
    folder = copy_of(exported[0], tmp_path)
    (folder / "model.safetensors").write_bytes(b"")
    done = subprocess.run([sys.executable, str(SRC / "predict.py"), str(mtat_clip), "--checkpoint",
                           str(folder)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"error: {folder / 'model.safetensors'}: damaged or replaced (its SHA-256 is not the one model.json "
        f"records); {predict.CHECKPOINT_FIX}"]


def test_a_synthetic_data_model_warns_in_its_card_and_when_it_tags(tmp_path, mtat_clip, capsys):
    data_dir = tmp_path / "data"
    write_spectrogram_set(data_dir, 24, n_tags=4, seed=1)
    formats.mark_synthetic(data_dir, (data_dir / "annotations_final.csv").read_bytes(), n_clips=24)
    args = list(SMALL_RUN_ARGS)
    args[args.index("--train-size") + 1], args[args.index("--val-size") + 1] = "16", "4"
    trainer.main(["--data-dir", str(data_dir), "--out", str(tmp_path / "runs"), "--run", "synth", "--epochs",
                  "1"] + args)
    card = export.main([str(tmp_path / "runs" / "synth" / "best_model.pt"), "--out", str(tmp_path / "synth")])
    assert card["training_data"]["dataset"] == "synthetic" and card["weights_licence"] is None
    assert card["warning"].startswith("this model was trained on a synthetic demo set (get_data.py "
                                      "--synthetic)")
    readme = (tmp_path / "synth" / "README.md").read_text()
    assert f"**Warning: {card['warning']}.**" in readme and "datasets:" not in readme
    capsys.readouterr()
    predict.main([str(mtat_clip), "--checkpoint", str(tmp_path / "synth"), "--workers", "0"])
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("model: trained on a synthetic set (")
    assert err[1] == "warning: " + card["warning"]


def test_out_never_replaces_what_it_should_not(exported, small_run, tmp_path):
    run_dir = small_run[0]
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    for argv, message in (
            ([str(run_dir), "--out", str(taken)], f"error: --out {taken} exists; pass another --out, or "),
            ([str(run_dir), "--out", str(taken), "--overwrite"], f"error: --out {taken} exists; "),
            ([str(run_dir), "--out", str(run_dir), "--overwrite"], f"error: --out {run_dir} is or holds "),
            ([str(run_dir), "--out", str(run_dir.parent)], f"error: --out {run_dir.parent} is or holds "),
            ([str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")], f"error: {tmp_path / 'nowhere'}: no "
             "best_model.pt and results.json there"),
            ([str(run_dir / "last.pt"), "--out", str(tmp_path / "m")], f"error: {run_dir / 'last.pt'}: not a "
             "PyTorch checkpoint of this project")):
        with pytest.raises(SystemExit) as stop:
            export.main(argv)
        assert str(stop.value.code).startswith(message), stop.value.code
    assert (taken / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    # a model folder: refused without --overwrite, replaced whole with it
    model = copy_of(exported[0], tmp_path)
    (model / "extra.txt").write_text("left over")
    with pytest.raises(SystemExit, match="exists"):
        export.main([str(run_dir), "--out", str(model)])
    export.main([str(run_dir), "--out", str(model), "--overwrite"])
    assert sorted(p.name for p in model.iterdir()) == ["README.md", "model.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small", "taken"]


def test_an_interrupted_export_leaves_nothing(small_run, tmp_path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "model_readme", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export.main([str(small_run[0]), "--out", str(tmp_path / "m")])
    assert list(tmp_path.iterdir()) == []


def test_help():
    done = subprocess.run([sys.executable, str(SRC / "export.py"), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--out OUT" in done.stdout and "--overwrite" in done.stdout
