"""Tag audio files and music folders with a trained multi-scale CNN checkpoint (docs/predict.md).

A file's tags are the mean of common.score over its 628-frame windows (29.1 s, every --hop-frames
frames, the last aligned to the end); its embedding, the mean of the windows' 500-d activations.
"""
import argparse
import contextlib
import csv
import errno
import json
import os
import re
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import soundfile
import torch
from tqdm import tqdm

import common
import devices
import formats
import plumbing

BAR_ABOVE_N_FILES = 4  # a progress bar only pays off past a handful of files
MAX_WORKERS = 16  # default --workers: the cores, at most this many
TAGGED_AHEAD = 64  # files per CPU worker tagged ahead of the one printed next
SAVE_EVERY_S = 60  # outputs are rewritten (atomically) this often during a run
OUTPUT_FORMAT = 1  # format_version of the CSV, JSON and .npz outputs; --resume refuses any other
CPU_BATCH, CUDA_BATCH = 8, 64  # windows per forward pass; on a CPU larger ones only cost memory
FALLBACK_EXTENSIONS = (".aac", ".m4a", ".mp3", ".mp4", ".webm", ".wma")  # what ffmpeg decodes (audioread)
AUDIO_EXTENSIONS = tuple(sorted({".aif", ".aifc", ".oga", ".opus", *FALLBACK_EXTENSIONS} | {
    "." + name.lower() for name in soundfile.available_formats() if name != "RAW"}))  # RAW: no header
FORMULA_STARTS = tuple("=+-@\t\r'")  # a CSV cell starting so is put behind a ': no spreadsheet runs it
CHECKPOINT_FIX = "pass the best_model.pt of a run trained with src/trainer.py, or a folder of src/export.py"
CSV_COLUMNS = ["path", "duration_s", "windows"]  # then one column per tag, then CSV_LAST_COLUMNS
CSV_LAST_COLUMNS = ["error", "checkpoint_sha256", "format_version"]
JSON_KEYS = ("tags", "windows", "duration_s", "error", "checkpoint_sha256")  # what the JSON holds of a file
OUTPUTS = ("json", "csv", "embeddings")  # the output flags, in the order they are written
scorer = None  # a CPU worker's tag_file settings: (model, tag_names, norm_mean, norm_std, hop, batch)


def window_starts(n_frames, hop_frames, window_frames=common.N_FRAMES):
    """First frame of each window, int64 (K,): every hop_frames frames, the last aligned to the end."""
    last = max(n_frames - window_frames, 0)
    return np.unique(np.append(np.arange(0, last + 1, hop_frames), last)).astype(np.int64)


def score_file(spec, duration_s, model, tag_names, norm_mean, norm_std, hop_frames=common.N_FRAMES // 2,
               batch_size=CPU_BATCH):
    """Score spec's (float32 (N_MELS, n_frames)) windows: dict of tags ([name, mean prob], best first),
    windows, duration_s, window_probs (K, n_tags), starts, window_start_s, window_embeddings, embedding."""
    starts = window_starts(spec.shape[1], hop_frames)
    probs, embeddings = [], []
    for first in range(0, len(starts), batch_size):  # fit_frames pads a window past the end
        windows = np.stack([common.fit_frames(spec[:, s:]) for s in starts[first:first + batch_size]])
        p, e = common.score(model, torch.from_numpy(windows).to(norm_mean.device), norm_mean, norm_std,
                            embed=True)
        probs.append(p.cpu().numpy())
        embeddings.append(e.cpu().numpy())
    window_probs, window_embeddings = np.concatenate(probs), np.concatenate(embeddings)
    mean_probs = window_probs.mean(axis=0)
    order = np.argsort(-mean_probs, kind="stable")
    return dict(tags=[[tag_names[i], float(mean_probs[i])] for i in order], windows=len(starts),
                duration_s=duration_s, window_probs=window_probs, starts=starts,
                window_start_s=starts * common.HOP_LENGTH / common.SAMPLE_RATE,
                window_embeddings=window_embeddings, embedding=window_embeddings.mean(axis=0))


@contextlib.contextmanager
def quiet_decoder():
    """Silence the decoders' warnings and notes on file descriptor 2: a bad file costs one line."""
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


def decode_one(path):
    """path -> read_log_mel's (spec, duration_s), or its ValueError (returned: only a dead worker raises)."""
    try:
        with quiet_decoder():
            return common.read_log_mel(path)
    except ValueError as error:
        return error


