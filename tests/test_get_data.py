"""get_data.py against a threaded HTTP server on 127.0.0.1 (never any other address).

The server serves the real annotations (real MD5) and small zips built here, split into
three byte parts like MTAT's mp3.zip.001..003; tests that use a built zip replace the
MD5 table with that zip's MD5 (the check itself always runs).
"""
import csv
import hashlib
import http.server
import io
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

import common
import get_data
import plumbing

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 1024  # get_data.CHUNK_BYTES in these tests, so a drop point can fall on a chunk edge


# ---------------------------------------------------------------- the loopback server

class Handler(http.server.BaseHTTPRequestHandler):
    """GET of server.files[name], with 'Range: bytes=K-' unless server.honour_range is off;
    server.drop_after[name] = n sends n body bytes then cuts the connection (once)."""

    def do_GET(self):
        server = self.server
        name = self.path.lstrip("/")
        byte_range = self.headers.get("Range")
        server.requests.append((name, byte_range))
        body = server.files.get(name)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if byte_range and server.honour_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", byte_range).group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        drop = server.drop_after.pop(name, None)
        if drop is not None:
            self.wfile.write(body[start:start + drop])
            self.connection.shutdown(socket.SHUT_RDWR)  # mid-body: the client sees a short body
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.files, httpd.requests, httpd.drop_after, httpd.honour_range = {}, [], {}, True
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def closed_port_url():
    """A loopback URL nobody listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """No test may reach the real hosts, wait long, or read in 1 MiB units."""
    monkeypatch.setattr(get_data, "HOSTS", [closed_port_url()])
    monkeypatch.setattr(get_data, "RETRIES", 3)
    monkeypatch.setattr(get_data, "BACKOFF_S", 0.001)
    monkeypatch.setattr(get_data, "TIMEOUT_S", 10)
    monkeypatch.setattr(get_data, "CHUNK_BYTES", CHUNK)


# ---------------------------------------------------------------- test data

def annotations_bytes(mp3_paths, seed=0):
    """An annotations file in MTAT's exact format (quoted, tab-separated, CRLF)."""
    rng = random.Random(seed)
    out = io.StringIO()
    writer = csv.writer(out, delimiter="\t", quoting=csv.QUOTE_ALL, lineterminator="\r\n")
    writer.writerow(["clip_id", "guitar", "techno", "no singer", "mp3_path"])
    for clip_id, path in enumerate(mp3_paths):
        writer.writerow([clip_id, *(rng.randint(0, 1) for _ in range(3)), path])
    return out.getvalue().encode()


