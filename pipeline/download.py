"""Fetch a dataset onto a user's machine: VOC 2012 and COCO 2017 from their official URLs, verified
against published checksums; Caltech-101 from the archive torchvision uses (verified by the same md5,
both inner archives extracted: torchvision's own downloader drops the outline annotations);
Flowers-102 through torchvision's own downloader.

Never run in CI (the tests serve small archives from a local server). What a download leaves in
the dataset root:

  <root>/VOCdevkit/... or train2017/, val2017/, annotations/   the extracted archives
  <root>/.download-complete.json                                written last; lists each archive,
                                                                its digests and what it extracted
  <root>/.downloads/                                            only while unfinished: <archive>.part
                                                                (resumed with an HTTP Range request),
                                                                <archive> (verified), its extraction
                                                                in progress, and one <archive>.done.json
                                                                per archive already extracted

A rerun with the marker in place does nothing; an interrupted run resumes where it stopped. An
archive whose digest differs from the published one is deleted and never extracted. Extraction
refuses any member that would land outside the root (absolute paths, `..`, links pointing out),
happens in a staging folder, and renames the archive's top-level entries into the root only when
the whole archive has been extracted.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import posixpath
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Mapping, Sequence

from pipeline import PipelineError
from pipeline.io import read_json, write_json
from pipeline.progress import progress

log = logging.getLogger(__name__)

MARKER = ".download-complete.json"
WORK_DIR = ".downloads"
CHUNK_BYTES = 1 << 20  # one MiB: progress counts chunks, so its lines read in MiB and MiB/s
# name -> (torchvision dataset class, the folder it extracts into under the root)
TORCHVISION_DATASETS = {"flowers102": ("Flowers102", "flowers-102"), "fgvc_aircraft": ("FGVCAircraft", "fgvc-aircraft-2013b")}


@dataclass(frozen=True)
class Archive:
    """One file to fetch: mirrors tried in order, and digests (hashlib name -> hex) that must all match."""

    filename: str
    urls: tuple[str, ...]
    digests: Mapping[str, str]
    # Archives inside this one (paths within it) to extract in turn into <root>/<inner_target>; the
    # outer archive's own files are then dropped. Empty: this archive extracts into <root> itself.
    inner: tuple[str, ...] = ()
    inner_target: str = ""


ARCHIVES: dict[str, tuple[Archive, ...]] = {
    # The zip torchvision's Caltech101 fetches, with its md5 (torchvision/datasets/caltech.py). Inside:
    # caltech-101/101_ObjectCategories.tar.gz (the images) and caltech-101/Annotations.tar (the object
    # outlines that give masks), both extracted into <root>/caltech101 as torchvision lays it out.
    "caltech101": (
        Archive(
            "caltech-101.zip",
            ("https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip",),
            {"md5": "3138e1922a9193bfa496528edbbc45d0"},
            inner=("caltech-101/101_ObjectCategories.tar.gz", "caltech-101/Annotations.tar"),
            inner_target="caltech101",
        ),
    ),
    # The python-version archives torchvision's CIFAR10 / CIFAR100 fetch, with its md5
    # (torchvision/datasets/cifar.py); each extracts to <root>/cifar-10-batches-py or cifar-100-python.
    "cifar10": (
        Archive("cifar-10-python.tar.gz", ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
                {"md5": "c58f30108f718f92721af3b95e74349a"}),
    ),
    "cifar100": (
        Archive("cifar-100-python.tar.gz", ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
                {"md5": "eb9058c3a382ffc7106e4002c42a8d85"}),
    ),
    # md5 as listed by torchvision (torchvision/datasets/voc.py) and PaddleDetection
    # (ppdet/utils/download.py). torchvision fetches from thor.robots.ox.ac.uk, a mirror of the same
    # files kept because host.robots.ox.ac.uk is often unreachable.
    "voc": (
        Archive(
            "VOCtrainval_11-May-2012.tar",
            (
                "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
                "https://thor.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
            ),
            {"md5": "6cd6e144f989b92b3379bac3b3de84fd"},
        ),
    ),
    # Two independent publications, both checked: md5 from PaddleDetection (ppdet/utils/download.py,
    # DATASETS["coco"]), sha1 from gluon-cv (scripts/datasets/mscoco.py, and the table of its
    # "Prepare COCO datasets" tutorial).
    "coco": (
        Archive(
            "annotations_trainval2017.zip",
            ("http://images.cocodataset.org/annotations/annotations_trainval2017.zip",),
            {"md5": "f4bbac642086de4f52a3fdda2de5fa2c", "sha1": "8551ee4bb5860311e79dace7e79cb91e432e78b3"},
        ),
        Archive(
            "val2017.zip",
            ("http://images.cocodataset.org/zips/val2017.zip",),
            {"md5": "442b8da7639aecaf257c1dceb8ba8c80", "sha1": "4950dc9d00dbe1c933ee0170f5797584351d2a41"},
        ),
        Archive(
            "train2017.zip",
            ("http://images.cocodataset.org/zips/train2017.zip",),
            {"md5": "cced6f7f71b7629ddf16f17bbcfab6b2", "sha1": "10ad623668ab00c62c096f0ed636d6aff41faca5"},
        ),
    ),
}


def download_dataset(
    name: str, root: str | Path, archives: Sequence[Archive] | None = None, timeout: float = 60.0
) -> Path:
    """Fetch dataset `name` into `root` unless its completion marker says it is there; return the marker.

    `archives` replaces the table of official URLs and checksums (tests serve their own);
    `timeout` bounds each network wait in seconds, not the whole download.
    """
    root = Path(root)
    marker = root / MARKER
    if archives is None and name in TORCHVISION_DATASETS:
        return _download_with_torchvision(name, root, marker)
    if archives is None:
        if name not in ARCHIVES:
            raise PipelineError(
                f"dataset.name: {name!r} has no download. Expected one of {sorted([*ARCHIVES, *TORCHVISION_DATASETS])}"
            )
        archives = ARCHIVES[name]
    if _marker_lists(marker, archives):
        log.info("%s already downloaded into %s (%s): nothing to do", name, root, MARKER)
        return marker

    work_dir = root / WORK_DIR
    work_dir.mkdir(parents=True, exist_ok=True)
    records = [_fetch_and_extract(archive, root, work_dir, timeout) for archive in archives]
    write_json(marker, {"dataset": name, "archives": records})
    shutil.rmtree(work_dir)
    log.info(
        "downloaded %s into %s: %s", name, root, ", ".join(f"{r['filename']} -> {', '.join(r['extracted'])}" for r in records)
    )
    return marker


def _marker_lists(marker: Path, archives: Sequence[Archive]) -> bool:
    """Whether the marker records exactly these archives with these digests."""
    if not marker.is_file():
        return False
    recorded = [(r["filename"], r["digests"]) for r in read_json(marker).get("archives", [])]
    return recorded == [(a.filename, dict(a.digests)) for a in archives]


def _fetch_and_extract(archive: Archive, root: Path, work_dir: Path, timeout: float) -> dict:
    """Download, verify and extract one archive, unless an earlier run already did; return its record."""
    done = work_dir / f"{archive.filename}.done.json"
    if done.is_file():
        return read_json(done)
    path, url = fetch_archive(archive, work_dir, timeout)
    size = path.stat().st_size
    if archive.inner:
        extracted = _extract_inner_archives(archive, path, root, work_dir)
    else:
        extracted = extract_archive(path, root, work_dir / f"{archive.filename}.extracting")
    record = {"filename": archive.filename, "url": url, "digests": dict(archive.digests), "bytes": size, "extracted": extracted}
    write_json(done, record)
    path.unlink()  # the archive is as large as what it holds; its digests stay in the record
    return record


def _extract_inner_archives(archive: Archive, path: Path, root: Path, work_dir: Path) -> list[str]:
    """Unpack `path` in the work folder, extract each of `archive.inner` into <root>/<inner_target>,
    and drop the rest; return the extracted entries as paths relative to `root`."""
    outer = work_dir / f"{archive.filename}.contents"
    if outer.exists():
        shutil.rmtree(outer)  # an earlier run stopped before the inner archives were extracted
    outer.mkdir()
    extract_archive(path, outer, work_dir / f"{archive.filename}.extracting")
    target = root / archive.inner_target
    target.mkdir(parents=True, exist_ok=True)
    extracted = []
    for name in archive.inner:
        inner = outer / checked_member_path(name, path)
        if not inner.is_file():
            raise PipelineError(f"{path}: expected the archive {name} inside it. Got {sorted(str(p.relative_to(outer)) for p in outer.rglob('*'))[:10]}")
        entries = extract_archive(inner, target, work_dir / f"{inner.name}.extracting")
        extracted += [f"{archive.inner_target}/{entry}" for entry in entries]
    shutil.rmtree(outer)
    return extracted


def fetch_archive(archive: Archive, directory: Path, timeout: float = 60.0) -> tuple[Path, str | None]:
    """Download `archive` into `directory` and verify it; return its path and the URL that served it
    (None when an earlier run downloaded it and stopped before extracting).

    Each mirror is tried in turn, resuming the .part file the previous attempt (or run) left. A file
    whose digests differ is deleted before the next mirror; if none succeeds, PipelineError says why
    for each.
    """
    target = directory / archive.filename
    if target.is_file():  # verified by an earlier run that stopped before extracting it
        mismatch = _digest_mismatch(archive, file_digests(target, archive.digests))
        if mismatch is None:
            return target, None
        log.warning("%s changed on disk since it was verified (%s): downloading it again", target, mismatch)
        target.unlink()
    part = directory / f"{archive.filename}.part"
    failures = []
    for url in archive.urls:
        try:
            digests = download_to_part(url, part, archive.digests, timeout)
        except (OSError, http.client.HTTPException) as exc:
            failures.append(f"{url}: {exc}")
            continue
        mismatch = _digest_mismatch(archive, digests)
        if mismatch is not None:
            part.unlink()
            failures.append(f"{archive.filename} from {url} is corrupt ({mismatch}); deleted it, not extracted")
            continue
        os.replace(part, target)
        log.info("%s verified (%s)", target, ", ".join(sorted(digests)))
        return target, url
    raise PipelineError(
        f"could not download {archive.filename}; " + "; ".join(failures)
        + (f". Rerun to resume from {part}" if part.exists() else "")
    )


def download_to_part(url: str, part: Path, algorithms: Sequence[str], timeout: float = 60.0) -> dict[str, str]:
    """Stream `url` onto the end of `part` and return the digests of the whole file.

    A non-empty part file is resumed with an HTTP Range request; a server that answers with the
    whole file instead (status 200) restarts it from the first byte. The bytes already in the part
    file are hashed first, so the digests always cover the complete file as it is on disk.
    """
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # range starts at the end: the part file is already complete
            log.info("%s: %s already holds all %d bytes", url, part.name, offset)
            return file_digests(part, algorithms)
        raise
    with response:
        if offset and response.status == 206:
            _check_resumed_range(url, response.headers.get("Content-Range", ""), offset)
        elif offset:
            log.info("%s ignored the Range request: downloading %s from the start", url, part.name)
            offset = 0
        hashers = {name: hashlib.new(name, usedforsecurity=False) for name in algorithms}
        if offset:
            _hash_file(part, hashers.values())
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None else None
        received = 0
        with open(part, "ab" if offset else "wb") as out:
            chunks = iter(lambda: response.read(CHUNK_BYTES), b"")
            total = -(-expected // CHUNK_BYTES) if expected is not None else None
            desc = f"download {part.name[: -len('.part')]} from byte {offset} (MiB)"
            for chunk in progress(chunks, total, desc):
                out.write(chunk)
                for hasher in hashers.values():
                    hasher.update(chunk)
                received += len(chunk)
    if expected is not None and received != expected:
        # ConnectionError: the caller tries the next mirror, resuming from what arrived.
        raise ConnectionError(f"connection closed after {received} of {expected} bytes")
    log.info("%s: received %d bytes, %s now %d bytes", url, received, part.name, offset + received)
    return {name: hasher.hexdigest() for name, hasher in hashers.items()}


def _check_resumed_range(url: str, content_range: str, offset: int) -> None:
    if not content_range.startswith(f"bytes {offset}-"):
        raise ConnectionError(f"{url} answered Range bytes={offset}- with Content-Range {content_range!r}")


def file_digests(path: Path, algorithms: Sequence[str]) -> dict[str, str]:
    """Hex digests of a file, read once in chunks whatever its size."""
    hashers = {name: hashlib.new(name, usedforsecurity=False) for name in algorithms}
    _hash_file(path, hashers.values())
    return {name: hasher.hexdigest() for name, hasher in hashers.items()}


def _hash_file(path: Path, hashers) -> None:
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            for hasher in hashers:
                hasher.update(chunk)


def _digest_mismatch(archive: Archive, got: Mapping[str, str]) -> str | None:
    """None when every published digest matches; else which ones differ, expected and got."""
    wrong = [name for name, expected in archive.digests.items() if got[name] != expected.lower()]
    if not wrong:
        return None
    return ", ".join(f"{name} expected {archive.digests[name]}, got {got[name]}" for name in wrong)


def extract_archive(archive: Path, target_dir: Path, staging: Path) -> list[str]:
    """Extract a tar or zip archive into `target_dir`, through the `staging` folder; return its top-level names.

    Every member is checked before anything is written, and the whole archive is refused if one
    would land outside the target (absolute path, `..`, a link pointing out, a device file). The
    top-level entries are renamed into `target_dir` only once all of them are extracted, and never
    over an existing file or folder.
    """
    if staging.exists():
        shutil.rmtree(staging)  # a previous extraction that did not finish
    staging.mkdir(parents=True)
    if zipfile.is_zipfile(archive):
        _extract_zip(archive, staging)
    elif tarfile.is_tarfile(archive):
        _extract_tar(archive, staging)
    else:
        raise PipelineError(f"{archive}: not a zip or tar archive")
    entries = sorted(staging.iterdir())
    clashes = [str(target_dir / entry.name) for entry in entries if (target_dir / entry.name).exists()]
    if clashes:
        raise PipelineError(
            f"{archive}: would replace {clashes}, which no earlier download recorded. Move them away and rerun, "
            f"or set dataset.download: false to use the dataset already there"
        )
    for entry in entries:
        os.replace(entry, target_dir / entry.name)
    staging.rmdir()
    return [entry.name for entry in entries]


def _extract_zip(archive: Path, staging: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zip_file:
            members = zip_file.infolist()
            for member in members:
                checked_member_path(member.filename, archive)
            # zipfile writes a stored symlink as a small regular file holding its target, so zip
            # members cannot create links: paths are all there is to check.
            for member in progress(members, len(members), f"extract {archive.name}"):
                zip_file.extract(member, staging)
    except zipfile.BadZipFile as exc:
        raise PipelineError(f"{archive}: damaged zip archive ({exc})") from None


def _extract_tar(archive: Path, staging: Path) -> None:
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                check_tar_member(member, archive)
            # The standard library's "data" filter (Python >= 3.10.12 / 3.11.4) re-checks each path
            # as it is written and drops modes that do not belong in a dataset.
            safety = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            for member in progress(members, len(members), f"extract {archive.name}"):
                tar.extract(member, staging, **safety)
    except tarfile.TarError as exc:
        raise PipelineError(f"{archive}: damaged or unsafe tar archive ({exc})") from None


def checked_member_path(name: str, archive: Path) -> PurePosixPath:
    """The member's path relative to the extraction folder; PipelineError if it would leave it."""
    # Backslashes count as separators: a Windows-made archive's "..\x" must not slip through.
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts:
        raise PipelineError(f"{archive}: member {name!r} would be written outside the extraction folder; refusing the archive")
    return path


