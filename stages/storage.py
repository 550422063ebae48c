"""Where caches live: a local folder, or any fsspec URL (s3://bucket/path.zarr, gs://..., memory://...).

A cache location is a `Path` for a local folder and a `str` only for a URL (`cache_location`
decides), because `Path` would fold the `//` of a URL. Every operation on a whole location
(exists, empty, remove, bytes on disk) goes through fsspec, so local folders and object stores
take the same code; zarr opens both itself (a URL becomes a zarr FsspecStore).

Storage options (endpoint, credentials, region) never enter a cache or a run folder: they come
from fsspec's own configuration, which reads environment variables such as
FSSPEC_S3_ENDPOINT_URL (and s3fs/botocore read AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...), or
from `set_storage_options` (the CLI's --storage-option KEY=VALUE).

The writer lock keeps its guarantee on both (`writer_lock`):
- local: an flock on CACHE.zarr.lock, which the kernel drops however its holder dies;
- object store: a lease object CACHE.zarr.lock created with a conditional PUT (If-None-Match: *,
  so of two writers racing for it exactly one creates it) and rewritten every
  LEASE_REFRESH_SECONDS while held. A lease not rewritten for LEASE_STALE_SECONDS (by the
  clock of the machine reading it: clocks must agree to well within that) belongs to a dead
  writer and is taken over. The holder stops writing when it finds its lease taken over, or
  when it could not renew it for nearly LEASE_STALE_SECONDS (before anyone may judge it
  stale). Two processes taking over one stale lease at the same moment could each remove the
  other's new lease; each re-reads it after TAKEOVER_SETTLE_SECONDS, and the one that finds
  another token backs off. Conditional creation is atomic only where the store honours it
  (CONDITIONAL_CREATE_PROTOCOLS); elsewhere a warning says so.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import IO

import fsspec
import fsspec.config

from stages.errors import CacheLockedError, InputError, PipelineError

log = logging.getLogger(__name__)

CacheLocation = Path | str  # str only for a URL

LEASE_REFRESH_SECONDS = 20.0
LEASE_STALE_SECONDS = 90.0
TAKEOVER_SETTLE_SECONDS = 2.0
# Stores whose fsspec filesystem creates an object only if absent, atomically (If-None-Match: *
# through s3fs: AWS S3, and S3-compatible stores that honour it, such as MinIO and moto).
CONDITIONAL_CREATE_PROTOCOLS = ("s3", "s3a")


def is_url(location: CacheLocation) -> bool:
    return isinstance(location, str) and "://" in location


def cache_location(value: str | Path) -> CacheLocation:
    """A URL stays a string (without a trailing slash); anything else is a local path."""
    text = str(value)
    if "://" in text:
        if text.startswith("file://"):
            return Path(text[len("file://"):]).absolute()
        return text.rstrip("/")
    return Path(value).absolute()  # the same folder from any working directory (a dask worker's too)


def protocol(location: CacheLocation) -> str:
    return location.split("://", 1)[0] if is_url(location) else "file"


def filesystem(location: CacheLocation) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of `location` and the location's path within it. A protocol whose
    package is not installed (s3fs for s3://) is a one-line input error."""
    try:
        return fsspec.core.url_to_fs(str(location))
    except ImportError as exc:
        raise InputError(f"{location}: {exc}".splitlines()[0]) from exc
    except ValueError as exc:  # an unknown protocol
        raise InputError(f"{location}: {exc}") from exc


def set_storage_options(options: dict[str, object], location: CacheLocation) -> None:
    """Options for every filesystem of `location`'s protocol made from now on in this process
    (fsspec's configuration, which also reads FSSPEC_<PROTOCOL>_<OPTION> environment variables)."""
    fsspec.config.conf.setdefault(protocol(location), {}).update(options)


def storage_options(location: CacheLocation) -> dict[str, object]:
    """This process's options for `location`'s protocol, to hand to another process (a dask worker)."""
    return dict(fsspec.config.conf.get(protocol(location), {}))


def exists(location: CacheLocation) -> bool:
    fs, path = filesystem(location)
    return fs.exists(path)


def is_empty(location: CacheLocation) -> bool:
    fs, path = filesystem(location)
    return not fs.exists(path) or (fs.isdir(path) and not fs.ls(path, detail=False))


def remove(location: CacheLocation) -> None:
    fs, path = filesystem(location)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def disk_usage(location: CacheLocation) -> int:
    """Bytes stored under `location` (every file or object but a killed write's leftovers)."""
    return sum(int(info["size"]) for info in _stored(location).values())


