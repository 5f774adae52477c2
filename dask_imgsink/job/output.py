"""The output directory against the job's ``mode``: what is there, what may be replaced, what may not.

Checked when the job is built (to fail early), again by the job once it holds
the lock, and once more by its commit before it changes anything.

- ``"error"``: nothing may be there but our hidden work folder.
- ``"overwrite"``: only what the old dataset owns (the shards its index lists and
  the fixed files) may be removed; any other file makes it refuse and list them.
  Never a filesystem root, the home directory, the working directory or a parent
  of it, with symlinks resolved first.
- ``"append"``: the directory must hold a dataset with an index, whose shard
  schema is the new job's.
"""

from __future__ import annotations

import os
import posixpath

import pyarrow as pa
import pyarrow.parquet as pq

from ..format.index import read_index
from ..format.layout import (
    INDEX_FILE,
    LAYOUT_VERSION,
    LEGACY_STAGING_DIR,
    METADATA_DIR,
    WORK_DIR,
    dataset_files,
    dataset_listing,
    index_layout,
    legacy_staging,
    parquet_name,
    shard_files,
)
from ..format.schema import narrowed, recorded_schema
from ..storage import forget_listings, is_local, is_s3, join, read_bytes

MODE_CHOICES = ("error", "overwrite", "append")


class OutputStateError(ValueError):
    """What the output directory holds does not suit the mode (a foreign file, another schema, ...):
    the state of the output, not a bad argument."""


def existing_entries(fs, root: str) -> list[str]:
    """Names in the output directory, leaving out our hidden work folder.

    The ``metadata/`` folder is listed by its files (``metadata/shard-000000.parquet``);
    an empty one counts as nothing.
    """
    forget_listings(fs, root)
    if is_s3(fs):  # no HEAD or LIST to ask first: the listing says it all
        try:
            names = dataset_listing(fs, root)
        except FileNotFoundError:
            return []
        if names == [posixpath.basename(root.rstrip("/"))] and fs.isfile(root):
            raise NotADirectoryError(f"the output path {root!r} exists and is not a directory")
        return sorted(n for n in names if n != WORK_DIR)
    if not fs.exists(root):
        return []
    if not fs.isdir(root):
        raise NotADirectoryError(f"the output path {root!r} exists and is not a directory")
    return sorted(n for n in dataset_listing(fs, root) if n != WORK_DIR)


