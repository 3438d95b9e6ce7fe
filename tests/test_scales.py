"""--scales: the ablation of the paper's claim. Every subset of the three branches, the default
network unchanged, and --scales 1 through the real trainer (train, save, resume), predict.py
and benchmark.py."""
import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import benchmark
import common
import formats
import predict
import trainer
from conftest import SMALL_RUN_ARGS, SRC

# branch 1: 1100 + 75,100 + 63,070; branch 2: 1,600 + 63,070; branch 3: 700; the merge's first
# convolution 70 x (70 x branches) x 3 x 3 + 70; the rest (second merge conv, batch norm,
# dense 5040 -> 500 -> 50) 44,170 + 10,080 + 2,520,500 + 25,050 = 2,599,800 whatever the branches.
BRANCH_PARAMETERS = {1: 139_270, 2: 64_670, 3: 700}
PARAMETERS = {(1,): 2_783_240, (2,): 2_708_640, (3,): 2_644_670, (1, 2): 2_892_010, (1, 3): 2_828_040,
              (2, 3): 2_753_440, (1, 2, 3): 2_936_810}
SUBSETS = [s for k in (1, 2, 3) for s in itertools.combinations((1, 2, 3), k)]


@pytest.mark.parametrize("scales", SUBSETS)
def test_parameter_count_of_every_subset(scales):
    model = common.MSCNN(50, scales=scales)
    count = sum(p.numel() for p in model.parameters())
    assert count == PARAMETERS[scales]
    assert count == sum(BRANCH_PARAMETERS[s] for s in scales) + 44_100 * len(scales) + 70 + 2_599_800
    assert model.merge[0][0].in_channels == 70 * len(scales)
    assert {name.split(".")[0] for name, _ in model.named_parameters()} == (
        {f"branch{s}" for s in scales} | {"merge", "head"})  # only the branches asked for are built
    x = torch.randn(2, 1, common.N_MELS, common.N_FRAMES)
    with torch.no_grad():
        features = model.eval().features(x)
        assert [tuple(f.shape) for f in features] == [(2, 70, 16, 19)] * len(scales)
        assert model(x).shape == (2, 50) and model.embed(x).shape == (2, 500)


def test_a_branch_sees_its_own_scale_whichever_others_are_built():
    """Branch 3 alone still sees the input average-pooled twice (1/4 x 1/16), as in the full
    network: with the same weights it gives the full network's branch-3 output."""
    full, alone = common.MSCNN(scales=(1, 2, 3)).eval(), common.MSCNN(scales=(3,)).eval()
    alone.branch3.load_state_dict(full.branch3.state_dict())
    x = torch.randn(1, 1, common.N_MELS, common.N_FRAMES)
    with torch.no_grad():
        assert torch.equal(alone.features(x)[0], full.features(x)[2])


class PaperMSCNN(nn.Module):
    """The network as it was written before --scales existed, kept to check that the default
    MSCNN is still it: the same modules and parameter names, in the same order."""

    def __init__(self, n_tags=50, dropout=0.4, bn_momentum=0.01):
        super().__init__()
        self.branch1 = nn.Sequential(
            common.conv(1, 50, (3, 7)), nn.MaxPool2d((2, 4)), common.conv(50, 100, (3, 5)),
            nn.MaxPool2d((2, 4)),
            common.conv(100, 70, (3, 3)), nn.MaxPool2d((2, 2)))
        self.subsample = nn.AvgPool2d((2, 4))
        self.branch2 = nn.Sequential(common.conv(1, 100, (3, 5)), nn.MaxPool2d((2, 4)),
                                     common.conv(100, 70, (3, 3)), nn.MaxPool2d((2, 2)))
        self.branch3 = nn.Sequential(common.conv(1, 70, (3, 3)), nn.MaxPool2d((2, 2)))
        self.merge = nn.Sequential(common.conv(210, 70, (3, 3)), common.conv(70, 70, (3, 3)),
                                   nn.MaxPool2d((2, 2)), nn.Flatten())
        self.head = nn.Sequential(nn.BatchNorm1d(5040, eps=1e-3, momentum=bn_momentum), nn.Dropout(dropout),
                                  nn.Linear(5040, 500), nn.ReLU(inplace=True), nn.Linear(500, n_tags))

    def forward(self, x):
        half = self.subsample(x)
        branches = [self.branch1(x), self.branch2(half), self.branch3(self.subsample(half))]
        return self.head(self.merge(torch.cat(branches, 1)))


