"""Tag audio files and music folders with a trained multi-scale CNN checkpoint.

    python src/predict.py song.mp3 other.wav                 # newest run in experiments/
    python src/predict.py ~/Music --csv tags.csv --embeddings emb.npz   # a whole library
    python src/predict.py ~/Music --csv tags.csv --resume    # continue an interrupted run
    python src/predict.py song.mp3 --checkpoint experiments/paper/best_model.pt \
        --top 10 --json tags.json --taggram song.png

Folders are searched recursively for AUDIO_EXTENSIONS. Each file is read in blocks of
BLOCK_S seconds, resampled to 11,025 Hz mono with soxr's streaming resampler and turned into
log-mel frames as the blocks arrive, so memory does not grow with a file's length; the
frames equal common.log_mel_of_audio(common.load_audio(path)), the training features. They
are cut into 628-frame windows (29.1 s, one MTAT clip) every --hop-frames frames; the last
window is aligned to the end of the audio so every frame is scored, and audio shorter than
one window is padded with silence exactly as log_mel pads it. A file's tag probabilities
(sigmoid of the logits) are the mean over its windows; its embedding is the mean of its
windows' 500-d penultimate activations (MSCNN.embed).

On a CPU, --workers processes (one per core by default) each tag whole files, decoding and
scoring with one thread, so every core is busy and none is fought over; a file's windows
are scored in batches of its own, so the output does not depend on the number of workers.
On a GPU the workers only decode and this process scores windows of consecutive files
together in batches. Results come out in input order either way.
See docs/predict.md.
"""
import argparse
import contextlib
import csv
import errno
import json
import os
import sys
import time
import warnings
import zipfile
from collections import deque
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import common
import formats
import plumbing

BAR_ABOVE_N_FILES = 4  # a progress bar only pays off past a handful of files
MAX_WORKERS = 16  # default --workers: the cores, at most this many (docs/predict.md, "Performance")
TAGGED_AHEAD = 64  # files per worker tagged ahead of the one printed next (see tag_all)
SAVE_EVERY_S = 60  # outputs are rewritten (atomically) this often during a run
EMBEDDING_SIZE = 500  # units of MSCNN's penultimate (dense) layer
# windows per forward pass: on a CPU a small batch scores as fast as a large one and keeps
# the peak memory low (docs/predict.md, "Memory"); a GPU wants large batches
CPU_BATCH, CUDA_BATCH = 8, 64


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


# -----------------------------------------------------------------------------
# Decoding in blocks: memory does not grow with the file's length
AUDIO_EXTENSIONS = (".aif", ".aifc", ".aiff", ".au", ".caf", ".flac", ".mp3", ".oga", ".ogg",
                    ".opus", ".w64", ".wav")  # what soundfile (libsndfile >= 1.1) decodes
BLOCK_S = 30  # seconds of source audio read, resampled and turned into log-mel at a time


