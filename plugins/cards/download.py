"""Downloading a card's files: resumable, checked by sha256, with a progress bar.

Sources (a :class:`~harness_plugins.cards.card.CardSource`, always at a pinned 40-hex commit):

- ``git``: the raw file of a public GitHub repository,
  ``https://raw.githubusercontent.com/<repo>/<commit>/<path>`` (``$HARNESS_GIT_RAW_URL`` replaces
  the host part, for mirrors and tests);
- ``hub``: a file of a Hugging Face hub repository. ``huggingface_hub`` resolves it
  (``get_hf_file_metadata``: the commit it is served from, its size and where the bytes are,
  often a CDN), honouring ``HF_ENDPOINT`` (read when the download starts), ``HF_TOKEN`` and
  ``HF_HUB_OFFLINE``; the bytes are then streamed here, because huggingface_hub neither resumes
  across runs nor checks content checksums.

Every download lands in ``<name>.partial`` beside its destination. An interrupted transfer is
retried in place with an HTTP ``Range`` request (a few times), and a later run continues from the
partial file (``<name>.partial.json`` records which source it belongs to). Only a file whose
sha256 equals the card's is moved into place; a mismatch deletes the partial file and is a
one-line error naming the file, the expected and the computed sha256. A card file with
``sha256: null`` is pinned by the revision alone: its sha256 is computed, logged with a warning
and returned (the run manifest records it).

Image archives (``.zip``, ``.tar``, ``.tar.gz``, ``.tgz``) are downloaded the same way, unpacked
into ``<dest>/images/`` (under the card's ``images.root`` when the archive has no such top
folder, so the annotation paths resolve either way; members leaving the folder are refused) and
then deleted; ``<dest>/images/.<archive>.sha256`` remembers what was unpacked. Other image files
(Pick-a-Pic's parquet files, whose ``jpg_0``/``jpg_1`` columns hold the images) stay beside the
annotations and are read in place, never unpacked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from http.client import HTTPException
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from harness.errors import HarnessError
from harness.io import sha256_file
from harness_plugins.cards.card import Card, CardFile, CardSource

log = logging.getLogger("harness.cards")

GIT_RAW_URL = "https://raw.githubusercontent.com"
HUB_URL = "https://huggingface.co"
#: Tries of one transfer within one call (the partial file is kept between them).
ATTEMPTS = 4
#: Seconds to wait before try ``n + 1`` is ``RETRY_WAIT * n``.
RETRY_WAIT = 1.0
TIMEOUT = 60.0
CHUNK = 1 << 20
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
#: The value of the images folder in :func:`download_card`'s result.
IMAGES_FOLDER = "folder"


def hub_endpoint() -> str:
    """``$HF_ENDPOINT`` (read now, not when huggingface_hub was imported), else the public hub."""
    return (os.environ.get("HF_ENDPOINT") or HUB_URL).rstrip("/")


def git_raw_url() -> str:
    return (os.environ.get("HARNESS_GIT_RAW_URL") or GIT_RAW_URL).rstrip("/")


def is_archive(path: str) -> bool:
    return path.lower().endswith(ARCHIVE_SUFFIXES)


# -- one file --------------------------------------------------------------------------------------
def fetch_file(card: Card, name: str, dest_dir: str | Path, progress: bool = False) -> Path:
    """The card's annotation file ``name`` in ``dest_dir`` under its upstream base name,
    downloaded unless a file with the card's sha256 is already there.

    :raises HarnessError: one line: the download failed (naming the URL), was interrupted (run
        again to resume), or its sha256 is not the card's (nothing saved).
    """
    spec = card.files[name]
    return fetch(card.id, card.source, spec, Path(dest_dir).expanduser(), progress)[0]


def fetch(bench: str, source: CardSource, spec: CardFile, dest_dir: Path,
          progress: bool = False) -> tuple[Path, str]:
    """``spec`` of ``source`` as ``dest_dir/<base name>``: ``(path, sha256)``."""
    dest = dest_dir / spec.name
    if dest.is_file():
        if spec.sha256 is None:
            got = sha256_file(dest)
            _warn_unpinned(bench, spec, got)
            return dest, got
        got = sha256_file(dest)
        if got == spec.sha256:
            return dest, got
        log.warning("%s: %s has sha256 %s, not the card's %s: downloading it again",
                    bench, dest, got[:12], spec.sha256[:12])
    url, headers, size = _locate(bench, source, spec)
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HarnessError(f"cannot create the download folder {dest_dir}: "
                           f"{exc.strerror or exc}") from exc
    partial = dest.with_name(dest.name + ".partial")
    _transfer(url, headers, partial, size, key=f"{source.kind}:{source.repo}@{source.revision}/"
              f"{spec.path}", label=spec.name, progress=progress)
    got = sha256_file(partial)
    if spec.sha256 is not None and got != spec.sha256:
        _discard(partial)
        _discard(_marker(partial))
        raise HarnessError(f"checksum mismatch for {spec.name} ({source.repo}@{source.revision[:12]}"
                           f"/{spec.path}): expected sha256 {spec.sha256}, got {got}; nothing was "
                           "saved (run again; if it persists the upstream file changed)")
    if spec.sha256 is None:
        _warn_unpinned(bench, spec, got)
    os.replace(partial, dest)
    _discard(_marker(partial))
    return dest, got


def _warn_unpinned(bench: str, spec: CardFile, got: str) -> None:
    log.warning("%s: the card gives no sha256 for %s (pinned by revision only); its sha256 is %s",
                bench, spec.path, got)


def _marker(partial: Path) -> Path:
    return partial.with_name(partial.name + ".json")


def _discard(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _locate(bench: str, source: CardSource, spec: CardFile) -> tuple[str, dict[str, str], int | None]:
    """Where the bytes of ``spec`` are: ``(url, request headers, size or None)``."""
    if source.kind == "git":
        url = f"{git_raw_url()}/{source.repo}/{source.revision}/{quote(spec.path)}"
        return url, {}, spec.size
    return _locate_hub(bench, source, spec)


def _locate_hub(bench: str, source: CardSource, spec: CardFile) -> tuple[str, dict[str, str], int | None]:
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import build_hf_headers

    endpoint = hub_endpoint()
    where = f"{source.repo_type} {source.repo}@{source.revision[:12]}"
    if constants.HF_HUB_OFFLINE:
        raise HarnessError(f"HF_HUB_OFFLINE is set, so {spec.path} of {where} cannot be downloaded: "
                           f"unset it, or pass --data DIR holding {spec.name}")
    url = hf_hub_url(source.repo, spec.path, repo_type=source.repo_type,
                     revision=source.revision, endpoint=endpoint)
    try:
        meta = get_hf_file_metadata(url, endpoint=endpoint, retry_on_errors=True)
    except GatedRepoError as exc:
        raise HarnessError(f"{where} is gated: accept its terms on the hub, then log in "
                           "(`hf auth login` or HF_TOKEN) and run again") from exc
    except RevisionNotFoundError as exc:
        raise HarnessError(f"{where}: revision {source.revision} not found on {endpoint} "
                           f"(fix images/source revision in the {bench} card)") from exc
    except EntryNotFoundError as exc:
        raise HarnessError(f"{where}: no file {spec.path} at that revision on {endpoint}") from exc
    except RepositoryNotFoundError as exc:
        raise HarnessError(f"{where}: repository not found on {endpoint} (or private: log in "
                           "with `hf auth login` or HF_TOKEN)") from exc
    except OfflineModeIsEnabled as exc:
        raise HarnessError(f"HF_HUB_OFFLINE is set, so {spec.path} of {where} cannot be "
                           "downloaded: unset it, or pass --data DIR") from exc
    except Exception as exc:  # noqa: BLE001 - any network failure of the HTTP client: one line
        raise HarnessError(f"could not reach {endpoint} for {spec.path} of {where}: "
                           f"{type(exc).__name__}: {_first_line(exc)}") from exc
    if meta.commit_hash and meta.commit_hash != source.revision:
        raise HarnessError(f"{where}: the hub served {spec.path} from commit {meta.commit_hash}, "
                           f"not the pinned {source.revision}")
    headers = {}
    if _origin(meta.location) == _origin(url):  # a signed CDN URL must not get the token
        headers = {k: v for k, v in build_hf_headers().items() if k.lower() == "authorization"}
    return meta.location, headers, meta.size if meta.size is not None else spec.size


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- streaming with resume -------------------------------------------------------------------------
def _transfer(url: str, headers: dict[str, str], partial: Path, size: int | None, *, key: str,
              label: str, progress: bool) -> None:
    """Stream ``url`` into ``partial``, continuing what is there (``Range``), until complete."""
    marker = _marker(partial)
    if partial.exists():
        try:
            same = json.loads(marker.read_text(encoding="utf-8")).get("source") == key
        except (OSError, ValueError, AttributeError):
            same = False
        if not same or (size is not None and partial.stat().st_size > size):
            _discard(partial)
    marker.write_text(json.dumps({"source": key, "size": size}), encoding="utf-8")
    bar = _progress_bar(label, size, partial.stat().st_size if partial.exists() else 0, progress)
    try:
        for attempt in range(1, ATTEMPTS + 1):
            have = partial.stat().st_size if partial.exists() else 0
            if size is not None and have == size:
                return
            try:
                size = _get(url, headers, partial, have, size, bar)
                if size is None or partial.stat().st_size == size:
                    return
                reason = f"the connection closed after {partial.stat().st_size} of {size} bytes"
            except (urllib.error.URLError, HTTPException, OSError, TimeoutError) as exc:
                if isinstance(exc, urllib.error.HTTPError) and exc.code not in (408, 429, 500, 502,
                                                                               503, 504):
                    _discard(partial)
                    _discard(marker)
                    raise HarnessError(f"could not download {_public(url)}: HTTP {exc.code} "
                                       f"{exc.reason}") from exc
                reason = _first_line(getattr(exc, "reason", None) or exc)
            if attempt < ATTEMPTS:
                log.info("download of %s interrupted (%s); resuming", label, reason)
                time.sleep(RETRY_WAIT * attempt)
        got = partial.stat().st_size if partial.exists() else 0
        total = f" of {size}" if size is not None else ""
        raise HarnessError(f"download of {label} interrupted ({reason}) after {got}{total} bytes; "
                           f"run the command again to resume from {partial}")
    finally:
        bar.close()


def _get(url: str, headers: dict[str, str], partial: Path, have: int, size: int | None,
         bar: Any) -> int | None:
    """One GET from byte ``have`` on; returns the total size (None when the server never says)."""
    request = urllib.request.Request(url, headers=dict(headers))
    if have:
        request.add_header("Range", f"bytes={have}-")
    with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:
        start = 0  # a 200 answer to a Range request: the server sends everything again
        if resp.status == 206:
            content_range = resp.headers.get("Content-Range", "")
            try:
                start = int(content_range.split()[1].split("-")[0])
            except (IndexError, ValueError):
                raise HTTPException(f"unreadable Content-Range {content_range!r}") from None
            if start > have:
                raise HTTPException(f"the server resumed at byte {start}, not {have}")
            total = content_range.rpartition("/")[2]
            if total.isdigit():
                size = int(total)
        length = resp.headers.get("Content-Length")
        if size is None and length and length.isdigit():
            size = start + int(length)
        if bar.total is None and size is not None:
            bar.total = size
        with open(partial, "r+b" if start and partial.exists() else "wb") as fh:
            fh.seek(start)
            fh.truncate()
            if bar.n != start:
                bar.n = start
                bar.refresh()
            while block := resp.read(CHUNK):
                fh.write(block)
                bar.update(len(block))
    return size


def _public(url: str) -> str:
    """``url`` without its query (signed CDN URLs carry credentials there)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _progress_bar(label: str, total: int | None, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=label, unit="B", unit_scale=True,
                unit_divisor=1024, disable=not enabled, file=sys.stderr, leave=True,
                dynamic_ncols=True)