def test_default_network_is_the_paper_network():
    before, now = PaperMSCNN(50, 0.4, 0.01), common.MSCNN(50, 0.4, 0.01)
    assert now.scales == (1, 2, 3)
    def shapes(model):  # names and order
        return [(k, v.shape) for k, v in model.state_dict().items()]
    assert shapes(now) == shapes(before)
    before.load_state_dict(now.state_dict())
    x = torch.randn(2, 1, common.N_MELS, common.N_FRAMES)
    with torch.no_grad():
        assert torch.equal(now.eval()(x), before.eval()(x))


@pytest.mark.parametrize("seed", [0, 1337])
def test_every_subset_starts_from_the_full_networks_weights(seed):
    """The initial weights come from numpy's RandomState(seed) (not torch's generator), drawn for
    the full network whatever the branches: every layer of a subset network is the full
    network's, the merge convolution its branches' input channels rescaled to its own Glorot std."""
    full = common.MSCNN(seed=seed).state_dict()
    torch.manual_seed(seed + 1)  # plays no part
    assert all(torch.equal(v, full[k]) for k, v in common.MSCNN(seed=seed).state_dict().items())
    assert not torch.equal(common.MSCNN(seed=seed + 1).state_dict()["head.4.weight"], full["head.4.weight"])
    for scales in SUBSETS:
        for name, value in common.MSCNN(seed=seed, scales=scales).state_dict().items():
            if name == "merge.0.0.weight":
                blocks = torch.cat([full[name][:, 70 * (s - 1):70 * s] for s in scales], dim=1)
                glorot = (2 / (9 * 70 * (len(scales) + 1))) ** 0.5  # fans 70 x branches x 9, 70 x 9
                torch.testing.assert_close(value, blocks * glorot / (2 / (9 * 280)) ** 0.5, rtol=1e-6, atol=0)
            else:
                assert torch.equal(value, full[name]), (scales, name)


def test_scales_that_are_not_a_subset_are_refused():
    for scales in ((), (1, 1), (4,), (0, 1)):
        with pytest.raises(ValueError, match="non-empty subset of"):
            common.MSCNN(scales=scales)
    assert common.MSCNN(scales=(3, 1)).scales == (1, 3)
    assert trainer.parse_args(["--scales", "3", "1"]).scales == [1, 3]
    assert trainer.parse_args([]).scales == [1, 2, 3] and "scales" in trainer.RESUME_KEYS
    for bad in (["--scales", "1", "1"], ["--scales", "4"], ["--scales"]):
        with pytest.raises(SystemExit):
            trainer.parse_args(bad)


def test_a_checkpoints_weights_say_its_scales(tmp_path):
    """load_model builds the network the weights are of: their branches are its scales; weights
    for another number of tags than the names are refused in one line."""
    norm = torch.zeros(128), torch.ones(128)
    for scales in ((1,), (1, 3), (1, 2, 3)):
        formats.save_best_model(tmp_path / "m.pt", common.MSCNN(4, scales=scales).state_dict(), list("abcd"),
                                norm, {}, 1, {}, None)
        assert formats.load_model(tmp_path / "m.pt")[0].scales == scales
    formats.save_best_model(tmp_path / "wrong.pt", common.MSCNN(5, scales=(2,)).state_dict(), list("abcd"),
                            norm, {}, 1, {}, None)
    with pytest.raises(ValueError, match=r"do not fit the MSCNN of 4 tags and scales 2 \(") as error:
        formats.load_model(tmp_path / "wrong.pt")
    assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def one_scale_run(small_data_dir, tmp_path_factory):
    """trainer.py --scales 1, 2 epochs on the small learnable set: (out, results)."""
    out = tmp_path_factory.mktemp("scales1")
    results = trainer.main(["--data-dir", str(small_data_dir), "--out", str(out), "--run", "one",
                            "--epochs", "2",
                            "--scales", "1"] + SMALL_RUN_ARGS)
    return out, results


