"""What keeps a long run correct when a disk fills, a process is killed or a file is damaged, for every
script: atomic writes and locks, signals, flags checked when parsed, a worker pool with one policy for
deaths. torch is imported where it is used, so that get_data.py and every --help start without it."""
import argparse
import atexit
import collections
import contextlib
import ctypes
import errno
import fcntl
import functools
import gzip
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
from tqdm import tqdm

# Files: atomic writes, disk errors, output places checked before work, one writer each
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS)
UMASK = os.umask(0o022)  # read once, at import: os.umask reads it only by setting it, which
os.umask(UMASK)          # would race with another thread creating a file


def disk_error_text(path, error):  # one line: what, where, how much room is left
    reason = os.strerror(error.errno) if getattr(error, "errno", None) else str(error).splitlines()[0]
    try:
        free = f"; {shutil.disk_usage(Path(path).parent).free / 2**20:,.0f} MiB free there"
    except OSError:
        free = ""
    return f"cannot write {path}: {reason}{free}"


def in_chain(error, matches):
    """The first exception in error's chain of causes that matches, or None: torch.save wraps them."""
    while error is not None and not matches(error):
        error = error.__cause__ or error.__context__
    return error


def disk_error_in(error):  # the OSError of DISK_ERRORS in error's chain of causes, or None
    return in_chain(error, lambda e: isinstance(e, OSError) and e.errno in DISK_ERRORS)


@contextlib.contextmanager
def atomic_write(path, mode="w", **open_kwargs):
    """Write `path` whole or not at all: f, a temporary file beside it (mkstemp: exclusive, no symbolic
    link), is fsynced and renamed over path, or removed on any error (Ctrl-C too). A DISK_ERRORS error,
    even wrapped, is SystemExit in one line; a wrapped interrupt is raised as itself."""
    path, tmp = Path(path), None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".tmp", dir=path.parent)
        with open(fd, mode, **open_kwargs) as f:
            os.fchmod(fd, 0o666 & ~UMASK)  # not mkstemp's 0o600: the file is the user's output
            yield f
            f.flush()
            os.fsync(fd)
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            with contextlib.suppress(OSError):  # the clean-up must not hide the first error
                os.unlink(tmp)
        interrupt = in_chain(error, lambda e: isinstance(e, KeyboardInterrupt))
        if interrupt is not None and interrupt is not error:
            raise interrupt from None
        cause = disk_error_in(error)
        if cause is not None:
            raise SystemExit(f"error: {disk_error_text(path, cause)}; the previous "
                             f"{path.name}, if any, is unchanged") from None
        raise


def write_json(path, obj, indent=1):  # atomically; NaN refused: it is not JSON
    with atomic_write(path) as f:
        f.write(json.dumps(obj, indent=indent, allow_nan=False) + "\n")


def read_json(path):  # the JSON object in the file at path; ValueError naming the file when it is not one
    try:
        obj = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if isinstance(obj, dict):
        return obj
    raise ValueError(f"{path} is not valid JSON of this project (not an object)")


