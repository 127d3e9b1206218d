"""Resumable, verified downloads of the published data archives, and safe extraction.

The reference pipeline hosts ``cocostuff.zip``, ``cityscapes.zip``, ``potsdam.zip`` and
``potsdamraw.zip`` under one base URL (config key ``base_url``, since hosting moves). For
each one :func:`fetch_dataset` skips it when ``<data_dir>/<name>/`` exists, otherwise
downloads ``<data_dir>/<name>.zip`` (``.part`` file, HTTP Range resume, size and optional
sha256 check, atomic rename), extracts it into a hidden staging folder and renames the
result to ``<data_dir>/<name>/``, so a killed run never leaves a half-extracted data set.
Only the standard library (urllib) is used.
"""

import hashlib
import http.client
import os
import re
import shutil
import stat
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

from smooseg.data.registry import archive_specs, find_spec
from smooseg.errors import SmoosegError
from smooseg.io import disk_error
from smooseg.progress import progress_bar
from smooseg.signals import sigterm_raises

ARCHIVE_SUFFIX = ".zip"
OFFICIAL_SOURCES = ("Cityscapes https://www.cityscapes-dataset.com, COCO-Stuff "
                    "https://github.com/nightrome/cocostuff, ISPRS Potsdam "
                    "https://www.isprs.org/education/benchmarks/UrbanSemLab/"
                    "2d-sem-label-potsdam.aspx")
CHUNK = 1 << 20


def archives():
    """``{archive stem: data set spec}``: what each data set's spec says the release hosts."""
    return archive_specs()


def archive_file(stem):
    """File name of a hosted archive."""
    return f"{stem}{ARCHIVE_SUFFIX}"


def _layout_hint(name):
    spec = archives().get(name)
    if spec is None:
        return "the layouts in README 'Data sets'"
    return f"README 'Data sets' ({spec.layout})"


def _host_error(url, reason, name=None):
    return SmoosegError(
        f"cannot download {url} ({reason}); the host may be down or have moved: set base_url to "
        f"the new location, or get the data from the official sources ({OFFICIAL_SOURCES}) and "
        f"arrange it as in {_layout_hint(name)}")


def sha256_of(path):
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _total_from_content_range(value):
    match = re.match(r"bytes\s+(\d+|\*)-?(\d*)/(\d+|\*)", value or "")
    if not match:
        return None, None
    start = None if match.group(1) == "*" else int(match.group(1))
    total = None if match.group(3) == "*" else int(match.group(3))
    return start, total