def tag_file(path, model, tag_names, norm_mean, norm_std, hop_frames=common.N_FRAMES // 2,
             batch_size=CPU_BATCH):
    """Decode and score one file here: score_file's dict; ValueError naming the file if unreadable."""
    with quiet_decoder():
        spec, duration_s = common.read_log_mel(path)
    return score_file(spec, duration_s, model, tag_names, norm_mean, norm_std, hop_frames, batch_size)


def start_scorer(*settings, one_thread=True):
    """A tagging worker's initializer: one torch thread, as sums round differently with another count."""
    global scorer
    scorer = settings
    if one_thread:
        torch.set_num_threads(1)


def tag_one(path):
    """A tagging worker's task: path -> tag_file's dict, or its ValueError."""
    decoded = decode_one(path)
    return decoded if isinstance(decoded, ValueError) else score_file(*decoded, *scorer)


def tag_all(paths, workers, model, tag_names, norm_mean, norm_std, hop_frames, batch_size, score_here=None):
    """(path, score_file's dict or ValueError) per path, in order; score_here: scored in this process."""
    settings = (model, tag_names, norm_mean, norm_std, hop_frames, batch_size)
    if workers == 0:
        start_scorer(*settings, one_thread=False)
        yield from ((path, tag_one(path)) for path in paths)
        return
    on_cpu = not score_here if score_here is not None else norm_mean.device.type == "cpu"
    common.warm_up()  # librosa's imports and numba compilation, once, before the workers fork
    # a tagged file waiting for its turn holds only its scores, a decoded one its spectrogram
    task, initializer, ahead = (tag_one, start_scorer, TAGGED_AHEAD) if on_cpu else (decode_one, None, 2)
    results = plumbing.pool_results(task, paths, min(workers, len(paths)), initializer,
                                    settings if on_cpu else (), ordered=True, ahead=ahead)
    with contextlib.closing(results):
        for index, result in results:
            path = paths[index]
            if isinstance(result, plumbing.WorkerDied):
                result = ValueError(f"{path}: {result}; nothing tagged")
            elif isinstance(result, Exception) and not isinstance(result, ValueError):
                result = ValueError(f"{path}: tagging failed ({type(result).__name__}: {result})")
            elif not on_cpu and not isinstance(result, Exception):
                result = score_file(*result, *settings)
            yield path, result


def expand_inputs(arguments):
    """(paths, skipped {path: why}): each folder becomes its audio files, recursively and sorted."""
    paths, skipped = [], {}

    def unreadable(error):
        skipped[error.filename] = f"{error.filename}: cannot be read ({error.strerror}); not searched"

    for argument in arguments:
        if not Path(argument).is_dir():
            paths.append(argument)
            continue
        found = []
        for root, dirs, files in os.walk(Path(argument), onerror=unreadable, followlinks=True):
            real_root = os.path.realpath(root)
            for name in sorted(dirs):
                real = os.path.realpath(os.path.join(root, name))
                if name.startswith("."):
                    dirs.remove(name)
                elif real_root == real or real_root.startswith(real.rstrip(os.sep) + os.sep):
                    dirs.remove(name)
                    link = os.path.join(root, name)
                    skipped[link] = (f"{link}: a symbolic link loop (to {real}, a folder holding it); "
                                     "not followed")
            for name in files:
                path = Path(root) / name
                if name.startswith(".") or path.suffix.lower() not in AUDIO_EXTENSIONS:
                    continue
                try:
                    path.stat()  # a FIFO or a device is listed too: decoding says what it is
                except OSError as error:
                    if path.is_symlink():  # os.walk lists a link it cannot follow as a file
                        why = "symbolic link loop" if error.errno == errno.ELOOP else "broken symbolic link"
                        skipped[str(path)] = f"{path}: a {why} ({os.readlink(path)}); nothing to tag"
                        continue
                found.append(path)
        paths += [str(p) for p in sorted(found)]
        if not found:
            skipped[argument] = f"{argument}: a folder with no audio file ({' '.join(AUDIO_EXTENSIONS)})"
    unique = {}  # ./a.wav, a.wav, a link to it, a folder's a.wav: one file, tagged once as first named
    for path in paths:
        unique.setdefault(plumbing.file_key(path), path)
    return list(unique.values()), skipped


