"""The reimplementation against numbers computed by the original code itself (tests/fixtures/original/,
its README says how they were made): initial weights, the random stream, the batches of the paper
run, the forward pass in both modes, one Adam step with the batch-norm statistics, and the features
of the real clip. Everything goes through the public code (common, trainer)."""
import contextlib
import hashlib
import json
from itertools import groupby

import numpy as np
import pytest
import torch

import common
import devices
import trainer
from conftest import FIXTURES

GOLDEN = json.loads((FIXTURES / "original" / "golden.json").read_text())
# the original's layer names -> this network's modules (ORIGINAL_LAYERS is the draw order)
ORIGINAL_NAMES = ("Conv1.1", "Conv1.2", "Conv1.3", "Conv2.1", "Conv2.2", "Conv3.1", "ConvLast1", "ConvLast2",
                  "FCLast", "Top")
MODULE_OF = {**dict(zip(ORIGINAL_NAMES, common.ORIGINAL_LAYERS)), "BNLast": "head.0"}


def tensor_of(model, torch_name):
    """The golden file's 'Conv1.1.weight' etc. -> that tensor of the model (float64 numpy, flattened)."""
    layer, kind = torch_name.rsplit(".", 1)
    return getattr(dict(model.named_modules())[MODULE_OF[layer]], kind).detach().double().numpy().ravel()


def original_network():
    """The default MSCNN with dropout 0 in float64, the original's float64 weights put back
    (reset_parameters draws in the module's dtype: exact where .double() of float32 is not)."""
    model = common.MSCNN(dropout=0.0).double()
    model.reset_parameters(1337)
    return model


# -----------------------------------------------------------------------------
# init and the random stream
def test_initial_weights_are_the_originals_value_for_value():
    """float64: the first and last 8 values of every tensor exactly; sums within 1e-12 relative
    (the same values summed in another order). float32, the module's dtype: those values
    rounded to float32 (the original ran float32: its draws cast)."""
    exact, model = original_network(), common.MSCNN()
    for param in GOLDEN["init"]["params"]:
        values = tensor_of(exact, param["torch_name"])
        assert values.shape == (np.prod(param["shape_torch"]),), param["torch_name"]
        if "first8" in param:  # a drawn weight
            assert values[:8].tolist() == param["first8"] and values[-8:].tolist() == param["last8"]
            assert values.sum() == pytest.approx(param["sum"], rel=1e-12, abs=1e-12)
            assert (values ** 2).sum() == pytest.approx(param["sum_sq"], rel=1e-12)
        else:  # biases 0, batch norm's gamma 1 and beta 0
            assert np.all(values == param["constant"]), param["torch_name"]
        assert np.array_equal(tensor_of(model, param["torch_name"]), values.astype(np.float32))
    constants = GOLDEN["init"]["constants"]
    bn = model.head[0]
    assert bn.eps == constants["BN_epsilon"]
    assert torch.all(bn.running_mean == 0) and torch.all(bn.running_var == 1)
    assert sum(p.numel() for p in model.parameters()) == GOLDEN["init"]["n_param_values"]


def test_the_weights_consume_the_random_stream_as_the_original():
    rng = np.random.RandomState(1337)
    draws = common.original_draws(rng)
    assert sum(d.size for d in draws) == GOLDEN["rng_after_init"]["normal_values_drawn"]
    assert rng.random_sample(3).tolist() == GOLDEN["rng_after_init"]["next3_random_sample"]
    assert [list(d.shape) for d in draws] == [p["shape_original"] for p in GOLDEN["init"]["params"]
                                               if "first8" in p]


# -----------------------------------------------------------------------------
# the split and the batches of the paper run
def checksum(rows):
    return int((rows.astype(np.int64) * np.arange(len(rows))).sum())


