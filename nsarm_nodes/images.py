"""IMAGE tensors from nodes and image files from users: checked, converted, named in every error.

IMAGE tensors (ComfyUI convention: float [B, H, W, C] in [0, 1]) handed to a node are checked by
`check_image` before any work: an empty batch, a wrong rank, NaN or infinite values are a
`ValueError` naming the node input. Grayscale (C = 1) is repeated to RGB; RGBA (C = 4) loses its
alpha channel (as ComfyUI's LoadImage, which puts alpha into a separate MASK, so the colour
channels are plain colour); values outside [0, 1] are clamped.
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .options import OUTPUT_FORMATS

RGB_CHANNELS = 3
ALPHA_CHANNELS = 4
GRAY_CHANNELS = 1


def check_image(images: Any, where: str) -> torch.Tensor:
    """A usable IMAGE batch [B, H, W, 3] float32 in [0, 1] from `images`, or ValueError naming `where`.

    Grayscale becomes RGB, alpha is dropped, values outside [0, 1] are clamped (see the module doc)."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{where}: expected an IMAGE tensor [B, H, W, C], got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"{where}: expected an IMAGE batch [B, H, W, C], got a tensor of shape {tuple(images.shape)}")
    b, h, w, c = images.shape
    if b == 0:
        raise ValueError(f"{where}: the IMAGE batch is empty (0 images); check the node that feeds it")
    if h == 0 or w == 0:
        raise ValueError(f"{where}: the images are {w}x{h} pixels; nothing to process")
    if c not in (GRAY_CHANNELS, RGB_CHANNELS, ALPHA_CHANNELS):
        raise ValueError(f"{where}: IMAGE has {c} channels; expected 3 (RGB), 1 (grayscale) or 4 (RGBA)")
    if not images.is_floating_point():
        raise ValueError(f"{where}: IMAGE has dtype {images.dtype}; expected floating-point values in [0, 1]")
    bad = (~torch.isfinite(images)).sum().item()
    if bad:
        raise ValueError(f"{where}: the IMAGE holds {bad} NaN or infinite value(s); fix the node that produced it")
    images = images.float()
    if c == GRAY_CHANNELS:
        images = images.expand(b, h, w, RGB_CHANNELS)
    elif c == ALPHA_CHANNELS:
        images = images[..., :RGB_CHANNELS]
    if images.min() < 0 or images.max() > 1:
        images = images.clamp(0, 1)
    return images.contiguous()


# ---------------------------------------------------------------------------------------------
# Image files
#
# Reading: only regular files are opened (a FIFO or device is refused without opening it for
# reading); the pixel count is checked against `max_pixels` from the header, before decoding
# (decompression-bomb guard); EXIF orientation is applied (as ComfyUI's LoadImage); 16-bit
# grayscale (PIL modes I;16* and I) is scaled from 0..65535 to [0, 1] at full precision instead of
# being clipped at 255 (which made such files come out white); alpha is dropped from the colour
# channels (returned separately, as ComfyUI's MASK, where asked for). Every error names the file.
#
# Writing: the format follows the extension (`OUTPUT_FORMATS`); the file is written to a hidden
# temporary name in the target folder, created with mode 0666 minus the umask like any file the
# user makes, synced, then moved into place in one step; an existing file is only replaced with
# `overwrite`.

SAVE_OPTIONS = {"PNG": {"compress_level": 4}, "JPEG": {"quality": 95}, "WEBP": {"quality": 95},
                "TIFF": {"compression": "tiff_lzw"}, "BMP": {}}
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
U16_MAX = 65535
U8_MAX = 255

_PIL_LIMIT_LOCK = threading.Lock()


class ImageFileError(ValueError):
    """An image file that cannot be used (missing, not a regular file, too large, unreadable)."""


def output_format(path: str | os.PathLike) -> str:
    """The PIL format for an output file name, from its extension; ImageFileError for others."""
    suffix = Path(path).suffix.lower()
    fmt = OUTPUT_FORMATS.get(suffix)
    if fmt is None:
        known = ", ".join(OUTPUT_FORMATS)
        raise ImageFileError(f"{path}: unknown image extension {suffix or '(none)'!r}; name the output "
                             f"with one of {known}")
    if fmt == "WEBP" and not _webp_available():
        raise ImageFileError(f"{path}: this Pillow has no WebP support; use .png or .jpg")
    return fmt