def _open(url, offset, timeout, name):
    headers = {"User-Agent": "smooseg-downloader"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                      timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            return err
        raise _host_error(url, f"HTTP {err.code} {err.reason}", name) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        raise _host_error(url, getattr(err, "reason", err), name) from None


def _receive(response, part, offset, total, url, progress):
    """Append the response body to ``part``; errors mid-way keep the part for a resume."""
    mode = "ab" if offset else "wb"
    received = offset
    try:
        with open(part, mode) as handle, progress_bar(total=total, initial=offset, unit="B", unit_scale=True,
                                              desc=part.name[:-5], disable=not progress) as bar:
            read = getattr(response, "read1", response.read)   # read1: whatever has arrived
            for block in iter(lambda: read(CHUNK), b""):
                handle.write(block)
                received += len(block)
                bar.update(len(block))
    except (OSError, http.client.HTTPException) as err:
        left = f"the {received} bytes received are kept in {part} and resumed by the next run"
        raise disk_error(err, part.parent, left) or SmoosegError(
            f"download of {url} broke off at {received} of {total or '?'} bytes ({err}); "
            f"run again to resume from {part}") from None


def _fetch(url, part, offset, expected_size, progress, timeout, name):
    """Fetch ``url`` into ``part`` from byte ``offset``; returns the full size if announced."""
    with _open(url, offset, timeout, name) as response:
        status = getattr(response, "status", None) or response.getcode()
        if status == 416:                       # nothing left to send: complete, or a stale part
            _, total = _total_from_content_range(response.headers.get("Content-Range"))
            if total == offset:
                return total
            part.unlink()
            return _fetch(url, part, 0, expected_size, progress, timeout, name)
        if status == 206:
            start, total = _total_from_content_range(response.headers.get("Content-Range"))
            if start != offset:
                raise SmoosegError(f"{url} answered a resume from byte {offset} with a range "
                                   f"starting at {start}; delete {part} and retry")
        else:                                   # 200: the server ignored Range, start over
            offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        if expected_size is not None and total is not None and total != expected_size:
            raise SmoosegError(f"{url} has {total} bytes but {expected_size} were expected; the "
                               f"archive changed: update the size/checksum in the config or fix "
                               f"base_url")
        _receive(response, part, offset, total, url, progress)
        return total


def download(url, dest, expected_size=None, sha256=None, progress=True, timeout=60.0,
             name=None):
    """Download ``url`` to ``dest`` with Range resume, verification and an atomic rename.

    Bytes go to ``<dest>.part``; an existing part is resumed with an HTTP Range request (a
    server that ignores Range restarts it). The part is checked against ``expected_size`` (or
    the announced size) and ``sha256`` and only then renamed to ``dest``.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        part.unlink()
        offset = 0
    total = expected_size
    if expected_size is None or offset < expected_size:
        total = _fetch(url, part, offset, expected_size, progress, timeout, name)
    _verify(part, url, expected_size if expected_size is not None else total, sha256)
    os.replace(part, dest)
    return dest


def _verify(part, url, size, sha256):
    actual = part.stat().st_size
    if size is not None and actual < size:
        raise SmoosegError(f"download of {url} ended early at {actual} of {size} bytes; "
                           f"run again to resume from {part}")
    if size is not None and actual > size:
        part.unlink()
        raise SmoosegError(f"download of {url} gave {actual} bytes, more than the expected "
                           f"{size}; the partial file was deleted, run again")
    if sha256 and sha256_of(part) != sha256.lower():
        part.unlink()
        raise SmoosegError(f"download of {url} is corrupt (sha256 mismatch); the file was "
                           f"deleted, run again or check the sha256 in the config")


def _inside(root, member):
    target = (root / member).resolve()
    return member and not os.path.isabs(member) and (target == root or root in target.parents)


def _unsafe(archive, name, why):
    return SmoosegError(f"archive {archive} has unsafe member {name!r} ({why}); refusing to extract: "
                        "get the archive from a trusted source")


def _refuse_unsafe_members(archive, root, members):
    """SmoosegError for the first member that would land outside ``root``, is a link or device,
    or clashes with another member (a file where another member needs a folder, or twice)."""
    kinds = {}
    for name, kind in members:
        if not _inside(root, name):
            raise _unsafe(archive, name, "outside the target folder")
        if kind == "link":
            raise _unsafe(archive, name, "a link, which could point outside the target folder")
        if kind == "other":
            raise _unsafe(archive, name, "a device or pipe, not a file or folder")
        path = name.rstrip("/")
        if kinds.get(path, kind) != kind or (kind == "file" and path in kinds):
            raise _unsafe(archive, name, f"it clashes with another member of the same path {path!r}")
        kinds[path] = kind
    for path in kinds:
        parent = os.path.dirname(path)
        while parent:
            if kinds.get(parent) == "file":
                raise _unsafe(archive, path, f"it needs the folder {parent!r}, which the archive also "
                                             "holds as a file")
            parent = os.path.dirname(parent)


def _zip_members(zf):
    for info in zf.infolist():
        mode = info.external_attr >> 16     # Unix mode bits, when the archiver stored them
        file_type = stat.S_IFMT(mode)
        kind = ("link" if stat.S_ISLNK(mode) else "dir" if info.is_dir()
                else "other" if file_type and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)) else "file")
        yield info.filename, kind


def _tar_members(tf):
    for member in tf.getmembers():
        kind = ("link" if member.issym() or member.islnk() else "dir" if member.isdir()
                else "file" if member.isfile() else "other")
        yield member.name, kind


def extract(archive, dest_dir):
    """Extract a .zip/.tar/.tar.gz into ``dest_dir``, refusing members that escape it."""
    archive, dest = Path(archive), Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                _refuse_unsafe_members(archive, root, list(_zip_members(zf)))
                zf.extractall(dest)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                _refuse_unsafe_members(archive, root, list(_tar_members(tf)))
                tf.extractall(dest, filter="data")
        else:
            raise SmoosegError(f"{archive} is not a zip or tar archive; delete it and download "
                               f"again")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as err:
        raise SmoosegError(f"cannot extract {archive} ({err}); the archive is corrupt: delete it "
                           f"and download again") from None
    return dest


def _place(staging, target):
    """Rename the extracted data set into place (unwrapping a single ``<name>/`` folder)."""
    entries = [p for p in staging.iterdir() if p.name != "__MACOSX"]
    if len(entries) == 1 and entries[0].is_dir() and entries[0].name.lower() == target.name.lower():
        os.replace(entries[0], target)
        shutil.rmtree(staging)
    else:
        os.replace(staging, target)


def archive_names(name):
    """The archive stems ``download_datasets.py datasets=[name]`` fetches: ``name`` itself when it
    is an archive, else every archive of the data set spec of that name."""
    if name in archives():
        return [name]
    spec = find_spec(name)
    if spec is not None and spec.archives:
        return list(spec.archives)
    raise SmoosegError(f"unknown data set '{name}' to download; choose from {', '.join(archives())}")


def fetch_dataset(name, data_dir, base_url, keep_archive=False, size=None, sha256=None,
                  progress=True, timeout=60.0):
    """Download and extract one published archive; returns ``"present"`` or ``"installed"``."""
    if name not in archives():
        raise SmoosegError(f"unknown data set '{name}' to download; choose from "
                           f"{', '.join(archives())}")
    data_dir = Path(data_dir)
    target = data_dir / name
    if target.exists():
        return "present"
    archive = data_dir / archive_file(name)
    if not archive.exists():
        url = str(base_url).rstrip("/") + "/" + archive_file(name)
        download(url, archive, size, sha256, progress, timeout, name)
    staging = data_dir / f".{name}.extracting"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        with sigterm_raises():
            extract(archive, staging)
            _place(staging, target)
    except BaseException as err:  # a full disk, a signal: no half-extracted copy is left filling it
        shutil.rmtree(staging, ignore_errors=True)
        problem = disk_error(err, data_dir, f"the partly extracted {staging} was removed; {archive} is "
                             "kept") if isinstance(err, OSError) else None
        if problem is not None:
            raise problem from None
        raise
    if not keep_archive:
        archive.unlink()
    return "installed"


def check_expected(sizes, checksums, stems):
    """Refuse expected sizes / checksums that cannot be meant: a key that is not an archive this
    download fetches (``stems``), a size that is not a positive byte count, a sha256 that is not
    64 hexadecimal digits."""
    for key, table in (("sizes", sizes), ("sha256", checksums)):
        for name, value in table.items():
            if name not in stems:
                raise SmoosegError(f"{key}.{name}: this download fetches no archive named '{name}' (it "
                                   f"fetches {', '.join(stems)}); key {key} by archive name, e.g. "
                                   f"{key}.{stems[0]}=...")
            if key == "sizes" and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise SmoosegError(f"sizes.{name}={value} is not allowed: a size is the archive's byte "
                                   "count, an integer >= 1")
            if key == "sha256" and not re.fullmatch(r"[0-9a-fA-F]{64}", str(value)):
                raise SmoosegError(f"sha256.{name}={value} is not allowed: a sha256 is 64 hexadecimal "
                                   "digits (sha256sum <archive> prints it)")


def download_datasets(data_dir, names, base_url, keep_archive=False, sizes=None, checksums=None,
                      progress=True, timeout=60.0):
    """Fetch several archives; returns ``{name: "present" | "installed"}``."""
    if base_url in (None, "", "???"):
        raise SmoosegError("base_url is not set; pass base_url=<URL of the folder holding "
                           "cityscapes.zip, cocostuff.zip, ...>")
    stems = list(dict.fromkeys(stem for name in names for stem in archive_names(name)))
    sizes, checksums = dict(sizes or {}), dict(checksums or {})
    check_expected(sizes, checksums, stems)
    try:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise disk_error(err, data_dir, "nothing was written") or SmoosegError(
            f"cannot create data_dir={data_dir} ({err.strerror}); "
            "pass data_dir=<a folder you can write to>") from None
    return {name: fetch_dataset(name, data_dir, base_url, keep_archive, sizes.get(name),
                                checksums.get(name), progress, timeout)
            for name in stems}