def newest_checkpoint(experiments_dir):
    """best_model.pt of the most recently modified run folder under experiments_dir, named on stderr."""
    runs = [p.parent for p in Path(experiments_dir).glob("*/best_model.pt")]
    if not runs:
        raise SystemExit(f"error: no trained model in {experiments_dir}/ (no <run>/best_model.pt); "
                         "train one with src/trainer.py first, or pass --checkpoint PATH")
    best = max(runs, key=lambda run: run.stat().st_mtime) / "best_model.pt"
    print(f"using {best} (newest run in {experiments_dir}/; --checkpoint picks another)", file=sys.stderr)
    return best


def load_checkpoint(path, device):
    """-> model, tag_names, norm_mean, norm_std (on device), checkpoint; a run folder: its best_model.pt."""
    path = Path(path)
    if path.is_dir() and not formats.is_model_folder(path):  # export.py's: formats.load_model reads it
        if not (path / "best_model.pt").is_file():
            raise SystemExit(f"error: checkpoint {path} is a folder with no best_model.pt in it; "
                             f"{CHECKPOINT_FIX} (or its run folder)")
        path = path / "best_model.pt"
    if not path.exists():
        raise SystemExit(f"error: checkpoint {path} not found; {CHECKPOINT_FIX}")
    try:
        model, checkpoint = formats.load_model(path, device)
    except ValueError as error:  # one whole line naming the file (formats.load_error_reason)
        raise SystemExit(f"error: {error}; {CHECKPOINT_FIX}") from None
    common.RESAMPLER = checkpoint["feature_params"]["resampler"]  # the workers, forked later, decode with it
    norm_mean, norm_std = (checkpoint[key].float().to(device) for key in ("norm_mean", "norm_std"))
    return model, list(checkpoint["tag_names"]), norm_mean, norm_std, checkpoint


def format_tags(path, result, top):
    """Readable block: the file, its length, then the top tags with aligned probabilities."""
    k, ranked = result["windows"], result["tags"][:top]
    width = max(len(name) for name, _ in ranked)
    return "\n".join([f"{path}  ({result['duration_s']:.1f} s, {k} window{'s' if k != 1 else ''})",
                      *(f"  {name:<{width}}  {prob:.3f}" for name, prob in ranked)])


def taggram_paths(taggram, audio_paths):
    """One PNG path per audio file: taggram for one, else '<stem>_<audio stem>[_n].png' beside it."""
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
    """matplotlib's Figure: only --taggram needs matplotlib, so it is optional."""
    pyplot = plumbing.import_pyplot()
    if pyplot is None:
        raise SystemExit("error: --taggram needs matplotlib, which is not installed; "
                         "pip install matplotlib (or leave out --taggram)")
    return pyplot.Figure