# -- archives --------------------------------------------------------------------------------------
def unpack(archive: Path, into: Path, root: str = "") -> None:
    """Unpack ``archive`` into ``into`` (under ``root`` unless the archive's members already
    start with it), refusing members that would land outside ``into``."""
    target = into
    names = _members(archive)
    root = root.strip("/")
    if root and not all(n == root or n.startswith(root + "/") for n in names if n):
        target = into / root
    work = into.parent / f".{into.name}.unpacking-{archive.name}"
    shutil.rmtree(work, ignore_errors=True)
    base = work.resolve()
    for name in names:
        where = (work / name).resolve()
        if name.startswith("/") or (where != base and base not in where.parents):
            raise HarnessError(f"archive {archive.name} has a member outside its folder ({name!r}); "
                               "refusing to unpack it")
    try:
        work.mkdir(parents=True)
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(work)
        else:
            with tarfile.open(archive) as tf:
                if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4
                    tf.extractall(work, filter="data")
                else:  # plain files and folders only: no links, devices or odd modes
                    tf.extractall(work, members=[m for m in tf.getmembers()
                                                 if m.isfile() or m.isdir()])
        target.mkdir(parents=True, exist_ok=True)
        for entry in work.iterdir():
            _merge(entry, target / entry.name)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise HarnessError(f"cannot unpack {archive}: {exc}; delete it and download again") from exc
    except OSError as exc:
        raise HarnessError(f"cannot unpack {archive} into {target}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _members(archive: Path) -> list[str]:
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                return [n.rstrip("/") for n in zf.namelist()]
        with tarfile.open(archive) as tf:
            return [m.name.rstrip("/") for m in tf.getmembers()]
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        raise HarnessError(f"cannot read the archive {archive}: {exc}; delete it and download "
                           "again") from exc


def _merge(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, merging folders (a file already there is replaced)."""
    if src.is_dir() and dst.is_dir():
        for entry in src.iterdir():
            _merge(entry, dst / entry.name)
        return
    if dst.is_dir():
        shutil.rmtree(dst)
    os.replace(src, dst)


# -- a whole card ----------------------------------------------------------------------------------
def download_card(card: Card, dest: str | Path | None = None, images: bool = False,
                  progress: bool = True) -> dict[str, str]:
    """Fetch the card's annotation files into ``dest`` (None: :meth:`Card.cache_folder`, where
    the benchmark looks without ``--data``) and, with ``images``, the files of
    ``images.source``: archives are unpacked into ``dest/images`` and deleted; other files (e.g.
    parquet files holding the images) are kept in ``dest`` and read in place.

    :returns: local path -> sha256 of every file fetched or found; with ``images`` also the
        folder to pass as ``--images`` -> :data:`IMAGES_FOLDER`.
    :raises HarnessError: with ``images`` when the card has no downloadable images (its note
        says where they are), before anything is fetched.
    """
    folder = Path(dest).expanduser() if dest is not None else card.cache_folder()
    source = card.images.source
    if images and source is None:
        note = f": {card.images.note}" if card.images.note else ""
        raise HarnessError(f"the images of {card.id} cannot be downloaded{note}; download "
                           f"them by hand and pass --images DIR (`harness data download {card.id}` "
                           "without --images fetches the annotations)")
    out: dict[str, str] = {}
    for spec in card.files.values():
        path, digest = fetch(card.id, card.source, spec, folder, progress)
        out[str(path)] = digest
    if not images or source is None:
        return out
    images_dir = folder
    for spec in source.files.values():
        if not is_archive(spec.path):
            path, digest = fetch(card.id, source, spec, folder, progress)
            out[str(path)] = digest
            continue
        images_dir = folder / "images"
        done = images_dir / f".{spec.name}.sha256"
        if done.is_file() and spec.sha256 in (None, done.read_text().strip()):
            continue  # unpacked before (an archive without a card sha256: pinned by revision)
        archive, digest = fetch(card.id, source, spec, folder, progress)
        unpack(archive, images_dir, card.images.root)
        done.write_text(digest + "\n")
        archive.unlink()
    out[str(images_dir)] = IMAGES_FOLDER
    _check_images(card, folder, images_dir)
    return out


def _check_images(card: Card, folder: Path, images_dir: Path) -> None:
    """Warn when the first images of the annotations are not where the card says (an archive laid
    out differently from the card's ``images.root``)."""
    from harness.images import split_member
    from harness_plugins.cards.card import format_functions

    try:
        parse, _ = format_functions(card)
        files = {name: folder / spec.name for name, spec in card.files.items()}
        data = parse(files, card, list(card.subsets))
    except HarnessError:
        return
    sample = [str(i) for i in data.images["image"].head(5)]
    missing = [i for i in sample
               if not (images_dir / (split_member(i) or (i, ""))[0]).exists()]
    if missing:
        log.warning("%s: images were unpacked into %s, but %s is not there: the archive's layout "
                    "differs from the card (images.root %r)", card.id, images_dir,
                    posixpath.join(str(images_dir), missing[0]), card.images.root)
