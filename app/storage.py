"""Arrays in storage, through fsspec: a local folder by default, S3 when scaled out
(docs/scaling.md).

Every object is written once under its own key and becomes visible by one
commit: locally a rename of a complete, fsynced temporary file; on S3 the
completion of a multipart upload (aborted, so nothing is listed, when the
writer fails or dies).  Reads are ranged.  Keys are built by the service from
opaque ids and array names, never from anything a client sent as a path.

``PLANNER_STORAGE_URL`` selects the backend: ``file:///abs/path`` (the
embedded default, a folder in ``PLANNER_DATA_DIR``) or ``s3://bucket/prefix``
with the endpoint and keys from the standard ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and ``AWS_DEFAULT_REGION``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import fsspec
import fsspec.asyn
import numpy as np
from fsspec.implementations.local import LocalFileSystem

__all__ = ["Storage"]

#: Bytes per part of an S3 multipart upload, and per ranged read when streaming.
BLOCK = 16 * 2**20
#: Ranged reads in flight when a worker copies an object to its cache.
DOWNLOADS = 4


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _timestamp(info: dict) -> float | None:
    m = info.get("mtime") or info.get("LastModified") or info.get("created")
    if m is None or m == "":
        return None
    return m.timestamp() if hasattr(m, "timestamp") else float(m)


def _boot_id() -> str:
    """This boot of the machine: the cache lives in a folder of its own per boot, so its
    copies need no fsync (a crash of the machine, which could leave a renamed copy with
    unwritten pages, starts a new folder; a crash of the process loses nothing)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        return "boot"


_BOOT = _boot_id()


def _close_s3_session(loop, s3) -> None:
    """s3fs's ``close_session`` (its finalizer when a file system is collected) without its
    bug: s3fs schedules the client's ``__aexit__`` on whatever event loop is running in the
    collecting thread, which then fails ("attached to a different loop") inside an
    unrelated coroutine. The client belongs to fsspec's own loop: close it there."""
    import asyncio

    if loop is not None and loop.is_running() and not loop.is_closed():
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:  # collected on fsspec's own thread
            loop.create_task(s3.__aexit__(None, None, None))
            return
        with contextlib.suppress(Exception):
            fsspec.asyn.sync(loop, s3.__aexit__, None, None, None, timeout=1)
            return
    with contextlib.suppress(AttributeError):  # no loop left: close the socket itself
        s3._client._endpoint.http_session._connector._close()


