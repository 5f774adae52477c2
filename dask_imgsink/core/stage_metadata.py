"""The stage's metadata: one Arrow schema for all its batches, and batch fingerprints for names.

:class:`MetadataSchema` takes the union of the metadata keys of a batch's
objects (in order of first appearance), fixes their Arrow types from the first
batch (or from ``metadata_schema``), and refuses a later batch that adds a key
or changes a type, naming the key, so every shard the stage writes has the same
Parquet schema. :func:`batch_fingerprint` identifies a batch by everything it
holds, so two different batches never get the same shard names.
"""

from __future__ import annotations

import json
import threading
from functools import partial
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import xxhash
from PIL import Image

from ..format.schema import check_metadata_names
from ..format.shapes import exact_array, is_nested, reshaped
from .tasks import ImageBatch, ImageObject

_SCHEMA_FIX = "pass metadata_schema={'name': pa.int64(), ...} to the stage to fix the types, or make the values agree"


class MetadataSchema:
    """The Arrow schema of a stage's metadata columns, fixed by its first batch."""

    def __init__(self, declared: Mapping[str, pa.DataType] | pa.Schema | None) -> None:
        if isinstance(declared, pa.Schema):
            declared = {f.name: f.type for f in declared}
        self.declared = dict(declared or {})
        check_metadata_names(list(self.declared))
        self.schema: pa.Schema | None = None
        self._fixing = threading.Lock()  # two threads' first batches must not fix two schemas

    def table(self, objects: list[ImageObject], batch: str) -> pa.Table:
        """The metadata of ``objects`` (``image_path`` first) as Arrow in the stage's schema.

        Raises
        ------
        ValueError
            A key the first batch did not have, or a value that does not fit its
            key's type; names the batch, the key and the fix.
        """
        for obj in objects:
            _check_keys_of(obj.metadata or {}, batch)
        rows = [{"image_path": obj.image_path, **dict(obj.metadata or {})} for obj in objects]
        names = list(dict.fromkeys(name for row in rows for name in row))
        check_metadata_names([n for n in names if n != "image_path"])
        with self._fixing:
            if self.schema is None:
                self.schema = self._first_schema(rows, names, batch)
        new = [n for n in names if n not in self.schema.names]
        if new:
            raise ValueError(
                f"batch {batch!r}: metadata key(s) {new} were not in the stage's first batch, which fixed its "
                f"Parquet schema ({self.schema.names}); every shard must have the same schema. Give every "
                f"object every key (None where unknown; a key that is None in the whole first batch takes the type "
                f"null, so give its type in metadata_schema) from the first batch on, or {_SCHEMA_FIX}"
            )
        return _to_table(rows, self.schema, batch)

    def _first_schema(self, rows: list[dict], names: list[str], batch: str) -> pa.Schema:
        fields = [pa.field("image_path", pa.string())]
        for name in names[1:]:
            if name in self.declared:
                fields.append(pa.field(name, self.declared[name]))
            else:
                try:
                    inferred = pa.array([row.get(name) for row in rows]).type
                except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                    raise ValueError(f"batch {batch!r}: the values of metadata key {name!r} have no single "
                                     f"Arrow type ({exc}); {_SCHEMA_FIX}") from None
                fields.append(pa.field(name, inferred))
        for name, type_ in self.declared.items():
            if name not in names:
                fields.append(pa.field(name, type_))
        return pa.schema(fields)


def _check_keys_of(metadata: Mapping, batch: str) -> None:
    """Refuse metadata keys that are not strings, or that would replace the stage's ``image_path`` column."""
    for key in metadata:
        if not isinstance(key, str):
            raise ValueError(f"batch {batch!r}: metadata key {key!r} is not a string; Parquet columns and key.json "
                             "keys are text: use str keys")
        if key == "image_path":
            raise ValueError(f"batch {batch!r}: metadata key 'image_path' would replace the object's image_path, "
                             "which the stage writes in that column; rename the key")


def _to_table(rows: list[dict], schema: pa.Schema, batch: str) -> pa.Table:
    columns = []
    for field in schema:
        values = [row.get(field.name) for row in rows]
        reason = next((r for r in map(partial(reshaped, type_=field.type), values) if r), None) \
            if is_nested(field.type) else None
        if reason is not None:
            raise ValueError(f"batch {batch!r}: metadata key {field.name!r} holds a value that does not fit its type "
                             f"{field.type}: {reason}; {_SCHEMA_FIX}")
        try:
            columns.append(exact_array(values, field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError) as exc:
            raise ValueError(
                f"batch {batch!r}: metadata key {field.name!r} holds a value that does not fit its type "
                f"{field.type}, fixed by the stage's first batch ({exc}); {_SCHEMA_FIX}"
            ) from None
    return pa.Table.from_arrays(columns, schema=schema)


def _image_fingerprint(value: Any, digest) -> None:
    if isinstance(value, np.ndarray):
        digest.update(f"{value.dtype.str}{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).view(np.uint8).reshape(-1).data)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        digest.update(value)
    elif isinstance(value, Image.Image):
        digest.update(f"{value.mode}{value.size}".encode())
        digest.update(value.tobytes())
        digest.update(bytes(value.getpalette() or []))  # a "P" image's pixels are indexes into it
    elif isinstance(value, dict):
        data = value.get("bytes")
        _image_fingerprint(data if isinstance(data, (bytes, bytearray, memoryview)) else None, digest)
        digest.update(str(value.get("path")).encode())
    else:
        digest.update(repr(type(value)).encode())


def batch_fingerprint(task: ImageBatch) -> str:
    """Hex XXH3-128 of everything a batch holds: names, ids, paths, images and metadata."""
    digest = xxhash.xxh3_128()
    for part in (task.dataset_name, task.task_id):
        digest.update(str(part).encode() + b"\0")
    for obj in task.data:
        digest.update(f"{obj.image_path}\0{obj.image_id}\0".encode())
        _image_fingerprint(obj.image_data, digest)
        digest.update(json.dumps(obj.metadata or {}, sort_keys=True, default=_whole).encode() + b"\0")
    return digest.hexdigest()


def _whole(value: Any) -> Any:
    """A metadata value JSON cannot hold, whole (``str`` of a long NumPy array elides its middle)."""
    if isinstance(value, np.ndarray):
        return [value.dtype.str, list(value.shape), value.tobytes().hex()]
    return str(value)