class LogMelStream:
    """Log-mel frames of audio fed in blocks, equal to common.log_mel_of_audio of the
    whole waveform (librosa's centred frames: N_FFT // 2 zeros before and after the audio).

    feed(y) takes the next samples (float32 (n,), at SAMPLE_RATE) and returns the frames
    they complete, (N_MELS, k); finish() returns the last ones. Only the N_FFT - HOP_LENGTH
    samples the next frame still needs are kept between calls.
    """

    def __init__(self):
        self.pending = np.zeros(common.N_FFT // 2, np.float32)  # the centre padding
        self.n_samples = 0

    def frames(self, y, final=False):
        import librosa

        buffer = np.concatenate([self.pending, y])
        if final:
            buffer = np.concatenate([buffer, np.zeros(common.N_FFT // 2, np.float32)])
        n_frames = max(0, 1 + (len(buffer) - common.N_FFT) // common.HOP_LENGTH)
        self.pending = buffer[n_frames * common.HOP_LENGTH:]
        if n_frames == 0:
            return np.zeros((common.N_MELS, 0), np.float32)
        used = buffer[:(n_frames - 1) * common.HOP_LENGTH + common.N_FFT]
        mel_power = librosa.feature.melspectrogram(
            y=used, sr=common.SAMPLE_RATE, n_fft=common.N_FFT, hop_length=common.HOP_LENGTH,
            n_mels=common.N_MELS, center=False)
        return np.log(np.maximum(mel_power, common.LOG_FLOOR)).astype(np.float32)

    def feed(self, y):
        self.n_samples += len(y)
        return self.frames(y)

    def finish(self):
        return self.frames(np.zeros(0, np.float32), final=True)


def check_finite(path, samples, offset_s, sample_rate):
    """ValueError naming the file and the time of the first NaN/inf sample, if any."""
    bad = ~np.isfinite(samples)
    if bad.any():
        first_s = offset_s + np.argmax(bad.reshape(len(samples), -1).any(axis=1)) / sample_rate
        raise ValueError(f"{path}: decodes, but its samples are not all finite (NaN or inf, "
                         f"first at {first_s:.1f} s); nothing to tag; repair or re-export it")


def stream_log_mel(path, block_s=BLOCK_S):
    """Decode, resample and turn into log-mel one block at a time: equal to
    common.log_mel_of_audio(common.load_audio(path)), the training features (up to float
    rounding of the mel projection), with memory of one block, not of the whole file.

    The steps are librosa.load's: soundfile reads float32 blocks, channels are averaged,
    soxr resamples to SAMPLE_RATE with librosa's default quality ('soxr_hq') through its
    streaming resampler (whose output is identical to the one-shot call), and the length is
    fixed to ceil(n * SAMPLE_RATE / sample_rate) samples as librosa.resample does.

    Returns:
        spec: float32 ndarray (N_MELS, 1 + n_samples // HOP_LENGTH).
        duration_s: float, length of the resampled audio in seconds.
    Raises soundfile.LibsndfileError when soundfile cannot open the file, ValueError naming
    the file when its samples are not finite or it has none.
    """
    import soundfile
    import soxr

    with soundfile.SoundFile(path) as f:
        rate = f.samplerate
        resampler = None if rate == common.SAMPLE_RATE else soxr.ResampleStream(
            rate, common.SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        mel, specs, n_in = LogMelStream(), [], 0
        # not f.blocks: its last block keeps unwritten frames when an MP3 decodes short
        while len(block := f.read(block_s * rate, dtype="float32", always_2d=True)):
            check_finite(path, block, n_in / rate, rate)
            mono = np.mean(block.T, axis=0)  # librosa.to_mono, same order of operations
            n_in += len(mono)
            specs.append(mel.feed(mono if resampler is None else resampler.resample_chunk(mono)))
    if n_in == 0:
        raise ValueError(f"{path}: no audio samples decoded; nothing to tag")
    tail = np.zeros(0, np.float32) if resampler is None else resampler.resample_chunk(
        np.zeros(0, np.float32), last=True)
    # librosa.resample fixes the length to n_target; soxr's output is never longer (checked
    # for rates of 8 to 96 kHz), often a few samples shorter, which librosa pads with zeros
    n_target = int(np.ceil(n_in * common.SAMPLE_RATE / rate))
    missing = n_target - mel.n_samples - len(tail)
    specs.append(mel.feed(np.concatenate([tail, np.zeros(max(missing, 0), np.float32)])))
    specs.append(mel.finish())
    return np.concatenate(specs, axis=1), n_target / common.SAMPLE_RATE


def read_log_mel(path, block_s=BLOCK_S):
    """Decode an audio file into its full log-mel spectrogram, as training computed it,
    in blocks (stream_log_mel); a format soundfile cannot open is decoded whole by
    common.load_audio (librosa's audioread fallback) and then framed the same way.

    Returns:
        spec: float32 ndarray (N_MELS, 1 + n_samples // HOP_LENGTH), every frame.
        duration_s: float, length of the decoded audio in seconds.
    Raises ValueError naming the file when it is missing, empty, not decodable audio, or
    decodes to samples that are not finite.
    """
    import soundfile

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (0 bytes); nothing to tag")
    try:
        with quiet_decoder():
            try:
                return stream_log_mel(path, block_s)
            except soundfile.LibsndfileError:
                audio = common.load_audio(path)
    except ValueError as error:
        if str(error).startswith(str(path)):
            raise
        error_text = error
    except Exception as error:  # each decoder raises its own types, often with no message
        error_text = error
    else:
        check_finite(path, audio, 0.0, common.SAMPLE_RATE)
        mel = LogMelStream()
        return (np.concatenate([mel.feed(audio), mel.finish()], axis=1),
                len(audio) / common.SAMPLE_RATE)
    message = str(error_text).splitlines()[0][:200] if str(error_text) else ""
    detail = type(error_text).__name__ + (f": {message}" if message else "")
    raise ValueError(f"{path}: cannot decode audio ({detail}); is it an audio file "
                     f"soundfile or librosa can read ({', '.join(AUDIO_EXTENSIONS)})?")


def decode_one(path):
    """A decoder's task: path -> (spec, duration_s) as read_log_mel gives, or its ValueError
    (returned, so that only a dead worker surfaces as an exception)."""
    try:
        return read_log_mel(path)
    except ValueError as error:
        return error


scorer = None  # tag_one's model and settings: (model, tag_names, norm_mean, norm_std, hop, batch)


def use_scorer(*settings):
    """Set what tag_one scores with: in this process (--workers 0), or in a worker as
    start_scorer does."""
    global scorer
    scorer = settings


def start_scorer(*settings):
    """A CPU worker's initializer: use_scorer (fork hands it the model as it is in this
    process, nothing pickled), then one torch thread, as in every worker (BLAS and OpenMP:
    one already, plumbing.start_worker): a batch's sums round differently with another
    thread count, so every worker gives the same numbers."""
    use_scorer(*settings)
    torch.set_num_threads(1)


def tag_one(path):
    """A CPU worker's task: path -> tag_file's result dict with the scorer's settings, or
    its ValueError (returned, so that only a dead worker surfaces as an exception)."""
    try:
        return tag_file(path, *scorer)
    except ValueError as error:
        return error


def run_all(task, paths, workers, initializer=None, initargs=(), ahead=2):
    """(path, task(path)) in input order: in this process (workers 0) or in
    plumbing.pool_results's worker processes, at most `ahead` files per worker in flight or
    done and waiting for their turn. A file whose worker process dies twice, the second time
    alone, gets a ValueError saying so, as does any other exception of the task."""
    if workers == 0 or not paths:
        if initializer is not None:
            initializer(*initargs)
        yield from ((path, task(path)) for path in paths)
        return
    # librosa's imports and numba functions loaded once here, not in every forked worker
    LogMelStream().feed(np.zeros(common.N_FFT, np.float32))
    results = plumbing.pool_results(task, paths, min(workers, len(paths)), initializer, initargs,
                                    ordered=True, ahead=ahead)
    with contextlib.closing(results):
        for index, result in results:
            path = paths[index]
            if isinstance(result, plumbing.WorkerDied):
                result = ValueError(f"{path}: {result}; nothing tagged")
            elif isinstance(result, Exception) and not isinstance(result, ValueError):
                result = ValueError(f"{path}: tagging failed ({type(result).__name__}: {result})")
            yield path, result


def tag_all(paths, workers, model, tag_names, norm_mean, norm_std, hop_frames, batch_size):
    """(path, result dict or ValueError) for every path, in input order.

    On a CPU every worker decodes and scores whole files with one thread, each file's
    windows in batches of their own: the same numbers whatever the number of workers. With
    workers 0 this process does the same with its own threads (its numbers agree within
    float rounding; its thread counts are left alone, as later work in the process, a
    training run, would round differently after a change). On a GPU the workers decode and
    this process scores windows of consecutive files together (tag_decoded), as a GPU wants
    large batches."""
    if norm_mean.device.type == "cpu":
        settings = (model, tag_names, norm_mean, norm_std, hop_frames, batch_size)
        if workers == 0:
            yield from run_all(tag_one, paths, 0, use_scorer, settings)
            return
        # a tagged file waiting for its turn holds only its windows' scores: many may wait, so
        # that the other workers go on while one tags a long file
        yield from run_all(tag_one, paths, workers, start_scorer, settings, ahead=TAGGED_AHEAD)
        return
    # a decoded file holds its whole spectrogram: a few per worker
    yield from tag_decoded(run_all(decode_one, paths, workers, ahead=2), model, tag_names,
                           norm_mean, norm_std, hop_frames, batch_size)


# -----------------------------------------------------------------------------
# Scoring: a file's windows in batches of their own (CPU), or across files (GPU)
@torch.no_grad()
def score_batch(model, windows, norm_mean, norm_std):
    """Probabilities and embeddings of a batch of log-mel windows.

    Args:
        windows: float32 ndarray (B, N_MELS, N_FRAMES).  norm_mean, norm_std: tensors
        (N_MELS,) on the model's device.
    Returns:
        probs: float32 ndarray (B, n_tags), sigmoid of the logits.
        embeddings: float32 ndarray (B, 500), MSCNN.embed (the last layer's input).
    """
    x = common.normalise(torch.from_numpy(windows).to(norm_mean.device), norm_mean, norm_std)
    embeddings = model.embed(x)
    return torch.sigmoid(model.head[-1](embeddings)).cpu().numpy(), embeddings.cpu().numpy()


def file_result(starts, duration_s, window_probs, window_embeddings, tag_names):
    """A tagged file, as tag_all yields it: dict of tags (list of [name, probability], all
    tags, most probable first; probability = mean over windows), windows (K), duration_s,
    window_probs (K, n_tags), starts (K,) window start frames, window_start_s (K,),
    window_embeddings (K, 500), embedding (500,) = their mean."""
    mean_probs = window_probs.mean(axis=0)
    order = np.argsort(-mean_probs, kind="stable")
    return dict(tags=[[tag_names[i], float(mean_probs[i])] for i in order],
                windows=len(starts), duration_s=duration_s, window_probs=window_probs,
                starts=starts, window_start_s=starts * common.HOP_LENGTH / common.SAMPLE_RATE,
                window_embeddings=window_embeddings, embedding=window_embeddings.mean(axis=0))


def score_file(spec, duration_s, model, tag_names, norm_mean, norm_std,
               hop_frames=common.N_FRAMES // 2, batch_size=CPU_BATCH):
    """Score one file's windows, batch_size at a time (batches of this file alone).

    Args:
        spec: float32 ndarray (N_MELS, n_frames), as read_log_mel gives.
    Returns file_result's dict.
    """
    starts = window_starts(spec.shape[1], hop_frames)
    probs, embeddings = [], []
    for first in range(0, len(starts), batch_size):  # fit_frames pads a window past the end
        windows = np.stack([common.fit_frames(spec[:, start:])
                            for start in starts[first:first + batch_size]])
        p, e = score_batch(model, windows, norm_mean, norm_std)
        probs.append(p)
        embeddings.append(e)
    return file_result(starts, duration_s, np.concatenate(probs), np.concatenate(embeddings),
                       tag_names)


def tag_decoded(decoded, model, tag_names, norm_mean, norm_std, hop_frames=common.N_FRAMES // 2,
                batch_size=CUDA_BATCH):
    """Score decoded files, batch_size windows per forward pass whatever the files' lengths
    (windows of several short files share a batch; a long file fills several): the GPU's way.

    Args:
        decoded: iterable of (path, (spec, duration_s) or ValueError), as
        run_all(decode_one, ...) yields.
    Yields:
        (path, file_result's dict or the ValueError) in the same order.
    """
    queue, batch = deque(), []  # files not yet yielded; (file, window) to score

    def score():
        windows = np.stack([window for _, window in batch])
        probs, embeddings = score_batch(model, windows, norm_mean, norm_std)
        for (file, _), p, e in zip(batch, probs, embeddings):
            file["probs"].append(p)
            file["embeddings"].append(e)
        batch.clear()

    def finished():
        while queue and (isinstance(queue[0], tuple)
                         or len(queue[0]["probs"]) == len(queue[0]["starts"])):
            file = queue.popleft()
            if isinstance(file, tuple):  # (path, error)
                yield file
                continue
            yield file["path"], file_result(file["starts"], file["duration_s"],
                                            np.stack(file["probs"]), np.stack(file["embeddings"]),
                                            tag_names)

    for path, item in decoded:
        if isinstance(item, Exception):
            queue.append((path, item))
        else:
            spec, duration_s = item
            file = dict(path=path, duration_s=duration_s, probs=[], embeddings=[],
                        starts=window_starts(spec.shape[1], hop_frames))
            queue.append(file)
            for start in file["starts"]:  # fit_frames pads a window that runs past the end
                batch.append((file, common.fit_frames(spec[:, start:])))
                if len(batch) == batch_size:
                    score()
        yield from finished()
    if batch:
        score()
    yield from finished()


# -----------------------------------------------------------------------------
# Checkpoint
def newest_checkpoint(experiments_dir):
    """best_model.pt of the most recently modified run folder under experiments_dir."""
    runs = [p.parent for p in Path(experiments_dir).glob("*/best_model.pt")]
    if not runs:
        raise SystemExit(f"error: no trained model in {experiments_dir}/ (no <run>/best_model.pt); "
                         "train one with src/trainer.py first, or pass --checkpoint PATH")
    return max(runs, key=lambda run: run.stat().st_mtime) / "best_model.pt"


CHECKPOINT_FIX = "pass the best_model.pt of a run trained with src/trainer.py"


def checkpoint_file(path):
    """The checkpoint file --checkpoint names: a run folder (one holding best_model.pt)
    stands for its best_model.pt. SystemExit (one line) when there is none."""
    path = Path(path)
    if path.is_dir():
        if not (path / "best_model.pt").is_file():
            raise SystemExit(f"error: checkpoint {path} is a folder with no best_model.pt in it; "
                             f"{CHECKPOINT_FIX} (or its run folder)")
        return path / "best_model.pt"
    if not path.exists():
        raise SystemExit(f"error: checkpoint {path} not found; {CHECKPOINT_FIX}")
    return path


def about_checkpoint(path):
    """-> (SHA-256 of the checkpoint file, recorded in every output row; the line saying
    what it was trained on; a warning line or None: formats.describe_training)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return (plumbing.file_digest(path, "sha256"),) + formats.describe_training(checkpoint)


def load_checkpoint(path, device):
    """-> model (eval, on device), tag_names, norm_mean, norm_std (tensors on device).

    A run folder (one holding best_model.pt) stands for its best_model.pt."""
    fix = CHECKPOINT_FIX
    path = checkpoint_file(path)
    try:
        model, checkpoint = formats.load_model(path, device)
    except ValueError as error:  # one whole line naming the file (formats.load_error_reason)
        raise SystemExit(f"error: {error}; {fix}") from None
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
    with plumbing.atomic_write(png_path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)


def write_json(path, results):
    """Write results ({path: {"tags", "windows", "duration_s"} or {"error"}}) as JSON, one
    file per line (readable and diffable), atomically."""
    lines = [f"{json.dumps(audio)}: {json.dumps(entry)}" for audio, entry in results.items()]
    with plumbing.atomic_write(path) as f:
        f.write("{\n" + ",\n".join(lines) + "\n}\n")


CSV_COLUMNS = ["path", "duration_s", "windows"]  # then one column per tag, then CSV_LAST_COLUMNS
CSV_LAST_COLUMNS = ["error", "checkpoint_sha256"]


def write_csv(path, results, tag_names):
    """One row per file: path, duration_s, windows, each tag's probability (checkpoint
    order), error (empty when tagged; only path and error are filled when not),
    checkpoint_sha256 (of the checkpoint that made the row)."""
    with plumbing.atomic_write(path, newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS + tag_names + CSV_LAST_COLUMNS)
        for audio, entry in results.items():
            if "error" in entry:
                writer.writerow([audio, "", ""] + [""] * len(tag_names)
                                + [entry["error"], entry["checkpoint_sha256"]])
            else:
                probs = dict(entry["tags"])
                writer.writerow([audio, f"{entry['duration_s']:.3f}", entry["windows"]]
                                + [f"{probs[name]:.6f}" for name in tag_names]
                                + ["", entry["checkpoint_sha256"]])


def write_embeddings(path, results, tag_names, per_window):
    """The tagged files' embeddings as .npz (np.load reads it; failed files are left out):
    paths (F,) str, tag_names (T,) str, embeddings (F, 500) float32 (mean over each file's
    windows), duration_s (F,), windows (F,); with per_window also window_embeddings (W, 500),
    window_file (W,) (row in paths) and window_start_s (W,); checkpoint_sha256 (F,) str, of
    the checkpoint that made each row."""
    tagged = [(audio, entry) for audio, entry in results.items() if "embedding" in entry]
    arrays = dict(
        paths=np.array([audio for audio, _ in tagged], dtype=str),
        checkpoint_sha256=np.array([e["checkpoint_sha256"] for _, e in tagged], dtype=str),
        tag_names=np.array(tag_names, dtype=str),
        embeddings=np.array([e["embedding"] for _, e in tagged],
                            np.float32).reshape(-1, EMBEDDING_SIZE),
        duration_s=np.array([e["duration_s"] for _, e in tagged], np.float64),
        windows=np.array([e["windows"] for _, e in tagged], np.int64))
    if per_window:
        arrays.update(
            window_embeddings=np.concatenate(
                [e["window_embeddings"] for _, e in tagged] or [np.zeros((0, EMBEDDING_SIZE))]
            ).astype(np.float32),
            window_file=np.repeat(np.arange(len(tagged)),
                                  [e["windows"] for _, e in tagged]).astype(np.int64),
            window_start_s=np.concatenate([e["window_start_s"] for _, e in tagged]
                                          or [np.zeros(0)]))
    with plumbing.atomic_write(path, "wb") as f:
        np.savez(f, **arrays)


def save_outputs(args, results, tag_names):
    """Write every output asked for, each atomically (a run killed at any moment leaves
    each output as its last complete save)."""
    keep = ("tags", "windows", "duration_s", "error", "checkpoint_sha256")
    if args.json:
        write_json(args.json, {path: {k: v for k, v in entry.items() if k in keep}
                               for path, entry in results.items()})
    if args.csv:
        write_csv(args.csv, results, tag_names)
    if args.embeddings:
        write_embeddings(args.embeddings, results, tag_names, args.per_window)


def read_previous(args, tag_names, checkpoint_sha256):
    """What earlier runs wrote to this run's outputs (--resume): {path: entry}, the entries
    of JSON, else CSV, with the embeddings joined in; and the paths every output requested
    already holds, tagged (not failed), which this run skips. An output that cannot be
    read, or holds rows of another checkpoint than checkpoint_sha256 (one file would mix
    two models) or of an unknown one, is refused in one line before any work."""
    outputs = [(name, getattr(args, name)) for name in ("json", "csv", "embeddings")
               if getattr(args, name)]
    previous, done = {}, None
    for name, path in outputs:
        if not Path(path).is_file():  # an output without anything yet: every file is redone
            done = set()
            continue
        fix = f"pass another --{name} file, or leave out --resume"
        try:
            entries = READERS[name](path, tag_names, args.per_window)
        except (ValueError, KeyError, TypeError, OSError, EOFError, csv.Error,
                zipfile.BadZipFile) as error:
            raise SystemExit(f"error: --resume: cannot read {path} ({type(error).__name__}: "
                             f"{error}); {fix}") from None
        formats.check_made_by(path, [entry.get("checkpoint_sha256") for entry in entries.values()],
                               checkpoint_sha256, fix)
        for audio, entry in entries.items():
            previous.setdefault(audio, {}).update(entry)
        tagged = {audio for audio, entry in entries.items() if "error" not in entry}
        done = tagged if done is None else done & tagged
    return previous, done


def read_json(path, tag_names, per_window):
    entries = json.loads(Path(path).read_text())
    if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
        raise ValueError("not predict.py's JSON ({path: {...}, ...})")
    for entry in entries.values():
        if "tags" in entry and sorted(name for name, _ in entry["tags"]) != sorted(tag_names):
            raise ValueError("its tags are not this checkpoint's (written with another model?)")
        if "tags" not in entry and "error" not in entry:
            raise ValueError("an entry has neither tags nor error")
    return entries


def read_csv(path, tag_names, per_window):
    """The rows of a CSV of write_csv; a row that is not whole (a file cut short) is left
    out with a note, so that its file is tagged again."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] != CSV_COLUMNS + tag_names + CSV_LAST_COLUMNS:
        older = bool(rows) and rows[0] == CSV_COLUMNS + tag_names + ["error"]
        raise ValueError("it has no checkpoint_sha256 column (written by an older predict.py)" if older else
                         "its columns are not path, duration_s, windows, this checkpoint's tags, "
                         "error, checkpoint_sha256 (written with another model?)")
    entries, cut = {}, []
    for line, row in enumerate(rows[1:], 2):
        if not row:  # a blank line
            continue
        try:
            if len(row) != len(rows[0]) or len(row[-1]) != 64:  # a SHA-256 in hex
                raise ValueError
            if row[-2]:
                entries[row[0]] = {"error": row[-2], "checkpoint_sha256": row[-1]}
                continue
            probs = [float(v) for v in row[3:-2]]
            order = np.argsort(-np.array(probs), kind="stable")
            entries[row[0]] = dict(tags=[[tag_names[i], probs[i]] for i in order],
                                   duration_s=float(row[1]), windows=int(row[2]),
                                   checkpoint_sha256=row[-1])
        except ValueError:
            cut.append(line)
    if cut:
        print(f"note: --resume: {path}: line{'s' * (len(cut) > 1)} {', '.join(map(str, cut[:5]))}"
              f"{' ...' if len(cut) > 5 else ''} not whole (cut short?): tagged again", file=sys.stderr)
    return entries


def read_embeddings(path, tag_names, per_window):
    with np.load(path) as saved:
        if list(saved["tag_names"]) != tag_names:
            raise ValueError("its tag_names are not this checkpoint's (written with another "
                             "model?)")
        if per_window and "window_embeddings" not in saved:
            return {}  # written without --per-window: every file is redone
        written_by = ([str(sha) for sha in saved["checkpoint_sha256"]] if "checkpoint_sha256" in saved
                      else [None] * len(saved["paths"]))  # an older predict.py's
        entries = {str(audio): dict(embedding=saved["embeddings"][i],
                                    duration_s=float(saved["duration_s"][i]),
                                    windows=int(saved["windows"][i]), checkpoint_sha256=written_by[i])
                   for i, audio in enumerate(saved["paths"])}
        if per_window:
            for i, audio in enumerate(saved["paths"]):
                rows = saved["window_file"] == i
                entries[str(audio)].update(window_embeddings=saved["window_embeddings"][rows],
                                           window_start_s=saved["window_start_s"][rows])
    return entries


READERS = dict(json=read_json, csv=read_csv, embeddings=read_embeddings)


# -----------------------------------------------------------------------------
# Inputs
def expand_inputs(arguments):
    """Audio paths from the command line, in order: a file stays itself; a folder becomes
    the files under it (recursively, through symbolic links too) whose extension is in
    AUDIO_EXTENSIONS, in sorted order, hidden files and folders (a leading '.') left out.

    Returns (paths, skipped): list of str; and {path: why it is not tagged} for what cannot
    be searched or tagged, each said once: a folder holding no audio file, a symbolic link
    that loops (to a folder holding it, or to itself: not followed) or leads nowhere, a
    folder that cannot be read.
    """
    paths, skipped = [], {}
    for argument in arguments:
        folder = Path(argument)
        if not folder.is_dir():
            paths.append(argument)
            continue
        found = []

        def unreadable(error):
            skipped[error.filename] = f"{error.filename}: cannot be read ({error.strerror}); not searched"

        for root, dirs, files in os.walk(folder, onerror=unreadable, followlinks=True):
            real_root = os.path.realpath(root)
            for name in sorted(dirs):
                real = os.path.realpath(os.path.join(root, name))
                if name.startswith("."):
                    dirs.remove(name)
                elif real_root == real or real_root.startswith(real.rstrip(os.sep) + os.sep):
                    dirs.remove(name)
                    skipped[os.path.join(root, name)] = (f"{os.path.join(root, name)}: a symbolic link loop "
                                                         f"(to {real}, a folder holding it); not followed")
            for name in files:
                path = Path(root) / name
                if name.startswith(".") or path.suffix.lower() not in AUDIO_EXTENSIONS:
                    continue
                if path.is_file():
                    found.append(path)
                elif path.is_symlink():  # os.walk lists a link it cannot follow as a file
                    try:
                        path.stat()
                        continue  # a link to something other than a file
                    except OSError as error:
                        why = "a symbolic link loop" if error.errno == errno.ELOOP else "a broken symbolic link"
                        skipped[str(path)] = f"{path}: {why} ({os.readlink(path)}); nothing to tag"
        paths += [str(p) for p in sorted(found)]
        if not found:
            skipped[argument] = f"{argument}: a folder with no audio file ({' '.join(AUDIO_EXTENSIONS)})"
    return paths, skipped


# -----------------------------------------------------------------------------
def tag_file(path, model, tag_names, norm_mean, norm_std, hop_frames=common.N_FRAMES // 2,
             batch_size=CPU_BATCH):
    """Tag one audio file, in this process, with this process's torch threads.

    Returns score_file's dict (file_result). Raises ValueError naming the file when it
    cannot be read.
    """
    decoded = decode_one(path)
    if isinstance(decoded, ValueError):
        raise decoded
    return score_file(*decoded, model, tag_names, norm_mean, norm_std, hop_frames, batch_size)


def default_workers():
    """--workers by default: one per core this process may use, at most MAX_WORKERS."""
    return min(plumbing.usable_cores(), MAX_WORKERS)


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Tag audio files and folders with a trained multi-scale CNN "
                    "(Dabral et al. 2018). See docs/predict.md.")
    parser.add_argument("audio", nargs="+", help="audio files and folders (searched recursively "
                        f"for {' '.join(AUDIO_EXTENSIONS)}); any sample rate, mono or stereo, "
                        "any length")
    parser.add_argument("--checkpoint", default=None, help="best_model.pt written by trainer.py, "
                        "or its run folder (default: that of the most recently modified run in "
                        "--experiments)")
    parser.add_argument("--experiments", default="experiments",
                        help="folder of runs searched when --checkpoint is not given (default: experiments)")
    parser.add_argument("--top", type=positive_int, default=5, help="tags printed per file (default: 5)")
    parser.add_argument("--hop-frames", type=positive_int, default=common.N_FRAMES // 2,
                        help="frames between window starts (46.4 ms each); the last window "
                        f"is aligned to the end of the audio (default: {common.N_FRAMES // 2}, half a "
                        "window)")
    parser.add_argument("--json", default=None, help="also write all results to this JSON file: "
                        '{path: {"tags": [[name, prob], ...all tags, most probable first], '
                        '"windows": K, "duration_s": s}} or {path: {"error": message}}')
    parser.add_argument("--csv", default=None, help="also write one row per file to this CSV: "
                        "path, duration_s, windows, one probability column per tag (checkpoint "
                        "order), error")
    parser.add_argument("--embeddings", default=None, help="also write the 500-d embeddings "
                        "(penultimate layer, mean over windows) to this .npz: paths, tag_names, "
                        "embeddings (F, 500), duration_s, windows")
    parser.add_argument("--per-window", action="store_true", help="--embeddings also keeps every "
                        "window: window_embeddings (W, 500), window_file, window_start_s")
    parser.add_argument("--resume", action="store_true", help="skip the files that every output "
                        "given (--csv/--json/--embeddings) already holds tagged; failed ones are "
                        "tried again")
    parser.add_argument("--taggram", default=None, help="save a PNG of tag probability over time "
                        "(needs matplotlib); with several files, one PNG each, named "
                        "<stem>_<audio stem>.png beside it")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="worker processes; on a CPU each decodes and scores whole files with "
                        "one thread, and any count gives the same output; on a GPU they decode "
                        "while this process scores; 0: all in this process, with its own threads "
                        f"(default: one per CPU core, at most {MAX_WORKERS})")
    parser.add_argument("--device", default="auto",
                        help="auto | cpu | cuda (default: auto, cuda where available)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="windows scored per forward pass (windows of several files share "
                        f"one); default {CUDA_BATCH} on a GPU, {CPU_BATCH} on a CPU, where larger "
                        "batches cost memory and are no faster (docs/predict.md)")
    args = parser.parse_args(argv)
    if args.workers < 0:
        parser.error(f"--workers must be 0 or more, got {args.workers}")
    if args.resume and not (args.csv or args.json or args.embeddings):
        parser.error("--resume needs an output to resume: --csv, --json or --embeddings")
    if args.per_window and not args.embeddings:
        parser.error("--per-window needs --embeddings FILE.npz")
    return args


def claim_outputs(args):
    """Check every output place (--json, --csv, --embeddings, --taggram) before any work
    (plumbing.check_file: not a folder, in a folder that exists or is made, writable), and
    lock each output file for this process (plumbing.hold_lock: one writer per output)."""
    for flag in ("json", "csv", "embeddings", "taggram"):
        path = getattr(args, flag)
        if path:
            plumbing.check_file(path, f"--{flag}")
            plumbing.hold_lock(f"{path}.lock", path, f"pass another --{flag}")


@plumbing.releasing_locks
def main(argv=None):
    """Tag the files; returns {path: tag_file's result or {"error": message}} (with --resume,
    the files skipped hold what the outputs held), and exits non-zero (after tagging the
    rest) when any file could not be tagged. Every entry records checkpoint_sha256."""
    args = parse_args(argv)
    claim_outputs(args)  # a bad output place is said now, not after tagging
    if args.taggram:
        import_figure()  # fail before the slow part, not after it
    device = plumbing.resolve_device(args.device)
    checkpoint_path = args.checkpoint
    if checkpoint_path is None:
        checkpoint_path = newest_checkpoint(args.experiments)
        print(f"using {checkpoint_path} (newest run in {args.experiments}/; "
              "--checkpoint picks another)", file=sys.stderr)
    model, tag_names, norm_mean, norm_std = load_checkpoint(checkpoint_path, device)
    sha256, trained_on, warning = about_checkpoint(checkpoint_file(checkpoint_path))
    print(trained_on, file=sys.stderr)
    if warning:
        print(warning, file=sys.stderr)
    batch_size = args.batch_size or (CUDA_BATCH if device.type == "cuda" else CPU_BATCH)

    paths, skipped = expand_inputs(args.audio)
    results, failed = {}, []
    for path, message in skipped.items():
        results[path] = {"error": message, "checkpoint_sha256": sha256}
        failed.append(path)
        print(f"error: {message}", file=sys.stderr)
    if args.resume:
        previous, done = read_previous(args, tag_names, sha256)
        results = {**previous, **results}
        skipped_done = len([path for path in paths if path in done])
        paths = [path for path in paths if path not in done]
        print(f"resuming: {skipped_done} file(s) already tagged in the outputs, {len(paths)} to tag",
              file=sys.stderr)
    png_paths = {}
    if args.taggram and paths:
        png_paths = dict(zip(paths, taggram_paths(args.taggram, paths)))

    tagged = tag_all(paths, args.workers, model, tag_names, norm_mean, norm_std, args.hop_frames,
                     batch_size)
    bar = tqdm(total=len(paths), unit="file", disable=len(paths) <= BAR_ABOVE_N_FILES)
    last_save = time.monotonic()
    try:
        for path, result in tagged:
            bar.update()
            if isinstance(result, Exception):
                failed.append(path)
                results[path] = {"error": str(result), "checkpoint_sha256": sha256}
                tqdm.write(f"error: {result}", file=sys.stderr)
            else:
                results[path] = dict(result, checkpoint_sha256=sha256)  # before it is printed: then kept
                tqdm.write(format_tags(path, result, args.top))
                if path in png_paths:
                    save_taggram(png_paths[path], result["window_probs"], result["starts"],
                                 result["duration_s"], tag_names, Path(path).name)
                    tqdm.write(f"  taggram: {png_paths[path]}")
            if time.monotonic() - last_save >= SAVE_EVERY_S:  # a killed run keeps all but this much
                save_outputs(args, results, tag_names)
                last_save = time.monotonic()
        save_outputs(args, results, tag_names)
    except (KeyboardInterrupt, plumbing.WorkersKeepDying) as stop:
        bar.close()
        save_outputs(args, results, tag_names)
        rest = "; rerun with --resume to tag the rest" if args.csv or args.json or args.embeddings else ""
        if isinstance(stop, plumbing.WorkersKeepDying):
            raise SystemExit(f"error: {stop}: out of memory? The files tagged so far are saved{rest}; "
                             "free memory or lower --workers") from None
        print(f"interrupted; the files tagged so far are saved{rest}", file=sys.stderr)
        raise SystemExit(plumbing.exit_code(stop)) from None
    finally:
        bar.close()
        tagged.close()  # stops the worker pool
    for output in (args.json, args.csv, args.embeddings):
        if output:
            print(f"wrote {output}", file=sys.stderr)
    if failed:
        n_inputs = len(paths) + len(skipped)
        raise SystemExit(f"error: {len(failed)} of {n_inputs} files could not be tagged "
                         f"({', '.join(failed[:3])}{', ...' if len(failed) > 3 else ''})")
    return results


if __name__ == "__main__":  # SIGTERM and SIGHUP stop it as Ctrl-C does: what is tagged is saved
    plumbing.run_script(main, "interrupted: each output holds its last complete save, if any; rerun with "
                              "--resume to go on", quick_exit=True)