def save_taggram(png_path, window_probs, starts, duration_s, tag_names, title):
    """Tag probability (window_probs (K, n_tags)) by time: each window drawn around its centre."""
    Figure = import_figure()
    centres = (starts + common.N_FRAMES / 2) * common.HOP_LENGTH / common.SAMPLE_RATE
    edges = np.concatenate([[0.0], (centres[:-1] + centres[1:]) / 2, [max(duration_s, centres[-1])]])
    fig = Figure(figsize=(8, 1.5 + 0.16 * len(tag_names)))
    ax = fig.add_subplot()
    mesh = ax.pcolormesh(edges, np.arange(len(tag_names) + 1) - 0.5, window_probs.T, vmin=0, vmax=1,
                         cmap="viridis")
    ax.set_yticks(np.arange(len(tag_names)), tag_names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("time (s)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(mesh, ax=ax, label="probability", fraction=0.04)
    fig.tight_layout()
    with plumbing.atomic_write(png_path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)


def save_outputs(args, results, tag_names):
    """Write every output asked for, atomically (layouts: docs/predict.md, "Outputs")."""
    if args.json:  # a file a line: readable and diffable
        lines = [json.dumps(audio) + ": " + json.dumps(
                     dict({k: v for k, v in entry.items() if k in JSON_KEYS}, format_version=OUTPUT_FORMAT))
                 for audio, entry in results.items()]
        with plumbing.atomic_write(args.json) as f:
            f.write("{\n" + ",\n".join(lines) + "\n}\n")
    if args.csv:
        with plumbing.atomic_write(args.csv, newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_COLUMNS + tag_names + CSV_LAST_COLUMNS)
            for audio, entry in results.items():
                if "error" in entry:
                    row = [csv_cell(audio), "", ""] + [""] * len(tag_names)
                else:
                    probs = dict(entry["tags"])
                    row = [csv_cell(audio), f"{entry['duration_s']:.3f}", entry["windows"]]
                    row += [f"{probs[name]:.6f}" for name in tag_names]
                writer.writerow(row + [csv_cell(entry.get("error", "")), entry["checkpoint_sha256"],
                                       OUTPUT_FORMAT])
    if args.embeddings:
        tagged = [(audio, entry) for audio, entry in results.items() if "embedding" in entry]
        arrays = dict(paths=np.array([audio for audio, _ in tagged], dtype=str),
                      checkpoint_sha256=np.array([e["checkpoint_sha256"] for _, e in tagged], dtype=str),
                      tag_names=np.array(tag_names, dtype=str), format_version=np.int64(OUTPUT_FORMAT),
                      embeddings=np.array([e["embedding"] for _, e in tagged], np.float32).reshape(-1, 500),
                      duration_s=np.array([e["duration_s"] for _, e in tagged], np.float64),
                      windows=np.array([e["windows"] for _, e in tagged], np.int64))
        if args.per_window:
            arrays.update(window_embeddings=np.concatenate([e["window_embeddings"] for _, e in tagged]
                                                           or [np.zeros((0, 500))]).astype(np.float32),
                window_file=np.repeat(np.arange(len(tagged)), [e["windows"] for _, e in tagged]),
                window_start_s=np.concatenate([e["window_start_s"] for _, e in tagged] or [np.zeros(0)]))
        with plumbing.atomic_write(args.embeddings, "wb") as f:
            np.savez(f, **arrays)


def outputs(args):
    """{flag: path} of the outputs asked for, in OUTPUTS order."""
    return {flag: getattr(args, flag) for flag in OUTPUTS if getattr(args, flag)}


def csv_cell(text):
    """A path or message as a CSV cell, kept whole (docs/predict.md): \\ doubled, each byte of a name that
    is not UTF-8 as \\xNN (Python holds it as a surrogate), a ' before a formula's start or a '."""
    text = re.sub(r"[\\\udc80-\udcff]", lambda m: "\\\\" if m[0] == "\\" else f"\\x{ord(m[0]) - 0xdc00:02x}",
                  text)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def cell_text(cell):  # csv_cell undone
    cell = cell[1:] if cell.startswith("'") else cell
    return re.sub(r"\\(\\|x[89a-f][0-9a-f])", lambda m: chr(0xdc00 + int(m[1][1:], 16)) if len(m[1]) == 3
                  else "\\", cell)


def check_format(found):
    if found != OUTPUT_FORMAT:
        raise ValueError(f"it is of format version {found}, this predict.py writes {OUTPUT_FORMAT}")


def read_json_output(path, tag_names, per_window):
    entries = json.loads(Path(path).read_text())
    if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
        raise ValueError("not predict.py's JSON ({path: {...}, ...})")
    for entry in entries.values():
        check_format(entry.pop("format_version", None))
        if "tags" in entry and sorted(name for name, _ in entry["tags"]) != sorted(tag_names):
            raise ValueError("its tags are not this checkpoint's (written with another model?)")
        if "tags" not in entry and "error" not in entry:
            raise ValueError("an entry has neither tags nor error")
    return entries


def read_csv_output(path, tag_names, per_window):
    """The rows of predict.py's CSV; a row not whole (cut short) is left out, with a note: tagged again."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] != CSV_COLUMNS + tag_names + CSV_LAST_COLUMNS:
        raise ValueError("its columns are not path, duration_s, windows, this checkpoint's tags, error, "
                         "checkpoint_sha256, format_version (written with another model or version?)")
    entries, cut = {}, []
    for line, row in enumerate(rows[1:], 2):
        if not row:  # a blank line
            continue
        try:
            if len(row) != len(rows[0]) or len(row[-2]) != 64:  # a SHA-256 in hex
                raise ValueError
            check_format(int(row[-1]))
            audio = cell_text(row[0])
            if row[-3]:
                entries[audio] = {"error": cell_text(row[-3]), "checkpoint_sha256": row[-2]}
                continue
            probs = [float(v) for v in row[3:-3]]
            order = np.argsort(-np.array(probs), kind="stable")
            entries[audio] = dict(tags=[[tag_names[i], probs[i]] for i in order], duration_s=float(row[1]),
                                  windows=int(row[2]), checkpoint_sha256=row[-2])
        except ValueError as error:
            if str(error).startswith("it is of format"):
                raise
            cut.append(line)
    if cut:
        print(f"note: --resume: {path}: line{'s' * (len(cut) > 1)} {', '.join(map(str, cut[:5]))}"
              f"{' ...' if len(cut) > 5 else ''} not whole (cut short?): tagged again", file=sys.stderr)
    return entries


def read_embeddings_output(path, tag_names, per_window):
    with np.load(path) as saved:
        check_format(int(saved["format_version"]) if "format_version" in saved else None)
        if list(saved["tag_names"]) != tag_names:
            raise ValueError("its tag_names are not this checkpoint's (written with another model?)")
        if per_window and "window_embeddings" not in saved:
            return {}  # written without --per-window: every file is redone
        entries = {}
        for i, audio in enumerate(saved["paths"]):
            entries[str(audio)] = dict(embedding=saved["embeddings"][i], windows=int(saved["windows"][i]),
                                       duration_s=float(saved["duration_s"][i]),
                                       checkpoint_sha256=str(saved["checkpoint_sha256"][i]))
            if per_window:
                rows = saved["window_file"] == i
                entries[str(audio)].update(window_embeddings=saved["window_embeddings"][rows],
                                           window_start_s=saved["window_start_s"][rows])
    return entries


def read_previous(args, tag_names, checkpoint_sha256):
    """--resume: ({path: entry} from the outputs, the paths all hold tagged); refuses another model's."""
    previous, done = {}, None
    readers = dict(json=read_json_output, csv=read_csv_output, embeddings=read_embeddings_output)
    for name, path in outputs(args).items():
        if not Path(path).is_file():  # an output without anything yet: every file is redone
            done = set()
            continue
        fix = f"pass another --{name} file, or leave out --resume"
        try:
            entries = readers[name](path, tag_names, args.per_window)
        except (ValueError, KeyError, TypeError, OSError, EOFError, csv.Error, zipfile.BadZipFile) as error:
            raise SystemExit(f"error: --resume: cannot read {path} ({type(error).__name__}: {error}); "
                             f"{fix}") from None
        if other := {entry["checkpoint_sha256"] for entry in entries.values()} - {checkpoint_sha256}:
            raise SystemExit(f"error: --resume: {path} holds results of another checkpoint (SHA-256 "
                             f"{sorted(other)[0][:16]}..., this one's is {checkpoint_sha256[:16]}...): one "
                             f"file would mix two models; resume with the checkpoint that wrote it, or {fix}")
        for audio, entry in entries.items():
            previous.setdefault(audio, {}).update(entry)
        tagged = {audio for audio, entry in entries.items() if "error" not in entry}
        done = tagged if done is None else done & tagged
    return previous, done


def default_workers():
    """--workers by default: one per core this process may use, at most MAX_WORKERS."""
    return min(plumbing.usable_cores(), MAX_WORKERS)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Tag audio with a trained CNN (docs/predict.md).")
    parser.add_argument("audio", nargs="+", help="audio files, and folders searched recursively for them")
    parser.add_argument("--checkpoint", help="best_model.pt, its run folder, or a model folder of export.py "
                        "(default: the newest run in --experiments)")
    parser.add_argument("--experiments", default="experiments", help="folder of runs (default: experiments)")
    parser.add_argument("--top", type=plumbing.at_least(1), default=5, help="top tags printed (default: 5)")
    parser.add_argument("--hop-frames", type=plumbing.at_least(1), default=common.N_FRAMES // 2,
                        help=f"frames between window starts (default: {common.N_FRAMES // 2}, half a window)")
    parser.add_argument("--json", help="also write every file's tags to this JSON file (docs/predict.md)")
    parser.add_argument("--csv", help="also write one row per file, a column per tag, to this CSV")
    parser.add_argument("--embeddings", help="also write each file's 500-d embedding to this .npz")
    parser.add_argument("--per-window", action="store_true", help="--embeddings also keeps each window's")
    parser.add_argument("--resume", action="store_true", help="skip the files tagged in every output given")
    parser.add_argument("--taggram", help="save a PNG of tag probability over time (needs matplotlib)")
    parser.add_argument("--workers", type=plumbing.at_least(0), default=default_workers(),
                        help=f"worker processes; 0: none (default: one per CPU core, at most {MAX_WORKERS})")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto, cuda if there)")
    parser.add_argument("--quiet", action="store_true", help="only errors and summaries: no tags, no bar")
    parser.add_argument("--batch-size", type=plumbing.at_least(1),
                        help=f"windows per forward pass (default: {CUDA_BATCH} on GPU, {CPU_BATCH} on CPU)")
    args = parser.parse_args(argv)
    if args.resume and not outputs(args):
        parser.error("--resume needs an output to resume: --csv, --json or --embeddings")
    if args.per_window and not args.embeddings:
        parser.error("--per-window needs --embeddings FILE.npz")
    return args


@plumbing.releasing_locks
def main(argv=None):
    """{path: score_file's dict or {"error": ...}, with checkpoint_sha256}; exits non-zero if any failed."""
    args = parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # a name that is not UTF-8 is printed escaped (\udcff), not fatal
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    written = {f"--{flag}": getattr(args, flag) for flag in (*OUTPUTS, "taggram") if getattr(args, flag)}
    for flag, path in written.items():  # checked and locked before any work
        plumbing.check_file(path, flag)
        plumbing.hold_lock(f"{path}.lock", path, f"pass another {flag}")
    if args.taggram:
        import_figure()  # fail before the slow part, not after it
    device = devices.resolve_device(args.device)
    checkpoint_path = args.checkpoint if args.checkpoint is not None else newest_checkpoint(args.experiments)
    paths, skipped = expand_inputs(args.audio)
    plumbing.check_distinct(written, {"the audio file": paths, "the checkpoint": [
        checkpoint_path, Path(checkpoint_path) / "best_model.pt"]})
    model, tag_names, norm_mean, norm_std, checkpoint = load_checkpoint(checkpoint_path, device)
    sha256 = checkpoint["sha256"]
    for line in filter(None, formats.describe_training(checkpoint)):  # its non-empty lines
        print(line, file=sys.stderr)
    batch_size = args.batch_size or (CUDA_BATCH if device.type == "cuda" else CPU_BATCH)
    results = {path: {"error": message, "checkpoint_sha256": sha256} for path, message in skipped.items()}
    failed = list(skipped)
    for message in skipped.values():
        print(f"error: {message}", file=sys.stderr)
    if args.resume:
        previous, done = read_previous(args, tag_names, sha256)
        results = {**previous, **results}
        n_done = len([path for path in paths if path in done])
        paths = [path for path in paths if path not in done]
        print(f"resuming: {n_done} file(s) already tagged in the outputs, {len(paths)} to tag",
              file=sys.stderr)
    png_paths = dict(zip(paths, taggram_paths(args.taggram, paths))) if args.taggram and paths else {}
    tagged = tag_all(paths, args.workers, model, tag_names, norm_mean, norm_std, args.hop_frames, batch_size)
    bar = tqdm(total=len(paths), unit="file", disable=args.quiet or len(paths) <= BAR_ABOVE_N_FILES)
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
                text = format_tags(path, result, args.top)
                if path in png_paths:
                    save_taggram(png_paths[path], result["window_probs"], result["starts"],
                                 result["duration_s"], tag_names,  # a name that is not UTF-8: \xNN
                                 os.fsencode(Path(path).name).decode(errors="backslashreplace"))
                    text += f"\n  taggram: {png_paths[path]}"
                if not args.quiet:
                    tqdm.write(text)
            if time.monotonic() - last_save >= SAVE_EVERY_S:  # a killed run keeps all but this much
                save_outputs(args, results, tag_names)
                last_save = time.monotonic()
        save_outputs(args, results, tag_names)
    except (KeyboardInterrupt, plumbing.WorkersKeepDying) as stop:
        bar.close()
        save_outputs(args, results, tag_names)
        rest = "; rerun with --resume to tag the rest" if outputs(args) else ""
        if isinstance(stop, plumbing.WorkersKeepDying):
            raise SystemExit(f"error: {stop}: out of memory? The files tagged so far are saved{rest}; "
                             "free memory or lower --workers") from None
        plumbing.exit_interrupted(stop, f"interrupted; the files tagged so far are saved{rest}")
    finally:
        bar.close()
        tagged.close()  # stops the worker pool
    for output in outputs(args).values():
        print(f"wrote {output}", file=sys.stderr)
    if failed:
        raise SystemExit(f"error: {len(failed)} of {len(paths) + len(skipped)} files could not be tagged "
                         f"({', '.join(failed[:3])}{', ...' if len(failed) > 3 else ''})")
    return results


if __name__ == "__main__":  # SIGTERM and SIGHUP stop it as Ctrl-C does: what is tagged is saved
    plumbing.run_script(main, "interrupted: each output holds its last complete save, if any; rerun with "
                              "--resume to go on", quick_exit=True)
