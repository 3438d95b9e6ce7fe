"""Stage 1: get MagnaTagATune into DATA/annotations_final.csv and DATA/mp3/<mp3_path>.

Downloads mp3.zip.001..003 and annotations_final.csv with resume, checks both MD5s and extracts into
DATA/mp3/. A rerun picks up finished and `.part` files; on a complete DATA/ it touches no network.

    python src/get_data.py                        # download into data/
    python src/get_data.py --from-dir ~/mtat      # files already downloaded
    python src/get_data.py --synthetic 64        # a small demo set in data/demo
"""
import argparse
import bisect
import contextlib
import errno
import io
import itertools
import re
import shutil
import socket
import time
import zipfile
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import requests
from tqdm import tqdm

import plumbing  # no torch: --help and downloads start at once

HOSTS = ["https://mirg.city.ac.uk/datasets/magnatagatune/",  # the default host
         "http://mi.soi.city.ac.uk/datasets/magnatagatune/"]  # the older one, which the original code used
ANNOTATIONS = "annotations_final.csv"
ARCHIVE = "mp3.zip"
PARTS = ["mp3.zip.001", "mp3.zip.002", "mp3.zip.003"]  # a zip split by byte concatenation
MD5 = {ARCHIVE: "f12add0eb4cd6c2a3ab7e4afaf7b7467",  # of the three parts concatenated
       ANNOTATIONS: "f04fa01752a8cc64f6e1ca142a0fef1d"}
# the most bytes a file may have: MTAT's annotations exactly; a part, at most the whole archive (~2.7 GB)
MAX_BYTES = {ANNOTATIONS: 21_517_373, **{name: 3 << 30 for name in PARTS}}
VERIFIED = ARCHIVE + ".verified"  # marker (JSON): these parts passed the MD5 check
RETRIES = 5  # tries of a host in a row without progress (a host name that does not resolve: one)
BACKOFF_S = 2.0  # wait before retry k is BACKOFF_S * 2**k seconds, at most 60
TIMEOUT_S = 60  # seconds to connect, and of silence while reading
CHUNK_BYTES = 1 << 20  # read/write unit: bounds memory whatever the file size


def fetch(url, part):
    """Stream url into part, resuming with 'Range: bytes=K-' (a 200 rewrites it), retrying network errors
    and 5xx with back-off. -> None, or why url failed for good: 4xx, unresolved host, RETRIES failures."""
    failures, name = 0, part.name[:-len(".part")]
    while True:
        have = part.stat().st_size if part.exists() else 0
        total = None
        headers = {"Accept-Encoding": "identity"}  # offsets and Content-Length count the file's own bytes
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with requests.get(url, headers=headers, stream=True, timeout=TIMEOUT_S) as r:
                if r.status_code == 416 and have:  # asked past the end: done, or a stale part
                    if r.headers.get("Content-Range", "").rpartition("/")[2] == str(have):
                        return
                    part.unlink()
                    continue
                if r.status_code >= 500:
                    raise requests.ConnectionError(f"HTTP {r.status_code} {r.reason}")
                if r.status_code not in (200, 206):
                    return f"{url}: HTTP {r.status_code} {r.reason}"
                start = 0
                if r.status_code == 206:
                    sent = re.match(r"bytes (\d+)-", r.headers.get("Content-Range", ""))
                    if not sent or int(sent.group(1)) != have:  # not what we asked: start over
                        part.unlink()
                        continue
                    start = have
                length = r.headers.get("Content-Length")
                total = start + int(length) if length is not None else None
                with open(part, "ab" if start else "wb") as f, \
                        tqdm(desc=name, total=total, initial=start,
                             unit="B", unit_scale=True, unit_divisor=1024) as bar:
                    for chunk in r.iter_content(CHUNK_BYTES):
                        if f.tell() + len(chunk) > MAX_BYTES[name]:  # a body that never ends: the disk fills
                            part.unlink()
                            return (f"{url}: {urlsplit(url).hostname} sends more than the "
                                    f"{MAX_BYTES[name]:,} bytes of {name}: not MTAT's file")
                        f.write(chunk)
                        bar.update(len(chunk))
                if total is not None and part.stat().st_size != total:
                    raise requests.ConnectionError(f"body ended at {part.stat().st_size} of {total} bytes")
                return
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            unresolved = plumbing.in_chain(e, lambda cause: isinstance(cause, socket.gaierror))
            if unresolved is not None:  # offline, or no such host: it stays so
                return f"{url}: the host name {urlsplit(url).hostname} does not resolve ({unresolved})"
            size = part.stat().st_size if part.exists() else 0
            if total is not None and size > total:  # longer than the file: useless
                part.unlink()
                size = 0
            failures = 0 if size > have else failures + 1  # progress earns fresh tries
            if failures >= RETRIES:
                errno_text = re.search(r"\[Errno -?\d+\][^'\")]*", str(e))  # '[Errno 111] Connection refused'
                reason = errno_text.group(0).strip() if errno_text else str(e)[:200]
                return f"{url}: failed after {RETRIES} tries ({reason})"
            time.sleep(min(BACKOFF_S * 2 ** failures, 60))