def check_folder(path, flag):
    """Path(path), an output folder made if missing and checked writable; else SystemExit naming flag."""
    path = Path(path)
    existing = next((p for p in [path, *path.parents] if p.exists()), path)
    if existing.exists() and not existing.is_dir():
        raise SystemExit(f"error: {flag} {path}: {existing} is a file, not a folder; name a folder "
                         "(it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # what a write needs: the permission bits do not
            pass                                # say it on a read-only file system, or for root
    except OSError as error:
        raise SystemExit(f"error: {flag} {path}: cannot write there ({error.strerror or error}); "
                         f"choose a folder you can write in") from None
    return path


def check_file(path, flag):
    """Path(path), an output file's place checked: not a folder, in one check_folder passes."""
    path = Path(path)
    if path.is_dir():
        raise SystemExit(f"error: {flag} {path} is a folder; name a file (in it, or anywhere else)")
    check_folder(path.parent, flag)
    return path


def file_key(path):  # what names one file: its inode when it exists (links too), else its real path
    with contextlib.suppress(OSError):
        stat = os.stat(path)
        return stat.st_dev, stat.st_ino
    return os.path.realpath(path)


def check_distinct(outputs, inputs):
    """SystemExit in one line, before any work, when an output ({flag: path}) is an input ({what: paths})
    or another output: as spelt differently, through a link, or not made yet."""
    taken = {file_key(path): f"{what} {path}" for what, paths in inputs.items() for path in paths}
    for flag, path in outputs.items():
        if file_key(path) in taken:
            raise SystemExit(f"error: {flag} {path}: the same file as {taken[file_key(path)]}, which it "
                             f"would overwrite; name another file for {flag}")
        taken[file_key(path)] = f"{flag} {path}"


held_locks = {}  # lock file path -> (the descriptor holding this process's lock, remove_empty_folder)


def hold_lock(lock_path, what, flag, remove_empty_folder=False):
    """Be the only writer of `what` until this process ends or releases it: an exclusive flock on lock_path,
    which names the holder (pid, command); the system drops it even on kill -9, so a lock file left is never
    stale. No flock: a note. remove_empty_folder: on release, also remove the folder if empty. SystemExit
    (`flag`: what to change) when another process holds it, lock_path is a link, or the write fails."""
    lock_path = Path(lock_path)
    if lock_path in held_locks:
        return
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as error:
            if lock_path.is_symlink():
                raise SystemExit(f"error: {lock_path} is a symbolic link, not a lock file of this "
                                 "program; remove it") from None
            raise SystemExit(f"error: cannot lock {what}: cannot write {lock_path} "
                             f"({error.strerror or error}); {flag}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # ENOLCK, ENOTSUP
                os.close(fd)
                print(f"note: {lock_path}: this file system cannot lock ({error.strerror}): make sure no "
                      f"other process writes {what} meanwhile", file=sys.stderr)
                return
            holder = os.pread(fd, 1000, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise SystemExit(f"error: {what} is being written by {holder} (lock {lock_path}); wait for "
                             f"it to finish or stop it, or {flag}") from None
        with contextlib.suppress(OSError):  # its previous holder may have removed it meanwhile
            if os.stat(lock_path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    held_locks[lock_path] = fd, remove_empty_folder
    command = " ".join([Path(sys.argv[0]).name] + sys.argv[1:])[:300]
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} ({command})\n".encode(errors="replace"))
    except OSError as error:
        text = disk_error_text(lock_path, error)  # before release_lock may remove the folder
        release_lock(lock_path)
        if error.errno not in DISK_ERRORS:
            raise
        raise SystemExit(f"error: cannot lock {what}: {text}; free some space there, or {flag}") from None


def release_lock(lock_path):  # its file removed first: one that opened it meanwhile opens a new one
    fd, remove_empty_folder = held_locks.pop(Path(lock_path), (None, False))
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.unlink(lock_path)
    os.close(fd)
    if remove_empty_folder:
        with contextlib.suppress(OSError):  # not empty: it holds what the process wrote
            Path(lock_path).parent.rmdir()


@atexit.register
def release_locks():
    for lock_path in list(held_locks):
        release_lock(lock_path)


def releasing_locks(main):
    """Decorate a script's main: the locks it takes are released when it ends (a test finds them free)."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        before = set(held_locks)
        try:
            return main(*args, **kwargs)
        finally:
            for lock_path in [p for p in held_locks if p not in before]:
                release_lock(lock_path)
    return wrapper


def npy_header(path):  # (shape, dtype, fortran_order, data offset) from a .npy file's header; else ValueError
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, fortran_order, dtype = read(f)
            return shape, dtype, fortran_order, f.tell()
    except ValueError as error:  # no magic string, or a header cut short or garbled
        raise ValueError(f"{path} has no valid .npy header ({error})") from None


def check_npy(path, shape, dtype):
    """ValueError unless path holds a whole C-order array of shape and dtype (np.load maps a cut file)."""
    shape, dtype = tuple(shape), np.dtype(dtype)
    found_shape, found_dtype, fortran_order, offset = npy_header(path)
    if found_shape != shape or found_dtype != dtype or fortran_order:
        raise ValueError(f"{path} holds {found_dtype} {found_shape}"
                         f"{' in Fortran order' if fortran_order else ''}, expected {dtype} {shape}")
    expected, size = offset + math.prod(shape) * dtype.itemsize, os.path.getsize(path)
    if size != expected:
        raise ValueError(f"{path} is damaged: {size:,} bytes, where its header ({dtype} {shape}) needs "
                         f"{expected:,} ({'cut short' if size < expected else 'extra bytes at the end'})")


def file_digest(paths, algorithm="md5", progress=None):
    """Hex digest of a file or a list of them, streamed (a *.gz's content); progress: a bar's label."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    gzipped = [str(path).endswith(".gz") for path in paths]
    total = None if not progress or any(gzipped) else sum(map(os.path.getsize, paths))
    digest = hashlib.new(algorithm)
    with tqdm(desc=progress, total=total, unit="B", unit_scale=True, unit_divisor=1024,
              disable=not progress) as bar:
        for path, gz in zip(paths, gzipped):
            with (gzip.open if gz else open)(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
                    bar.update(len(chunk))
    return digest.hexdigest()


# Signals: SIGTERM and SIGHUP end a script the way Ctrl-C does
class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, as a KeyboardInterrupt: every clean-up written for Ctrl-C runs."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_interrupted(interrupt, message):
    """`message` on stderr, then exit with the code a shell reports: 128 + the signal (130 for Ctrl-C)."""
    print(message, file=sys.stderr)
    raise SystemExit(128 + getattr(interrupt, "signum", signal.SIGINT)) from None


def run_script(main, interrupted, quick_exit=False):
    """A script's entry point: main(), SIGTERM (kill, a batch system's limit) and SIGHUP (a closed terminal)
    raising Interrupted; an interrupt main does not handle ends with the line `interrupted`. quick_exit:
    flush, release the locks and os._exit, skipping the slow teardown of torch, scipy and numba."""
    def interrupt(signum, frame):
        raise Interrupted(signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)
    code = 0
    try:
        try:
            main()
        except KeyboardInterrupt as interrupt:
            exit_interrupted(interrupt, f"\n{interrupted}")
    except SystemExit as stop:
        if not quick_exit:
            raise
        code = stop.code
    if not quick_exit:
        return
    if isinstance(code, str):  # what Python does with SystemExit("error: ...")
        print(code, file=sys.stderr)
        code = 1
    release_locks()
    with contextlib.suppress(OSError):  # a closed pipe (| head): nothing left to say
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code or 0)


# Command-line values (checked at parse time, before any work) and optional matplotlib
def parsed(text, convert, what):  # convert(text) (float or int), else argparse's error `not {what}: 'text'`
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None


def float_in(low, high, low_closed=False, high_closed=False):
    """An argparse type: a float from low to high, each end open unless closed; NaN is in no interval."""
    def parse(text):
        value = parsed(text, float, "a number")
        above = value >= low if low_closed else value > low
        below = value <= high if high_closed else value < high
        if not (above and below):
            interval = f"{'[' if low_closed else '('}{low:g}, {high:g}{']' if high_closed else ')'}"
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value
    return parse


def at_least(minimum):  # an argparse type: an integer of at least `minimum`
    def parse(text):
        value = parsed(text, int, "an integer")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def import_pyplot():  # matplotlib.pyplot drawing into files (Agg: no display), or None: it is optional
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    from matplotlib import pyplot
    return pyplot


# The worker pool: gen_spectrograms.py's and predict.py's, with one policy
def usable_cores():  # the cores this process may run on: its affinity mask where the OS has one
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class WorkerDied(Exception):
    """What pool_results yields for a task whose worker died while running it alone."""


class WorkersKeepDying(Exception):
    """Full pools died twice with no task finished in between: not one task kills them. .tasks: in flight."""

    def __init__(self, tasks, described):
        super().__init__(f"worker processes keep dying (twice with no task finished in between; "
                         f"in flight: {described})")
        self.tasks = tasks


blas_limit = None  # a worker's one-thread BLAS limit, kept alive as long as the worker


def start_worker(parent_pid, initializer, initargs):
    """Every worker's start: Ctrl-C ignored, SIGTERM/SIGHUP default (the main process stops the pool),
    death with the main process, one BLAS thread (the parallelism is across tasks), the initializer."""
    global blas_limit
    from threadpoolctl import threadpool_limits

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    try:  # after the main process's kill -9, orphans would wait forever, holding memory
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != parent_pid:  # it died before the call above
            os._exit(1)
    except (OSError, AttributeError):  # not Linux: orphans wait, as they do without this
        pass
    blas_limit = threadpool_limits(limits=1)
    if initializer is not None:
        initializer(*initargs)


def pool_results(fn, tasks, workers, initializer=None, initargs=(), ordered=False, ahead=1,
                 tick_s=None, describe=str):
    """fn(task) for every task in `workers` forked processes, at most ahead x workers in flight or waiting:
    yields (index, result) as tasks finish (in task order when `ordered`; fn's exception as its result; with
    tick_s, None after tick_s s without one). A dead worker's tasks in flight run again alone, named in a
    warning (describe); one dying again yields WorkerDied; two full pools dying with no task finished between
    raise WorkersKeepDying. Its end, an error or close() (call it on Ctrl-C) kills its workers."""
    context = multiprocessing.get_context("fork")
    todo, suspects, held = collections.deque(range(len(tasks))), collections.deque(), {}
    next_out, streak, full_deaths = 0, [], 0  # tasks lost, full-pool deaths, since a task finished
    pool = others = None

    def names(indices):
        indices = sorted(set(indices))
        return ", ".join(describe(tasks[i]) for i in indices[:6]) + (
            f" and {len(indices) - 6} more" if len(indices) > 6 else "")

    def release():  # what is finished, in task order when ordered
        nonlocal next_out
        while held and not ordered:
            index = next(iter(held))
            yield index, held.pop(index)
        while next_out in held:
            yield next_out, held.pop(next_out)
            next_out += 1

    try:
        while todo or suspects:
            alone = bool(suspects)  # a suspect runs alone: if its worker dies, it did it
            source, limit = (suspects, 1) if alone else (todo, ahead * workers)
            others = multiprocessing.active_children()  # not this pool's workers (see the end)
            pool = ProcessPoolExecutor(1 if alone else workers, mp_context=context, initializer=start_worker,
                                       initargs=(os.getpid(), initializer, initargs))
            in_flight, lost, broken = {}, [], False
            while (source or in_flight) and not broken:
                while source and (len(in_flight) + (0 if alone else len(held)) < limit or (
                        ordered and not alone and source[0] == next_out)):  # the one awaited
                    try:
                        in_flight[pool.submit(fn, tasks[source[0]])] = source[0]
                    except BrokenProcessPool:  # a worker died since the last wait
                        broken = True
                        break
                    source.popleft()
                done, _ = wait(in_flight, timeout=0 if broken else tick_s, return_when=FIRST_COMPLETED)
                if broken or any(isinstance(f.exception(), BrokenProcessPool) for f in done):
                    broken = True
                    done = wait(in_flight)[0]  # a broken pool fails all its futures at once
                if not done and not broken:
                    yield None
                for future in done:
                    index = in_flight.pop(future)
                    error = future.exception()
                    if isinstance(error, BrokenProcessPool):
                        lost.append(index)
                        continue
                    held[index] = error if error is not None else future.result()
                    streak, full_deaths = [], 0
                yield from release()
            pool.shutdown(wait=True)
            pool = None
            if not broken:
                continue
            streak += lost
            if alone:
                for index in lost:
                    held[index] = WorkerDied(
                        "its worker process died twice while computing it, the second time "
                        "alone (killed by the system, out of memory?, or crashed in the decoder)")
                yield from release()
                continue
            full_deaths += 1
            if full_deaths == 2:
                raise WorkersKeepDying(sorted(set(streak)), names(streak))
            tqdm.write("a worker process died (killed: out of memory? kill -9?) with " + (
                f"{names(lost)} in flight; computing them again, one at a time, " if lost
                else "nothing in flight; going on ") + "in a fresh pool", file=sys.stderr)
            suspects.extend(sorted(lost))
        yield from release()
    finally:
        if pool is not None:  # an error or Ctrl-C on the way out: no worker outlives it
            # SIGKILL: one just forked may still hold our SIGTERM handler. Before Python 3.14's
            # kill_workers, the workers are this process's children but `others`
            if hasattr(pool, "kill_workers"):
                pool.kill_workers()
            else:
                for process in multiprocessing.active_children():
                    if process not in others:
                        process.kill()
            pool.shutdown(wait=True, cancel_futures=True)
