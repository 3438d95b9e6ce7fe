"""Stage 2: MTAT audio -> log-mel spectrograms, one row per annotation row (docs/gen_spectrograms.md).

    python src/gen_spectrograms.py             # all clips of data/, 8 workers (at most the cores)
    python src/gen_spectrograms.py --limit 1000 --workers 2

Reads DATA/annotations_final.csv (or .csv.gz) and DATA/mp3/; writes DATA/spectrograms.npy and its .json,
which lists the undecodable clips (zero rows). A rerun after a crash computes only the missing rows.
"""
import argparse
import contextlib
import errno
import functools
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
out_rows = None  # each worker's (N, N_MELS, N_FRAMES) memmap of the partial file, opened once


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=Path("data"),
                   help="folder with annotations_final.csv(.gz) and mp3/; outputs go here (default: data)")
    p.add_argument("--workers", type=plumbing.at_least(1), default=None,
                   help=f"worker processes (default: {DEFAULT_WORKERS}, or the usable CPU cores if fewer)")
    p.add_argument("--limit", type=plumbing.at_least(1), default=None, help="only the first N rows")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                   help="storage type of spectrograms.npy; float16 halves the file (default: float16)")
    p.add_argument("--resampler", choices=common.RESAMPLERS, default="soxr_hq",
                   help="to 11,025 Hz: soxr_hq (librosa's default) or kaiser_best (the original's, slower)")
    p.add_argument("--overwrite", action="store_true", help="compute every row again, replacing any outputs")
    args = p.parse_args(argv)
    cores = plumbing.usable_cores()
    if args.workers is None:
        args.workers = min(DEFAULT_WORKERS, cores)
    elif args.workers > cores:  # honoured, so that benchmark.py can measure what it costs
        print(f"note: --workers {args.workers} is more than the {cores} CPU cores this process may use; "
              f"{cores} would be faster", file=sys.stderr)
    return args


def init_worker(partial_path):
    """Quiet librosa's fallback warnings (a failure is reported with its error) and open the output."""
    global out_rows
    warnings.filterwarnings("ignore", message="PySoundFile failed", category=UserWarning)
    warnings.filterwarnings("ignore", message=".*audioread", category=FutureWarning)
    out_rows = np.load(partial_path, mmap_mode="r+")


def extract(task):
    """(row, audio path) -> (row, None), or (row, why) after writing zeros: undecodable, or NaN or inf."""
    row, path = task
    try:
        with warnings.catch_warnings():  # numpy's overflow warnings: the row is reported as failed
            warnings.simplefilter("ignore", RuntimeWarning)
            out_rows[row] = common.log_mel(path)
        return row, None
    except Exception as error:  # any decoder error: the row stays zeros, the run goes on
        out_rows[row] = 0
        message = str(error).removeprefix(f"{path}: ")  # the path is beside it in the .json
        return row, message if isinstance(error, ValueError) else f"{type(error).__name__}: {message}"


def describe(settings):
    return f"{settings.get('n_clips')} clips, {settings.get('dtype')}"


def can_carry_over(old, new, mp3_paths):
    """Whether the rows of a file of settings `old` are the first rows of `new` (features, dtype, clips)."""
    return (all(old.get(k) == new[k] for k in list(common.feature_params()) + ["dtype"])
            and isinstance(old.get("n_clips"), int) and 0 < old["n_clips"] <= new["n_clips"]
            and old.get("mp3_paths_md5") == formats.paths_md5(mp3_paths[:old["n_clips"]]))


def no_space(path, n_bytes, reason):
    def size(n):
        return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"
    free = size(shutil.disk_usage(path.parent).free)
    return (f"error: cannot reserve {size(n_bytes)} for {path}: {reason}; {free} free there. Free some space "
            "(or use another --data-dir) and rerun: rows already computed are kept")


def leading_rows(path, n_rows):
    """The first n_rows rows of the .npy at path, a read-only memmap (the file may end after them)."""
    shape, dtype, _, offset = plumbing.npy_header(path)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(n_rows,) + shape[1:])


