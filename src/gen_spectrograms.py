"""Stage 2: MTAT audio -> log-mel spectrograms, one row per annotation row.

    python src/gen_spectrograms.py             # all clips of data/, 8 workers (at most the cores)
    python src/gen_spectrograms.py --limit 1000 --workers 2

Reads DATA/annotations_final.csv (or .csv.gz) and the audio at DATA/mp3/<mp3_path>; writes
DATA/spectrograms.npy, shape (N, 128, 628), row i = annotation row i, and
DATA/spectrograms.json (feature parameters, dtype, library versions, N, and the clips
that could not be decoded: their rows are zeros, as in the original).

Resumable: while it runs, rows go into DATA/spectrograms.partial.npy and the rows done
so far into DATA/spectrograms.progress.json (every few seconds); after a crash or Ctrl-C,
rerun the same command and only the missing rows are computed. A larger --limit than a
finished file's keeps the finished rows. spectrograms.npy and .json appear only when every
row is done (the .json is written last), and a finished file is left alone unless
--overwrite; one found damaged (cut short) gets its lost rows computed again.

Faults: the output's disk space is reserved before the first clip (a full disk is refused
up front, with the size needed and free). A worker process that dies (the out-of-memory
killer, kill -9) is noticed: the clips it may have held are computed again one at a time
in a fresh pool, and a clip that kills its worker again is listed as failed. One run at a
time writes a data folder's spectrograms (DATA/spectrograms.lock, an OS lock); a row that
holds NaN or inf never counts as done.
"""
import argparse
import contextlib
import errno
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

import common
import formats
import plumbing

SAVE_EVERY_S = 5.0  # the progress file is rewritten this often while rows come in (and on exit)
COPY_ROWS = 256  # rows per chunk when a finished or partial file is carried over to a new N
DEFAULT_WORKERS = 8  # the original's


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=Path("data"),
                   help="folder with annotations_final.csv (or .csv.gz) and mp3/; the outputs go here too "
                        "(default: data)")
    p.add_argument("--workers", type=int, default=None,
                   help=f"worker processes, one clip at a time each (default: {DEFAULT_WORKERS}, the "
                        "original's, or the CPU cores this process may use if fewer: more workers "
                        "than cores is slower, docs/gen_spectrograms.md#speed). More than the "
                        "cores, given here, is used as given, with a note")
    p.add_argument("--limit", type=int, default=None,
                   help="only the first N annotation rows (default: all)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                   help="storage type of spectrograms.npy; float16 halves the file, at the "
                        "precision docs/gen_spectrograms.md states (default: float16)")
    p.add_argument("--resampler", choices=common.RESAMPLERS, default="soxr_hq",
                   help="to 11,025 Hz: soxr_hq (librosa 0.11's default) or kaiser_best (resampy, librosa's "
                        "default in 2018: the original's features; slower, and a file is resampled whole) "
                        "(default: soxr_hq)")
    p.add_argument("--overwrite", action="store_true",
                   help="compute every row again, replacing a finished or partial file")
    args = p.parse_args(argv)
    cores = plumbing.usable_cores()
    if args.workers is None:
        args.workers = min(DEFAULT_WORKERS, cores)
    elif args.workers < 1:
        p.error("--workers must be at least 1")
    elif args.workers > cores:  # honoured, so that benchmark.py can measure what it costs
        print(f"note: --workers {args.workers} is more than the {cores} CPU cores this process "
              f"may use; {cores} would be faster", file=sys.stderr)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be at least 1")
    return args


# -----------------------------------------------------------------------------
# The workers (plumbing.pool_results): each opens the output memmap once and writes its
# rows straight into it
out_rows = None  # the worker's (N, N_MELS, N_FRAMES) memmap of the partial file


def init_worker(partial_path):
    """Quiet librosa's fallback warnings (a failure is reported with its error in the .json
    and on the console) and open the output file for writing."""
    global out_rows
    warnings.filterwarnings("ignore", message="PySoundFile failed", category=UserWarning)
    warnings.filterwarnings("ignore", message=".*audioread", category=FutureWarning)
    out_rows = np.load(partial_path, mmap_mode="r+")


def extract(task):
    """(row, audio path) -> (row, None), or (row, 'error text') after writing zeros (a
    clip that cannot be decoded, or whose row would hold NaN or inf)."""
    row, path = task
    try:
        with warnings.catch_warnings():  # numpy's overflow warnings: the row is reported as failed
            warnings.simplefilter("ignore", RuntimeWarning)
            out_rows[row] = common.log_mel(path)
        if not np.isfinite(out_rows[row]).all():  # audio so loud that its power overflows
            raise ValueError("its log-mel holds NaN or inf (the audio's power overflows float32)")
        return row, None
    except Exception as error:  # any decoder error: the row stays zeros, the run goes on
        out_rows[row] = 0
        return row, error_text(error, path)


