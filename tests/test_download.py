"""pipeline.download on small archives built here, served by a local HTTP server on 127.0.0.1 that
honours (or ignores) Range requests, never the real URLs."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import io
import json
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from pipeline import PipelineError
from pipeline.download import (
    ARCHIVES,
    MARKER,
    WORK_DIR,
    Archive,
    download_dataset,
    download_to_part,
    extract_archive,
    fetch_archive,
)

TIMEOUT = 5.0  # seconds: every network wait in these tests is bounded


def digests_of(data: bytes) -> dict[str, str]:
    return {"md5": hashlib.md5(data).hexdigest(), "sha1": hashlib.sha1(data).hexdigest()}


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zip_file:
        for name, data in files.items():
            zip_file.writestr(name, data)
    return buffer.getvalue()


def tar_bytes(files: dict[str, bytes], links: dict[str, str] | None = None, hard: bool = False) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buffer.getvalue()


# A zip of two folders, like COCO's val2017.zip / annotations zip, and a tar like VOC's.
IMAGES = {"val2017/000000000001.jpg": b"jpeg bytes " * 500, "val2017/000000000002.jpg": b"more bytes " * 400}
ANNOTATIONS = {"annotations/instances_val2017.json": json.dumps({"images": []}).encode()}
VOC = {"VOCdevkit/VOC2012/JPEGImages/2007_000032.jpg": b"voc image", "VOCdevkit/VOC2012/ImageSets/x.txt": b"2007_000032\n"}


class Server:
    """Serves `files` (name -> bytes) over HTTP; counts requests and can ignore Range or send short bodies."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests: list[tuple[str, str | None]] = []
        self.honour_range = True
        self.truncate_at: int | None = None  # close the connection after this many body bytes, once
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                range_header = self.headers.get("Range")
                server.requests.append((name, range_header))
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                start = 0
                if range_header and server.honour_range:
                    start = int(range_header.removeprefix("bytes=").rstrip("-"))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.truncate_at is not None:
                    body, server.truncate_at = body[: server.truncate_at], None
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.timeout = TIMEOUT
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(TIMEOUT)


@pytest.fixture
def server():
    files = {"val2017.zip": zip_bytes(IMAGES), "annotations.zip": zip_bytes(ANNOTATIONS), "voc.tar": tar_bytes(VOC)}
    with Server(files) as running:
        yield running


def archive_for(server: Server, name: str, **digests) -> Archive:
    return Archive(name, (server.url(name),), digests or digests_of(server.files[name]))


# --- the official table -----------------------------------------------------------------------


def test_official_table_has_the_issue_urls_and_well_formed_digests():
    urls = {url for archives in ARCHIVES.values() for archive in archives for url in archive.urls}
    assert "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar" in urls
    for name in ("zips/train2017.zip", "zips/val2017.zip", "annotations/annotations_trainval2017.zip"):
        assert f"http://images.cocodataset.org/{name}" in urls
    assert ARCHIVES["voc"][0].digests["md5"] == "6cd6e144f989b92b3379bac3b3de84fd"
    lengths = {"md5": 32, "sha1": 40}
    for archives in ARCHIVES.values():
        for archive in archives:
            assert all(archive.filename == url.rsplit("/", 1)[1] for url in archive.urls)
            for algorithm, digest in archive.digests.items():
                assert len(digest) == lengths[algorithm] and int(digest, 16) >= 0


def test_unknown_dataset_is_refused(tmp_path):
    with pytest.raises(PipelineError, match="'folder' has no download"):
        download_dataset("folder", tmp_path)


# --- extraction ---------------------------------------------------------------------------------


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_extraction_renames_top_level_entries_into_place(tmp_path, kind):
    data = zip_bytes(IMAGES) if kind == "zip" else tar_bytes(IMAGES)
    archive = write(tmp_path, f"a.{kind}", data)
    target = tmp_path / "root"
    target.mkdir()
    assert extract_archive(archive, target, tmp_path / "staging") == ["val2017"]
    for name, content in IMAGES.items():
        assert (target / name).read_bytes() == content
    assert not (tmp_path / "staging").exists()


