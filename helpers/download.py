"""Verified files: download a pinned file once, check its git blob id, write it atomically."""

import fcntl
import glob
import hashlib
import http.client
import os
import secrets
import shutil
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from helpers.config import PinnedFile


class DownloadError(RuntimeError):
    """A pinned file could not be fetched or did not verify; nothing was left behind."""


@dataclass(frozen=True)
class VerifiedFile:
    path: Path
    blob_id: str  # its git blob id
    matches_pin: bool  # whether that id is the pinned one
    source: str  # "cache", "download", "local" or "synthetic"


def git_blob_id(content: bytes) -> str:
    """The id git gives this content: sha1(b"blob <size>\\0" + content)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


STAGING_SUFFIX = "[0-9a-f]" * 16 + ".tmp"  # the random part and suffix of a staging name, as a glob pattern


def _staging_name(path: Path) -> Path:
    """A fresh name beside `path` for a staging file or folder: `.NAME.<16 hex digits>.tmp`."""
    return path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"


def try_lock(descriptor: int) -> bool | None:
    """Take the exclusive flock of an open file or folder without waiting: True when taken, False when another
    open descriptor (of any process) holds it, None where the file system has no locks (some network or FUSE
    mounts). The kernel drops a lock when its descriptor closes, also when its process is killed."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def remove_stale_staging(path: Path) -> None:
    """Remove the staging files and folders beside `path` that a killed writer left: a writer holds its
    staging's lock until it renames or removes it, so one that nobody locks is stale (kept where locks fail)."""
    for leftover in map(Path, glob.glob(glob.escape(str(path.parent / f".{path.name}.")) + STAGING_SUFFIX)):
        try:
            descriptor = os.open(leftover, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # gone meanwhile, or not ours to read
            continue
        try:
            stale = try_lock(descriptor) is True
        finally:
            os.close(descriptor)
        if stale:
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, content: bytes) -> None:
    """Write `content` to a staging file beside `path`, then rename: never a half-written file. The file is
    created as open() creates one (mode 0o666 less the umask); a staging file left by a kill goes next time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(path)
    temporary = _staging_name(path)
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
    try:
        try_lock(handle)  # held until closed: not stale
        with os.fdopen(handle, "wb") as out:
            out.write(content)
            out.flush()
            os.fsync(out.fileno())
            os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `path`: it replaces `path` when the block succeeds, else goes. It is
    created as mkdir creates one (mode 0o777 less the umask); a staging folder left by a kill goes next time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(path)
    staging = _staging_name(path)
    staging.mkdir(mode=0o777)  # the kernel applies the umask
    handle = os.open(staging, os.O_RDONLY)
    try:
        try_lock(handle)  # held until closed: not stale
        yield staging
        shutil.rmtree(path, ignore_errors=True)
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        os.close(handle)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(Path(path), text.encode("utf-8"))


def fetch_pinned(pinned: PinnedFile, cache_dir: Path, local_path: Path | None = None, timeout: float = 60) -> VerifiedFile:
    """Return a verified copy of `pinned`: the local file you name, else the cache, else a download. A local
    file whose blob id differs is used with a warning (you asked for it); a cached one is deleted, with a
    warning, and downloaded again; a download whose id differs is an error, and nothing is left behind."""
    if local_path is not None:
        if not (local := Path(local_path)).is_file():
            raise FileNotFoundError(f"{local}: {'a folder, not a file' if local.is_dir() else 'no such file'} (given for {pinned.path})")
        if (blob_id := git_blob_id(local.read_bytes())) != pinned.blob_id:
            warnings.warn(f"{local}: git blob id {blob_id} differs from the official {pinned.path} "
                          f"({pinned.blob_id}); using it because you asked for this file", stacklevel=2)
        return VerifiedFile(local, blob_id, blob_id == pinned.blob_id, "local")
    cached, damaged = Path(cache_dir) / pinned.name, ""
    if cached.is_file():
        if (blob_id := git_blob_id(cached.read_bytes())) == pinned.blob_id:
            return VerifiedFile(cached, blob_id, True, "cache")
        cached.unlink()  # damaged or changed: say so, and where, then download it again
        damaged = f"the cached copy {cached} failed its git blob check (id {blob_id}, not {pinned.blob_id}) and was deleted; "
        warnings.warn(f"{damaged}downloading {pinned.url} again", stacklevel=2)
    try:
        with urllib.request.urlopen(pinned.url, timeout=timeout) as response:
            content = response.read()
    except (OSError, http.client.HTTPException) as error:  # HTTPException: a connection dropped mid-body
        raise DownloadError(f"{damaged}could not download {pinned.url}: {error}. Check your internet connection, "
                            "or download the file yourself and pass its path (the config's dataset_path / "
                            "questions_path, or EM_DATASET_PATH / EM_QUESTIONS_PATH).") from error
    if (blob_id := git_blob_id(content)) != pinned.blob_id:
        raise DownloadError(f"{damaged}{pinned.url}: downloaded {len(content):,} bytes with git blob id {blob_id}, expected "
                            f"{pinned.blob_id} (truncated or changed). Nothing was saved; run the cell again.")
    atomic_write_bytes(cached, content)
    return VerifiedFile(cached, blob_id, True, "download")
