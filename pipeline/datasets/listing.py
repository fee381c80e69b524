"""A fingerprint of the files a dataset reader reads, so the workflow reruns prepare when they change.

Snakemake sees only declared inputs; a dataset root is a folder whose contents it does not follow.
The fingerprint hashes (relative path, size, mtime) of every file the reader of dataset.name would
read, found by listing and stat alone, never by opening an image, so even COCO's 120k images cost a
fraction of a second when the workflow is parsed. Adding, removing or replacing such a file changes
it; files the reader never looks at do not.
"""

from __future__ import annotations

import csv
import hashlib
import os
import stat
from pathlib import Path

from pipeline import PipelineError
from pipeline.datasets.coco import SPLIT_FILES as COCO_SPLIT_FILES
from pipeline.datasets.folder import MASK_FOLDER
from pipeline.datasets.voc import SPLIT_LISTS as VOC_SPLIT_LISTS, find_voc_root


def listing_fingerprint(dataset_cfg: dict) -> str:
    """sha256 of the sorted listing of the files dataset_cfg's reader reads under its root."""
    root = Path(dataset_cfg["root"]).resolve()
    if not root.is_dir():  # prepare names the problem; nothing to list yet
        return "no dataset root"
    lines = sorted(_listing(dataset_cfg, str(root)))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _listing(dataset_cfg: dict, root: str) -> list[str]:
    """One "relative path, size, mtime" line per file the reader reads."""
    name = dataset_cfg["name"]
    if name == "coco":
        return coco_listing(root)
    if name == "voc":
        return voc_listing(root)
    if name == "folder" and dataset_cfg.get("csv"):
        return csv_listing(root, dataset_cfg["csv"])
    if name == "folder":
        return class_folder_listing(root)
    return _listing_under(root)  # caltech101, flowers102, cifar, fgvc_aircraft, stanford_cars: their folders hold nothing else


def coco_listing(root: str) -> list[str]:
    """The annotation files and the image folders' entries (which of them an annotation file
    lists would mean parsing it, too slow here; stray files in those folders rerun prepare too)."""
    lines = []
    for annotation_file, image_folder, _ in COCO_SPLIT_FILES.values():
        lines.append(_line(root, annotation_file))
        lines.extend(_entry_lines(root, image_folder))
    return lines


def voc_listing(root: str) -> list[str]:
    """The split lists and, for every image they name, its JPEG and its two segmentation PNGs."""
    try:
        voc_root = find_voc_root(Path(root))
    except PipelineError:  # prepare reports the layout; there is nothing to list
        return []
    base = voc_root.relative_to(root).as_posix()
    lines = []
    for split_list in VOC_SPLIT_LISTS:
        list_path = f"{base}/ImageSets/Segmentation/{split_list}.txt"
        lines.append(_line(root, list_path))
        names = Path(root, list_path).read_text().split() if Path(root, list_path).is_file() else []
        for name in names:
            for relative in (f"JPEGImages/{name}.jpg", f"SegmentationObject/{name}.png", f"SegmentationClass/{name}.png"):
                lines.append(_line(root, f"{base}/{relative}"))
    return lines


def csv_listing(root: str, csv_file: str) -> list[str]:
    """The CSV and every image and mask it lists (a small file, read here)."""
    csv_path = Path(root, csv_file)
    if not csv_path.is_file():
        return []
    lines = [_line(root, csv_file)]
    with open(csv_path, newline="") as handle:
        for row in csv.DictReader(handle):
            listed = [(row.get(column) or "").strip() for column in ("path", "mask_path")]
            lines.extend(_line(root, relative) for relative in listed if relative)
    return lines


def class_folder_listing(root: str) -> list[str]:
    """root/<class>/<entry>, root/<class>/masks/<entry>, and entries lying in the root: all that prepare lists."""
    lines = _entry_lines(root, "")
    with os.scandir(root) as entries:
        folders = [entry.name for entry in entries if not entry.name.startswith(".") and entry.is_dir()]
    for folder in folders:
        lines += _entry_lines(root, folder) + _entry_lines(root, f"{folder}/{MASK_FOLDER}")
    return lines


def _entry_lines(root: str, folder: str) -> list[str]:
    """Lines of the folder's non-hidden entries (none when it does not exist), by scandir: one stat each."""
    try:
        entries = list(os.scandir(os.path.join(root, folder)))
    except (FileNotFoundError, NotADirectoryError):
        return []
    prefix = f"{folder}/" if folder else ""
    return [f"{prefix}{entry.name}\t{_size_and_mtime(entry)}" for entry in entries if not entry.name.startswith(".")]


def _line(root: str, relative: str) -> str:
    return f"{relative}\t{_size_and_mtime(Path(root, relative))}"


def _size_and_mtime(entry: os.DirEntry | Path) -> str:
    try:
        status = entry.stat()
    except OSError:  # absent (a VOC list may name a missing image), a link to nothing, or a link loop
        return f"link\t{entry.stat(follow_symlinks=False).st_mtime_ns}" if entry.is_symlink() else "missing"
    if stat.S_ISDIR(status.st_mode):  # a folder prepare only notes by name; its mtime moves with hidden files too
        return "folder"
    return f"{status.st_size}\t{status.st_mtime_ns}"


def _listing_under(root: str) -> list[str]:
    lines = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        relative = os.path.relpath(folder, root)
        lines.extend(_line(root, name if relative == "." else f"{relative}/{name}") for name in names if not name.startswith("."))
    return lines