def download(name, hosts, part):
    """Fetch file name into part from the first host that serves it; else exit naming each URL and why."""
    failures = []
    for host in hosts:
        url = host.rstrip("/") + "/" + name
        print(f"trying {url}", flush=True)
        failures.append(fetch(url, part))
        if failures[-1] is None:
            return
    raise SystemExit(f"error: could not download {name}: {'; '.join(failures)}. Check the "
                     "network or point --base-url at a mirror; a rerun resumes the download")


def get_annotations(data_dir, hosts, from_dir):
    """DATA/annotations_final.csv, verified: fetched or copied to `.part`, checked, then renamed."""
    path = data_dir / ANNOTATIONS
    if path.exists():
        actual = plumbing.file_digest(path, progress=f"md5 {path.name}")
        if actual != MD5[ANNOTATIONS]:
            raise SystemExit(f"error: {path} is not MTAT's annotations (MD5 {actual}, expected "
                             f"{MD5[ANNOTATIONS]}; a --synthetic demo set or a damaged copy?): "
                             "delete it or choose another --data-dir, and rerun")
        return path
    part = path.with_name(path.name + ".part")
    if from_dir:
        shutil.copyfile(from_dir / ANNOTATIONS, part)
    else:
        download(ANNOTATIONS, hosts, part)
    actual = plumbing.file_digest(part, progress=f"md5 {part.name}")
    if actual != MD5[ANNOTATIONS]:
        if from_dir:
            part.unlink()
            fix = f"replace {from_dir / ANNOTATIONS} with MTAT's file, or drop --from-dir"
        else:
            part.replace(path.with_name(ANNOTATIONS + ".bad"))
            fix = f"kept as {ANNOTATIONS}.bad for inspection; rerun to download it again"
        raise SystemExit(f"error: MD5 mismatch for {ANNOTATIONS}: expected {MD5[ANNOTATIONS]}, "
                         f"got {actual}; {fix}")
    part.replace(path)
    print(f"{path}: MD5 verified")
    return path


def get_archive(data_dir, hosts, from_dir):
    """The paths of the verified archive parts: in DATA/, else in --from-dir, else downloaded into DATA/."""
    paths = []
    for name in PARTS:
        path = data_dir / name
        if not path.exists() and from_dir:
            path = from_dir / name
        if not path.exists():
            part = path.with_name(path.name + ".part")
            download(name, hosts, part)
            part.replace(path)  # complete, though only the concatenation has an MD5
        paths.append(path)
    marker = data_dir / VERIFIED
    stamps = {"md5": MD5[ARCHIVE], "parts": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns]
                                             for p in paths]}
    with contextlib.suppress(ValueError):  # the marker only saves rereading 2.7 GB; damaged: check again
        if marker.exists() and plumbing.read_json(marker) == stamps:
            return paths
    actual = plumbing.file_digest(paths, progress=f"md5 {paths[0].name}")
    if actual != MD5[ARCHIVE]:
        marker.unlink(missing_ok=True)
        ours = [p for p in paths if p.parent == data_dir]
        for p in ours:  # which part is bad cannot be told: none stays under its final name
            p.replace(p.with_name(p.name + ".bad"))
        theirs = [str(p) for p in paths if p.parent != data_dir]
        fixes = [f"renamed {', '.join(p.name + '.bad' for p in ours)} in {data_dir}; rerun to download again "
                 "(or point --base-url at a mirror)"] if ours else []
        fixes += [f"replace {', '.join(theirs)} with MTAT's parts"] if theirs else []
        raise SystemExit(f"error: MD5 mismatch for {ARCHIVE} ({' + '.join(p.name for p in paths)}"
                         f" concatenated): expected {MD5[ARCHIVE]}, got {actual}; {'; '.join(fixes)}")
    plumbing.write_json(marker, stamps)
    print(f"{ARCHIVE}: MD5 verified")
    return paths


