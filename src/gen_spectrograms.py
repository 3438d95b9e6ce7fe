"""Stage 2: MTAT audio -> log-mel spectrograms, one row per annotation row.

    python src/gen_spectrograms.py                       # all clips of data/, 8 workers
    python src/gen_spectrograms.py --limit 1000 --workers 2

Reads DATA/annotations_final.csv and the audio at DATA/mp3/<mp3_path>; writes
DATA/spectrograms.npy, shape (N, 128, 628), row i = annotation row i, and
DATA/spectrograms.json (feature parameters, dtype, library versions, N, and the clips
that could not be decoded: their rows are zeros, as in the original).

Resumable: while it runs, rows go into DATA/spectrograms.partial.npy and the rows done
so far into DATA/spectrograms.progress.json; after a crash or Ctrl-C, rerun the same
command and only the missing rows are computed. A larger --limit than a finished file's
keeps the finished rows. spectrograms.npy and .json appear only when every row is done
(the .json is written last), and a finished file is left alone unless --overwrite.
"""
import argparse
import hashlib
import json
import os
import signal
import sys
import tempfile
import time
import warnings
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm

import common

SAVE_EVERY_S = 5.0  # the progress file is rewritten at most this often (and on exit)
COPY_ROWS = 256  # rows per chunk when a finished or partial file is carried over to a new N


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=Path("data"),
                   help="folder with annotations_final.csv and mp3/; the outputs go here too "
                        "(default: data)")
    p.add_argument("--workers", type=int, default=8,
                   help="worker processes, one clip at a time each; more than the CPU cores "
                        "gains nothing (default: 8, as the original)")
    p.add_argument("--limit", type=int, default=None,
                   help="only the first N annotation rows (default: all)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                   help="storage type of spectrograms.npy; float16 halves the file (4.2 GB for "
                        "MTAT) and keeps log-mel to within 0.016 (default: float16)")
    p.add_argument("--overwrite", action="store_true",
                   help="compute every row again, replacing a finished or partial file")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be at least 1")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be at least 1")
    return args


# -----------------------------------------------------------------------------
# The workers: each opens the output memmap once and writes its rows straight into it
out_rows = None  # the worker's (N, N_MELS, N_FRAMES) memmap of the partial file
blas_limit = None  # kept so the one-thread BLAS limit lives as long as the worker


def init_worker(partial_path):
    """Pool initializer: ignore Ctrl-C (the main process stops the pool), one BLAS
    thread per worker, and open the output file for writing."""
    global out_rows, blas_limit
    from threadpoolctl import threadpool_limits

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # librosa retries a file soundfile cannot open with audioread and warns twice; the
    # failure itself is reported with its error in the .json and on the console
    warnings.filterwarnings("ignore", message="PySoundFile failed", category=UserWarning)
    warnings.filterwarnings("ignore", message=".*audioread", category=FutureWarning)
    # librosa's mel projection (an einsum on OpenBLAS) runs several times slower with 2
    # threads than with 1 on a loaded 2-core machine, and W workers x T threads would
    # oversubscribe the cores; the parallelism is across clips instead
    blas_limit = threadpool_limits(limits=1)
    out_rows = np.load(partial_path, mmap_mode="r+")


def extract(task):
    """(row, audio path) -> (row, None), or (row, 'error text') after writing zeros."""
    row, path = task
    try:
        out_rows[row] = common.log_mel(path)
        return row, None
    except Exception as error:  # any decoder error: the row stays zeros, the run goes on
        out_rows[row] = 0
        return row, error_text(error, path)


