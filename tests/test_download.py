"""Downloader against a local HTTP server on 127.0.0.1 started by the test."""

import hashlib
import io
import os
import re
import socket
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from smooseg.data.datasets import build_dataset
from smooseg.data.download import download, download_datasets, extract, fetch_dataset
from smooseg.data.synthetic import write_cityscapes_layout
from smooseg.errors import SmoosegError

REPO = Path(__file__).resolve().parents[1]
PAYLOAD = bytes(range(256)) * 4000 + b"tail"          # ~1 MB, position-dependent bytes


class Handler(BaseHTTPRequestHandler):
    """Serves ``server.files``; the first path part picks a behaviour."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.requests.append((self.path, self.headers.get("Range")))
        mode, _, name = self.path.lstrip("/").partition("/")
        body = self.server.files.get(name)
        if body is None or mode == "missing":
            self.send_error(404)
            return
        if mode == "corrupt":
            body = body[:-10] + b"x" * 10
        start = 0
        match = re.match(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and mode != "ignore-range":
            start = int(match.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        chunk = body[start:]
        if mode == "short":
            chunk = chunk[: len(chunk) // 2]
        if mode == "slow":
            for i in range(0, len(chunk), 4096):
                self.wfile.write(chunk[i:i + 4096])
                time.sleep(0.01)
            return
        self.wfile.write(chunk)


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.files, httpd.requests = {"blob.bin": PAYLOAD}, []
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_full_download_with_size_and_checksum(server, tmp_path):
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    dest = download(f"{server.url}/ok/blob.bin", tmp_path / "blob.bin", expected_size=len(PAYLOAD),
                    sha256=digest, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin"]
    assert server.requests == [("/ok/blob.bin", None)]


def test_resume_from_partial_file_with_range(server, tmp_path):
    (tmp_path / "blob.bin.part").write_bytes(PAYLOAD[:300000])
    download(f"{server.url}/ok/blob.bin", tmp_path / "blob.bin", progress=False)
    assert (tmp_path / "blob.bin").read_bytes() == PAYLOAD
    assert server.requests == [("/ok/blob.bin", "bytes=300000-")]
    assert not (tmp_path / "blob.bin.part").exists()


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    (tmp_path / "blob.bin.part").write_bytes(b"garbage that must not survive")
    download(f"{server.url}/ignore-range/blob.bin", tmp_path / "blob.bin", progress=False)
    assert (tmp_path / "blob.bin").read_bytes() == PAYLOAD


def test_complete_part_file_answered_416(server, tmp_path):
    (tmp_path / "blob.bin.part").write_bytes(PAYLOAD)
    download(f"{server.url}/ok/blob.bin", tmp_path / "blob.bin", progress=False)
    assert (tmp_path / "blob.bin").read_bytes() == PAYLOAD


def test_short_download_detected_then_resumed(server, tmp_path):
    with pytest.raises(SmoosegError, match="run again to resume"):
        download(f"{server.url}/short/blob.bin", tmp_path / "blob.bin", progress=False)
    assert not (tmp_path / "blob.bin").exists()
    part = (tmp_path / "blob.bin.part").read_bytes()
    assert 0 < len(part) < len(PAYLOAD) and PAYLOAD.startswith(part)
    download(f"{server.url}/ok/blob.bin", tmp_path / "blob.bin", progress=False)
    assert (tmp_path / "blob.bin").read_bytes() == PAYLOAD
    assert server.requests[-1][1] == f"bytes={len(part)}-"


def test_expected_size_larger_than_served_is_detected(server, tmp_path):
    with pytest.raises(SmoosegError, match="expected"):
        download(f"{server.url}/ok/blob.bin", tmp_path / "blob.bin",
                 expected_size=len(PAYLOAD) + 5, progress=False)
    assert not (tmp_path / "blob.bin").exists()


def test_corrupted_download_detected_and_removed(server, tmp_path):
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    with pytest.raises(SmoosegError, match="corrupt .sha256 mismatch"):
        download(f"{server.url}/corrupt/blob.bin", tmp_path / "blob.bin", sha256=digest,
                 progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unreachable_host_and_http_error_are_clear(server, tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/cityscapes.zip"
    with pytest.raises(SmoosegError) as err:
        download(url, tmp_path / "c.zip", progress=False, timeout=5, name="cityscapes")
    message = str(err.value)
    assert "\n" not in message and url in message
    for fragment in ("base_url", "https://www.cityscapes-dataset.com",
                     "https://github.com/nightrome/cocostuff", "2d-sem-label-potsdam",
                     "leftImg8bit/<split>/<city>"):
        assert fragment in message
    with pytest.raises(SmoosegError, match="HTTP 404"):
        download(f"{server.url}/missing/blob.bin", tmp_path / "b", progress=False)


def zip_of(folder, inner):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, f"{inner}/{path.relative_to(folder)}")
    return buffer.getvalue()


def test_fetch_extracts_archive_and_skips_when_present(server, tmp_path):
    write_cityscapes_layout(tmp_path / "src", n_train=2, n_val=1, size=(16, 32))
    server.files["cityscapes.zip"] = zip_of(tmp_path / "src/cityscapes", "cityscapes")
    data = tmp_path / "data"
    status = download_datasets(data, ["cityscapes"], f"{server.url}/ok/", progress=False)
    assert status == {"cityscapes": "installed"}
    assert sorted(p.name for p in data.iterdir()) == ["cityscapes"]       # archive deleted
    assert len(build_dataset("cityscapes", data, "train", res=8)) == 2
    count = len(server.requests)
    assert fetch_dataset("cityscapes", data, f"{server.url}/ok", progress=False) == "present"
    assert len(server.requests) == count


def test_keep_archive_and_flat_archive(server, tmp_path):
    write_cityscapes_layout(tmp_path / "src", n_train=1, n_val=1, size=(16, 32))
    flat = zip_of(tmp_path / "src/cityscapes/gtFine", "gtFine")     # no top-level cityscapes/
    server.files["cityscapes.zip"] = flat
    fetch_dataset("cityscapes", tmp_path / "d", f"{server.url}/ok", keep_archive=True,
                  progress=False)
    assert (tmp_path / "d/cityscapes.zip").read_bytes() == flat
    assert (tmp_path / "d/cityscapes/gtFine/train").is_dir()
    assert not any(p.name.startswith(".") for p in (tmp_path / "d").iterdir())


def test_extract_tar_and_refuse_escaping_members(tmp_path):
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("potsdam/all.txt")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"a\nb"))
    extract(archive, tmp_path / "out")
    assert (tmp_path / "out/potsdam/all.txt").read_bytes() == b"a\nb"
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../escaped.txt", "x")
    with pytest.raises(SmoosegError, match="unsafe member"):
        extract(evil, tmp_path / "out2")
    assert not (tmp_path / "escaped.txt").exists()
    broken = tmp_path / "broken.zip"
    broken.write_bytes(zipfile.ZipFile.__doc__.encode())
    with pytest.raises(SmoosegError, match="not a zip or tar"):
        extract(broken, tmp_path / "out3")


def _tar_with(path, *members):
    with tarfile.open(path, "w") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _tar_file(name, data=b"x"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _tar_entry(name, kind, target=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


@pytest.mark.parametrize("members, why", [
    ([_tar_file("d/a.txt"), _tar_entry("d/link", tarfile.SYMTYPE, "a.txt")], r"'d/link' \(a link"),
    ([_tar_file("d/a.txt"), _tar_entry("d/hard", tarfile.LNKTYPE, "d/a.txt")], r"'d/hard' \(a link"),
    ([_tar_entry("d/fifo", tarfile.FIFOTYPE)], r"'d/fifo' \(a device or pipe"),
    ([_tar_file("d/x"), _tar_file("d/x/inner.txt")], r"'d/x/inner.txt' \(it needs the folder 'd/x', which "
                                                        r"the archive also holds as a file"),
    ([_tar_file("d/x"), _tar_file("d/x")], r"'d/x' \(it clashes with another member of the same path"),
    ([_tar_entry("d/x", tarfile.DIRTYPE), _tar_file("d/x")], r"'d/x' \(it clashes"),
])
def test_links_and_clashing_members_are_unsafe_not_corrupt(tmp_path, members, why):
    archive = _tar_with(tmp_path / "a.tar", *members)
    with pytest.raises(SmoosegError, match=rf"archive .*a\.tar has unsafe member {why}.*refusing to extract"):
        extract(archive, tmp_path / "out")
    assert not any((tmp_path / "out").rglob("*"))


def test_zip_symlink_member_is_unsafe(tmp_path):
    archive = tmp_path / "links.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("d/a.txt", "x")
        link = zipfile.ZipInfo("d/link")
        link.external_attr = (0o120777 << 16)
        zf.writestr(link, "a.txt")
    with pytest.raises(SmoosegError, match=r"unsafe member 'd/link' \(a link"):
        extract(archive, tmp_path / "out")


def test_data_set_names_download_their_spec_archives(server, tmp_path):
    from smooseg.data.download import archive_names

    assert archive_names("cocostuff27") == ["cocostuff"] and archive_names("cocostuff") == ["cocostuff"]
    assert archive_names("potsdam") == ["potsdam"]
    with pytest.raises(SmoosegError, match="unknown data set 'mars' to download; choose from cityscapes, "):
        archive_names("mars")


def run_cli(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "download_datasets.py"), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_download_kill_resume_and_unreachable(server, tmp_path, entry_point):
    write_cityscapes_layout(tmp_path / "src", n_train=2, n_val=1, size=(16, 32))
    archive = zip_of(tmp_path / "src/cityscapes", "cityscapes")
    server.files["cityscapes.zip"] = archive
    (tmp_path / "src/cityscapes/padding.bin").write_bytes(os.urandom(400000))
    server.files["potsdam.zip"] = zip_of(tmp_path / "src/cityscapes", "potsdam")  # ~1 s slow
    data, work = tmp_path / "data", tmp_path / "cwd"
    work.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "download_datasets.py"), f"data_dir={data}",
         f"base_url={server.url}/slow/", "datasets=[potsdam]"], cwd=work,
        env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    part = data / "potsdam.zip.part"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and not (
            part.exists() and part.stat().st_size > 8192):
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert part.exists() and not (data / "potsdam").exists()
    out = run_cli([f"data_dir={data}", f"base_url={server.url}/ok/",
                   "datasets=[potsdam,cityscapes]", "progress=false"], work)
    assert out.returncode == 0, out.stderr
    assert any(r[0] == "/ok/potsdam.zip" and r[1] for r in server.requests)   # resumed by Range
    assert (data / "potsdam/leftImg8bit/train").is_dir()
    assert len(build_dataset("cityscapes", data, "val", res=8)) == 1
    again = entry_point("download_datasets.py", "--data_dir", data, "--base_url", f"{server.url}/ok/",
                        "--datasets", "[cityscapes]", cwd=work)
    assert again.returncode == 0 and "cityscapes: already present" in again.stdout
    bad = entry_point("download_datasets.py", f"data_dir={tmp_path / 'new'}",
                      f"base_url=http://127.0.0.1:{closed_port()}/", "datasets=[cocostuff]", cwd=work)
    assert bad.returncode == 2
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot download") and "nightrome/cocostuff" in last
    assert list(work.iterdir()) == []


@pytest.mark.slow
def test_cli_expected_sizes_and_checksums_by_archive_name(server, tmp_path, entry_point):
    """The documented keys work as typed: sizes.<archive>=<bytes> and sha256.<archive>=<hex>; a
    wrong checksum stops the download, the right one installs."""
    write_cityscapes_layout(tmp_path / "src", n_train=1, n_val=1, size=(16, 32))
    archive = zip_of(tmp_path / "src/cityscapes", "cityscapes")
    server.files["cityscapes.zip"] = archive
    data, work = tmp_path / "data", tmp_path / "cwd"
    work.mkdir()
    common = [f"data_dir={data}", f"base_url={server.url}/ok/", "datasets=[cityscapes]", "progress=false"]
    wrong = entry_point("download_datasets.py", *common, f"sha256.cityscapes={'0' * 64}", cwd=work)
    assert wrong.returncode == 2 and "sha256 mismatch" in wrong.stderr.strip().splitlines()[-1], wrong.stderr
    assert not (data / "cityscapes").exists() and not list(data.glob("*.zip*"))
    digest = hashlib.sha256(archive).hexdigest()
    right = entry_point("download_datasets.py", *common, f"sha256.cityscapes={digest}",
                        f"sizes.cityscapes={len(archive)}", cwd=work)
    assert right.returncode == 0, right.stderr
    assert (data / "cityscapes/leftImg8bit/val").is_dir()
