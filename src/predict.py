"""Tag any audio file with a trained multi-scale CNN checkpoint.

    python src/predict.py song.mp3 other.wav                 # newest run in experiments/
    python src/predict.py song.mp3 --checkpoint experiments/paper/best_model.pt \
        --top 10 --json tags.json --taggram song.png

Audio of any format, sample rate and channel count librosa reads is decoded to 11,025 Hz
mono and turned into a log-mel spectrogram by the same code as training (common.log_mel).
It is cut into 628-frame windows (29.1 s, the length of an MTAT clip) every --hop-frames
frames; the last window is aligned to the end of the audio so every frame is scored, and
audio shorter than one window is padded with silence exactly as log_mel pads it. The
tag probabilities (sigmoid of the logits) are averaged over the windows.
"""
import argparse
import contextlib
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import common

BAR_ABOVE_N_FILES = 4  # a progress bar only pays off past a handful of files


# -----------------------------------------------------------------------------
# Windows
def window_starts(n_frames, hop_frames, window_frames=common.N_FRAMES):
    """First frame of each window of a spectrogram n_frames long.

    Windows start every hop_frames frames; when that leaves frames at the end uncovered,
    one more window aligned to the end is added, so every frame is scored. Audio of at
    most one window gives the single window [0] (padded by fit_frames). The count is
    1 + ceil((n_frames - window_frames) / hop_frames) for longer audio.

    Returns:
        int64 ndarray (K,) of start frames.
    """
    if n_frames <= window_frames:
        return np.zeros(1, dtype=np.int64)
    starts = np.arange(0, n_frames - window_frames + 1, hop_frames)
    if starts[-1] != n_frames - window_frames:
        starts = np.append(starts, n_frames - window_frames)
    return starts.astype(np.int64)


@contextlib.contextmanager
def quiet_decoder():
    """Silence the decoders' chatter (librosa's fallback warnings, mpg123's notes written
    straight to file descriptor 2) so a bad file costs the user one line, not ten."""
    sys.stderr.flush()
    saved_fd = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved_fd, 2)
        os.close(saved_fd)