class ConcatenatedFile(io.RawIOBase):
    """A read-only, seekable view of files laid end to end: zipfile extracts straight from the parts."""

    def __init__(self, paths):
        self.files = [open(p, "rb") for p in paths]  # noqa: SIM115 (closed by close())
        self.starts = [0, *itertools.accumulate(Path(p).stat().st_size for p in paths)]  # and the end
        self.pos = 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=io.SEEK_SET):  # tell() is seek(0, io.SEEK_CUR)
        origin = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.starts[-1]}[whence]
        self.pos = max(0, offset + origin)
        return self.pos

    def readinto(self, buffer):
        i = bisect.bisect_right(self.starts, self.pos) - 1  # the file holding pos, skipping empty ones
        if i >= len(self.files):
            return 0
        self.files[i].seek(self.pos - self.starts[i])
        n = self.files[i].readinto(memoryview(buffer)[:self.starts[i + 1] - self.pos])
        self.pos += n
        return n

    def close(self):
        for f in self.files:
            f.close()
        super().close()


def safe_target(mp3_dir, name):
    """DATA/mp3/<name>, or None when it would land outside (absolute path, drive or '..': zip-slip)."""
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        return None
    return mp3_dir.joinpath(*parts)


def extract(archive_paths, mp3_dir):
    """Unzip archive_paths to mp3_dir -> n files: names checked first, each via `.part` unless there whole."""
    with zipfile.ZipFile(io.BufferedReader(ConcatenatedFile(archive_paths), CHUNK_BYTES)) as zf:
        entries = [info for info in zf.infolist() if not info.is_dir()]
        targets = [safe_target(mp3_dir, info.filename) for info in entries]
        unsafe = [info.filename for info, t in zip(entries, targets) if t is None]
        if unsafe:
            raise SystemExit(f"error: {ARCHIVE} has {len(unsafe)} entries that would be written "
                             f"outside {mp3_dir} (absolute path or '..', e.g. {unsafe[0]!r}); "
                             "refused, nothing extracted. Use MTAT's original archive")
        with tqdm(desc="extract", total=sum(i.file_size for i in entries), unit="B", unit_scale=True,
                  unit_divisor=1024) as bar:
            for info, target in zip(entries, targets):
                if not (target.exists() and target.stat().st_size == info.file_size):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    part = target.with_name(target.name + ".part")
                    try:
                        with zf.open(info) as src, open(part, "wb") as dst:
                            shutil.copyfileobj(src, dst, CHUNK_BYTES)
                    except (zipfile.BadZipFile, zlib.error, EOFError) as error:  # a CRC or inflate error
                        part.unlink()
                        (mp3_dir.parent / VERIFIED).unlink(missing_ok=True)  # the rerun hashes them again
                        raise SystemExit(f"error: {ARCHIVE} ({' + '.join(p.name for p in archive_paths)}): "
                                         f"its member {info.filename} is damaged ({error}); rerun: the parts "
                                         "are checked again, and downloaded again if damaged") from None
                    part.replace(target)
                bar.update(info.file_size)
    return len(entries)


def missing_clips(annotations, mp3_dir):
    """mp3_paths of the annotations that are not files under mp3_dir."""
    import common  # here: common loads torch (seconds), which --help need not wait for
    return [p for p in common.read_annotations(annotations)[3] if not (mp3_dir / p).is_file()]


def require(from_dir, data_dir, names):
    """Exit naming the files among names that are neither in DATA nor in --from-dir."""
    lacking = [n for n in names if not (data_dir / n).exists() and not (from_dir / n).is_file()]
    if lacking:
        raise SystemExit(f"error: --from-dir {from_dir} lacks {', '.join(lacking)}: put the "
                         "MTAT files there, or drop --from-dir to download them")