def error_text(error, path):
    """One line saying why a clip could not be decoded (its path is beside it in the .json)."""
    message = str(error).removeprefix(f"{path}: ")
    return message if isinstance(error, ValueError) else f"{type(error).__name__}: {message}".rstrip(": ")


def warm_up():
    """Compute one log-mel of 1 s of silence, in the main process before the pool starts.

    librosa's first load imports scipy.signal and compiles its numba functions: seconds
    per process, more when numba's on-disk cache is cold (a fresh install).
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
def read_json(path, keys, fix):
    """The JSON object in path, which must have `keys`; one line (SystemExit) saying `fix`
    when it is not valid JSON or lacks one of them."""
    try:
        obj = plumbing.read_json(path)
    except ValueError as error:
        raise SystemExit(f"error: {error}; {fix}") from None
    missing = [key for key in keys if key not in obj]
    if missing:
        raise SystemExit(f"error: {path} lacks {', '.join(missing)}; {fix}")
    return obj


def can_carry_over(old, new, mp3_paths):
    """True when the rows of a file made with settings `old` are valid rows of `new`:
    same features and dtype, and its clips are the first of the new ones."""
    differ = [k for k in list(common.feature_params()) + ["dtype"] if old.get(k) != new[k]]
    return (not differ and old.get("n_clips", 0) <= new["n_clips"]
            and old.get("mp3_paths_md5") == formats.paths_md5(mp3_paths[:old["n_clips"]]))


def describe(settings):
    return f"{settings.get('n_clips')} clips, {settings.get('dtype')}"


def size_text(n_bytes):
    return f"{n_bytes / 2**30:,.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:,.1f} MiB"


def no_space(path, n_bytes, reason):
    """The line that refuses to start when the output does not fit on its disk."""
    free = shutil.disk_usage(path.parent).free
    return (f"error: cannot reserve {size_text(n_bytes)} for {path}: {reason}; {size_text(free)} "
            "free there. Free some space (or use another --data-dir) and rerun: rows already "
            "computed are kept")


def reserve(path):
    """Allocate the disk blocks of the file at path now. A memmap on a sparse file reserves
    nothing: a full disk would show up later as SIGBUS in a worker writing its row. Here it
    is one line (SystemExit) before any clip is computed."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as error:
        if error.errno in plumbing.DISK_ERRORS:
            raise SystemExit(no_space(path, size, os.strerror(error.errno))) from None
        if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # these: cannot reserve here
            raise
    finally:
        os.close(fd)


def leading_rows(path, n_rows):
    """The first n_rows rows of the .npy file at path, memory-mapped read-only (its header
    must be readable; the file may be cut short after those rows)."""
    shape, dtype, _, offset = plumbing.npy_header(path)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(n_rows,) + shape[1:])