def read_log_mel(path):
    """Decode an audio file into its full log-mel spectrogram, as training computed it.

    Returns:
        spec: float32 ndarray (N_MELS, 1 + n_samples // HOP_LENGTH), every frame.
        duration_s: float, length of the decoded audio in seconds.
    Raises ValueError naming the file when it is missing, empty or not decodable audio.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (0 bytes); nothing to tag")
    try:
        with quiet_decoder():
            audio = common.load_audio(path)
    except Exception as error:  # each decoder raises its own types, often with no message
        message = str(error).splitlines()[0][:200] if str(error) else ""
        detail = type(error).__name__ + (f": {message}" if message else "")
        raise ValueError(f"{path}: cannot decode audio ({detail}); is it an audio file "
                         "librosa can read (mp3, wav, flac, ogg, ...)?") from None
    # the same two steps as common.log_mel, minus its crop: windows are cut below
    return common.log_mel_of_audio(audio), len(audio) / common.SAMPLE_RATE


@torch.no_grad()
def score_windows(model, spec, starts, norm_mean, norm_std, batch_size=64):
    """Tag probabilities of each window of a log-mel spectrogram.

    Windows are cut batch by batch (so an hour of audio needs no more memory than one
    batch), with common.fit_frames, which pads a window that runs past the end.

    Args:
        model: MSCNN in eval mode.  spec: ndarray (N_MELS, n) of log-mel.
        starts: (K,) window start frames.  norm_mean, norm_std: tensors (N_MELS,) on the
        model's device.
    Returns:
        float32 ndarray (K, n_tags), sigmoid of the logits.
    """
    probs = []
    for i in range(0, len(starts), batch_size):
        windows = np.stack([common.fit_frames(spec[:, s:]) for s in starts[i:i + batch_size]])
        x = common.normalise(torch.from_numpy(windows).to(norm_mean.device), norm_mean, norm_std)
        probs.append(torch.sigmoid(model(x)).cpu())
    return torch.cat(probs).numpy()


# -----------------------------------------------------------------------------
# Checkpoint
def newest_checkpoint(experiments_dir):
    """best_model.pt of the most recently modified run folder under experiments_dir."""
    runs = [p.parent for p in Path(experiments_dir).glob("*/best_model.pt")]
    if not runs:
        raise SystemExit(f"error: no trained model in {experiments_dir}/ (no <run>/best_model.pt); "
                         "train one with src/trainer.py first, or pass --checkpoint PATH")
    return max(runs, key=lambda run: run.stat().st_mtime) / "best_model.pt"


def load_checkpoint(path, device):
    """-> model (eval, on device), tag_names, norm_mean, norm_std (tensors on device)."""
    if not Path(path).is_file():
        raise SystemExit(f"error: checkpoint {path} not found; pass the best_model.pt of a run "
                         "trained with src/trainer.py")
    fix = "pass the best_model.pt of a run trained with src/trainer.py"
    try:
        model, checkpoint = common.load_model(path, device)
    except ValueError as error:  # its message names the file
        raise SystemExit(f"error: {str(error).splitlines()[0]}; {fix}") from None
    except RuntimeError:  # load_state_dict: weights of another architecture
        raise SystemExit(f"error: {path}: its weights do not fit this model; {fix}") from None
    norm_mean = checkpoint["norm_mean"].float().to(device)
    norm_std = checkpoint["norm_std"].float().to(device)
    return model, list(checkpoint["tag_names"]), norm_mean, norm_std


# -----------------------------------------------------------------------------
# Output
def format_tags(path, result, top):
    """Readable block: the file, its length, then the top tags with aligned probabilities."""
    k = result["windows"]
    lines = [f"{path}  ({result['duration_s']:.1f} s, {k} window{'s' if k != 1 else ''})"]
    ranked = result["tags"][:top]
    width = max(len(name) for name, _ in ranked)
    lines += [f"  {name:<{width}}  {prob:.3f}" for name, prob in ranked]
    return "\n".join(lines)


def taggram_paths(taggram, audio_paths):
    """One PNG path per audio file: taggram itself for one file; for several,
    '<stem>_<audio stem>.png' beside it (a counter is added if audio stems repeat)."""
    taggram = Path(taggram)
    if len(audio_paths) == 1:
        return [taggram]
    paths, taken = [], set()
    for audio_path in audio_paths:
        name, n = f"{taggram.stem}_{Path(audio_path).stem}", 2
        candidate = taggram.with_name(name + ".png")
        while candidate in taken:
            candidate, n = taggram.with_name(f"{name}_{n}.png"), n + 1
        taken.add(candidate)
        paths.append(candidate)
    return paths


def import_figure():
    """matplotlib is only needed for --taggram, so it is optional and imported on demand."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise SystemExit("error: --taggram needs matplotlib, which is not installed; "
                         "pip install matplotlib (or leave out --taggram)") from None
    return Figure