def zip_bytes(files):
    """A stored (uncompressed, like MTAT's) zip of {entry name: bytes}."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        for name, content in files.items():
            zf.writestr(name, content)
    return buffer.getvalue()


def split3(blob):
    """Three byte parts whose concatenation is blob, named as MTAT's."""
    cut = [0, len(blob) // 3, 2 * len(blob) // 3, len(blob)]
    return {name: blob[cut[i]:cut[i + 1]] for i, name in enumerate(get_data.PARTS)}


def md5(blob):
    return hashlib.md5(blob).hexdigest()


@pytest.fixture
def small(monkeypatch):
    """A 6-clip MTAT-shaped set: clips, annotations and archive parts, with their MD5s set."""
    rng = random.Random(1)
    clips = {f"{folder}/artist_{i}-album-0{i}-track-30-59.mp3": rng.randbytes(3000 + 500 * i)
             for i, folder in enumerate("0e5fa9")}
    annotations = annotations_bytes(list(clips))
    archive = zip_bytes(clips)
    monkeypatch.setitem(get_data.MD5, "mp3.zip", md5(archive))
    monkeypatch.setitem(get_data.MD5, "annotations_final.csv", md5(annotations))
    return {"clips": clips, "annotations": annotations, "parts": split3(archive)}


def serve(server, data):
    server.files.update({"annotations_final.csv": data["annotations"], **data["parts"]})


def run(data_dir, *args):
    """main() in-process; returns the SystemExit message ('' on success)."""
    try:
        get_data.main(["--data-dir", str(data_dir), *args])
    except SystemExit as e:
        assert e.code not in (0, None), "a failure must exit non-zero"
        return str(e.code)
    return ""


def assert_complete(data_dir, data):
    assert (data_dir / "annotations_final.csv").read_bytes() == data["annotations"]
    for path, content in data["clips"].items():
        assert (data_dir / "mp3" / path).read_bytes() == content
    leftovers = [p.name for p in data_dir.rglob("*") if p.suffix in (".part", ".bad")]
    assert leftovers == []


def requested(server, name):
    return [r for n, r in server.requests if n == name]


# ---------------------------------------------------------------- tests

def test_fresh_download_verifies_extracts_and_removes_archives(server, small, tmp_path):
    serve(server, small)
    data_dir = tmp_path / "data"
    assert run(data_dir, "--base-url", server.url) == ""
    assert_complete(data_dir, small)
    # each file fetched once, from the start; the parts are gone after extraction
    assert sorted(server.requests) == sorted((n, None) for n in server.files)
    assert sorted(p.name for p in data_dir.iterdir()) == ["annotations_final.csv", "mp3"]


def test_keep_archives_keeps_the_parts(server, small, tmp_path):
    serve(server, small)
    assert run(tmp_path, "--base-url", server.url, "--keep-archives") == ""
    assert_complete(tmp_path, small)
    for name, content in small["parts"].items():
        assert (tmp_path / name).read_bytes() == content


def test_resume_after_mid_body_drop_asks_for_the_remaining_bytes(server, small, tmp_path):
    serve(server, small)
    server.drop_after["mp3.zip.001"] = 4 * CHUNK
    assert run(tmp_path, "--base-url", server.url) == ""
    assert_complete(tmp_path, small)
    assert requested(server, "mp3.zip.001") == [None, f"bytes={4 * CHUNK}-"]


def test_resume_of_a_part_left_by_an_interrupted_run(server, small, tmp_path):
    serve(server, small)
    kept = 2500  # bytes of mp3.zip.002 written before the interruption (any offset)
    (tmp_path / "mp3.zip.002.part").write_bytes(small["parts"]["mp3.zip.002"][:kept])
    assert run(tmp_path, "--base-url", server.url) == ""
    assert_complete(tmp_path, small)
    assert requested(server, "mp3.zip.002") == [f"bytes={kept}-"]


def test_complete_part_left_before_its_rename_is_used(server, small, tmp_path):
    serve(server, small)
    whole = small["parts"]["mp3.zip.003"]
    (tmp_path / "mp3.zip.003.part").write_bytes(whole)
    assert run(tmp_path, "--base-url", server.url) == ""
    assert requested(server, "mp3.zip.003") == [f"bytes={len(whole)}-"]  # answered 416
    assert_complete(tmp_path, small)


def test_server_ignoring_range_restarts_from_zero(server, small, tmp_path):
    serve(server, small)
    server.honour_range = False
    server.drop_after["mp3.zip.003"] = 3 * CHUNK
    (tmp_path / "annotations_final.csv.part").write_bytes(small["annotations"][:100])
    assert run(tmp_path, "--base-url", server.url) == ""
    # Range was asked for, answered 200 with the whole file, and not appended to the part
    assert requested(server, "annotations_final.csv") == ["bytes=100-"]
    assert requested(server, "mp3.zip.003") == [None, f"bytes={3 * CHUNK}-"]
    assert_complete(tmp_path, small)


def test_corrupted_archive_byte_fails_md5_and_keeps_no_final_file(server, small, tmp_path):
    part = bytearray(small["parts"]["mp3.zip.002"])
    part[1234] ^= 0xFF
    serve(server, small)
    server.files["mp3.zip.002"] = bytes(part)
    bad_md5 = md5(small["parts"]["mp3.zip.001"] + part + small["parts"]["mp3.zip.003"])
    message = run(tmp_path, "--base-url", server.url)
    assert message.startswith("error: MD5 mismatch for mp3.zip")
    assert get_data.MD5["mp3.zip"] in message and bad_md5 in message and "rerun" in message
    assert not any((tmp_path / name).exists() for name in get_data.PARTS)
    assert all((tmp_path / (name + ".bad")).exists() for name in get_data.PARTS)
    assert not (tmp_path / "mp3").exists() and not (tmp_path / "mp3.zip.verified").exists()
    # the annotations were verified first and stay
    assert (tmp_path / "annotations_final.csv").read_bytes() == small["annotations"]


def test_corrupted_annotations_byte_fails_md5_and_keeps_no_final_file(server, small, tmp_path):
    serve(server, small)
    bad = bytearray(small["annotations"])
    bad[50] ^= 0x01
    server.files["annotations_final.csv"] = bytes(bad)
    message = run(tmp_path, "--base-url", server.url)
    assert "MD5 mismatch for annotations_final.csv" in message and md5(bad) in message
    assert not (tmp_path / "annotations_final.csv").exists()
    assert (tmp_path / "annotations_final.csv.bad").read_bytes() == bad
    assert requested(server, "mp3.zip.001") == []  # nothing uses an unverified file


@pytest.mark.parametrize("evil", ["../evil.mp3", "e/../../evil.mp3", "ABSOLUTE"])
def test_zip_entry_escaping_mp3_dir_is_refused(server, small, tmp_path, monkeypatch, evil):
    data_dir = tmp_path / "data"
    outside = tmp_path / "evil.mp3"
    evil = str(outside) if evil == "ABSOLUTE" else evil
    archive = zip_bytes({**small["clips"], evil: b"payload"})
    monkeypatch.setitem(get_data.MD5, "mp3.zip", md5(archive))
    server.files.update({"annotations_final.csv": small["annotations"], **split3(archive)})
    message = run(data_dir, "--base-url", server.url)
    assert "refused" in message and "evil.mp3" in message
    assert not outside.exists()
    assert not (data_dir / "mp3").exists()  # names are checked before anything is written


def test_second_run_touches_no_network(server, small, tmp_path, capsys):
    serve(server, small)
    assert run(tmp_path, "--base-url", server.url) == ""
    server.requests.clear()
    assert run(tmp_path, "--base-url", server.url) == ""
    assert server.requests == []
    assert "in place" in capsys.readouterr().out.splitlines()[-1]


def record_hashes(monkeypatch):
    """The names of the files plumbing.file_digest hashes from now on, one list per call."""
    hashed, file_digest = [], plumbing.file_digest

    def recording(paths, *args, **kwargs):
        hashed.append([p.name for p in (paths if isinstance(paths, list) else [paths])])
        return file_digest(paths, *args, **kwargs)

    monkeypatch.setattr(plumbing, "file_digest", recording)
    return hashed


def test_interrupted_extraction_resumes_without_redoing_verified_work(
        server, small, tmp_path, monkeypatch):
    serve(server, small)
    assert run(tmp_path, "--base-url", server.url, "--keep-archives") == ""
    # as if killed mid-extraction: one clip not yet extracted, another half-written
    first, second = [tmp_path / "mp3" / p for p in list(small["clips"])[:2]]
    first.unlink()
    second.replace(second.with_name(second.name + ".part"))
    untouched = tmp_path / "mp3" / list(small["clips"])[2]
    mtime_ns = untouched.stat().st_mtime_ns
    server.requests.clear()
    hashed = record_hashes(monkeypatch)
    assert run(tmp_path, "--base-url", server.url) == ""
    assert_complete(tmp_path, small)
    assert server.requests == []
    assert hashed == [["annotations_final.csv"]]  # the verified archive is not hashed again
    assert untouched.stat().st_mtime_ns == mtime_ns
    assert not (tmp_path / "mp3.zip.001").exists()  # removed after this verified extraction


@pytest.mark.parametrize("marker", ["{", "[1, 2]", '{"md5": "0", "parts": []}'])
def test_a_damaged_or_stale_verified_marker_means_hash_again(server, small, tmp_path, monkeypatch, marker):
    serve(server, small)
    assert run(tmp_path, "--base-url", server.url, "--keep-archives") == ""
    (tmp_path / "mp3" / next(iter(small["clips"]))).unlink()  # the archive is needed again
    (tmp_path / get_data.VERIFIED).write_text(marker)
    hashed = record_hashes(monkeypatch)
    assert run(tmp_path, "--base-url", server.url, "--keep-archives") == ""
    assert hashed == [["annotations_final.csv"], get_data.PARTS]
    assert_complete(tmp_path, small)
    assert plumbing.read_json(tmp_path / get_data.VERIFIED)["md5"] == get_data.MD5["mp3.zip"]


def test_foreign_annotations_are_refused_and_left_alone(server, small, tmp_path):
    serve(server, small)
    foreign = annotations_bytes(list(small["clips"]), seed=7)  # e.g. a --synthetic set
    (tmp_path / "annotations_final.csv").write_bytes(foreign)
    message = run(tmp_path, "--base-url", server.url)
    assert message.startswith(f"error: {tmp_path / 'annotations_final.csv'} is not MTAT's")
    assert (tmp_path / "annotations_final.csv").read_bytes() == foreign
    assert server.requests == []


def test_from_dir_uses_local_files_in_place(small, tmp_path):
    from_dir = tmp_path / "downloads"
    from_dir.mkdir()
    (from_dir / "annotations_final.csv").write_bytes(small["annotations"])
    for name, content in small["parts"].items():
        (from_dir / name).write_bytes(content)
    data_dir = tmp_path / "data"
    assert run(data_dir, "--from-dir", str(from_dir)) == ""  # HOSTS is a closed port
    assert_complete(data_dir, small)
    assert sorted(p.name for p in data_dir.iterdir()) == ["annotations_final.csv", "mp3"]
    assert sorted(p.name for p in from_dir.iterdir()) == sorted(
        ["annotations_final.csv", *get_data.PARTS])  # the user's files are left alone


def test_from_dir_without_the_files_names_them(small, tmp_path):
    (tmp_path / "annotations_final.csv").write_bytes(small["annotations"])
    (tmp_path / "mp3.zip.001").write_bytes(small["parts"]["mp3.zip.001"])
    message = run(tmp_path / "data", "--from-dir", str(tmp_path))
    assert message.startswith(f"error: --from-dir {tmp_path} lacks mp3.zip.002, mp3.zip.003")
    assert not (tmp_path / "data" / "annotations_final.csv").exists()


def test_http_404_names_status_and_url(server, small, tmp_path):
    message = run(tmp_path, "--base-url", server.url)
    url = server.url + "annotations_final.csv"
    assert message.startswith("error: could not download annotations_final.csv")
    assert f"{url}: HTTP 404" in message
    assert requested(server, "annotations_final.csv") == [None]  # a 4xx is not retried


def test_host_down_names_url_after_retries(tmp_path):
    url = closed_port_url()
    message = run(tmp_path, "--base-url", url)
    assert f"{url}annotations_final.csv: failed after 3 tries" in message
    assert "Connection refused" in message
    assert not (tmp_path / "annotations_final.csv").exists()


def test_falls_back_to_the_second_host(server, small, tmp_path, monkeypatch):
    serve(server, small)
    down = closed_port_url()
    monkeypatch.setattr(get_data, "HOSTS", [down, server.url])
    assert run(tmp_path) == ""
    assert_complete(tmp_path, small)


UNRESOLVABLE = "http://mtat.invalid/"  # .invalid never resolves (RFC 2606)


def test_a_host_name_that_does_not_resolve_is_tried_once_then_the_next_host(
        server, small, tmp_path, monkeypatch, capsys):
    serve(server, small)
    monkeypatch.setattr(get_data, "RETRIES", 5)  # the real retries and back-off (60 s a host)
    monkeypatch.setattr(get_data, "BACKOFF_S", 2.0)
    monkeypatch.setattr(get_data, "HOSTS", [UNRESOLVABLE, server.url])
    start = time.perf_counter()
    assert run(tmp_path) == ""
    assert time.perf_counter() - start < 20
    assert_complete(tmp_path, small)
    tried = [line for line in capsys.readouterr().out.splitlines() if line.startswith("trying ")]
    assert tried[:2] == [f"trying {UNRESOLVABLE}annotations_final.csv",
                         f"trying {server.url}annotations_final.csv"]
    assert len(tried) == 2 * (1 + len(get_data.PARTS))  # each file: the dead name, then the server


def test_cli_offline_says_which_host_it_tries_and_fails_fast_in_one_line(tmp_path):
    """By subprocess, as a user without a network: the real retries and back-off."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "src" / "get_data.py"), "--base-url", UNRESOLVABLE,
                           "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=120,
                          check=False)
    seconds = time.perf_counter() - start
    assert done.returncode == 1 and seconds < 20, (done.returncode, seconds)  # was 5 tries, 60 s
    assert done.stdout == f"trying {UNRESOLVABLE}annotations_final.csv\n"
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"error: could not download annotations_final.csv: {UNRESOLVABLE}"
                                  "annotations_final.csv: the host name mtat.invalid does not resolve")
    assert "Check the network" in done.stderr
    assert not (tmp_path / "annotations_final.csv").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cli_signal_while_waiting_for_a_host_is_one_line_and_its_exit_status(tmp_path, signum):
    """By subprocess: kill or Ctrl-C while a host accepts the connection and never answers."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # connections wait in its backlog: the request is sent, no reply comes
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/"
        proc = subprocess.Popen([sys.executable, str(ROOT / "src" / "get_data.py"), "--base-url", url,
                                 "--data-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            assert proc.stdout.readline() == f"trying {url}annotations_final.csv\n"
            os.kill(proc.pid, signum)
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 128 + signum, err  # 143, 130
    assert err.strip().splitlines() == ["interrupted: rerun the same command to resume"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_disk_full_is_one_clear_line(server, small, tmp_path):
    serve(server, small)
    (tmp_path / "annotations_final.csv.part").symlink_to("/dev/full")  # writes fail: ENOSPC
    message = run(tmp_path, "--base-url", server.url)
    assert message.startswith(f"error: disk full while writing in {tmp_path}")


@pytest.mark.slow
def test_real_annotations_full_extraction_then_a_fast_idle_rerun(
        server, annotations_csv, tmp_path, monkeypatch):
    """Real annotations (real MD5) and an archive holding every one of their 25,863 paths."""
    mp3_paths = common.read_annotations(annotations_csv)[3]
    rng = random.Random(2)
    clips = {path: rng.randbytes(16) for path in mp3_paths}
    archive = zip_bytes(clips)
    monkeypatch.setitem(get_data.MD5, "mp3.zip", md5(archive))
    monkeypatch.setattr(get_data, "CHUNK_BYTES", 1 << 20)
    server.files.update({"annotations_final.csv": annotations_csv.read_bytes(), **split3(archive)})
    data_dir = tmp_path / "data"
    assert run(data_dir, "--base-url", server.url) == ""
    assert len(list((data_dir / "mp3").rglob("*.mp3"))) == len(set(mp3_paths))
    for path in rng.sample(mp3_paths, 50):
        assert (data_dir / "mp3" / path).read_bytes() == clips[path]
    server.requests.clear()
    start = time.perf_counter()
    assert run(data_dir, "--base-url", server.url) == ""
    assert server.requests == [] and time.perf_counter() - start < 15


@pytest.mark.slow
def test_cli_help_and_acceptance_real_annotations_with_wrong_parts(
        server, annotations_csv, small, tmp_path):
    """By subprocess, unpatched MD5 table: real annotations pass, the wrong archive fails."""
    script = str(ROOT / "src" / "get_data.py")
    shown = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, check=False)
    assert shown.returncode == 0 and "--from-dir" in shown.stdout and "--synthetic" in shown.stdout
    server.files.update({"annotations_final.csv": annotations_csv.read_bytes(), **small["parts"]})
    data_dir = tmp_path / "D"
    done = subprocess.run([sys.executable, script, "--base-url", server.url,
                           "--data-dir", str(data_dir)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: MD5 mismatch for mp3.zip") and "f12add0eb4cd6c2a3ab7e4" in last
    kept = data_dir / "annotations_final.csv"
    assert md5(kept.read_bytes()) == "f04fa01752a8cc64f6e1ca142a0fef1d"
    assert "annotations_final.csv: MD5 verified" in done.stdout


@pytest.mark.slow
def test_synthetic_writes_an_mtat_shaped_set_and_says_what_next(tmp_path, capsys):
    synthetic = pytest.importorskip("synthetic")  # src/synthetic.py
    assert synthetic.write_synthetic_mtat  # the function --synthetic calls
    assert run(tmp_path, "--synthetic", "2", "--seed", "0") == ""
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"wrote a synthetic set (not MTAT) of 2 clips in {tmp_path}: annotations_final.csv and mp3/; "
        f"next: python src/gen_spectrograms.py --data-dir {tmp_path}")
    mp3_paths = common.read_annotations(tmp_path / "annotations_final.csv")[3]
    assert len(mp3_paths) == 2
    assert all((tmp_path / "mp3" / p).is_file() for p in mp3_paths)


@pytest.mark.slow
def test_synthetic_defaults_to_data_demo(tmp_path, monkeypatch):
    pytest.importorskip("synthetic")
    monkeypatch.chdir(tmp_path)
    get_data.main(["--synthetic", "1"])
    assert (tmp_path / "data" / "demo" / "annotations_final.csv").is_file()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["demo"]


def test_synthetic_refuses_a_folder_holding_mtat(annotations_csv, tmp_path):
    (tmp_path / "annotations_final.csv").write_bytes(annotations_csv.read_bytes())
    message = run(tmp_path, "--synthetic", "1")
    assert message.startswith(f"error: {tmp_path} holds MTAT") and "--data-dir" in message
    assert md5((tmp_path / "annotations_final.csv").read_bytes()) == "f04fa01752a8cc64f6e1ca142a0fef1d"
    assert not (tmp_path / "mp3").exists()
