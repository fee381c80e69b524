"""Atomic outputs, one writer per output, Parquet with key-value metadata, PNG bytes, and image
decoding on threads.

Every output is written to a temporary name beside its final path and renamed into place only when
complete, so a crashed or killed job never leaves a file that looks finished. A stage that resumes
from work flushed beside its output holds `output_lock` for its whole life, so that no second
process (an orphan of a lost Snakemake controller, a second command with the same --out) adopts
or deletes that work while it runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import socket
import tempfile
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from pipeline import PipelineError

Item, Result = TypeVar("Item"), TypeVar("Result")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` if the block succeeds.

    Works for files and for folders (the block creates whichever it wants at the yielded path).
    On failure the temporary is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)) / path.name
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written to the temporary output for {path}")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def try_lock(path: str | Path) -> IO[str] | None:
    """Take an exclusive advisory lock on the file `path` (created if missing) without waiting.

    Returns the open file, which holds the lock until it is closed or the process ends (the kernel
    releases it on any exit, kill -9 included), with this process's pid and host written into it for
    whoever finds it taken; None when another open file holds it. The file is never deleted:
    unlinking a lock file lets a process that opened the old file and one that creates a new one
    both "hold" it.

    This relies on flock(2) being coherent for everyone who can reach the file: always on a local
    disk; across machines (a SLURM job on another node) only where the shared filesystem forwards
    flock to a lock manager (NFSv4, NFSv3 with lockd, Lustre mounted with -o flock, GPFS). On a mount
    without that (NFS with nolock, Lustre's default localflock) each node only sees its own locks.
    """
    handle = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    except OSError as exc:
        handle.close()
        raise PipelineError(f"cannot lock {path}: {exc}. Expected a filesystem that supports flock(2).") from None
    handle.truncate(0)
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
    handle.flush()
    return handle


def lock_holder(path: str | Path) -> str:
    """Who holds the lock file `path`, as `try_lock` recorded it: "pid 123 on host node7"."""
    try:
        holder = json.loads(Path(path).read_text())
        return f"pid {holder['pid']} on host {holder['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet recorded its pid"  # it locked the file and is writing it now


def lock_path_for(out_path: str | Path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".lock")


@contextlib.contextmanager
def output_lock(out_path: str | Path) -> Iterator[Path]:
    """Hold the exclusive lock on `<out_path>.lock` for the block; yield the lock file's path.

    Fails at once, naming the lock file and its holder, when another process holds it: two writers
    of one output would resume from, and delete, each other's flushed work.
    """
    lock_path = lock_path_for(out_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    handle = try_lock(lock_path)
    if handle is None:
        raise PipelineError(
            f"{lock_path} is held by {lock_holder(lock_path)}: another process is writing {out_path}. "
            "Expected one writer per output: wait for that process to end (or stop it), then rerun."
        )
    with handle:
        yield lock_path


# Read once, at import, while no other thread of this process can create a file with it cleared.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def grant_umask_permissions(path: str | Path) -> None:
    """Give the files in folder `path` (recursively) the mode open() gives: 0666 less the umask.

    safetensors (0.8) writes its files 0600, so tokens and checkpoints in a shared results folder
    were unreadable to the group the umask lets read every other output.
    """
    mode = 0o666 & ~_UMASK
    for file in Path(path).rglob("*"):
        if file.is_file() and not file.is_symlink() and file.stat().st_mode & 0o777 != mode:
            file.chmod(mode)


def write_json(path: str | Path, value) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def read_json(path: str | Path):
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path} is not valid JSON: {exc}") from None


def write_parquet(path: str | Path, table: pa.Table, metadata: dict | None = None) -> None:
    """Write `table` atomically; `metadata` values are stored as JSON under their keys."""
    if metadata:
        existing = dict(table.schema.metadata or {})
        existing.update({k.encode(): json.dumps(v, default=_json_default).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(existing)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_parquet(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} does not exist")
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise PipelineError(f"{path} is not a readable Parquet file: {exc}") from None


def read_metadata(path: str | Path) -> dict:
    """The key-value metadata written by `write_parquet`, decoded from JSON."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} does not exist")
    try:
        raw = pq.read_schema(path).metadata or {}
    except (pa.ArrowInvalid, OSError) as exc:  # empty, cut off, or not Parquet at all
        raise PipelineError(f"{path} is not a readable Parquet file: {exc}") from None
    out = {}
    for key, value in raw.items():
        key = key.decode()
        if key == "ARROW:schema":
            continue
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value.decode(errors="replace")
    return out