def object_count(location: CacheLocation) -> int:
    """Files or objects stored under `location` (but a killed write's leftovers)."""
    return len(_stored(location))


def _stored(location: CacheLocation) -> dict[str, dict]:
    """fsspec's info on every file or object under `location` but a killed write's leftovers, by name."""
    fs, path = filesystem(location)
    if not fs.exists(path):
        return {}
    if not fs.isdir(path):
        return {path: fs.info(path)}
    return {name: info for name, info in fs.find(path, detail=True).items() if not is_partial(name)}


# zarr's local store writes a file as NAME.<uuid>.partial, then renames it to NAME: a kill in
# between leaves the .partial file, which is no part of the cache.
PARTIAL_SUFFIX = ".partial"


def is_partial(name: str) -> bool:
    return name.endswith(PARTIAL_SUFFIX)


def remove_partial_files(location: CacheLocation) -> None:
    """Remove the leftovers of writes killed half way under `location` (see PARTIAL_SUFFIX)."""
    fs, path = filesystem(location)
    for name in fs.find(path):
        if is_partial(name):
            fs.rm_file(name)


def open_no_follow(path: Path, mode: str = "w") -> IO:
    """`open(path, mode)` for writing ("w", "wb", "a"), refusing a symbolic link at `path`:
    whoever planted one would have this tool write (or truncate) the file it points to."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode.startswith("a") else os.O_TRUNC)
    return os.fdopen(no_follow_fd(path, flags), mode)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace the file at `path` with `data` so that a kill or a full disk leaves the previous
    file (or none), never half of one: written to PATH.partial (never through a symbolic link),
    then renamed over PATH. Callers serialise to bytes first, so that a write error arrives as
    the OSError it is (torch.save into a full disk reports only "unexpected pos")."""
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        with open_no_follow(partial, "wb") as file:
            file.write(data)
        partial.replace(path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise PipelineError(f"cannot write {path}: {exc.strerror or exc}") from exc


def no_follow_fd(path: Path, flags: int) -> int:
    """os.open(path, flags) without following a symbolic link at `path` (refused, one line)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"refusing to write {path}: it is a symbolic link (remove it; this tool never writes through one)") from None
        raise


def name(location: CacheLocation) -> str:
    """The last part of the location: CACHE.zarr."""
    return location.rsplit("/", 1)[-1] if is_url(location) else Path(location).name


def child(location: CacheLocation, name: str) -> CacheLocation:
    return f"{location}/{name}" if is_url(location) else Path(location) / name


def lock_location(location: CacheLocation) -> CacheLocation:
    """Beside the cache, not inside it: plain zarr would warn about a foreign entry."""
    return f"{location}.lock" if is_url(location) else Path(location).with_name(Path(location).name + ".lock")


def writer_lock(location: CacheLocation) -> FileLock | LeaseLock:
    """The exclusive lock of the one process allowed to write the cache at `location`."""
    return LeaseLock(location) if is_url(location) else FileLock(location)


class FileLock:
    """An flock on the file CACHE.zarr.lock beside a local cache. The kernel drops an flock when
    its holder exits, however it exits (even SIGKILL), so a crashed writer leaves at most an
    unlocked file, never a stale lock. Deleting the file of a live writer would let a second
    writer in: the holder checks before each chunk that the file is still its own, and stops if
    not. Readers take no lock: they only read complete caches, which writers no longer change."""

    def __init__(self, location: CacheLocation, what: str = "cache"):
        self.location = location
        self.what = what  # what is locked, for messages: "cache", "run folder"
        self.lock_path = Path(lock_location(location))
        self._fd: int | None = None

    def __enter__(self) -> FileLock:
        while True:
            try:
                self.lock_path.parent.mkdir(parents=True, exist_ok=True)
                fd = no_follow_fd(self.lock_path, os.O_RDWR | os.O_CREAT)
            except OSError as exc:
                raise PipelineError(f"cannot lock {self.what} {self.location} for writing: {exc.strerror}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise CacheLockedError(
                    f"{self.what} {self.location} is being written by another process (pid {holder}); wait for it to finish"
                ) from None
            # The previous holder unlinks the file as it lets go: if it did so between our
            # open and our flock, we locked an orphan and must try again on the new file.
            if _same_file(fd, self.lock_path):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def check_held(self) -> None:
        """Raise if the lock file was deleted or replaced while held: the flock is then on an
        orphan, and a second writer may already hold the file now at that path. This process
        must stop writing the cache."""
        if self._fd is not None and not _same_file(self._fd, self.lock_path):
            raise CacheLockedError(
                f"cache {self.location}: its lock file {self.lock_path} was deleted or replaced while this process "
                "was writing; stopped writing (another writer may have started: never delete the lock of a live writer)"
            )

    def __exit__(self, *exc_info) -> None:
        if self._fd is not None:
            if _same_file(self._fd, self.lock_path):  # never another writer's lock, if ours was replaced
                self.lock_path.unlink(missing_ok=True)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    """Whether the file open as `fd` is the one at `path` now (not deleted, not replaced)."""
    try:
        found, held = os.lstat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (found.st_dev, found.st_ino) == (held.st_dev, held.st_ino)


class LeaseLock:
    """A lease object CACHE.zarr.lock beside a cache on an object store (see the module
    docstring): created only if absent, refreshed by a daemon thread, taken over once stale."""

    def __init__(self, location: CacheLocation, *, refresh_seconds: float = LEASE_REFRESH_SECONDS,
                 stale_seconds: float = LEASE_STALE_SECONDS):
        self.location = location
        self.fs, self.path = filesystem(lock_location(location))
        self.refresh_seconds = refresh_seconds
        self.stale_seconds = stale_seconds
        self.token = uuid.uuid4().hex
        self.holder = f"{socket.gethostname()} pid {os.getpid()}"
        self._stop = threading.Event()
        self._lost: str | None = None
        self._renewed = time.monotonic()
        self._thread: threading.Thread | None = None
        if protocol(location) not in CONDITIONAL_CREATE_PROTOCOLS:
            log.warning("%s: this store's conditional create is not known to be atomic: two writers starting "
                        "at the same moment might both take the lease", location)

    def _lease(self) -> bytes:
        return json.dumps({"token": self.token, "holder": self.holder, "renewed_at": time.time()}).encode()

    def _read(self) -> dict | None:
        try:
            lease = json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:  # torn or foreign content: judged by its age alone
            lease = {}
        if not isinstance(lease, dict) or not isinstance(lease.get("renewed_at"), (int, float)):
            lease = {"holder": "unknown", "renewed_at": self.fs.modified(self.path).timestamp()}
        return lease

    def __enter__(self) -> LeaseLock:
        took_over = False
        for _ in range(3):
            try:
                self.fs.pipe_file(self.path, self._lease(), mode="create")
                break
            except FileExistsError:
                lease = self._read()
                if lease is None:
                    continue  # released between our create and our read
                age = time.time() - lease["renewed_at"]
                if age < self.stale_seconds:
                    raise CacheLockedError(
                        f"cache {self.location} is being written by another process ({lease.get('holder', 'unknown')}, "
                        f"lease renewed {age:.0f}s ago); wait for it to finish"
                    ) from None
                if self._read() == lease:  # still the dead writer's (not just taken over by another): remove it
                    self.fs.rm_file(self.path)
                    took_over = True
        else:
            raise CacheLockedError(f"cache {self.location}: could not take its lease; try again")
        if took_over:
            # Two processes that judged one stale lease at the same moment could each remove
            # the other's new one; whoever finds another token after a pause backs off.
            time.sleep(TAKEOVER_SETTLE_SECONDS)
            lease = self._read()
            if lease is None or lease.get("token") != self.token:
                raise CacheLockedError(f"cache {self.location}: another writer took over its stale lease at the same moment")
        self._renewed = time.monotonic()
        self._thread = threading.Thread(target=self._renew, name="cache-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.refresh_seconds):
            try:
                lease = self._read()
                if lease is None or lease.get("token") != self.token:
                    self._lost = "taken over by another writer"
                    return
                self.fs.pipe_file(self.path, self._lease())
                self._renewed = time.monotonic()
            except Exception:  # noqa: BLE001 - any store error: retried next period; check_held watches the age
                continue

    def check_held(self) -> None:
        """Raise if the lease was lost, or could not be renewed for so long that another writer
        may judge it stale: this process must stop writing the cache."""
        if self._lost is not None:
            raise CacheLockedError(f"cache {self.location}: lost its writer lease ({self._lost}); stopped writing")
        unrenewed = time.monotonic() - self._renewed
        if unrenewed > self.stale_seconds - self.refresh_seconds:
            raise CacheLockedError(f"cache {self.location}: could not renew its writer lease for {unrenewed:.0f}s; stopped writing")

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            lease = self._read()
            if lease is not None and lease.get("token") == self.token:
                self.fs.rm_file(self.path)
        except OSError:
            pass  # left to go stale: the next writer takes it over