def _webp_available() -> bool:
    from PIL import features

    return bool(features.check("webp"))


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _open_regular(path: Path):
    """A binary file object for `path` if it is a regular file; ImageFileError otherwise. Special
    files are refused from stat() alone; the open is non-blocking and re-checked with fstat()."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageFileError(f"{path}: input image not found") from None
    except OSError as exc:
        raise ImageFileError(f"{path}: cannot read the input image ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageFileError(f"{path}: {_kind(st.st_mode)}, not an image file; give an image file (PNG, JPEG, ...)")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ImageFileError(f"{path}: cannot read the input image ({exc.strerror or exc})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ImageFileError(f"{path}: {_kind(st.st_mode)}, not an image file; give an image file (PNG, JPEG, ...)")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


@contextlib.contextmanager
def open_image(path: str | os.PathLike, max_pixels: int, option: str = "--max-pixels"):
    """The opened (not yet decoded) PIL image of `path`, after the checks above. `option` is how
    the caller lets a user raise `max_pixels` (named in the error)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    fh = _open_regular(path)
    try:
        with _pil_limit(max_pixels), warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                img = Image.open(fh)
            except Image.DecompressionBombError as exc:
                raise ImageFileError(_too_large(path, _pixels_in(str(exc)), max_pixels, option)) from None
            except UnidentifiedImageError:
                raise ImageFileError(f"{path}: not an image file Pillow can read (PNG, JPEG, WebP, TIFF, ...)") from None
            except Exception as exc:  # noqa: BLE001 - any decoder failure on a user's file is a bad file
                raise ImageFileError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from None
        with img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageFileError(_too_large(path, w * h, max_pixels, option, f"{w}x{h}"))
            if w == 0 or h == 0:
                raise ImageFileError(f"{path}: the image is {w}x{h} pixels; nothing to upscale")
            yield img
    finally:
        fh.close()


def _too_large(path: Path, pixels: int | None, limit: int, option: str, size: str = "") -> str:
    what = f"{size} = {pixels:,} pixels" if size else (f"{pixels:,} pixels" if pixels else "too many pixels")
    return (f"{path}: the image is {what}, more than the limit of {limit:,} (a guard against decompression "
            f"bombs); if you trust the file, raise the limit with {option} {pixels or 2 * limit}")


def _pixels_in(message: str) -> int | None:
    import re

    m = re.search(r"\((\d+) pixels\)", message)
    return int(m.group(1)) if m else None


@contextlib.contextmanager
def _pil_limit(max_pixels: int):
    """Pillow refuses images above twice its own limit before we see their size: when our limit is
    higher, Pillow's is raised to it for the duration of the open (under a lock)."""
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is None or max_pixels <= Image.MAX_IMAGE_PIXELS:
        yield
        return
    with _PIL_LIMIT_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def frame_arrays(frame, path: Path):
    """(RGB float32 [H, W, 3] in [0, 1], alpha float32 [H, W] in [0, 1] or None) of one PIL frame,
    EXIF orientation applied. Decoding happens here; failures name the file."""
    import numpy as np
    from PIL import ImageOps

    try:
        frame.load()  # decode first: damaged pixel data is an error, a damaged EXIF block only a warning
        try:
            frame = ImageOps.exif_transpose(frame)
        except Exception as exc:  # noqa: BLE001 - a damaged EXIF block should not cost the picture
            warnings.warn(f"{path}: unreadable EXIF orientation ({type(exc).__name__}: {exc}); using the image "
                          "as stored", stacklevel=2)
        if frame.mode in SIXTEEN_BIT_MODES:
            gray = np.clip(np.asarray(frame).astype(np.float32), 0, U16_MAX) / U16_MAX
            return np.repeat(gray[..., None], RGB_CHANNELS, axis=-1), None
        alpha = None
        if "A" in frame.getbands():
            alpha = np.asarray(frame.getchannel("A"), dtype=np.float32) / U8_MAX
        elif frame.mode == "P" and "transparency" in frame.info:
            alpha = np.asarray(frame.convert("RGBA").getchannel("A"), dtype=np.float32) / U8_MAX
        rgb = np.asarray(frame.convert("RGB"), dtype=np.float32) / U8_MAX
    except ImageFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated / corrupt data in a user's file
        raise ImageFileError(f"{path}: unreadable image data ({type(exc).__name__}: {exc}); is the file "
                             "truncated or damaged?") from None
    return rgb, alpha