@pytest.mark.slow
def test_one_scale_trains_saves_and_is_recorded(one_scale_run, small_data_dir, capsys):
    out, results = one_scale_run
    assert results["scales"] == [1] and results["test_roc_auc"] >= 0.9  # one branch learns the loud bands too
    assert json.loads((out / "one" / "results.json").read_text())["scales"] == [1]
    model, checkpoint = formats.load_model(out / "one" / "best_model.pt")
    assert checkpoint["args"]["scales"] == [1] and model.scales == (1,)
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[(1,)] - 46 * 501  # 4 tags, not 50
    assert torch.load(out / "one" / "last.pt", weights_only=True)["args"]["scales"] == [1]


@pytest.mark.slow
def test_one_scale_resumes_like_an_uninterrupted_run(one_scale_run, small_data_dir):
    out, _ = one_scale_run
    run = ["--data-dir", str(small_data_dir), "--out", str(out), "--run", "resumed"] + SMALL_RUN_ARGS
    trainer.main(run + ["--scales", "1", "--epochs", "1"])
    with pytest.raises(SystemExit, match="cannot resume .* with different --scales"):
        trainer.main(run + ["--epochs", "2", "--resume"])  # the default, three scales
    trainer.main(run + ["--scales", "1", "--epochs", "2", "--resume"])
    resumed = torch.load(out / "resumed" / "last.pt", weights_only=True)["model"]
    full = torch.load(out / "one" / "last.pt", weights_only=True)["model"]
    assert list(resumed) == list(full) and all(torch.allclose(resumed[k].float(), full[k].float(), atol=1e-6)
                                               for k in full)


@pytest.mark.slow
def test_one_scale_tags_through_predict(one_scale_run, mtat_clip, tmp_path):
    """predict.py builds the network the checkpoint names (one branch) and tags a real clip
    with exactly what that network computes on the clip's log-mel."""
    out, _ = one_scale_run
    json_path = tmp_path / "tags.json"
    result = subprocess.run([sys.executable, str(SRC / "predict.py"), str(mtat_clip), "--checkpoint",
                             str(out / "one"), "--json", str(json_path), "--workers", "0"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    tags = dict(json.loads(json_path.read_text())[str(mtat_clip)]["tags"])
    model, tag_names, mean, std, _ = predict.load_checkpoint(out / "one", torch.device("cpu"))
    x = common.normalise(torch.from_numpy(common.log_mel(mtat_clip))[None], mean, std)
    with torch.no_grad():
        expected = torch.sigmoid(model(x))[0].numpy()
    np.testing.assert_allclose([tags[name] for name in tag_names], expected, atol=1e-5)


def test_benchmark_counts_and_times_one_scale(capsys):
    # 2 x output elements x fan-in per convolution: branch 1 and the merge, which takes 70 channels
    convs = [(50, 128, 628, 1 * 3 * 7), (100, 64, 157, 50 * 3 * 5), (70, 32, 39, 100 * 9),
             (70, 16, 19, 70 * 9), (70, 16, 19, 70 * 9)]
    expected = sum(2 * c * h * w * fan_in for c, h, w, fan_in in convs) + 2 * (5040 * 500 + 500 * 50)
    assert benchmark.forward_flops(scales=(1,)) == expected < benchmark.forward_flops()
    results = benchmark.main(["--what", "train", "--device", "cpu", "--steps", "1", "--batch-size", "2",
                              "--eval-clips", "2", "--scales", "1"])["train"]
    assert results["scales"] == [1] and results["forward_gflop_per_clip"] == expected / 1e9
    assert "MSCNN, scales 1, forward:" in capsys.readouterr().out


@pytest.mark.slow
def test_a_last_pt_of_another_format_is_refused(small_run, small_data_dir, tmp_path):
    """--resume of a last.pt of another format_version: one line, nothing trained."""
    run_dir, _ = small_run
    (tmp_path / "old").mkdir()
    state = torch.load(run_dir / "last.pt", weights_only=True)
    torch.save(dict(state, format_version=0), tmp_path / "old" / "last.pt")
    run = (["--data-dir", str(small_data_dir), "--out", str(tmp_path), "--run", "old", "--resume"]
           + SMALL_RUN_ARGS)
    with pytest.raises(SystemExit, match=r"last.pt: of format 0, this code reads 1; it cannot be resumed"):
        trainer.main(run + ["--epochs", "3"])