@pytest.mark.parametrize(
    "member",
    ["../escape.txt", "/tmp/absolute.txt", "val2017/../../escape.txt", "..\\escape.txt"],
)
@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_members_escaping_the_target_refuse_the_whole_archive(tmp_path, kind, member):
    files = {"val2017/ok.jpg": b"fine", member: b"evil"}
    archive = write(tmp_path, f"a.{kind}", zip_bytes(files) if kind == "zip" else tar_bytes(files))
    target = tmp_path / "root"
    target.mkdir()
    with pytest.raises(PipelineError, match="outside the extraction folder"):
        extract_archive(archive, target, tmp_path / "staging")
    assert list(target.iterdir()) == []  # nothing extracted, not even the good member
    assert not (tmp_path / "escape.txt").exists()


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("link_target", ["../../outside", "/etc/passwd", "sub/../../.."])
def test_tar_links_pointing_out_are_refused(tmp_path, link_target, hard):
    archive = write(tmp_path, "a.tar", tar_bytes({"data/file.txt": b"x"}, links={"data/link": link_target}, hard=hard))
    target = tmp_path / "root"
    target.mkdir()
    with pytest.raises(PipelineError, match="points outside"):
        extract_archive(archive, target, tmp_path / "staging")
    assert list(target.iterdir()) == []


def test_tar_symlink_inside_the_archive_is_kept(tmp_path):
    archive = write(tmp_path, "a.tar", tar_bytes({"data/file.txt": b"content"}, links={"data/alias.txt": "file.txt"}))
    target = tmp_path / "root"
    target.mkdir()
    extract_archive(archive, target, tmp_path / "staging")
    assert (target / "data" / "alias.txt").is_symlink()
    assert (target / "data" / "alias.txt").read_bytes() == b"content"


def test_extraction_never_replaces_existing_entries(tmp_path):
    archive = write(tmp_path, "a.zip", zip_bytes(IMAGES))
    target = tmp_path / "root"
    (target / "val2017").mkdir(parents=True)
    (target / "val2017" / "mine.jpg").write_bytes(b"user data")
    with pytest.raises(PipelineError, match="val2017.*dataset.download: false"):
        extract_archive(archive, target, tmp_path / "staging")
    assert [p.name for p in (target / "val2017").iterdir()] == ["mine.jpg"]


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_damaged_archive_is_a_pipeline_error(tmp_path, kind):
    data = zip_bytes(IMAGES) if kind == "zip" else tar_bytes(IMAGES)
    # Flip bytes inside the first member's data: the zip CRC or the tar header checksum catches it.
    offset = data.index(b"jpeg bytes") if kind == "zip" else 10
    damaged = data[:offset] + bytes(b ^ 0xFF for b in data[offset : offset + 64]) + data[offset + 64 :]
    archive = write(tmp_path, f"a.{kind}", damaged)
    target = tmp_path / "root"
    target.mkdir()
    with pytest.raises(PipelineError, match=str(archive)):
        extract_archive(archive, target, tmp_path / "staging")
    assert list(target.iterdir()) == []


# --- download and verification ------------------------------------------------------------------


def test_fetch_verifies_and_names_the_mismatch(tmp_path, server):
    good = archive_for(server, "val2017.zip")
    path, url = fetch_archive(good, tmp_path, TIMEOUT)
    assert path.read_bytes() == server.files["val2017.zip"] and url == server.url("val2017.zip")

    wrong_md5 = "0" * 32
    bad = archive_for(server, "annotations.zip", md5=wrong_md5)
    got_md5 = hashlib.md5(server.files["annotations.zip"]).hexdigest()
    with pytest.raises(PipelineError) as error:
        fetch_archive(bad, tmp_path, TIMEOUT)
    message = str(error.value)
    assert "annotations.zip" in message and wrong_md5 in message and got_md5 in message
    assert not (tmp_path / "annotations.zip").exists() and not (tmp_path / "annotations.zip.part").exists()


def test_corrupt_download_is_never_extracted(tmp_path, server):
    bad = Archive("val2017.zip", (server.url("val2017.zip"),), {"sha1": "f" * 40})
    root = tmp_path / "root"
    with pytest.raises(PipelineError, match="sha1 expected f{40}"):
        download_dataset("coco", root, archives=[bad], timeout=TIMEOUT)
    assert not (root / "val2017").exists() and not (root / MARKER).exists()
    assert list((root / WORK_DIR).iterdir()) == []