def error_text(error, path):
    """One line saying why a clip could not be decoded (with soundfile's reason when
    librosa's audioread fallback failed too)."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        return "empty file (0 bytes)"
    causes = [error] if error.__context__ is None else [error, error.__context__]
    return "; ".join(f"{type(e).__name__}: {e}".rstrip(": ") for e in causes)


def warm_up():
    """Compute one log-mel of 1 s of silence, in the main process before the pool starts.

    librosa's first load imports scipy.signal and compiles its numba functions: about
    3 s per process, or 30+ s when numba's on-disk cache is cold (a fresh install).
    Paid here once, the forked workers inherit it instead of each paying it, and the
    cache gets written once rather than by every worker at the same time.
    """
    import soundfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "silence.wav"
        soundfile.write(path, np.zeros(16000, np.float32), 16000)  # 16 kHz: resampled, as MTAT
        common.log_mel(path)


# -----------------------------------------------------------------------------
# Files and progress
def write_json(path, obj):
    """Write obj as JSON to path atomically (temp file in the same folder, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def paths_md5(mp3_paths):
    """MD5 of the clips' paths, in order: which rows a file holds."""
    return hashlib.md5("\n".join(mp3_paths).encode()).hexdigest()


def settings_of(n_clips, dtype, mp3_paths):
    """What a spectrogram file was made with; equal settings = the same rows and values."""
    return dict(common.feature_params(), dtype=dtype, n_clips=n_clips,
                mp3_paths_md5=paths_md5(mp3_paths[:n_clips]))


def can_carry_over(old, new, mp3_paths):
    """True when the rows of a file made with settings `old` are valid rows of `new`:
    same features and dtype, and its clips are the first of the new ones."""
    differ = [k for k in list(common.feature_params()) + ["dtype"] if old.get(k) != new[k]]
    return (not differ and old.get("n_clips", 0) <= new["n_clips"]
            and old.get("mp3_paths_md5") == paths_md5(mp3_paths[:old["n_clips"]]))


def describe(settings):
    return f"{settings.get('n_clips')} clips, {settings.get('dtype')}"


def read_partial(files):
    """Settings, done rows and failures of an interrupted run (its progress file), or None
    when there is none or its partial file does not have the shape and dtype it records."""
    if not files["partial"].is_file() or not files["progress"].is_file():
        return None
    state = json.loads(files["progress"].read_text())
    try:
        rows = np.load(files["partial"], mmap_mode="r")
    except ValueError:  # not a .npy (a crash while it was created)
        return None
    shape = (state["n_clips"], common.N_MELS, common.N_FRAMES)
    return state if rows.shape == shape and str(rows.dtype) == state["dtype"] else None


def create_partial(partial, settings, source=None):
    """Create the output file for `settings`, all zeros, or starting with the rows of the
    finished or partial .npy `source`; made under a temp name, then renamed."""
    tmp = partial.with_name(partial.name + ".tmp")
    shape = (settings["n_clips"], common.N_MELS, common.N_FRAMES)
    rows = np.lib.format.open_memmap(tmp, mode="w+", dtype=settings["dtype"], shape=shape)
    if source is not None:
        old_rows = np.load(source, mmap_mode="r")
        for start in range(0, len(old_rows), COPY_ROWS):  # in chunks: memory stays bounded
            stop = min(start + COPY_ROWS, len(old_rows))
            rows[start:stop] = old_rows[start:stop]
        del old_rows
    rows.flush()
    del rows
    os.replace(tmp, partial)


def save_progress(files, settings, done, failed):
    """Flush the rows written so far to disk, then record which they are."""
    fd = os.open(files["partial"], os.O_RDONLY)
    try:
        os.fsync(fd)  # the workers' pages first, so that a recorded row is on disk
    finally:
        os.close(fd)
    write_json(files["progress"], dict(settings, done=np.flatnonzero(done).tolist(), failed=failed))


def prepare(args, settings, mp3_paths, files):
    """Decide where this run starts: resume an interrupted run, extend a finished file
    with fewer rows, or start afresh; leaves the partial file and progress ready.

    Returns (done, failed): bool ndarray (N,) of the rows already computed and the list
    of failures among them; None when the finished file already matches (nothing to do).
    """
    def say(message):
        print(message, file=sys.stderr)

    if args.overwrite:  # earlier partial work goes; a finished pair stays until replaced
        files["partial"].unlink(missing_ok=True)
        files["progress"].unlink(missing_ok=True)
    done, failed = np.zeros(settings["n_clips"], bool), []
    state = read_partial(files)
    if state is not None and can_carry_over(state, settings, mp3_paths):
        say(f"resuming {files['partial']}: {len(state['done'])} clips of {describe(state)} done")
        if state["n_clips"] != settings["n_clips"]:
            say(f"extending it to {describe(settings)}")
            create_partial(files["partial"], settings, source=files["partial"])
        done[state["done"]] = True
        failed = state["failed"]
    else:
        if files["partial"].exists():
            why = ("has no matching progress file" if state is None else
                   f"was started with {describe(state)} (or other features or clips)")
            say(f"{files['partial']} {why}; this run asks for {describe(settings)}: starting again")
        finished = None
        if files["json"].is_file() and files["npy"].is_file() and not args.overwrite:
            finished = json.loads(files["json"].read_text())
        if finished is None:
            create_partial(files["partial"], settings)
        elif {k: finished.get(k) for k in settings} == settings:
            print(f"{files['npy']} is already complete ({describe(finished)}, "
                  f"{len(finished['failed'])} failed); nothing to do "
                  "(--overwrite computes it again)")
            return None
        elif can_carry_over(finished, settings, mp3_paths):
            say(f"extending {files['npy']} ({describe(finished)}) to {describe(settings)}")
            create_partial(files["partial"], settings, source=files["npy"])
            done[:finished["n_clips"]] = True
            failed = finished["failed"]
        else:
            raise SystemExit(f"error: {files['npy']} is complete with {describe(finished)}; "
                             f"this run asks for {describe(settings)} (or other features or "
                             "clips) and would replace it: pass --overwrite to do so, or use "
                             "another --data-dir")
    save_progress(files, settings, done, failed)
    return done, failed


def finish(files, settings, failed):
    """Turn the partial file into the finished pair; the .json last, so it means complete."""
    import librosa
    import soundfile

    files["json"].unlink(missing_ok=True)
    os.replace(files["partial"], files["npy"])
    versions = dict(librosa=librosa.__version__, numpy=np.__version__,
                    soundfile=soundfile.__version__)
    shape = [settings["n_clips"], common.N_MELS, common.N_FRAMES]
    write_json(files["json"], dict(settings, shape=shape, versions=versions,
                                   failed=sorted(failed, key=lambda f: f["row"])))
    files["progress"].unlink(missing_ok=True)


def run_pool(args, todo, files, settings, done, failed, clip_ids, mp3_paths):
    """Compute the rows `todo` ((row, audio path) pairs) with a pool of workers, marking
    them in `done` and adding failures to `failed` as they come; progress is saved every
    SAVE_EVERY_S and on Ctrl-C (which ends the run with exit code 130)."""
    saved_at = time.monotonic()
    n_clips = len(done)
    bar = tqdm(total=n_clips, initial=n_clips - len(todo), desc="log-mel", unit="clip",
               smoothing=0.05)
    pool = Pool(min(args.workers, max(len(todo), 1)), initializer=init_worker,
                initargs=(str(files["partial"]),))
    try:
        for row, error in pool.imap_unordered(extract, todo):
            done[row] = True
            if error is not None:
                failed.append(dict(row=int(row), clip_id=int(clip_ids[row]), path=mp3_paths[row],
                                   error=error))
                if len(failed) <= 10:  # all of them are in the .json
                    bar.write(f"failed: row {row}, {mp3_paths[row]}: {error}", file=sys.stderr)
            bar.update()
            if time.monotonic() - saved_at > SAVE_EVERY_S:
                save_progress(files, settings, done, failed)
                saved_at = time.monotonic()
        pool.close()
    except KeyboardInterrupt:
        pool.terminate()
        pool.join()
        bar.close()
        save_progress(files, settings, done, failed)
        again = "the same command without --overwrite" if args.overwrite else "the same command"
        print(f"interrupted: {done.sum()} of {n_clips} clips done, kept in {files['partial']}; "
              f"rerun {again} to resume", file=sys.stderr)
        raise SystemExit(130)
    pool.join()
    bar.close()


# -----------------------------------------------------------------------------
def main(argv=None):
    """Run stage 2. Returns dict(n_clips, n_computed, n_failed, seconds, clips_per_s)."""
    args = parse_args(argv)
    csv_path, audio_dir = args.data_dir / "annotations_final.csv", args.data_dir / "mp3"
    for path, what in ((csv_path, "the MTAT annotations"), (audio_dir, "the audio folder")):
        if not path.exists():
            raise SystemExit(f"error: {path} ({what}) not found; download MTAT first: "
                             f"python src/get_data.py --data-dir {args.data_dir}")
    try:
        clip_ids, _, _, mp3_paths = common.read_annotations(csv_path)
    except ValueError as error:
        raise SystemExit(f"error: {error}; download it again: python src/get_data.py") from None
    n_clips = len(mp3_paths) if args.limit is None else min(args.limit, len(mp3_paths))
    settings = settings_of(n_clips, args.dtype, mp3_paths)
    files = {name: args.data_dir / f"spectrograms{suffix}" for name, suffix in (
        ("npy", ".npy"), ("json", ".json"), ("partial", ".partial.npy"),
        ("progress", ".progress.json"))}

    try:  # Ctrl-C here loses nothing: files are only ever renamed into place
        start = prepare(args, settings, mp3_paths, files)
        if start is None:
            return dict(n_clips=n_clips, n_computed=0, n_failed=None, seconds=0.0,
                        clips_per_s=None)
        t0 = time.perf_counter()
        warm_up()
    except KeyboardInterrupt:
        print("interrupted before this run computed any clip; nothing lost", file=sys.stderr)
        raise SystemExit(130)
    done, failed = start
    todo = [(row, str(audio_dir / mp3_paths[row])) for row in np.flatnonzero(~done)]
    run_pool(args, todo, files, settings, done, failed, clip_ids, mp3_paths)
    seconds = time.perf_counter() - t0
    finish(files, settings, failed)
    clips_per_s = len(todo) / seconds
    print(f"wrote {files['npy']}: {n_clips} clips x {common.N_MELS} x {common.N_FRAMES} "
          f"{args.dtype}, {len(failed)} failed (listed in {files['json'].name}); computed "
          f"{len(todo)} clips in {seconds:.1f} s with {args.workers} workers: "
          f"{clips_per_s:.1f} clips/s")
    return dict(n_clips=n_clips, n_computed=len(todo), n_failed=len(failed), seconds=seconds,
                clips_per_s=clips_per_s)


if __name__ == "__main__":
    main()