def encode_png(image: Image.Image | np.ndarray) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_image(data: bytes, what: str = "image") -> Image.Image:
    """Decode encoded image bytes to RGB (see `to_rgb`); `what` names the source in the error message."""
    return _decoded(data, what, f"{what}: cannot decode image bytes")


def open_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB (see `to_rgb`) with an error that names the file."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise PipelineError(f"image {path} does not exist") from None
    except OSError as exc:  # a folder, a symlink loop, no permission
        raise PipelineError(f"image {path} cannot be read ({exc.strerror or exc})") from None
    return _decoded(data, f"image {path}", f"image {path} is truncated or not an image")


def read_object_mask(mask_path: str | Path, image_id: str, size: tuple[int, int]) -> np.ndarray:
    """Boolean [H,W] map of image `image_id`'s labelled object: the non-zero pixels of its mask, which
    must have the image's `size` (width, height) and mark at least one pixel."""
    mask = open_image(mask_path)
    if mask.size != size:
        raise PipelineError(
            f"mask {mask_path} of image {image_id!r} is {mask.size[0]}x{mask.size[1]}. "
            f"Expected the image's size {size[0]}x{size[1]}."
        )
    obj = np.asarray(mask).any(axis=2)
    if not obj.any():
        raise PipelineError(f"mask {mask_path} of image {image_id!r} marks no object pixel. Expected some non-zero pixels.")
    return obj


