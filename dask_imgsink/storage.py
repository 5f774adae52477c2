"""Filesystem access through fsspec: resolving paths and publishing files atomically.

A file is written under a staging name and moved to its final name only when it
is complete: ``os.replace`` on local disks (atomic), a move elsewhere (a single
PUT of the whole object on object stores, so readers never see part of it).
"""

from __future__ import annotations

import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


def resolve(path: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """Return ``(filesystem, path_on_that_filesystem)`` for a local path or URL."""
    fs, root = fsspec.core.url_to_fs(str(path), **(storage_options or {}))
    return fs, root.rstrip("/") or root


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def is_local(fs) -> bool:
    return isinstance(fs, LocalFileSystem)


def publish(fs, staged: str, final: str) -> None:
    """Move a complete staged file to its final name, replacing what is there."""
    if is_local(fs):
        import os

        os.replace(staged, final)
    else:
        fs.mv(staged, final)


def write_bytes_atomic(fs, path: str, data: bytes) -> None:
    """Write a small file so that readers see either nothing or all of it."""
    if is_local(fs):
        tmp = join(posixpath.dirname(path), f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
        with fs.open(tmp, "wb") as f:
            f.write(data)
        publish(fs, tmp, path)
    else:
        fs.pipe_file(path, data)


def remove_quietly(fs, path: str, recursive: bool = False) -> None:
    """Remove ``path`` if it exists."""
    try:
        if fs.exists(path):
            fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        pass