class Storage:
    """Objects under ``url``: ``put``/``writer`` commit whole, ``open``/``read_range`` read."""

    def __init__(
        self,
        url: str,
        cache_dir: str | os.PathLike | None = None,
        cache_bytes: int = 16 * 2**30,
    ) -> None:
        self.url = url.rstrip("/")
        options = {}
        if url.startswith("s3://"):
            endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
            if endpoint:
                options["endpoint_url"] = endpoint
            region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
            options["client_kwargs"] = {"region_name": region} if region else {}
            options["default_block_size"] = BLOCK
            options["skip_instance_cache"] = True
        self.fs, self.root = fsspec.core.url_to_fs(url, **options)
        if not isinstance(self.fs, LocalFileSystem):  # read by s3fs when it opens a session
            self.fs.close_session = _close_s3_session
        self.root = self.root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            Path(self.root).mkdir(parents=True, exist_ok=True)
        #: where a process keeps local copies of remote objects it memory-maps, and how
        #: many bytes of them at most
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.cache_bytes = cache_bytes

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    # -- writing ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def writer(self, key: str) -> Iterator[BinaryIO]:
        """A file to write ``key`` into; the object appears whole when the block exits
        cleanly, and not at all otherwise."""
        full = self.path(key)
        if self.local:
            dst = Path(full)
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(6)}.partial")
            f = open(tmp, "wb")  # noqa: SIM115 - closed below, in both outcomes
            try:
                yield f
                f.flush()
                os.fsync(f.fileno())
                f.close()
                os.replace(tmp, dst)
                _fsync_dir(dst.parent)
            except BaseException:
                f.close()
                tmp.unlink(missing_ok=True)
                raise
            return
        f = self.fs.open(full, "wb", block_size=BLOCK)
        try:
            yield f
        except BaseException:
            f.discard()  # abort the multipart upload: nothing becomes visible
            f.closed = True  # and no flush when the file is collected
            raise
        f.close()

    def put_file(self, path: Path, key: str) -> int:
        """Adopt a complete local file as ``key``: renamed into place when storage is a local
        folder on the same file system, else streamed up; returns its size."""
        size = Path(path).stat().st_size
        if self.local:
            dst = Path(self.path(key))
            dst.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.replace(path, dst)
                _fsync_dir(dst.parent)
                return size
            except OSError:  # another file system: copy instead
                pass
        with open(path, "rb") as src, self.writer(key) as out:
            while chunk := src.read(BLOCK):
                out.write(chunk)
        return size

    def copy(self, src: str, dst: str) -> None:
        """Copy one object to another key (server-side on S3), committed whole."""
        if self.local:
            with self.open(src) as f, self.writer(dst) as out:
                while chunk := f.read(BLOCK):
                    out.write(chunk)
            return
        self.fs.copy(self.path(src), self.path(dst))

    def local_file(self, key: str) -> Path:
        """A local file with the object's bytes: its own file for a local folder, else
        this process's cached copy (downloaded once)."""
        path = self.local_path(key)
        return path if path is not None else self.cached(key)

    def put_npy(self, key: str, a: np.ndarray, dtype=None) -> tuple[str, int]:
        """Write ``a`` (optionally cast) as ``.npy`` under ``key``; return (sha256, bytes)."""
        from .arrays import npy_chunks

        h, size = hashlib.sha256(), 0
        with self.writer(key) as f:
            for chunk in npy_chunks(a, dtype):
                h.update(chunk)
                f.write(chunk)
                size += len(chunk)
        return h.hexdigest(), size

    # -- reading ----------------------------------------------------------------------------
    def open(self, key: str) -> BinaryIO:
        """A seekable file reading ``key`` (ranged reads on S3)."""
        return self.fs.open(self.path(key), "rb", block_size=BLOCK)

    def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``start..end`` (end exclusive) of ``key``."""
        return self.fs.cat_file(self.path(key), start=start, end=end)

    def size(self, key: str) -> int | None:
        try:
            return int(self.fs.size(self.path(key)))
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def local_path(self, key: str) -> Path | None:
        """The object's own file when storage is a local folder (for memory maps)."""
        return Path(self.path(key)) if self.local else None

    def load_npy(self, key: str) -> np.ndarray:
        """A ``.npy`` object as a read-only memory map: the file itself locally; remotely a
        copy in this process's cache (objects are immutable: one download per object).
        Returned as a plain ``ndarray`` view of the map: ``np.memmap``'s subclass hooks
        run on every slice and gather, which made a small plan's search several times
        slower; the view still reads the file in place (its ``base`` is the map)."""
        m = np.load(self.local_file(key), mmap_mode="r", allow_pickle=False)
        return m.view(np.ndarray)

    def _cache_path(self, key: str) -> Path:
        import tempfile

        base = self.cache_dir or Path(tempfile.gettempdir()) / "alignment-planner-cache"
        name = hashlib.sha256(f"{self.url}/{key}".encode()).hexdigest()[:32] + ".npy"
        return base / _BOOT / name

    def cached(self, key: str) -> Path:
        """The path of a local copy of ``key`` in the cache, downloaded if missing; the
        least recently used copies are evicted beyond ``cache_bytes`` (a copy being read
        stays readable: an unlinked file lives on while it is open or mapped)."""
        dst = self._cache_path(key)
        if dst.exists():
            os.utime(dst)  # recently used
            return dst
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(6)}.partial")
        try:
            self._download(key, tmp)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
        self._evict(keep=dst)
        return dst

    def _download(self, key: str, dst: Path) -> None:
        """The object into a local file by ranged reads, ``DOWNLOADS`` at a time (one S3
        stream is far slower than the link)."""
        size = self.size(key)
        if size is None:
            raise FileNotFoundError(key)
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)

            def part(start: int) -> None:
                os.pwrite(fd, self.read_range(key, start, min(size, start + BLOCK)), start)

            with ThreadPoolExecutor(DOWNLOADS) as pool:
                list(pool.map(part, range(0, size, BLOCK)))
        finally:
            os.close(fd)

    def forget(self, key: str) -> None:
        """Drop this process's cached copy of ``key``, if any."""
        if not self.local:
            self._cache_path(key).unlink(missing_ok=True)

    def _evict(self, keep: Path) -> None:
        for other in keep.parent.parent.iterdir():  # copies from before a reboot
            if other.is_dir() and other.name != _BOOT:
                shutil.rmtree(other, ignore_errors=True)
        files = [(f.stat().st_mtime, f.stat().st_size, f) for f in keep.parent.glob("*.npy")]
        total = sum(size for _, size, _ in files)
        for _, size, f in sorted(files):
            if total <= self.cache_bytes:
                return
            if f != keep:
                f.unlink(missing_ok=True)
                total -= size

    # -- housekeeping -----------------------------------------------------------------------
    def delete(self, prefix: str) -> None:
        """Remove every object under ``prefix`` (a folder-like key)."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(prefix), recursive=True)

    def children(self, prefix: str) -> list[str]:
        """Names directly under ``prefix``."""
        try:
            entries = self.fs.ls(self.path(prefix), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]

    def modified(self, prefix: str) -> float | None:
        """When anything under ``prefix`` (an object, or a folder-like prefix) was last
        written: the newest of its objects (and, locally, of its folders); None when
        nothing is there."""
        path = self.path(prefix)
        if not self.local:
            self.fs.invalidate_cache(path)
        try:
            found = self.fs.find(path, withdirs=self.local, detail=True)
        except FileNotFoundError:
            return None
        if self.local and os.path.exists(path):
            found[path] = self.fs.info(path)
        times = [_timestamp(info) for info in found.values()]
        times = [t for t in times if t is not None]
        return max(times) if times else None

    def abort_uploads(self, grace: float) -> int:
        """Abort the unfinished multipart uploads under this storage's prefix that started
        more than ``grace`` seconds ago (a replica killed mid-upload leaves one: never
        listed, but holding its parts); how many.  Nothing to do for a local folder."""
        if self.local:
            return 0
        bucket, _, prefix = self.root.partition("/")
        args = {"Bucket": bucket, "Prefix": f"{prefix}/" if prefix else ""}
        now, aborted = time.time(), 0
        while True:
            page = self.fs.call_s3("list_multipart_uploads", **args)
            for u in page.get("Uploads", []):
                started = u.get("Initiated")
                age = now - started.timestamp() if started is not None else float("inf")
                if age > grace:
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.abort_mpu(bucket, u["Key"], u["UploadId"])
                    aborted += 1
            if not page.get("IsTruncated"):
                return aborted
            args["KeyMarker"] = page.get("NextKeyMarker")
            args["UploadIdMarker"] = page.get("NextUploadIdMarker")

    def close(self) -> None:
        """Close the S3 client's connections now, on fsspec's own loop.  (s3fs would
        otherwise close them when the file system is collected, on whatever event loop
        is running in the collecting thread, which fails when it is not fsspec's.)"""
        if self.local:
            return
        creator = getattr(self.fs, "_s3creator", None)
        if creator is None:
            return
        registry = getattr(weakref.finalize, "_registry", {})
        for fin, info in list(registry.items()):
            if info.args and info.args[-1] is creator:
                fin.detach()
        with contextlib.suppress(Exception):
            fsspec.asyn.sync(self.fs.loop, creator.__aexit__, None, None, None, timeout=10)
        self.fs._s3 = self.fs._s3creator = None

    def ping(self) -> None:
        """Raise when the storage cannot be reached."""
        if self.local:
            if not Path(self.root).is_dir():
                raise FileNotFoundError(self.root)
            return
        self.fs.ls(self.root.split("/", 1)[0], detail=False, refresh=True)