def _decoded(data: bytes, what: str, undecodable: str) -> Image.Image:
    """`data` decoded to RGB; errors start with `what`, or with `undecodable` when PIL cannot decode it."""
    try:
        image = Image.open(io.BytesIO(data))
        check_pixel_count(image, what)
        image.load()
    except Image.DecompressionBombError as exc:
        raise PipelineError(f"{what}: {exc}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise PipelineError(f"{undecodable} ({exc})") from None
    if image.format == "JPEG":
        damage = jpeg_damage(data)
        if damage:
            raise PipelineError(f"{what} is a damaged JPEG: {damage}. Expected a complete, uncorrupted file")
    return to_rgb(image, what)


# open_image refuses images over PIL's limit itself, naming the file; PIL's warning for them would
# only repeat that without the name.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def check_pixel_count(image: Image.Image, what: str) -> None:
    """Refuse sizes over PIL's decompression-bomb limit before decoding (PIL itself only warns up to twice it)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        raise PipelineError(
            f"{what} is {image.width}x{image.height} = {image.width * image.height} pixels, over PIL's "
            f"decompression-bomb limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS). Expected a smaller image"
        )


# Fully transparent pixels become this colour, partly transparent ones are blended with it.
ALPHA_BACKGROUND = (255, 255, 255)
ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
PLAIN_MODES = {"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr"}
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


def to_rgb(image: Image.Image, what: str) -> Image.Image:
    """8-bit RGB of a decoded image of any mode a photo comes in, or PipelineError naming `what`.

    Deep greyscale (16- or 32-bit integers) is scaled by its bit depth, not by its own min/max, so
    equal values mean equal brightness across images; PIL's convert("RGB") clips it (all white).
    Transparency (an alpha channel, a palette's or a PNG's transparent colour) is composited on
    ALPHA_BACKGROUND rather than dropped, which would show whatever colour hides under it.
    """
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
        return _scaled_grey(image, _integer_bit_depth(image)).convert("RGB")
    if image.mode in ALPHA_MODES or (image.mode in PLAIN_MODES and "transparency" in image.info):
        background = Image.new("RGBA", image.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    if image.mode in PLAIN_MODES:
        return image.convert("RGB")
    raise PipelineError(
        f"{what} has pixel mode {image.mode!r}. Expected 8-bit greyscale, palette, RGB(A), CMYK, or 16/32-bit "
        "integer greyscale (floating-point pixels have no bit depth to scale by)"
    )


def _integer_bit_depth(image: Image.Image) -> int:
    """Bits per pixel of a greyscale image PIL holds as 16- or 32-bit integers."""
    if image.mode in SIXTEEN_BIT_MODES or image.format == "PNG":  # PNG greyscale is at most 16 bit
        return 16
    bits_per_sample = getattr(image, "tag_v2", {}).get(258)  # TIFF BitsPerSample
    return int(bits_per_sample[0]) if bits_per_sample else 32


def _scaled_grey(image: Image.Image, bits: int) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    scaled = np.clip(np.rint(values * (255 / (2**bits - 1))), 0, 255)
    return Image.fromarray(scaled.astype(np.uint8), mode="L")


# JPEG markers that may follow entropy-coded data: restarts, the next scan's tables and header, end.
_RESTART_MARKERS = range(0xD0, 0xD8)
_END_OF_IMAGE, _START_OF_SCAN = 0xD9, 0xDA


def jpeg_damage(data: bytes) -> str | None:
    """What is wrong with a JPEG that libjpeg decoded anyway, or None.

    libjpeg recovers from missing and corrupt entropy-coded data (filling grey), and PIL silences
    its warnings, so a cut-off file padded with zeros or one with a bad marker decodes without a
    word. This walks the marker structure: every segment where its length says, restart markers
    in sequence, and an end-of-image marker after the last scan. Bit errors that leave the
    structure intact are not seen.
    """
    position = 2  # after the start-of-image marker, which PIL has checked
    while True:
        if position + 2 > len(data) or data[position] != 0xFF:
            return f"no marker at byte {position} where the previous segment ends"
        while position + 1 < len(data) and data[position + 1] == 0xFF:  # fill bytes
            position += 1
        if position + 2 > len(data):
            return "the file ends before its end-of-image marker"
        marker = data[position + 1]
        if marker == _END_OF_IMAGE:
            return None
        if position + 4 > len(data):
            return f"segment 0xFF{marker:02X} at byte {position} is cut off"
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        position += 2 + length
        if marker == _START_OF_SCAN:
            position, damage = _end_of_scan(data, position)
            if damage:
                return damage


def _end_of_scan(data: bytes, position: int) -> tuple[int, str | None]:
    """Where the entropy-coded data starting at `position` ends (at the next marker), or what is wrong in it."""
    expected_restart = 0
    while True:
        position = data.find(b"\xff", position)
        if position < 0 or position + 1 >= len(data):
            return len(data), "the file ends inside scan data, with no end-of-image marker (cut off or padded)"
        following = data[position + 1]
        if following == 0x00 or following == 0xFF:  # a stuffed 0xFF data byte, or fill before a marker
            position += 1
            continue
        if following in _RESTART_MARKERS:
            if following - 0xD0 != expected_restart:
                return position, f"restart marker {following - 0xD0} at byte {position} where {expected_restart} was due (data lost)"
            expected_restart = (expected_restart + 1) % 8
            position += 2
            continue
        if following < 0xC0 or following == 0xC8 or 0xF0 <= following <= 0xFD:  # not a marker that can come next
            return position, f"byte pair 0xFF{following:02X} at byte {position} inside scan data is not a JPEG marker"
        return position, None


@contextlib.contextmanager
def threaded_map(fn: Callable[[Item], Result], items: Iterable[Item], threads: int, ahead: int) -> Iterator[Iterator[Result]]:
    """`map(fn, items)` in order, computed by `threads` threads at most `ahead` items before the
    consumer, so that decoding the next images overlaps the caller's work on the current ones.

    For host-side image work: PIL's decoders and resizers and zlib release the GIL, so the threads
    run in parallel (a 512 px PNG takes about 8 ms to decode and resize on one core, too slow
    to feed a GPU from one thread). An error in `fn` is raised, unchanged, where the consumer
    reaches that item. Leaving the context cancels what has not started and waits for the rest.
    """
    if threads < 1 or ahead < 1:
        raise ValueError(f"threaded_map needs threads >= 1 and ahead >= 1. Got threads={threads}, ahead={ahead}")
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")

    def results() -> Iterator[Result]:
        pending = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    try:
        yield results()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def batched(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    """Consecutive lists of `size` items, the last one shorter when they do not divide evenly."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