def test_verified_archive_left_by_an_earlier_run_is_reused_or_fetched_again_if_changed(tmp_path, server):
    archive = archive_for(server, "voc.tar")
    (tmp_path / "voc.tar").write_bytes(server.files["voc.tar"])
    assert fetch_archive(archive, tmp_path, TIMEOUT) == (tmp_path / "voc.tar", None)
    assert server.requests == []

    (tmp_path / "voc.tar").write_bytes(b"damaged on disk")
    path, url = fetch_archive(archive, tmp_path, TIMEOUT)
    assert url == server.url("voc.tar") and path.read_bytes() == server.files["voc.tar"]


def test_next_mirror_is_tried_after_a_failure(tmp_path, server):
    archive = Archive("voc.tar", (server.url("missing.tar"), server.url("voc.tar")), digests_of(server.files["voc.tar"]))
    path, url = fetch_archive(archive, tmp_path, TIMEOUT)
    assert url == server.url("voc.tar") and path.read_bytes() == server.files["voc.tar"]


def test_unreachable_mirrors_report_each_failure(tmp_path, server):
    archive = Archive("voc.tar", (server.url("gone-1.tar"), server.url("gone-2.tar")), {"md5": "0" * 32})
    with pytest.raises(PipelineError, match="gone-1.tar: HTTP Error 404.*gone-2.tar: HTTP Error 404"):
        fetch_archive(archive, tmp_path, TIMEOUT)


def test_part_file_is_resumed_with_a_range_request(tmp_path, server):
    data = server.files["val2017.zip"]
    part = tmp_path / "val2017.zip.part"
    part.write_bytes(data[:1000])
    digests = download_to_part(server.url("val2017.zip"), part, ["md5", "sha1"], TIMEOUT)
    assert server.requests == [("val2017.zip", "bytes=1000-")]
    assert part.read_bytes() == data
    assert digests == digests_of(data)  # the resumed bytes and those already on disk, hashed together


def test_server_ignoring_range_restarts_from_the_first_byte(tmp_path, server):
    server.honour_range = False
    data = server.files["val2017.zip"]
    part = tmp_path / "val2017.zip.part"
    part.write_bytes(b"stale bytes from another version")
    digests = download_to_part(server.url("val2017.zip"), part, ["md5"], TIMEOUT)
    assert part.read_bytes() == data and digests["md5"] == hashlib.md5(data).hexdigest()


def test_complete_part_file_answered_416_is_verified_not_refetched(tmp_path, server):
    data = server.files["voc.tar"]
    part = tmp_path / "voc.tar.part"
    part.write_bytes(data)
    assert download_to_part(server.url("voc.tar"), part, ["sha1"], TIMEOUT) == {"sha1": hashlib.sha1(data).hexdigest()}
    assert part.read_bytes() == data


def test_dropped_connection_leaves_a_part_file_that_the_next_run_resumes(tmp_path, server):
    data = server.files["val2017.zip"]
    server.truncate_at = 700
    root = tmp_path / "root"
    archive = archive_for(server, "val2017.zip")
    with pytest.raises(PipelineError, match="after 700 of .* bytes.*Rerun to resume"):
        download_dataset("coco", root, archives=[archive], timeout=TIMEOUT)
    assert (root / WORK_DIR / "val2017.zip.part").read_bytes() == data[:700]

    download_dataset("coco", root, archives=[archive], timeout=TIMEOUT)
    assert server.requests[-1] == ("val2017.zip", "bytes=700-")
    for name, content in IMAGES.items():
        assert (root / name).read_bytes() == content


# --- the whole download ---------------------------------------------------------------------------