def read_image(path: str | os.PathLike, max_pixels: int, option: str = "--max-pixels") -> torch.Tensor:
    """An image file -> IMAGE [1, H, W, 3] float32 in [0, 1] (first frame; alpha dropped)."""
    with open_image(path, max_pixels, option) as img:
        rgb, _ = frame_arrays(img, Path(path))
    return torch.from_numpy(rgb.copy()).unsqueeze(0)


def _to_uint8(image: torch.Tensor):
    """IMAGE [H, W, 3] in [0, 1] -> uint8 numpy by truncation (as upstream and ComfyUI's SaveImage)."""
    return image.detach().float().clamp(0, 1).mul(U8_MAX).to(torch.uint8).cpu().numpy()


PARTIAL_SUFFIX = ".part"  # temporary files of write_new_file: .<name>.<token>.part
_PARTIAL_NAME_CHARS = 100  # of the target's name kept in the temporary name (file names stay short)
_PARTIAL_TOKEN_CHARS = 12  # random hex digits


def partial_files(folder: Path, targets: Iterable[str]) -> list[Path]:
    """The temporary files that `write_new_file` made in `folder` for the file names `targets` and
    that are still there (left by a process killed while writing; a live writer's file looks the
    same, so call this only when no other process writes these targets)."""
    prefixes = {name[:_PARTIAL_NAME_CHARS] for name in targets}
    tail = 1 + _PARTIAL_TOKEN_CHARS + len(PARTIAL_SUFFIX)  # ".<token>.part"
    found = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return found
    for entry in entries:
        name = entry.name
        if not (name.startswith(".") and name.endswith(PARTIAL_SUFFIX) and len(name) > tail + 1):
            continue
        token = name[-tail + 1:-len(PARTIAL_SUFFIX)]
        if (name[-tail] == "." and name[1:-tail] in prefixes and all(c in "0123456789abcdef" for c in token)
                and entry.is_file(follow_symlinks=False)):
            found.append(Path(entry.path))
    return found


def write_new_file(path: Path, write: Callable[[Any], None], *, overwrite: bool) -> Path:
    """Write a file through `write(fileobj)`: hidden temporary name in the target folder (mode 0666
    minus the umask), fsync, then one atomic move; never replaces `path` unless `overwrite`.
    On any failure (or interruption) nothing is left behind (only a killed process can leave its
    temporary file: see `partial_files`). FileExistsError if `path` exists."""
    from .files import place_new

    path = Path(path)
    token = uuid.uuid4().hex[:_PARTIAL_TOKEN_CHARS]
    tmp = path.parent / f".{path.name[:_PARTIAL_NAME_CHARS]}.{token}{PARTIAL_SUFFIX}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        elif place_new(tmp, [path]) is None:
            raise FileExistsError(errno.EEXIST, "already exists", str(path))
    except OSError as exc:
        if exc.errno is not None and (exc.filename is None or str(exc.filename) == str(tmp)):
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def save_image(image: torch.Tensor, path: str | os.PathLike, *, overwrite: bool = False,
               metadata: Mapping[str, str] | None = None) -> Path:
    """IMAGE [H, W, 3] in [0, 1] -> an image file whose format follows the extension, written as
    `write_new_file` does. `metadata`: text chunks (key -> text), written before the image data;
    PNG only (ValueError for other formats, which would drop them)."""
    from PIL import Image, PngImagePlugin

    path = Path(path)
    fmt = output_format(path)
    extra = dict(SAVE_OPTIONS[fmt])
    if metadata:
        if fmt != "PNG":
            raise ValueError(f"{path}: text metadata can only be stored in PNG files, not {fmt}")
        extra["pnginfo"] = PngImagePlugin.PngInfo()
        for key, text in metadata.items():
            extra["pnginfo"].add_text(key, text)
    pil = Image.fromarray(_to_uint8(image))
    return write_new_file(path, lambda fh: pil.save(fh, format=fmt, **extra), overwrite=overwrite)