def get_mtat(data_dir, hosts=None, from_dir=None, keep_archives=False):
    """Bring DATA/ to complete MTAT; hosts: base URLs tried in turn for each file (default HOSTS)."""
    data_dir, hosts = Path(data_dir), hosts or HOSTS
    mp3_dir = data_dir / "mp3"
    data_dir.mkdir(parents=True, exist_ok=True)
    if from_dir:
        from_dir = Path(from_dir)
        require(from_dir, data_dir, [ANNOTATIONS] + ([] if mp3_dir.exists() else PARTS))
    annotations = get_annotations(data_dir, hosts, from_dir)
    missing = missing_clips(annotations, mp3_dir)
    if not missing:
        print(f"MTAT is in place in {data_dir}: {ANNOTATIONS} verified, every clip in {mp3_dir}")
        return
    print(f"{len(missing)} clips missing from {mp3_dir}: getting {ARCHIVE}")
    if from_dir:
        require(from_dir, data_dir, PARTS)
    archive_paths = get_archive(data_dir, hosts, from_dir)
    n_files = extract(archive_paths, mp3_dir)
    missing = missing_clips(annotations, mp3_dir)
    if missing:
        raise SystemExit(f"error: {ARCHIVE} extracted ({n_files} files) but {len(missing)} clips "
                         f"of {annotations} are not in {mp3_dir} (e.g. {missing[0]}); the archive "
                         "does not match the annotations")
    if not keep_archives:
        for path in archive_paths:
            if path.parent == data_dir:
                path.unlink()
        (data_dir / VERIFIED).unlink(missing_ok=True)
    print(f"MTAT is in place in {data_dir}: {n_files} files extracted to {mp3_dir}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help="where annotations and mp3/ go (default: data; --synthetic: data/demo)")
    p.add_argument("--base-url", help=f"a mirror with the four files (default: try {', then '.join(HOSTS)})")
    p.add_argument("--from-dir", help="take annotations_final.csv and mp3.zip.001..003 from here, no network")
    p.add_argument("--keep-archives", action="store_true", help="keep the downloaded mp3.zip.00N")
    p.add_argument("--synthetic", type=int, metavar="N", help="instead, N synthetic clips in MTAT's layout")
    p.add_argument("--seed", type=int, default=0, help="random seed of --synthetic (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="--synthetic: replace annotations not MTAT's")
    args = p.parse_args(argv)
    if args.data_dir is None:
        args.data_dir = "data/demo" if args.synthetic is not None else "data"
    plumbing.check_folder(args.data_dir, "--data-dir")  # else mkdir would say only "[Errno 17] File exists"
    try:
        if args.synthetic is not None:
            import formats  # only this branch needs them
            import synthetic
            for csv in (Path(args.data_dir) / ANNOTATIONS, Path(args.data_dir) / (ANNOTATIONS + ".gz")):
                found = csv.is_file() and ("other" if csv.suffix == ".gz" else  # --synthetic writes no .gz
                                           formats.dataset_of(csv, plumbing.file_digest(csv, progress="md5")))
                if found == "MTAT" or found == "other" and not args.overwrite:  # not an earlier run's set
                    raise SystemExit(f"error: {args.data_dir} holds {found} annotations ({csv.name}), which "
                                     "--synthetic would replace; choose another --data-dir (default for "
                                     f"--synthetic: data/demo){', or pass --overwrite' * (found == 'other')}")
            synthetic.write_synthetic_mtat(Path(args.data_dir), args.synthetic, args.seed)
            print(f"wrote a synthetic set (not MTAT) of {args.synthetic} clips in {args.data_dir}: "
                  f"{ANNOTATIONS} and mp3/; next: python src/gen_spectrograms.py --data-dir {args.data_dir}")
            return
        get_mtat(args.data_dir, [args.base_url] if args.base_url else None, args.from_dir, args.keep_archives)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise SystemExit(f"error: disk full while writing in {args.data_dir}: free space "
                             "(MTAT needs about 6 GB while extracting, 3 GB after) and rerun; "
                             "finished files are kept and downloads resume") from None
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt as interrupt:
        plumbing.exit_interrupted(interrupt, "interrupted: rerun the same command to resume")


if __name__ == "__main__":  # SIGTERM and SIGHUP stop it as Ctrl-C does: downloads resume
    plumbing.run_script(main, "interrupted: rerun the same command to resume")