def test_split_of_the_paper_run():
    order = common.original_order()[1]
    train, val, test = common.paper_split()
    for name, rows, sorted_rows in (("validation", order[:2000], val), ("test", order[2000:7863], test)):
        expected = GOLDEN["batches"]["split"][name]
        assert rows[:8].tolist() == expected["first8"] and rows[-8:].tolist() == expected["last8"]
        assert int(rows.sum()) == expected["sum"] and checksum(rows) == expected["checksum"]
        assert np.array_equal(np.sort(rows), sorted_rows)
    assert np.array_equal(np.sort(order[7863:]), train)


def test_batches_of_the_paper_run():
    """Epochs 1 to 3 clip by clip (sha256 of the order, first, second and last batch), the 40
    epochs' checksums, and the batch sizes: 564 steps, [32] * 93 + [24] six times."""
    golden = GOLDEN["batches"]
    train = common.paper_split()[0]
    checksums = []
    for epoch in range(1, 41):
        order = trainer.epoch_order(train, common.N_CLIPS, 1337, epoch)
        checksums.append(checksum(order))
        if epoch > 3:
            continue
        expected = golden["epochs"][str(epoch)]
        assert hashlib.sha256(order.astype("<i8").tobytes()).hexdigest() == expected["sha256_int64_le"]
        batches = trainer.epoch_batches(order, 32)
        for batch, key in ((batches[0], "batch_1"), (batches[1], "batch_2"), (batches[-1], "last_batch")):
            assert batch.tolist() == sorted(expected[key])  # sorted: the same clips, read in file order
        assert order[:32].tolist() == expected["batch_1"] and order[-24:].tolist() == expected["last_batch"]
        sizes = [len(b) for b in batches]
        assert len(batches) == golden["steps_per_epoch"] == 564 and sum(sizes) == 18000
        assert sizes == ([32] * 93 + [24]) * 6
        assert [[size, len(list(run))] for size, run in groupby(sizes)] == golden["batch_sizes_rle"]
        assert np.array_equal(np.sort(np.concatenate(batches)), train)
    assert checksums == golden["checksum_by_epoch_1_to_40"]


def test_batches_of_other_splits_sizes_and_processes(monkeypatch):
    """Any split: the same stream (other seeds: other orders, the same clips); runs of 3,000
    cut into batches; a run's last batch too small for batch norm joins the one before it; under
    torchrun each process takes its share of every global batch."""
    train = np.arange(5, 3006, dtype=np.int64)  # 3,001 rows, sorted
    first = trainer.epoch_order(train, 4000, 7, 1)
    assert not np.array_equal(first, train) and np.array_equal(np.sort(first), train)
    assert not np.array_equal(trainer.epoch_order(train, 4000, 7, 2), first)
    assert not np.array_equal(trainer.epoch_order(train, 4000, 8, 1), first)
    assert np.array_equal(trainer.epoch_order(train, 4000, 7, 1), first)  # replayed: a resumed run's
    def sizes(batches):
        return [len(b) for b in batches]
    # 3,000 = 187 x 16 + 8, then a run of 1 clip: it joins the batch before it
    assert sizes(trainer.epoch_batches(first, 16)) == [16] * 187 + [8 + 1]
    assert sizes(trainer.epoch_batches(first[:3000], 2999)) == [3000]  # 2,999 + 1
    assert sizes(trainer.epoch_batches(first[:3000], 5000)) == [3000]  # a batch never spans two runs
    monkeypatch.setattr(trainer, "world_size", lambda: 4)
    shares, short = [], []  # global batches of 128: 3,000 = 23 x 128 + 56; 2,946 = 23 x 128 + 2
    for rank in range(4):
        monkeypatch.setattr(devices, "rank", lambda rank=rank: rank)
        shares.append(trainer.epoch_batches(first[:3000], 32))
        short.append(sizes(trainer.epoch_batches(first[:2946], 32)))
    assert [sizes(s) for s in shares] == [[32] * 23 + [14]] * 4
    for step in (0, 23):
        assert np.array_equal(np.sort(np.concatenate([s[step] for s in shares])),
                              np.sort(first[:3000][128 * step:128 * step + 128]))
    assert short == [[32] * 22 + [33]] * 2 + [[32] * 22 + [32]] * 2  # 2 clips for 4 processes: 130 shared