def test_download_dataset_extracts_writes_marker_and_rerun_is_a_no_op(tmp_path, server):
    root = tmp_path / "coco"
    archives = [archive_for(server, "annotations.zip"), archive_for(server, "val2017.zip")]
    marker = download_dataset("coco", root, archives=archives, timeout=TIMEOUT)

    assert marker == root / MARKER
    for name, content in {**IMAGES, **ANNOTATIONS}.items():
        assert (root / name).read_bytes() == content
    assert sorted(p.name for p in root.iterdir()) == sorted([MARKER, "annotations", "val2017"])  # archives deleted
    record = json.loads(marker.read_text())
    assert record["dataset"] == "coco"
    assert [(a["filename"], a["digests"], a["extracted"], a["bytes"]) for a in record["archives"]] == [
        ("annotations.zip", digests_of(server.files["annotations.zip"]), ["annotations"], len(server.files["annotations.zip"])),
        ("val2017.zip", digests_of(server.files["val2017.zip"]), ["val2017"], len(server.files["val2017.zip"])),
    ]

    requests = len(server.requests)
    before = marker.stat().st_mtime_ns
    assert download_dataset("coco", root, archives=archives, timeout=TIMEOUT) == marker
    assert len(server.requests) == requests and marker.stat().st_mtime_ns == before


def test_interrupted_multi_archive_download_skips_archives_already_extracted(tmp_path, server):
    root = tmp_path / "coco"
    missing = Archive("val2017.zip", (server.url("not-there.zip"),), digests_of(server.files["val2017.zip"]))
    archives = [archive_for(server, "annotations.zip"), missing]
    with pytest.raises(PipelineError, match="not-there.zip"):
        download_dataset("coco", root, archives=archives, timeout=TIMEOUT)
    assert (root / "annotations" / "instances_val2017.json").is_file() and not (root / MARKER).exists()

    fixed = [archives[0], archive_for(server, "val2017.zip")]
    download_dataset("coco", root, archives=fixed, timeout=TIMEOUT)
    assert [name for name, _ in server.requests].count("annotations.zip") == 1  # not fetched again
    assert (root / "val2017" / "000000000001.jpg").is_file() and (root / MARKER).is_file()
    assert not (root / WORK_DIR).exists()


def test_tar_download_gives_the_voc_layout(tmp_path, server):
    root = tmp_path / "voc"
    download_dataset("voc", root, archives=[archive_for(server, "voc.tar")], timeout=TIMEOUT)
    assert (root / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2007_000032.jpg").read_bytes() == b"voc image"


def test_caltech_zip_gives_images_and_annotations_in_torchvisions_layout(tmp_path):
    images = {"101_ObjectCategories/accordion/image_0001.jpg": b"accordion jpeg"}
    outlines = {"Annotations/accordion/annotation_0001.mat": b"outline"}
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb") as handle:
        handle.write(tar_bytes(images))
    files = {"caltech-101.zip": zip_bytes({"caltech-101/101_ObjectCategories.tar.gz": gz.getvalue(),
                                            "caltech-101/Annotations.tar": tar_bytes(outlines),
                                            "caltech-101/show_annotation.m": b"% matlab"})}
    official = ARCHIVES["caltech101"][0]
    with Server(files) as server:
        archive = dataclasses.replace(archive_for(server, "caltech-101.zip"), inner=official.inner, inner_target=official.inner_target)
        marker = download_dataset("caltech101", tmp_path / "data", archives=[archive], timeout=TIMEOUT)

    root = tmp_path / "data"
    for name, content in {**images, **outlines}.items():
        assert (root / "caltech101" / name).read_bytes() == content  # where the caltech101 reader looks
    assert sorted(p.name for p in root.iterdir()) == sorted([MARKER, "caltech101"])  # zip and its other files gone
    (record,) = json.loads(marker.read_text())["archives"]
    assert record["extracted"] == ["caltech101/101_ObjectCategories", "caltech101/Annotations"]


def test_cli_download_subcommand_uses_dataset_root(tmp_path, monkeypatch):
    import yaml

    from pipeline import __main__ as cli

    calls = []
    monkeypatch.setattr("pipeline.download.download_dataset", lambda name, root, timeout: calls.append((name, str(root), timeout)))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"dataset": {"name": "voc", "root": str(tmp_path / "v"), "download": True}}))
    assert cli.main(["download", "--config", str(config), "--timeout", "7"]) == 0
    assert calls == [("voc", str(tmp_path / "v"), 7.0)]