def intact_rows(npy, meta):
    """(n, damage): how many leading rows of the finished file are whole, what is wrong with it (or None)."""
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
        raise SystemExit(f"error: {damage}, but its .json says {describe(meta)}: the pair does not belong "
                         "together; pass --overwrite to compute it again")
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    return min(meta["n_clips"], max(os.path.getsize(npy) - offset, 0) // row_bytes), damage


def failures_of(n, failed):
    """Whether `failed` lists failures as this code writes them: rows of n clips, each with its error."""
    return type(n) is int and isinstance(failed, list) and all(
        isinstance(f, dict) and type(f.get("row")) is int and 0 <= f["row"] < n
        and isinstance(f.get("error"), str) for f in failed)


def read_progress(files):
    """(state: an interrupted run's settings, done and failed, checked in full, or None; why not, or None)."""
    if not files["partial"].is_file():
        files["progress"].unlink(missing_ok=True)  # left by a kill after finish's rename: of no use
        return None, None
    try:
        state = plumbing.read_json(files["progress"])
        n, done = state.get("n_clips"), state.get("done")
        if not (failures_of(n, state.get("failed")) and isinstance(done, list)
                and all(type(row) is int and 0 <= row < n for row in done)):
            raise ValueError(f"{files['progress']} does not hold rows of its {n!r} clips")
        plumbing.check_npy(files["partial"], (n, common.N_MELS, common.N_FRAMES), state.get("dtype"))
    except (OSError, ValueError, TypeError) as error:
        return None, f"cannot be resumed ({type(error).__name__}: {error})"
    return state, None


def create_partial(partial, settings, source_rows=None):
    """The partial file of `settings`: source_rows (n, N_MELS, N_FRAMES) then zeros, its space reserved."""
    shape = (settings["n_clips"], common.N_MELS, common.N_FRAMES)
    n_bytes = math.prod(shape) * np.dtype(settings["dtype"]).itemsize
    if n_bytes > shutil.disk_usage(partial.parent).free:
        raise SystemExit(no_space(partial, n_bytes, "not enough free space"))
    fd, tmp = tempfile.mkstemp(dir=partial.parent, prefix=f".{partial.name}.", suffix=".tmp")
    try:
        rows = np.lib.format.open_memmap(tmp, mode="w+", dtype=settings["dtype"], shape=shape)
        # allocate the disk blocks now: a sparse memmap on a full disk is a SIGBUS in a worker, later
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        except OSError as error:
            if error.errno in plumbing.DISK_ERRORS:
                reason = os.strerror(error.errno)
                raise SystemExit(no_space(Path(tmp), os.fstat(fd).st_size, reason)) from None
            if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # these: cannot reserve here
                raise
        n_source = 0 if source_rows is None else len(source_rows)
        for start in range(0, n_source, COPY_ROWS):  # in chunks: memory stays bounded
            rows[start:min(start + COPY_ROWS, n_source)] = source_rows[start:start + COPY_ROWS]
        rows.flush()
        del rows
        os.replace(tmp, partial)
    except BaseException as error:
        os.unlink(tmp)
        if isinstance(error, OSError) and error.errno in plumbing.DISK_ERRORS:  # a size limit, a full disk
            raise SystemExit(no_space(partial, n_bytes, os.strerror(error.errno))) from None
        raise
    finally:
        os.close(fd)


def save_progress(files, settings, done, failed):
    """Flush the rows written so far to disk, then record which they are."""
    fd = os.open(files["partial"], os.O_RDONLY)
    try:
        os.fsync(fd)  # the workers' pages first, so that a recorded row is on disk
    except OSError as error:
        if plumbing.disk_error_in(error) is None:
            raise
        raise SystemExit(f"error: {plumbing.disk_error_text(files['partial'], error)}; the rows recorded in "
                         f"{files['progress']} are kept: rerun to resume") from None
    finally:
        os.close(fd)
    plumbing.write_json(files["progress"], dict(settings, done=np.flatnonzero(done).tolist(), failed=failed))


def prepare(args, settings, mp3_paths, files):
    """Resume, extend, repair or start afresh -> (done: bool (N,), failed) so far; None: nothing to do."""
    say = functools.partial(print, file=sys.stderr)
    if args.overwrite:  # earlier partial work goes (read_progress drops its record); a finished pair stays
        files["partial"].unlink(missing_ok=True)
    done, failed = np.zeros(settings["n_clips"], bool), []
    state, why_not = read_progress(files)
    if state is not None and can_carry_over(state, settings, mp3_paths):
        say(f"resuming {files['partial']}: {len(state['done'])} clips of {describe(state)} done")
        if state["n_clips"] != settings["n_clips"]:
            say(f"extending it to {describe(settings)}")
            create_partial(files["partial"], settings, leading_rows(files["partial"], state["n_clips"]))
        done[state["done"]] = True
        failed = state["failed"]
    else:
        if files["partial"].exists():
            why = why_not or f"was started with {describe(state)} (or other features or clips)"
            say(f"{files['partial']} {why}; this run asks for {describe(settings)}: removing it")
            files["partial"].unlink()  # a finished pair may need no new one: none stays behind
            files["progress"].unlink(missing_ok=True)
        finished = None
        if files["json"].is_file() and files["npy"].is_file() and not args.overwrite:
            fix = f"{files['npy'].name} cannot be trusted without it: pass --overwrite to compute it again"
            try:
                finished = plumbing.read_json(files["json"])
            except ValueError as error:
                raise SystemExit(f"error: {error}; {fix}") from None
            if (version := finished.get("format_version")) != formats.SPECTROGRAMS_FORMAT:
                raise SystemExit(f"error: {files['json']} is of format {version}, this code writes "
                                 f"{formats.SPECTROGRAMS_FORMAT}; {fix}")
            if not failures_of(finished.get("n_clips"), finished.get("failed")) or "dtype" not in finished:
                raise SystemExit(f"error: {files['json']} lacks n_clips, dtype or the failed rows as this "
                                 f"code writes them; {fix}")
        if finished is None:
            create_partial(files["partial"], settings)
        elif not can_carry_over(finished, settings, mp3_paths):
            raise SystemExit(f"error: {files['npy']} is complete with {describe(finished)}; this run asks "
                             f"for {describe(settings)} (or other features or clips) and would replace it: "
                             "pass --overwrite to do so, or use another --data-dir")
        else:
            n_intact, damage = intact_rows(files["npy"], finished)
            intact = leading_rows(files["npy"], n_intact) if n_intact else None
            bad = formats.non_finite_rows(intact) if n_intact else []  # NaN or inf: damage too
            if damage is not None:
                say(f"{damage}; its first {n_intact} rows are whole: computing the other "
                    f"{finished['n_clips'] - n_intact} again")
            if len(bad):
                say(f"{files['npy']} holds NaN or inf in {len(bad)} row(s) (the first: row {bad[0]}): "
                    "computing them again")
            if damage is None and not len(bad):
                if {k: finished.get(k) for k in settings} == settings:
                    print(f"{files['npy']} is already complete ({describe(finished)}, "
                          f"{len(finished['failed'])} failed); nothing to do (--overwrite computes it again)")
                    return None
                say(f"extending {files['npy']} ({describe(finished)}) to {describe(settings)}")
            create_partial(files["partial"], settings, intact)
            done[:n_intact] = True
            done[bad] = False
            failed = [f for f in finished["failed"] if f["row"] < n_intact]
    save_progress(files, settings, done, failed)
    return done, failed


def finish(files, settings, done, failed, annotations_md5):
    """The partial file -> the finished pair, the .json first (a rerun completes a kill before the rename)."""
    import librosa
    import soundfile
    bad = formats.non_finite_rows(np.load(files["partial"], mmap_mode="r"))
    if len(bad):  # every row was checked as it was computed: damaged on disk since?
        done[bad] = False
        save_progress(files, settings, done, failed)
        raise SystemExit(f"error: {files['partial']} holds NaN or inf in {len(bad)} row(s) (the first: row "
                         f"{bad[0]}), so it is not complete; rerun the same command to compute them again")
    versions = dict(librosa=librosa.__version__, numpy=np.__version__, soundfile=soundfile.__version__)
    files["npy"].unlink(missing_ok=True)  # the old rows go before the new .json says complete
    plumbing.write_json(files["json"], formats.spectrogram_meta(settings, failed, versions=versions,
                                                                annotations_md5=annotations_md5))
    os.replace(files["partial"], files["npy"])
    files["progress"].unlink(missing_ok=True)


def run_pool(args, todo, files, settings, done, failed, clip_ids, mp3_paths):
    """Compute `todo` ((row, audio path) pairs) into done and failed, saved every SAVE_EVERY_S and on exit."""
    saved_at = time.monotonic()
    bar = tqdm(total=len(done), initial=len(done) - len(todo), desc="log-mel", unit="clip", smoothing=0.05)
    results = plumbing.pool_results(extract, todo, min(args.workers, len(todo)), init_worker,
                                    (str(files["partial"]),), tick_s=SAVE_EVERY_S,
                                    describe=lambda task: f"row {task[0]} ({mp3_paths[task[0]]})")
    try:
        with contextlib.closing(results):
            for item in results:
                if item is not None:  # None: a tick, no clip finished meanwhile
                    index, result = item  # extract's (row, error text or None), or WorkerDied
                    row, error = todo[index][0], str(result) if isinstance(result, Exception) else result[1]
                    done[row] = True
                    if error is not None:
                        failed.append(dict(row=int(row), clip_id=int(clip_ids[row]), path=mp3_paths[row],
                                           error=error))
                        if len(failed) <= 10:  # all of them are in the .json
                            bar.write(f"failed: row {row}, {mp3_paths[row]}: {error}", file=sys.stderr)
                    bar.update()  # last: a Ctrl-C in it finds the row recorded whole
                if time.monotonic() - saved_at >= SAVE_EVERY_S:
                    save_progress(files, settings, done, failed)
                    saved_at = time.monotonic()
    except plumbing.WorkersKeepDying as error:  # something kills any worker: none of them is blamed
        blamed = {todo[i][0] for i in error.tasks}
        failed[:] = [f for f in failed if f["row"] not in blamed]
        done[list(blamed)] = False
        save_progress(files, settings, done, failed)
        raise SystemExit(f"error: {error}; none of them is listed as failed: out of memory? {done.sum()} of "
                         f"{len(done)} clips are kept in {files['partial']}; free memory or lower --workers, "
                         "then rerun the same command to resume") from None
    except KeyboardInterrupt as interrupt:
        bar.close()
        save_progress(files, settings, done, failed)
        again = "the same command without --overwrite" if args.overwrite else "the same command"
        plumbing.exit_interrupted(interrupt, f"interrupted: {done.sum()} of {len(done)} clips done, kept in "
                                             f"{files['partial']}; rerun {again} to resume")
    finally:
        bar.close()
    save_progress(files, settings, done, failed)  # on disk before the .json says complete


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
        ("npy", ".npy"), ("json", ".json"), ("partial", ".partial.npy"), ("progress", ".progress.json"))}
    plumbing.check_folder(args.data_dir, "--data-dir")  # the outputs go there: writable, before any clip
    plumbing.hold_lock(args.data_dir / "spectrograms.lock", files["npy"], "use another --data-dir")
    try:  # Ctrl-C here loses nothing: files are only ever renamed into place
        start = prepare(args, settings, mp3_paths, files)
        if start is None:
            return dict(n_clips=n_clips, n_computed=0, n_failed=None, seconds=0.0, clips_per_s=None)
        t0 = time.perf_counter()
        common.warm_up()  # librosa's imports and numba compilation, once, before the workers fork
    except KeyboardInterrupt as interrupt:
        plumbing.exit_interrupted(interrupt, "interrupted before this run computed any clip; nothing lost")
    done, failed = start
    todo = [(row, str(audio_dir / mp3_paths[row])) for row in np.flatnonzero(~done)]
    run_pool(args, todo, files, settings, done, failed, clip_ids, mp3_paths)
    seconds = time.perf_counter() - t0
    finish(files, settings, done, failed, plumbing.file_digest(csv_path))
    print(f"wrote {files['npy']}: {n_clips} clips x {common.N_MELS} x {common.N_FRAMES} {args.dtype}, "
          f"{len(failed)} failed (listed in {files['json'].name}); computed {len(todo)} clips in "
          f"{seconds:.1f} s with {args.workers} workers: {len(todo) / seconds:.1f} clips/s")
    return dict(n_clips=n_clips, n_computed=len(todo), n_failed=len(failed), seconds=seconds,
                clips_per_s=len(todo) / seconds)


if __name__ == "__main__":  # SIGTERM and SIGHUP stop it as Ctrl-C does
    plumbing.run_script(main, "interrupted: the rows computed are kept; rerun the same command to resume")
