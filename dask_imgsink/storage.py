"""Filesystem access through fsspec: resolving paths, publishing files atomically, create-if-absent.

A file is written under a staging name and moved to its final name only when it
is complete: ``os.replace`` on local disks (atomic), a move elsewhere (a single
PUT or server-side copy of the whole object on object stores, so readers never
see part of it).

:func:`create_exclusive` is the one atomic create-if-absent the job lock rests
on: a hard link onto the name on local and POSIX filesystems (``link()`` fails
if the name exists, like ``O_EXCL``, and the file appears with its whole
content), a conditional PUT
(``If-None-Match: *``) on S3 through s3fs's ``mode="create"``, and fsspec's own
``pipe_file(mode="create")`` elsewhere (atomic only where the backend makes it so).
"""

from __future__ import annotations

import asyncio
import errno
import os
import posixpath
import uuid
from typing import Any

import fsspec
import fsspec.asyn
from fsspec.implementations.local import LocalFileSystem


def resolve(path: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """Return ``(filesystem, path_on_that_filesystem)`` for a local path or URL."""
    fs, root = fsspec.core.url_to_fs(str(path), **(storage_options or {}))
    return fs, root.rstrip("/") or root


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def is_local(fs) -> bool:
    return isinstance(fs, LocalFileSystem)


def forget_listings(fs, path: str | None = None) -> None:
    """Drop fsspec's cached listings, so that a check sees what other processes did.

    All of them: s3fs forgets only a path and its parents when given one, and
    the checks list folders below it.
    """
    try:
        fs.invalidate_cache()
    except Exception:  # not every backend caches
        pass


def publish(fs, staged: str, final: str) -> None:
    """Move a complete staged file to its final name, replacing what is there."""
    if is_local(fs):
        os.replace(staged, final)
    else:
        fs.mv(staged, final)


#: Requests in flight at once when publishing or removing many objects.
CONCURRENCY = 64
#: Largest object S3's CopyObject copies in one request; larger ones are copied in parts.
MAX_SINGLE_COPY = 5 * 2**30


def is_s3(fs) -> bool:
    """Whether ``fs`` is s3fs, whose async calls let us copy and delete many objects concurrently."""
    return getattr(fs, "async_impl", False) and hasattr(fs, "_copy_basic") and hasattr(fs, "_bulk_delete")


def _wide_s3(fs):
    """The same S3 filesystem with a connection pool of ``CONCURRENCY`` (botocore's default of 10
    would hold our concurrent requests to 10 at a time); a setting the user made that is larger stays."""
    options = dict(fs.storage_options)
    config = dict(options.get("config_kwargs") or {})
    if config.get("max_pool_connections", 10) >= CONCURRENCY:
        return fs
    config["max_pool_connections"] = CONCURRENCY
    return type(fs)(**{**options, "config_kwargs": config})


def publish_many(fs, moves: list[tuple[str, str, int]], fast: bool = True) -> None:
    """Give complete staged files their final names: ``(staged, final, size)`` each.

    On S3 (s3fs): one server-side CopyObject per file, ``CONCURRENCY`` at a time,
    with no HEAD or LIST first (the sizes are known); the staged objects stay
    until the job's staging folder is removed, so publishing again is harmless.
    With ``fast``, the copies go through obstore where it sends the same requests
    for a fraction of botocore's CPU (:mod:`~dask_imgsink.s3copy`), the rest
    through s3fs. Elsewhere: :func:`publish` each file in turn.
    """
    if not is_s3(fs):
        for staged, final, _ in moves:
            publish(fs, staged, final)
        return
    if fast:
        from .s3copy import copy_fast

        moves = copy_fast(fs, moves)
        if not moves:
            return
    fs = _wide_s3(fs)

    async def copy_all():  # every copy ends before this returns, failed or not (see _all_settled)
        limit = asyncio.Semaphore(CONCURRENCY)

        async def copy(staged: str, final: str, size: int) -> None:
            async with limit:
                if size > MAX_SINGLE_COPY:
                    await fs._copy_managed(staged, final, size)
                else:
                    await fs._copy_basic(staged, final)
        await _all_settled(copy(*move) for move in moves)

    fsspec.asyn.sync(fs.loop, copy_all)


async def _all_settled(coroutines) -> None:
    """Run ``coroutines`` at once; once every one has ended, raise the first error, if any.

    ``asyncio.gather`` raises at the first error and leaves the rest running: a
    copy still queued would then land after the commit had taken back what it
    published.
    """
    results = await asyncio.gather(*coroutines, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise errors[0]


def remove_many(fs, paths: list[str]) -> None:
    """Remove files that may or may not exist; on S3 with one DeleteObjects request per 1,000."""
    if not is_s3(fs):
        for path in paths:
            remove_file(fs, path)
        return
    chunks = [paths[i:i + 1000] for i in range(0, len(paths), 1000)]
    fs = _wide_s3(fs) if len(chunks) > 10 else fs

    async def delete_all():
        await _all_settled(fs._bulk_delete(chunk) for chunk in chunks)

    if chunks:
        fsspec.asyn.sync(fs.loop, delete_all)


def files_below(fs, folder: str) -> dict[str, int]:
    """Every file below ``folder`` with its size, from listings (one LIST per 1,000 objects on S3)."""
    try:
        found = fs.find(folder, detail=True)
    except FileNotFoundError:
        return {}
    return {path: info.get("size", 0) for path, info in found.items() if info.get("type") != "directory"}


def create_exclusive(fs, path: str, data: bytes) -> None:
    """Create ``path`` holding ``data`` only if nothing is there; atomic where the filesystem allows.

    Raises
    ------
    FileExistsError
        Something already exists at ``path``.
    """
    if is_local(fs):
        # Write the content under a unique name, then hard-link it to ``path``: link()
        # fails if ``path`` exists, and a reader never sees the file empty or partial.
        folder = os.path.dirname(path)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.part")
        _in_folder(folder, lambda: _write_file(tmp, data, sync=True))
        try:
            os.link(tmp, path)
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            _create_excl(path, data)  # e.g. a FUSE mount: the file is empty for a moment
        finally:
            os.unlink(tmp)
        return
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        raise
    except OSError as exc:
        # s3fs turns 412 Precondition Failed into FileExistsError; AWS answers 409
        # ConditionalRequestConflict while another conditional write or a delete of
        # the key is in flight: someone else is creating or removing it.
        text = str(exc).lower()
        if any(word in text for word in ("precondition", "conditionalrequestconflict", "409")):
            raise FileExistsError(path) from exc
        raise


#: errno values of link() on filesystems without hard links
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS}


def _create_excl(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_small(fs, path: str, data: bytes, tmp_dir: str) -> None:
    """Write a small file so that readers see either nothing or all of it.

    Locally the bytes go to a temporary file in ``tmp_dir`` (the job's staging
    folder, invisible to readers) which then replaces ``path``; a process killed
    at any moment leaves no temporary file in the dataset. Object stores get
    one PUT, which is atomic.
    """
    if is_local(fs):
        tmp = join(tmp_dir, f"{posixpath.basename(path)}.{uuid.uuid4().hex}.part")
        _in_folder(tmp_dir, lambda: _write_file(tmp, data))
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def _write_file(path: str, data: bytes, sync: bool = False) -> None:
    with open(path, "wb") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())


def _in_folder(folder: str, write) -> None:
    """Run ``write`` after creating ``folder``; again if another process removed the (empty) folder meanwhile."""
    for attempt in range(5):
        os.makedirs(folder, exist_ok=True)
        try:
            return write()
        except FileNotFoundError:
            if attempt == 4:
                raise


def read_bytes(fs, path: str) -> bytes | None:
    """The whole (small) file at ``path``, or ``None`` if there is none.

    One GET on object stores (s3fs otherwise asks for the size first): a file
    object would pin the object's ETag and fail (s3fs's ``FileExpired``) when
    another process replaces the object between opening and reading it, as a
    lock being updated is.
    """
    for attempt in range(5):
        try:
            return fs.cat_file(path, **_one_request(fs))
        except FileNotFoundError:
            return None
        except OSError as exc:
            if type(exc).__name__ != "FileExpired" or attempt == 4:
                raise


def read_many(fs, paths: list[str]) -> list[bytes | None]:
    """:func:`read_bytes` of each path; on S3 all at once (one round of GETs, not one after another)."""
    if not is_s3(fs) or len(paths) < 2:
        return [read_bytes(fs, path) for path in paths]
    found = fs.cat(paths, on_error="return", **_one_request(fs))
    results = []
    for path in paths:
        data = found.get(path, found.get(fs._strip_protocol(path)))
        if isinstance(data, FileNotFoundError) or data is None:
            results.append(None)
        elif isinstance(data, BaseException):
            results.append(read_bytes(fs, path))  # another error: once more alone, which raises it
        else:
            results.append(data)
    return results


def write_small_many(fs, files: list[tuple[str, bytes]], tmp_dir: str) -> None:
    """:func:`write_small` of each ``(path, data)``; on object stores all at once (one round of PUTs)."""
    if is_local(fs) or len(files) < 2:
        for path, data in files:
            write_small(fs, path, data, tmp_dir)
        return
    if not getattr(fs, "async_impl", False):
        fs.pipe(dict(files))
        return

    async def put_all():  # fsspec's pipe would raise at the first error and leave the rest running
        await _all_settled(fs._pipe_file(path, data) for path, data in files)

    fsspec.asyn.sync(fs.loop, put_all)


def _one_request(fs) -> dict:
    """What makes s3fs read a small object with one GET (no HEAD for its size first)."""
    return {"max_concurrency": 1} if is_s3(fs) else {}


def remove_file(fs, path: str) -> None:
    """Remove one file (never a directory tree, never what a symlink points to); quiet if absent."""
    try:
        if is_local(fs):
            os.unlink(path)
        else:
            fs.rm_file(path)
    except FileNotFoundError:
        pass


def remove_quietly(fs, path: str, recursive: bool = False) -> None:
    """Remove ``path`` (a tree with ``recursive``) if it exists."""
    try:
        if is_local(fs) or is_s3(fs):  # both raise FileNotFoundError for nothing there: no check first
            fs.rm(path, recursive=recursive)
        elif fs.exists(path):
            fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        pass


def remove_empty_dir(fs, path: str) -> None:
    """Remove the directory ``path`` if it exists and is empty (object stores have none to remove)."""
    if is_s3(fs):
        return  # S3 has no directories: nothing to ask for
    try:
        if is_local(fs):
            os.rmdir(path)
        elif fs.isdir(path) and not fs.ls(path, detail=False):
            fs.rmdir(path)
    except (OSError, ValueError):
        pass