def check_tar_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Refuse tar members outside the folder, links that point out of it, and device files."""
    path = checked_member_path(member.name, archive)
    if member.isdev():
        raise PipelineError(f"{archive}: member {member.name!r} is a device or fifo; refusing the archive")
    if member.issym() or member.islnk():
        # A symlink's target is relative to its own folder, a hard link's to the archive root.
        base = str(path.parent) if member.issym() else ""
        resolved = posixpath.normpath(posixpath.join(base, member.linkname))
        if posixpath.isabs(member.linkname) or resolved == ".." or resolved.startswith("../"):
            raise PipelineError(
                f"{archive}: link {member.name!r} -> {member.linkname!r} points outside the extraction folder; "
                f"refusing the archive"
            )


def _download_with_torchvision(name: str, root: Path, marker: Path) -> Path:
    """Flowers-102 and FGVC Aircraft: torchvision knows their URLs and md5s and checks them itself."""
    import torchvision
    from torchvision import datasets

    if marker.is_file():
        log.info("%s already downloaded into %s (%s): nothing to do", name, root, MARKER)
        return marker
    root.mkdir(parents=True, exist_ok=True)
    try:
        class_name, folder = TORCHVISION_DATASETS[name]
        getattr(datasets, class_name)(str(root), download=True)  # one download holds every split
    except (RuntimeError, OSError) as exc:
        raise PipelineError(f"torchvision could not download {name} into {root}: {exc}") from None
    write_json(marker, {"dataset": name, "downloaded_by": f"torchvision {torchvision.__version__}", "extracted": [folder]})
    log.info("downloaded %s into %s/%s with torchvision %s", name, root, folder, torchvision.__version__)
    return marker
