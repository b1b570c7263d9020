"""Image files: the one decoder, and which entries of an images folder can be read at all.

Every image the harness scores is decoded by :func:`open_image`, in the file's own mode (palette,
RGBA, CMYK, ... reach :meth:`~harness.types.RewardModel.preprocess` unconverted, so each model
converts them the way its original does), with one exception: samples wider than 8 bits are
scaled to 8 bits first (:func:`as_8bit`), because ``Image.convert("RGB")``, which every original
implementation ends with, clips them.

Before a run, :func:`list_images` and :func:`unreadable_images` find the entries that cannot be
read at all (missing, broken or looping symbolic links, folders named like images, files that
cannot be opened, empty files) without decoding anything, so ``harness score`` and the
leaderboard's image resolution refuse them, or skip and list them with ``--skip-missing``, in
the same words. What only decoding finds (a truncated or corrupt file, a decompression bomb) is a
per-image failure of the run, named and listed, and the other images are scored.

Nothing here imports numpy or PIL at import time: the command line imports this module.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("harness.images")

#: Bumped whenever :func:`open_image` decodes some file differently: it keys the score cache,
#: so scores of images decoded the old way are never returned (2: 16-bit samples scaled).
DECODER_VERSION = "2"

#: File name suffixes (lower case) taken for images when a folder is listed.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


#: ``<container>::<member>``: an image inside a .zip or .tar file (member: its path there) or a
#: .parquet file (member: ``<row>/<column>`` of a binary column), read without unpacking.
MEMBER_SEP = "::"
CONTAINER_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".parquet")


def split_member(path: str | Path) -> tuple[str, str] | None:
    """``(container, member)`` when ``path`` names an image inside a container, else None."""
    text = str(path)
    if MEMBER_SEP not in text:
        return None
    container, _, member = text.partition(MEMBER_SEP)
    if not container.lower().endswith(CONTAINER_SUFFIXES) or not member:
        return None
    return container, member


def read_image_bytes(path: str | Path) -> bytes:
    """The bytes of an image file, or of an image inside a container (:data:`MEMBER_SEP`)."""
    ref = split_member(path)
    if ref is None:
        with open(path, "rb") as fh:
            return fh.read()
    container, member = ref
    return _read_member(container, member)


def _read_member(container: str, member: str) -> bytes:
    low = container.lower()
    if low.endswith(".zip"):
        import zipfile

        try:
            with zipfile.ZipFile(container) as zf:
                return zf.read(member)
        except KeyError:
            raise FileNotFoundError(errno.ENOENT, f"no member '{member}' in", container) from None
        except zipfile.BadZipFile as exc:
            raise OSError(errno.EIO, f"not a readable zip file ({exc})", container) from None
    if low.endswith(".parquet"):
        row, _, column = member.partition("/")
        table = _parquet_column(container, column)
        try:
            value = table[int(row)]
        except (ValueError, IndexError):
            raise FileNotFoundError(errno.ENOENT, f"no row '{row}' in", container) from None
        if value is None:
            raise OSError(errno.EIO, f"row {row} of column '{column}' is empty in", container)
        return bytes(value)
    import tarfile

    try:
        with tarfile.open(container) as tf:
            handle = tf.extractfile(member)
            if handle is None:
                raise FileNotFoundError(errno.ENOENT, f"no file '{member}' in", container)
            return handle.read()
    except KeyError:
        raise FileNotFoundError(errno.ENOENT, f"no member '{member}' in", container) from None
    except tarfile.TarError as exc:
        raise OSError(errno.EIO, f"not a readable tar file ({exc})", container) from None


_PARQUET: dict[tuple[str, str, int, int], Any] = {}


def _parquet_column(container: str, column: str) -> Any:
    """One binary column of a parquet file as a Python list, memoised per file version."""
    st = os.stat(container)
    key = (os.path.realpath(container), column, st.st_size, st.st_mtime_ns)
    if key not in _PARQUET:
        import pyarrow.parquet as pq

        try:
            values = pq.read_table(container, columns=[column]).column(column).to_pylist()
        except (KeyError, ValueError, OSError) as exc:
            raise OSError(errno.EIO, f"cannot read column '{column}' ({exc}) of", container) from None
        _PARQUET.clear()  # one file at a time: the image columns are large
        _PARQUET[key] = values
    return _PARQUET[key]


def open_image(path: str | Path) -> Any:
    """The one image decoder: ``Image.open`` + ``load()`` in the file's own mode, then
    :func:`as_8bit` (which changes only images with samples wider than 8 bits).

    PIL's decompression-bomb warning is re-issued naming the file; its error (an image more
    than twice ``PIL.Image.MAX_IMAGE_PIXELS``) is raised again naming the file, and the batch
    runner records it as that image's failure like any other unreadable image.
    """
    from PIL import Image

    with warnings.catch_warnings(record=True) as caught:
        # "always": PIL's message does not name the file, so two same-sized bombs would
        # otherwise be reported once.
        warnings.simplefilter("always", Image.DecompressionBombWarning)
        try:
            if split_member(path) is not None:
                import io

                source: Any = io.BytesIO(read_image_bytes(path))
            else:
                source = path
            with Image.open(source) as img:
                img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            # A warning arrives here as an exception when the user's filters say "error".
            raise type(exc)(f"image file '{path}': {exc}") from None
    for w in caught:
        if issubclass(w.category, Image.DecompressionBombWarning):
            warnings.warn(f"image file '{path}': {w.message}", w.category, stacklevel=2)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    return as_8bit(img)


def as_8bit(image: Any) -> Any:
    """A PIL image whose samples are wider than 8 bits -> the 8-bit greyscale image a viewer
    shows; any other image is returned unchanged (the same object).

    The originals (open_clip, transformers' image processors, BLIP, ImageReward) all end with
    ``image.convert("RGB")``, which clips wider samples to 255: a 16-bit greyscale PNG becomes
    near white. Only where that path is plainly wrong does the harness scale instead:

    - ``I;16``, ``I;16L``, ``I;16B``, ``I;16N`` (16-bit greyscale): ``round(v / 257)``, so
      65535 is white and the result equals the image's 8-bit counterpart within 1;
    - ``I`` (32-bit integer) and ``F`` (32-bit float) whose values all lie in 0..255: unchanged,
      the convert path is right for them; values in 0..65535 otherwise (a 16-bit image held in a
      32-bit mode): ``round(v / 257)``; values below 0 or above 65535: stretched linearly from
      their minimum and maximum to 0..255 (the usual display of 32-bit data). Non-finite
      float values become 0 (NaN, -inf) or 255 (+inf).

    A transparent colour of an integer image (``info["transparency"]``, as a 16-bit PNG's tRNS
    chunk gives) becomes an alpha band (mode ``LA``), so transparency is composited as before.
    16-bit RGB(A) PNGs need nothing here: PIL already reads them as 8-bit RGB(A).
    """
    mode = image.mode
    if mode not in _SIXTEEN_BIT_MODES and mode not in ("I", "F"):
        return image
    import numpy as np
    from PIL import Image

    values = np.asarray(image)  # [H, W]: uint16 (either byte order), int32 or float32
    if mode in _SIXTEEN_BIT_MODES:
        scaled = values.astype(np.float64) / 257.0
    else:
        finite = values[np.isfinite(values)] if mode == "F" else values.reshape(-1)
        lo = float(finite.min()) if finite.size else 0.0
        hi = float(finite.max()) if finite.size else 0.0
        if 0.0 <= lo and hi <= 255.0:
            return image
        if 0.0 <= lo and hi <= 65535.0:
            scaled = values.astype(np.float64) / 257.0
        else:
            span = hi - lo
            scaled = (values.astype(np.float64) - lo) * (255.0 / span if span else 0.0)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    grey = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
    transparent = image.info.get("transparency")
    if mode != "F" and isinstance(transparent, int):
        grey.putalpha(Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8)))
    return grey


# -- which entries can be read -------------------------------------------------------------------
def _why(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "missing"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.ELOOP:
        return "a symbolic link loop"
    return exc.strerror or f"{type(exc).__name__}: {exc}"


def unreadable_reason(path: str | Path) -> str | None:
    """Why ``path`` cannot be read as an image file, found without decoding it; None when it
    is a non-empty regular file (or a link to one) that this process can open.

    Reasons: ``missing``, ``a broken symbolic link to TARGET``, ``a symbolic link loop``,
    ``permission denied``, ``a folder, not an image file``, ``not a regular file``,
    ``an empty file``.
    """
    ref = split_member(path)
    if ref is not None:  # an image inside a container: the container must be readable
        reason = unreadable_reason(ref[0])
        return None if reason is None else f"its container {ref[0]} is {reason}"
    try:
        st = os.stat(path)
    except ValueError as exc:  # an embedded NUL byte
        return f"not a valid path ({exc})"
    except OSError as exc:
        if exc.errno == errno.ENOENT and os.path.islink(path):
            try:
                return f"a broken symbolic link to {os.readlink(path)}"
            except OSError:
                return "a broken symbolic link"
        return _why(exc)
    if stat.S_ISDIR(st.st_mode):
        return "a folder, not an image file"
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block the reader forever
        return "not a regular file"
    if st.st_size == 0:
        return "an empty file"
    try:
        os.close(os.open(path, os.O_RDONLY))
    except OSError as exc:
        return _why(exc)
    return None


def unreadable_images(paths: Iterable[str | Path]) -> dict[str, str]:
    """``{path: reason}`` for each of ``paths`` that :func:`unreadable_reason` refuses, in order."""
    found = {}
    for p in paths:
        reason = unreadable_reason(p)
        if reason is not None:
            found[str(p)] = reason
    return found


def list_images(folder: str | Path, suffixes: Iterable[str] = IMAGE_SUFFIXES,
                ) -> tuple[list[str], dict[str, str]]:
    """The image files under ``folder`` (recursively) -> ``(readable paths, {culprit: reason})``.

    Entries named like images (by ``suffixes``, any case) are checked with
    :func:`unreadable_reason`; sub-folders that cannot be listed are culprits too (the images in
    them would be lost). Symbolic links to folders are followed, each folder listed once, so a
    link back up the tree neither hangs nor lists an image twice. Both results are sorted.
    """
    wanted = {s.lower() for s in suffixes}
    found: list[Path] = []
    culprits: dict[str, str] = {}
    seen: set[tuple[int, int]] = set()
    # The real tree first, linked folders after: a folder reachable both ways is listed under
    # its own path.
    folders, linked = [Path(folder)], []
    while folders or linked:
        here = folders.pop() if folders else linked.pop(0)
        try:
            st = here.stat()
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(here) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            culprits[str(here)] = f"a folder that cannot be listed, {_why(exc)}"
            continue
        for entry in entries:
            path = Path(entry.path)
            if path.suffix.lower() in wanted:
                reason = unreadable_reason(path)
                if reason is None:
                    found.append(path)
                else:
                    culprits[str(path)] = reason
                continue
            try:
                is_dir = entry.is_dir()  # follows links; a looping link is not a folder
                is_link = entry.is_symlink()
            except OSError:
                is_dir = is_link = False
            if is_dir:
                (linked if is_link else folders).append(path)
    return [str(p) for p in sorted(found)], dict(sorted(culprits.items()))


def describe_unreadable(culprits: Mapping[str, str], limit: int = 3) -> str:
    """``"a.png (missing), b.png (a folder, not an image file) and 4 more"`` (one line)."""
    items = list(culprits.items())
    text = ", ".join(f"{p} ({why})" for p, why in items[:limit])
    return text + (f" and {len(items) - limit} more" if len(items) > limit else "")


def unreadable_message(culprits: Mapping[str, str], total: int, what: str, where: str | Path,
                       ) -> str:
    """The one-line refusal of a benchmark's image resolution, e.g. ``"2 of 7500 TIA2 images
    are missing under 'imgs': ...; pass --skip-missing to score the rest"``."""
    state = ("are missing" if all(why == "missing" for why in culprits.values())
             else "are missing or cannot be read")
    return (f"{len(culprits)} of {total} {what} {state} under '{where}': "
            f"{describe_unreadable(culprits)}; pass --skip-missing to score the rest")


def skipped_lines(culprits: Mapping[str, str], limit: int = 20) -> list[str]:
    """What is skipped, for the user: a heading and ``"  path: reason"`` for up to ``limit``."""
    lines = [f"Skipping {len(culprits)} images that cannot be read (--skip-missing):"]
    lines += [f"  {p}: {why}" for p, why in list(culprits.items())[:limit]]
    if len(culprits) > limit:
        lines.append(f"  ... and {len(culprits) - limit} more")
    return lines


def log_skipped(culprits: Mapping[str, str], limit: int = 20) -> None:
    """Warn (logger ``harness.images``) that ``culprits`` are skipped: :func:`skipped_lines`."""
    if culprits:
        log.warning("\n".join(skipped_lines(culprits, limit)))
