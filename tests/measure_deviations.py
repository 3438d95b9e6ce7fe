"""Measure what still differs from the original system (the README's deviations table):

    python tests/measure_deviations.py                       # features only (seconds)
    python tests/measure_deviations.py --demo-data DATA      # + training on the demo set (~10 min, 2 cores)

Features, on the real clip (tests/fixtures/): log-mel differences of the 2018 decoder (audioread
with ffmpeg, 16-bit samples; needs ffmpeg on the PATH) and of soxr_hq against the original's
log-mel (tests/fixtures/original/logmel_original.npy). Training, with DATA a demo set (bash
demo.sh makes one, data/demo by default): demo.sh's run as it is, then with each deviation
undone in turn (one dropout mask per batch; band statistics over all clips; kaiser_best
features, computed once into OUT/kaiser), and with another --seed, the spread of two equal
runs; the best validation ROC-AUC and its epoch's test ROC-AUC of each.
"""
import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
import common  # noqa: E402
import gen_spectrograms  # noqa: E402
import trainer  # noqa: E402

CLIP = ROOT / "tests" / "fixtures" / "joram-moments_of_clarity-08-solipsism-59-88.mp3"
DEMO_ARGS = ["--split", "random", "--train-size", "192", "--val-size", "32", "--epochs", "6",
             "--batch-size", "8", "--bn-momentum", "0.1", "--device", "cpu"]  # demo.sh's


def differences(spec, reference):
    """Max |difference| (log units): everywhere, in bands 0-99, where the reference's power > e^-10."""
    d = np.abs(spec - reference)
    return (f"max {d.max():.3g}, bands 0-99 {d[:100].max():.3g}, "
            f"where log-mel > -10 {d[reference > -10].max():.3g}")


def features():
    import librosa

    original = np.load(ROOT / "tests" / "fixtures" / "original" / "logmel_original.npy")
    ours = common.read_log_mel(CLIP, None, "kaiser_best")[0]
    print(f"kaiser_best (this pipeline) against the original's log-mel: {differences(ours, original)}")
    soxr = common.read_log_mel(CLIP, None, "soxr_hq")[0]
    print(f"soxr_hq against the original's log-mel: {differences(soxr, original)}")
    seconds = {resampler: [] for resampler in common.RESAMPLERS}
    for _ in range(7):  # interleaved, so that other load falls on both alike
        for resampler, times in seconds.items():
            start = time.perf_counter()
            common.log_mel(CLIP, resampler=resampler)
            times.append(time.perf_counter() - start)
    print("one log-mel of the clip, median of 7: " + ", ".join(f"{r} {1000 * np.median(t):.0f} ms"
                                                            for r, t in seconds.items()))
    if shutil.which("ffmpeg") is None:
        print("the 2018 decoder: not measured (no ffmpeg on the PATH)")
        return
    import audioread.ffdec

    with audioread.ffdec.FFmpegAudioFile(str(CLIP)) as f:  # librosa 2018's decoding: 16-bit samples
        rate, audio = f.samplerate, np.frombuffer(b"".join(f), "<i2").astype(np.float32) / 32768
    decoded = common.load_audio(CLIP, "kaiser_best")  # resampled, to compare lengths
    resampled = librosa.resample(audio, orig_sr=rate, target_sr=common.SAMPLE_RATE, res_type="kaiser_best")
    spec = np.concatenate(list(common.log_mel_frames([resampled])), axis=1)
    print(f"the 2018 decoder (audioread + ffmpeg, 16-bit): {len(resampled)} samples against {len(decoded)}; "
          f"log-mel against the original's: {differences(spec, original)}")


class SharedMaskDropout(torch.nn.Dropout):
    """The original's dropout: one mask (features,) for every clip of a batch."""

    def forward(self, x):
        if not self.training:
            return x
        return x * torch.bernoulli(torch.full_like(x[:1], 1 - self.p)) / (1 - self.p)


def train(data, out, name, *extra):
    results = trainer.main(["--data-dir", str(data), "--out", str(out), "--run", name, *DEMO_ARGS, *extra])
    print(f"{name}: best validation ROC-AUC {results['val_roc_auc']:.4f} at epoch {results['epoch']}, "
          f"test ROC-AUC {results['test_roc_auc']:.4f}", flush=True)


def training(data, out):
    train(data, out, "as_demo")
    train(data, out, "seed1338", "--seed", "1338")
    dropout = torch.nn.Dropout
    torch.nn.Dropout = SharedMaskDropout  # MSCNN builds its head with nn.Dropout
    try:
        train(data, out, "one_mask_per_batch")
    finally:
        torch.nn.Dropout = dropout
    band_stats = trainer.band_stats
    trainer.band_stats = lambda source, rows, device: band_stats(source, np.arange(len(source)), device)
    try:
        train(data, out, "statistics_over_all_clips")
    finally:
        trainer.band_stats = band_stats
    kaiser = out / "kaiser"
    kaiser.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(data / "annotations_final.csv", kaiser / "annotations_final.csv")
    if not (kaiser / "mp3").exists():
        (kaiser / "mp3").symlink_to((data / "mp3").resolve())
    gen_spectrograms.main(["--data-dir", str(kaiser), "--workers", "2", "--resampler", "kaiser_best"])
    train(kaiser, out, "kaiser_best_features")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-data", type=Path, help="a demo data set (demo.sh's DATA) to train on")
    p.add_argument("--out", type=Path, default=None, help="run folders (default: a temporary folder)")
    args = p.parse_args()
    features()
    if args.demo_data:
        out = args.out or Path(tempfile.mkdtemp(prefix="deviations-"))
        training(args.demo_data, out)


if __name__ == "__main__":
    main()