def _shown(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def not_empty_error(url: str, names: list[str]) -> FileExistsError:
    return FileExistsError(
        f"the output directory {url!r} is not empty ({_shown(names)}); pass mode='overwrite' to "
        "replace the dataset there, or mode='append' to add shards to it"
    )


def check_overwrite_target(fs, root: str, url: str) -> None:
    """Refuse to overwrite a filesystem root, the home directory, or the working directory or a parent of it.

    Symlinks are resolved first, so a link to the working directory is caught too.
    """
    if not is_local(fs):
        if root.strip("/").count("/") == 0:
            raise OutputStateError(f"mode='overwrite' refuses {url!r}: it is a bucket root; write to a folder in it")
        return
    target = os.path.realpath(root)
    cwd = os.path.realpath(os.getcwd())
    home = os.path.realpath(os.path.expanduser("~"))
    if target == os.path.dirname(target):
        reason = "it is a filesystem root"
    elif target == home:
        reason = "it is the home directory"
    elif cwd == target or cwd.startswith(target.rstrip(os.sep) + os.sep):
        reason = "it holds the current working directory"
    else:
        return
    raise OutputStateError(
        f"mode='overwrite' refuses {url!r} (resolved: {target}): {reason}. Write the dataset to a directory of its own"
    )


def unknown_entries(names: list[str], index: dict | None) -> list[str]:
    """Entries that belong to no dataset of ours (``overwrite`` refuses to delete them)."""
    owned = dataset_files(index)
    return [n for n in names if n not in owned]


def overwrite_removals(fs, root: str, url: str) -> list[str]:
    """What ``overwrite`` will remove: the old dataset's files that exist.

    Raises
    ------
    ValueError
        If the target is unsafe, or holds files no dataset of ours accounts for.
    """
    check_overwrite_target(fs, root, url)
    names = existing_entries(fs, root)
    index = read_index(fs, root) if INDEX_FILE in names else None
    unknown = unknown_entries(names, index)
    if unknown:
        hint = (f" ({LEGACY_STAGING_DIR} is staging left by an older dask-imgsink: remove it with "
                f"`dask-imgsink clean {url}`)") if LEGACY_STAGING_DIR in unknown and legacy_staging(
                    fs, join(root, LEGACY_STAGING_DIR)) else ""
        raise OutputStateError(
            f"mode='overwrite' only removes the files a dataset's {INDEX_FILE} accounts for, and "
            f"{url!r} also holds {_shown(unknown)}{hint}. Move or delete them yourself, or write "
            "to another directory"
        )
    return sorted(n for n in names if n in dataset_files(index))


def existing_shard_schema(fs, root: str, index: dict) -> pa.Schema | None:
    """The Parquet schema of the dataset's first shard; with no shard, the one its last job recorded
    (``None`` if it recorded none)."""
    names = shard_files(index)
    if not names:
        return recorded_schema(index)
    data = read_bytes(fs, posixpath.join(root, parquet_name(names[0], index_layout(index))))
    return None if data is None else pq.read_schema(pa.BufferReader(data))


def adopt_dataset_types(existing: pa.Schema | None, user_schema: pa.Schema) -> pa.Schema:
    """For an append: the job's metadata schema, with each column whose type is the dataset's but for
    offset width (``string`` / ``large_string``, ``binary`` / ``large_binary``, ``list`` / ``large_list``)
    given the dataset's type. Such columns hold the same values; pandas gives either depending on
    how a frame was built, and the shards of one dataset must have one schema."""
    if existing is None:
        return user_schema
    fields = []
    for field in user_schema:
        index = existing.get_field_index(field.name)
        theirs = existing.field(index).type if index >= 0 else None
        alike = theirs is not None and theirs != field.type and narrowed(theirs) == narrowed(field.type)
        fields.append(field.with_type(theirs) if alike else field)
    return pa.schema(fields)


def schema_to_append(fs, root: str, user_schema: pa.Schema) -> pa.Schema:
    """The metadata schema an append to the dataset at ``root`` writes (:func:`adopt_dataset_types`)."""
    index = read_index(fs, root)
    if index is None:
        return user_schema  # no dataset: the checks of the mode say so
    return adopt_dataset_types(existing_shard_schema(fs, root, index), user_schema)


def check_append_schema(existing: pa.Schema | None, new: pa.Schema, url: str) -> None:
    """Refuse appending shards whose Parquet schema differs from the dataset's."""
    if existing is None:
        return
    old = [(f.name, str(f.type)) for f in existing]
    now = [(f.name, str(f.type)) for f in new]
    if old == now:
        return
    gone = [f"{n}: {t}" for n, t in old if (n, t) not in now]
    added = [f"{n}: {t}" for n, t in now if (n, t) not in old]
    raise OutputStateError(
        f"mode='append' would add shards whose Parquet schema differs from the dataset in {url!r} "
        f"(the dataset has {gone or 'the same columns in another order'}, this job has "
        f"{added or 'the same columns in another order'}); readers such as dd.read_parquet would "
        "silently drop or mistype columns. Select and cast the same metadata columns "
        "(metadata_columns=..., metadata_schema=...), or write a new dataset"
    )


def check_output(fs, root: str, url: str, mode: str, shard_schema: pa.Schema) -> dict | None:
    """Check the directory against ``mode``; return the index of the dataset there (``None`` if none).

    Raises
    ------
    FileExistsError
        ``mode="error"`` and the directory holds anything.
    ValueError
        ``overwrite`` of an unsafe target or of unknown files; ``append`` to a
        directory without an index, or with another schema.
    """
    names = existing_entries(fs, root)
    if not names:
        return None
    if mode == "error":
        raise not_empty_error(url, names)
    if mode == "overwrite":
        overwrite_removals(fs, root, url)
        return read_index(fs, root) if INDEX_FILE in names else None
    index = read_index(fs, root) if INDEX_FILE in names else None
    if index is None:
        raise OutputStateError(
            f"mode='append' needs the dataset's {INDEX_FILE} in {url!r}, and there is none: "
            "it is not a complete dask-imgsink dataset. Use mode='overwrite' to replace it"
        )
    if index_layout(index) != LAYOUT_VERSION:
        raise OutputStateError(
            f"mode='append' cannot add to the dataset in {url!r}: an older dask-imgsink wrote it with its "
            f"Parquet files beside the tars (layout {index_layout(index)}), and this release puts them in "
            f"{METADATA_DIR}/ (layout {LAYOUT_VERSION}). Rewrite it as a new dataset, or use mode='overwrite'"
        )
    check_append_schema(existing_shard_schema(fs, root, index), shard_schema, url)
    return index