# -----------------------------------------------------------------------------
# the forward pass and one training step, in float64 as the original's numbers were computed
def filled_network():
    """original_network() with biases, batch-norm parameters and statistics drawn as the golden
    file's `fill_order` says, and its input x (2, 1, 128, 628)."""
    model = original_network()
    r = np.random.RandomState(1)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for line in GOLDEN["forward"]["fill_order"]:
            target, draw = line.split(" = ")
            layer, kind = target.rsplit(".", 1)
            low, high = (-0.5, 0.5) if "(-0.5, 0.5" in draw else (0.5, 1.5)
            tensor = getattr(modules[MODULE_OF[layer]], {"gamma": "weight", "beta": "bias"}.get(kind, kind))
            tensor.copy_(torch.from_numpy(r.uniform(low, high, tuple(tensor.shape))))
    x = torch.from_numpy(np.random.RandomState(0).standard_normal((2, 1, 128, 628)))
    assert x.sum().item() == GOLDEN["forward"]["x_sum"]
    return model, x


def test_forward_logits_in_both_modes():
    """Inference (running statistics) and training mode (the batch's mean and biased variance).
    Tolerance 1e-10: float64 sums of up to 10^4 products in another order (oneDNN against
    Theano's); measured 1.1e-14 and 3.2e-14."""
    model, x = filled_network()
    with torch.no_grad():
        inference = model.eval()(x).numpy()
        training = model.train()(x).numpy()
    np.testing.assert_allclose(inference, GOLDEN["forward"]["logits_inference"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(training, GOLDEN["forward"]["logits_training"], rtol=0, atol=1e-10)


def test_one_adam_step_and_the_batch_norm_statistics():
    """One step of the trainer's loss and optimiser (mean BCE with logits, torch's Adam: the
    original's formula, eps added to the bias-corrected sqrt(v)) from the state above, in float64
    (trainer.train_step casts the logits to float32, for bf16). Tolerances, against measured
    differences on a 2-core Xeon: the loss 1e-12 (9e-16); gradients 1e-9 absolute (1.9e-12: sums
    over 10^5 terms in another order); updates where |grad| >= 1e-6, 1e-10 (1.2e-14; a first
    step is lr x sign(grad), and below 1e-6 the gradient is rounding noise whose sign is
    arbitrary, e.g. the last convolution's bias, whose shift batch norm cancels); the running
    statistics after the step, with the biased variance, 1e-12 (1e-16; PyTorch's BatchNorm1d
    would divide by n - 1 = 1, not 2)."""
    golden = GOLDEN["adam_step"]
    model, x = filled_network()
    model.train()
    y = torch.from_numpy(np.random.RandomState(3).randint(0, 2, (2, 50))).double()
    assert y.sum().item() == golden["y_sum"]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = {name: tensor_of(model, name).copy() for name in (t["torch_name"] for t in golden["per_tensor"])}
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
    loss.backward()
    optimizer.step()
    assert trainer.train_step(filled_network()[0].train(), torch.optim.Adam([torch.zeros(1)]), x, y,
                              False).item() == pytest.approx(golden["loss_before_step"], rel=1e-6)
    assert loss.item() == pytest.approx(golden["loss_before_step"], rel=0, abs=1e-12)
    for expected in golden["per_tensor"]:
        name = expected["torch_name"]
        layer, kind = name.rsplit(".", 1)
        grad = getattr(dict(model.named_modules())[MODULE_OF[layer]], kind).grad.double().numpy().ravel()
        update = tensor_of(model, name) - before[name]
        assert grad.sum() == pytest.approx(expected["grad_sum"], rel=0, abs=1e-9), name
        np.testing.assert_allclose(grad[:8], expected["grad_first8"], rtol=0, atol=1e-9, err_msg=name)
        assert (np.abs(grad) < 1e-6).sum() == expected["n_abs_grad_below_1e-6"], name
        big = np.abs(grad) >= 1e-6
        expected_sum = expected["update_sum_where_abs_grad_ge_1e-6"]
        assert update[big].sum() == pytest.approx(expected_sum, rel=0, abs=1e-10), name
        np.testing.assert_allclose(update[:8][big[:8]], np.array(expected["update_first8"])[big[:8]],
                                   rtol=0, atol=1e-10, err_msg=name)
    bn = model.head[0]
    for stat, buffer in (("mean", bn.running_mean), ("var", bn.running_var)):
        values, expected = buffer.numpy(), golden[f"bn_running_{stat}_after"]
        np.testing.assert_allclose(values[:8], expected["first8"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(values[-8:], expected["last8"], rtol=0, atol=1e-12)
        assert values.sum() == pytest.approx(expected["sum"], rel=1e-12)
        assert (values ** 2).sum() == pytest.approx(expected["sum_sq"], rel=1e-12)
    assert optimizer.state[model.head[4].weight]["step"].item() == golden["t_after"]


# -----------------------------------------------------------------------------
# features
def test_features_of_the_real_clip_are_the_originals(mtat_clip):
    """The real clip through common's pipeline with the original's settings (kaiser_best,
    reflection padding) against the original's two lines, run with librosa 0.11 decoding the
    MP3 with libsndfile 1.2.2 (mpg123): measured bit-identical with the same libsndfile. The
    tolerance, 1e-3 in log units where the power is above e^-10, allows another mpg123's
    rounding of the decoded samples; zero padding (0.85 in the edge frames) or soxr (5.6 in the
    top band) fail it. The 2018 decoder (audioread, e.g. ffmpeg) is not reproduced."""
    golden = np.load(FIXTURES / "original" / "logmel_original.npy")
    assert golden.shape == tuple(GOLDEN["features"]["shape"]) and golden.dtype == np.float32
    spec = common.log_mel(mtat_clip, n_frames=None, resampler="kaiser_best")
    assert spec.shape == golden.shape and spec.dtype == np.float32
    loud = golden > -10
    assert loud.mean() > 0.95
    assert np.abs(spec - golden)[loud].max() <= 1e-3
    assert np.abs(spec - golden).max() <= 1e-2  # the near-empty top band's power, e^-24: relative rounding
    assert float(golden.sum(dtype=np.float64)) == pytest.approx(GOLDEN["features"]["sum"], rel=1e-12)
    assert common.feature_params("kaiser_best")["resampler"] == "kaiser_best"
    assert common.feature_params()["pad_mode"] == "reflect"


@pytest.mark.parametrize("n", [1, 7, 1000, 1024, 1025, 1500, 20000])
def test_reflection_padding_block_by_block_and_of_short_audio(n):
    """log_mel_frames in any blocks (one sample, empty, shorter than the reflection) gives
    librosa's centred mel spectrogram with pad_mode 'reflect' of the whole waveform (np.pad's
    repeated reflection for audio shorter than N_FFT // 2 + 1): exactly for one block, within
    float32 rounding of the mel projection (1e-5 in log units) for blocks."""
    import librosa

    audio = np.random.RandomState(n).standard_normal(n).astype(np.float32)
    with pytest.warns(UserWarning) if n < common.N_FFT else contextlib.nullcontext():  # n_fft too large
        power = librosa.feature.melspectrogram(y=audio, sr=common.SAMPLE_RATE, pad_mode="reflect")
    expected = np.log(np.maximum(power, common.LOG_FLOOR)).astype(np.float32)
    assert np.array_equal(np.concatenate(list(common.log_mel_frames([audio])), axis=1), expected)
    for cuts in ([1, 2, 3], [0, 0, 5, 700], [300, 600, 1500], [1024, 1025, 5000]):
        blocks = np.split(audio, [c for c in cuts if c < n])
        frames = np.concatenate(list(common.log_mel_frames(blocks)), axis=1)
        assert frames.shape == expected.shape
        np.testing.assert_allclose(frames, expected, rtol=0, atol=1e-5)
    assert list(common.log_mel_frames([np.zeros(0, np.float32)])) == []  # no audio, no frame


@pytest.mark.slow
def test_the_resampler_goes_from_spectrograms_to_checkpoint_to_predict(mtat_clip, tmp_path, monkeypatch):
    """gen_spectrograms.py --resampler kaiser_best records it in spectrograms.json; trainer.py
    trains on those features and records them in its checkpoint; predict.py computes a file's
    features with the checkpoint's resampler. Spectrograms of other settings are refused in one
    line that says how to make them again."""
    import gen_spectrograms
    import predict

    monkeypatch.setattr(common, "RESAMPLER", "soxr_hq")  # each script sets it; undone after the test
    data = tmp_path / "data"
    lines = ['"clip_id"\t"t0"\t"t1"\t"mp3_path"']
    for row in range(12):
        (data / "mp3" / "a").mkdir(parents=True, exist_ok=True)
        (data / "mp3" / "a" / f"{row}.mp3").write_bytes(mtat_clip.read_bytes())
        lines.append(f'"{row}"\t"{row % 2}"\t"{1 - row % 2}"\t"a/{row}.mp3"')
    (data / "annotations_final.csv").write_text("\r\n".join(lines) + "\r\n")
    gen_spectrograms.main(["--data-dir", str(data), "--workers", "2", "--dtype", "float32",
                           "--resampler", "kaiser_best"])
    meta = json.loads((data / "spectrograms.json").read_text())
    assert meta["resampler"] == "kaiser_best" and meta["pad_mode"] == "reflect"
    kaiser = common.log_mel(mtat_clip, resampler="kaiser_best")
    row = np.load(data / "spectrograms.npy")[5]  # computed with one BLAS thread: rounds otherwise
    np.testing.assert_allclose(row, kaiser, rtol=0, atol=3e-3)
    with pytest.raises(SystemExit, match="pass --overwrite"):  # another resampler would replace the rows
        gen_spectrograms.main(["--data-dir", str(data), "--workers", "1", "--dtype", "float32"])

    common.RESAMPLER = "soxr_hq"  # as in a fresh process
    trainer.main(["--data-dir", str(data), "--out", str(tmp_path), "--run", "r", "--epochs", "1", "--split",
                  "random", "--train-size", "6", "--val-size", "3", "--batch-size", "2", "--n-tags", "2",
                  "--no-merge", "--device", "cpu"])
    common.RESAMPLER = "soxr_hq"
    model, tag_names, mean, std, checkpoint = predict.load_checkpoint(tmp_path / "r", torch.device("cpu"))
    assert checkpoint["feature_params"] == common.feature_params("kaiser_best")
    assert common.RESAMPLER == "kaiser_best"
    result = predict.tag_file(mtat_clip, model, tag_names, mean, std)
    expected = common.score(model, torch.from_numpy(kaiser[None]), mean, std).numpy()
    np.testing.assert_allclose(result["window_probs"], expected, rtol=0, atol=1e-6)

    for key in ("resampler", "pad_mode"):  # spectrograms of an older version of the features
        (data / "spectrograms.json").write_text(json.dumps({k: v for k, v in meta.items() if k != key}))
        with pytest.raises(SystemExit, match=r"^error: .* was made with feature parameters .*; rerun: python "
                                             r"src/gen_spectrograms.py --data-dir .* --overwrite$"):
            trainer.main(["--data-dir", str(data), "--out", str(tmp_path), "--split", "random",
                          "--train-size", "6", "--val-size", "3", "--device", "cpu"])