def save_taggram(png_path, window_probs, starts, duration_s, tag_names, title):
    """Picture of tag probability over time: tags on y (checkpoint order, most frequent
    first), seconds on x; each window is drawn around its centre.

    Args:
        window_probs: ndarray (K, n_tags).  starts: (K,) window start frames.
    """
    Figure = import_figure()
    frame_s = common.HOP_LENGTH / common.SAMPLE_RATE
    centres = (starts + common.N_FRAMES / 2) * frame_s
    # cell edges halfway between window centres; the outer ones at the audio's ends
    end_s = max(duration_s, centres[-1])
    edges = np.concatenate([[0.0], (centres[:-1] + centres[1:]) / 2, [end_s]])
    fig = Figure(figsize=(8, 1.5 + 0.16 * len(tag_names)))
    ax = fig.add_subplot()
    mesh = ax.pcolormesh(edges, np.arange(len(tag_names) + 1) - 0.5, window_probs.T,
                         vmin=0, vmax=1, cmap="viridis")
    ax.set_yticks(np.arange(len(tag_names)), tag_names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("time (s)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(mesh, ax=ax, label="probability", fraction=0.04)
    fig.tight_layout()
    tmp_path = png_path.with_name(png_path.name + ".tmp")
    fig.savefig(tmp_path, format="png", dpi=100)
    os.replace(tmp_path, png_path)


def write_json(path, results):
    """Write results as JSON, one file per line (readable and diffable), atomically."""
    lines = [f"{json.dumps(audio)}: {json.dumps(entry)}" for audio, entry in results.items()]
    tmp_path = Path(str(path) + ".tmp")
    tmp_path.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    os.replace(tmp_path, path)


# -----------------------------------------------------------------------------
def tag_file(path, model, tag_names, norm_mean, norm_std, hop_frames=common.N_FRAMES // 2,
             batch_size=64):
    """Tag one audio file.

    Returns dict: tags (list of [name, probability], all tags, most probable first;
    probability = mean over windows), windows (K), duration_s (float), window_probs
    (ndarray (K, n_tags)), starts (ndarray (K,), window start frames).
    Raises ValueError naming the file when it cannot be read.
    """
    spec, duration_s = read_log_mel(path)
    starts = window_starts(spec.shape[1], hop_frames)
    window_probs = score_windows(model, spec, starts, norm_mean, norm_std, batch_size)
    mean_probs = window_probs.mean(axis=0)
    order = np.argsort(-mean_probs, kind="stable")
    return dict(tags=[[tag_names[i], float(mean_probs[i])] for i in order], windows=len(starts),
                duration_s=duration_s, window_probs=window_probs, starts=starts)


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv=None):
    """Tag the files; returns {path: tag_file's result or {"error": message}}, and exits
    non-zero (after tagging the rest) when any file could not be tagged."""
    parser = argparse.ArgumentParser(
        description="Tag audio files with a trained multi-scale CNN (Dabral et al. 2018).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("audio", nargs="+", help="audio files (anything librosa reads: "
                        "mp3, wav, flac, ogg...; any sample rate, mono or stereo, any length)")
    parser.add_argument("--checkpoint", default=None, help="best_model.pt written by trainer.py "
                        "(default: that of the most recently modified run in --experiments)")
    parser.add_argument("--experiments", default="experiments",
                        help="folder of runs searched when --checkpoint is not given")
    parser.add_argument("--top", type=positive_int, default=5, help="tags printed per file")
    parser.add_argument("--hop-frames", type=positive_int, default=common.N_FRAMES // 2,
                        help="frames between window starts (46.4 ms each); the last window "
                        "is aligned to the end of the audio")
    parser.add_argument("--json", default=None, help="also write all results to this JSON file: "
                        '{path: {"tags": [[name, prob], ...all tags, most probable first], '
                        '"windows": K, "duration_s": s}} or {path: {"error": message}}')
    parser.add_argument("--taggram", default=None, help="save a PNG of tag probability over time "
                        "(needs matplotlib); with several files, one PNG each, named "
                        "<stem>_<audio stem>.png beside it")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--batch-size", type=positive_int, default=64,
                        help="windows scored per forward pass")
    args = parser.parse_args(argv)

    if args.taggram:
        import_figure()  # fail before the slow part, not after it
    device = common.resolve_device(args.device)
    checkpoint_path = args.checkpoint
    if checkpoint_path is None:
        checkpoint_path = newest_checkpoint(args.experiments)
        print(f"using {checkpoint_path} (newest run in {args.experiments}/; "
              "--checkpoint picks another)", file=sys.stderr)
    model, tag_names, norm_mean, norm_std = load_checkpoint(checkpoint_path, device)
    png_paths = taggram_paths(args.taggram, args.audio) if args.taggram else None

    results, failed = {}, []
    bar = tqdm(args.audio, unit="file", disable=len(args.audio) <= BAR_ABOVE_N_FILES)
    for i, path in enumerate(bar):
        try:
            result = tag_file(path, model, tag_names, norm_mean, norm_std,
                              args.hop_frames, args.batch_size)
        except ValueError as error:
            failed.append(path)
            results[path] = {"error": str(error)}
            tqdm.write(f"error: {error}", file=sys.stderr)
            continue
        tqdm.write(format_tags(path, result, args.top))
        if png_paths:
            save_taggram(png_paths[i], result["window_probs"], result["starts"],
                         result["duration_s"], tag_names, Path(path).name)
            tqdm.write(f"  taggram: {png_paths[i]}")
        results[path] = result
    bar.close()

    if args.json:
        keep = ("tags", "windows", "duration_s", "error")
        write_json(args.json, {path: {k: v for k, v in result.items() if k in keep}
                               for path, result in results.items()})
        print(f"wrote {args.json}", file=sys.stderr)
    if failed:
        raise SystemExit(f"error: {len(failed)} of {len(args.audio)} files could not be tagged "
                         f"({', '.join(failed[:3])}{', ...' if len(failed) > 3 else ''})")
    return results


if __name__ == "__main__":
    main()