def intact_rows(npy, meta):
    """(n, damage): how many leading rows of the finished file npy have all their bytes
    (meta["n_clips"] when it is whole, fewer when it was cut short, 0 when its header is
    gone) and what is wrong with it (None: nothing). SystemExit when its header describes
    another array than its .json: then nothing in it can be trusted."""
    shape = (meta["n_clips"], common.N_MELS, common.N_FRAMES)
    try:
        plumbing.check_npy(npy, shape, meta["dtype"])
        return meta["n_clips"], None
    except ValueError as error:
        damage = str(error)
    try:
        found_shape, dtype, fortran_order, offset = plumbing.npy_header(npy)
    except ValueError:
        return 0, damage
    if found_shape != shape or dtype != np.dtype(meta["dtype"]) or fortran_order:
        raise SystemExit(f"error: {damage}, but its .json says {describe(meta)}: the pair does "
                         "not belong together; pass --overwrite to compute it again")
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    return min(meta["n_clips"], max(os.path.getsize(npy) - offset, 0) // row_bytes), damage


def read_partial(files):
    """(state, None): the settings, done rows and failures of an interrupted run (its
    progress file); or (None, why it cannot be resumed); (None, None) when there is none."""
    if not files["partial"].is_file():
        return None, None
    if not files["progress"].is_file():
        return None, "has no progress file"
    try:
        state = plumbing.read_json(files["progress"])
    except ValueError as error:
        return None, f"cannot be resumed: {error}"
    if not {"n_clips", "dtype", "done", "failed"} <= set(state):
        return None, f"cannot be resumed: {files['progress']} lacks the rows done"
    try:
        plumbing.check_npy(files["partial"], (state["n_clips"], common.N_MELS, common.N_FRAMES),
                         state["dtype"])
    except (ValueError, TypeError) as error:
        return None, f"cannot be resumed: {error}"
    return state, None


def create_partial(partial, settings, source_rows=None):
    """Create the output file for `settings`, all zeros, or starting with the rows
    `source_rows` (an array (n, N_MELS, N_FRAMES), e.g. a memmap of the file it replaces);
    its disk space reserved first; made under a temp name, then renamed."""
    tmp = partial.with_name(partial.name + ".tmp")
    shape = (settings["n_clips"], common.N_MELS, common.N_FRAMES)
    n_bytes = math.prod(shape) * np.dtype(settings["dtype"]).itemsize
    if n_bytes > shutil.disk_usage(partial.parent).free:
        raise SystemExit(no_space(partial, n_bytes, "not enough free space"))
    try:
        rows = np.lib.format.open_memmap(tmp, mode="w+", dtype=settings["dtype"], shape=shape)
        reserve(tmp)
        if source_rows is not None:
            for start in range(0, len(source_rows), COPY_ROWS):  # in chunks: memory stays bounded
                stop = min(start + COPY_ROWS, len(source_rows))
                rows[start:stop] = source_rows[start:stop]
        rows.flush()
        del rows
        os.replace(tmp, partial)
    except OSError as error:  # a file-size limit, or a disk that filled meanwhile
        tmp.unlink(missing_ok=True)
        if error.errno in plumbing.DISK_ERRORS:
            raise SystemExit(no_space(partial, n_bytes, os.strerror(error.errno))) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_progress(files, settings, done, failed):
    """Flush the rows written so far to disk, then record which they are."""
    fd = os.open(files["partial"], os.O_RDONLY)
    try:
        os.fsync(fd)  # the workers' pages first, so that a recorded row is on disk
    except OSError as error:
        if plumbing.disk_error_in(error) is None:
            raise
        raise SystemExit(f"error: {plumbing.disk_error_text(files['partial'], error)}; the rows "
                         f"recorded in {files['progress']} are kept: rerun to resume") from None
    finally:
        os.close(fd)
    plumbing.write_json(files["progress"], dict(settings, done=np.flatnonzero(done).tolist(), failed=failed))


def prepare(args, settings, mp3_paths, files):
    """Decide where this run starts: resume an interrupted run, extend a finished file
    with fewer rows or repair a damaged one, or start afresh; leaves the partial file
    (its disk space reserved) and progress ready.

    Returns (done, failed): bool ndarray (N,) of the rows already computed and the list
    of failures among them; None when the finished file already matches (nothing to do).
    """
    def say(message):
        print(message, file=sys.stderr)

    if args.overwrite:  # earlier partial work goes; a finished pair stays until replaced
        files["partial"].unlink(missing_ok=True)
        files["progress"].unlink(missing_ok=True)
    done, failed = np.zeros(settings["n_clips"], bool), []
    state, why_not = read_partial(files)
    if state is not None and can_carry_over(state, settings, mp3_paths):
        say(f"resuming {files['partial']}: {len(state['done'])} clips of {describe(state)} done")
        if state["n_clips"] != settings["n_clips"]:
            say(f"extending it to {describe(settings)}")
            create_partial(files["partial"], settings,
                           leading_rows(files["partial"], state["n_clips"]))
        else:
            reserve(files["partial"])  # a partial file of an older version may be sparse
        done[state["done"]] = True
        failed = state["failed"]
    else:
        if files["partial"].exists():
            why = why_not or f"was started with {describe(state)} (or other features or clips)"
            say(f"{files['partial']} {why}; this run asks for {describe(settings)}: starting again")
        finished = None
        if files["json"].is_file() and files["npy"].is_file() and not args.overwrite:
            finished = read_json(files["json"], ["n_clips", "dtype", "failed"],
                                 f"{files['npy'].name} cannot be trusted without it: pass "
                                 "--overwrite to compute it again")
        if finished is None:
            create_partial(files["partial"], settings)
        elif not can_carry_over(finished, settings, mp3_paths):
            raise SystemExit(f"error: {files['npy']} is complete with {describe(finished)}; "
                             f"this run asks for {describe(settings)} (or other features or "
                             "clips) and would replace it: pass --overwrite to do so, or use "
                             "another --data-dir")
        else:
            n_intact, damage = intact_rows(files["npy"], finished)
            # a value that is not finite is damage too (failed clips' rows are zeros)
            bad = formats.non_finite_rows(leading_rows(files["npy"], n_intact)) if n_intact else []
            if damage is not None:
                say(f"{damage}; its first {n_intact} rows are whole: computing the other "
                    f"{finished['n_clips'] - n_intact} again")
            if len(bad):
                say(f"{files['npy']} holds NaN or inf in {len(bad)} row(s) (the first: row {bad[0]}): "
                    "computing them again")
            if damage is None and not len(bad):
                if {k: finished.get(k) for k in settings} == settings:
                    print(f"{files['npy']} is already complete ({describe(finished)}, "
                          f"{len(finished['failed'])} failed); nothing to do "
                          "(--overwrite computes it again)")
                    return None
                say(f"extending {files['npy']} ({describe(finished)}) to {describe(settings)}")
            create_partial(files["partial"], settings,
                           leading_rows(files["npy"], n_intact) if n_intact else None)
            done[:n_intact] = True
            done[bad] = False
            failed = [f for f in finished["failed"] if f["row"] < n_intact]
    save_progress(files, settings, done, failed)
    return done, failed


def finish(files, settings, done, failed, annotations_md5):
    """Turn the partial file into the finished pair; the .json last, so it means complete
    (and records annotations_md5, the MD5 of the annotations file it was made from). A row
    that holds NaN or inf is not complete: it is marked to do again and the run stops.
    When the .json cannot be written (a full disk) the partial file is put back: the rerun
    that follows finds every row done."""
    import librosa
    import soundfile

    bad = formats.non_finite_rows(np.load(files["partial"], mmap_mode="r"))
    if len(bad):  # every row was checked as it was computed: damaged on disk since?
        done[bad] = False
        save_progress(files, settings, done, failed)
        raise SystemExit(f"error: {files['partial']} holds NaN or inf in {len(bad)} row(s) (the first: "
                         f"row {bad[0]}), so it is not complete; rerun the same command to compute them again")
    files["json"].unlink(missing_ok=True)
    os.replace(files["partial"], files["npy"])
    versions = dict(librosa=librosa.__version__, numpy=np.__version__,
                    soundfile=soundfile.__version__)
    try:
        plumbing.write_json(files["json"], formats.spectrogram_meta(settings, failed, versions=versions,
                                                                    annotations_md5=annotations_md5))
    except BaseException:
        os.replace(files["npy"], files["partial"])
        raise
    files["progress"].unlink(missing_ok=True)


# -----------------------------------------------------------------------------
# The pool
def run_pool(args, todo, files, settings, done, failed, clip_ids, mp3_paths):
    """Compute the rows `todo` ((row, audio path) pairs) in plumbing.pool_results's worker
    processes (one clip in flight per worker), marking them in `done` and adding failures to
    `failed` as they come.

    Progress is saved every SAVE_EVERY_S while rows come in (the pool ticks when none
    does, so a stalled clip cannot hold back rows already done) and on every exit. A worker
    that dies costs a retry of its clip alone; one that kills its worker again is listed
    as failed. Workers that keep dying stop the run (exit 1: something kills any worker);
    Ctrl-C or SIGTERM stops it (exit 128 + the signal). A rerun resumes either.
    """
    n_clips = len(done)
    saved_at = time.monotonic()
    bar = tqdm(total=n_clips, initial=n_clips - len(todo), desc="log-mel", unit="clip",
               smoothing=0.05)

    def describe(task):
        return f"row {task[0]} ({mp3_paths[task[0]]})"

    results = plumbing.pool_results(extract, todo, min(args.workers, len(todo)), init_worker,
                                    (str(files["partial"]),), tick_s=SAVE_EVERY_S, describe=describe)
    try:
        with contextlib.closing(results):
            for item in results:
                if item is not None:  # None: a tick, no clip finished meanwhile
                    index, result = item  # extract's (row, error text or None), or WorkerDied
                    error = str(result) if isinstance(result, Exception) else result[1]
                    record(todo[index][0], error, done, failed, clip_ids, mp3_paths, bar)
                if time.monotonic() - saved_at >= SAVE_EVERY_S:
                    save_progress(files, settings, done, failed)
                    saved_at = time.monotonic()
    except plumbing.WorkersKeepDying as error:
        bar.close()
        stop_after_deaths(files, settings, done, failed, [todo[i][0] for i in error.tasks], error)
    except KeyboardInterrupt as interrupt:
        bar.close()
        save_progress(files, settings, done, failed)
        again = "the same command without --overwrite" if args.overwrite else "the same command"
        print(f"interrupted: {done.sum()} of {n_clips} clips done, kept in {files['partial']}; "
              f"rerun {again} to resume", file=sys.stderr)
        raise SystemExit(plumbing.exit_code(interrupt))
    finally:
        bar.close()
    save_progress(files, settings, done, failed)  # on disk before the .json says complete


def record(row, error, done, failed, clip_ids, mp3_paths, bar):
    """Mark a row done; a failure is listed (and the first ten said on the console)."""
    done[row] = True
    if error is not None:
        failed.append(dict(row=int(row), clip_id=int(clip_ids[row]), path=mp3_paths[row], error=error))
        if len(failed) <= 10:  # all of them are in the .json
            bar.write(f"failed: row {row}, {mp3_paths[row]}: {error}", file=sys.stderr)
    bar.update()


def stop_after_deaths(files, settings, done, failed, rows, error):
    """Stop the run in one line: full pools died twice with no clip finished in between, so
    something kills any worker (memory?). Clips that died alone meanwhile are not blamed
    (they go back to the rows to compute); the rest of the progress is saved."""
    blamed = set(rows)
    failed[:] = [f for f in failed if f["row"] not in blamed]
    done[list(blamed)] = False
    save_progress(files, settings, done, failed)
    raise SystemExit(f"error: {error}; none of them is listed as failed: out of memory? "
                     f"{done.sum()} of {len(done)} clips are kept in {files['partial']}; free memory "
                     "or lower --workers, then rerun the same command to resume")


# -----------------------------------------------------------------------------
@plumbing.releasing_locks
def main(argv=None):
    """Run stage 2. Returns dict(n_clips, n_computed, n_failed, seconds, clips_per_s)."""
    args = parse_args(argv)
    csv_path, audio_dir = formats.annotations_path(args.data_dir), args.data_dir / "mp3"
    for path, what in ((csv_path, "the MTAT annotations"), (audio_dir, "the audio folder")):
        if not path.exists():
            raise SystemExit(f"error: {path} ({what}) not found; download MTAT first: "
                             f"python src/get_data.py --data-dir {args.data_dir}")
    try:
        clip_ids, _, _, mp3_paths = common.read_annotations(csv_path)
    except ValueError as error:
        raise SystemExit(f"error: {error}; download it again: python src/get_data.py") from None
    n_clips = len(mp3_paths) if args.limit is None else min(args.limit, len(mp3_paths))
    common.RESAMPLER = args.resampler  # the workers (forked) compute with it, the settings record it
    settings = formats.spectrogram_settings(n_clips, args.dtype, mp3_paths)
    files = {name: args.data_dir / f"spectrograms{suffix}" for name, suffix in (
        ("npy", ".npy"), ("json", ".json"), ("partial", ".partial.npy"),
        ("progress", ".progress.json"))}
    plumbing.check_folder(args.data_dir, "--data-dir")  # the outputs go there: writable, before any clip
    plumbing.hold_lock(args.data_dir / "spectrograms.lock", files["npy"], "use another --data-dir")

    try:  # Ctrl-C here loses nothing: files are only ever renamed into place
        start = prepare(args, settings, mp3_paths, files)
        if start is None:
            return dict(n_clips=n_clips, n_computed=0, n_failed=None, seconds=0.0,
                        clips_per_s=None)
        t0 = time.perf_counter()
        warm_up()
    except KeyboardInterrupt as interrupt:
        print("interrupted before this run computed any clip; nothing lost", file=sys.stderr)
        raise SystemExit(plumbing.exit_code(interrupt))
    done, failed = start
    todo = [(row, str(audio_dir / mp3_paths[row])) for row in np.flatnonzero(~done)]
    run_pool(args, todo, files, settings, done, failed, clip_ids, mp3_paths)
    seconds = time.perf_counter() - t0
    finish(files, settings, done, failed, plumbing.file_digest(csv_path))
    clips_per_s = len(todo) / seconds
    print(f"wrote {files['npy']}: {n_clips} clips x {common.N_MELS} x {common.N_FRAMES} "
          f"{args.dtype}, {len(failed)} failed (listed in {files['json'].name}); computed "
          f"{len(todo)} clips in {seconds:.1f} s with {args.workers} workers: "
          f"{clips_per_s:.1f} clips/s")
    return dict(n_clips=n_clips, n_computed=len(todo), n_failed=len(failed), seconds=seconds,
                clips_per_s=clips_per_s)


if __name__ == "__main__":  # SIGTERM and SIGHUP stop it as Ctrl-C does
    plumbing.run_script(main, "interrupted: the rows computed are kept; rerun the same command to resume")
