"""The settings of one ``to_webdataset`` job: validated once, shipped to every task.

Also the job's naming rules: final shard names and the staging layout
``<output>/_temporary/<job id>/<attempt id>/``.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field

import pyarrow as pa

from ..core.encode import EncodeOptions
from ..storage import join

PACKING_CHOICES = ("exact", "per_partition")
MODE_CHOICES = ("error", "overwrite", "append")
STAGING_DIR = "_temporary"

_PREFIX = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}")
    return value


@dataclass(frozen=True)
class WriteOptions:
    """Everything a write, merge or commit task needs to know (picklable, small)."""

    url: str
    root: str
    storage_options: dict | None
    image_column: str
    key_column: str | None
    text_column: str | None
    label_column: str | None
    metadata_columns: tuple[str, ...]
    user_schema: pa.Schema
    images_per_tar: int
    encode: EncodeOptions
    deterministic_name: bool
    name_prefix: str
    encode_threads: int | None
    packing: str
    mode: str
    on_error: str
    dataset_name: str
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    first_shard: int = 0
    first_partition: int = 0

    def __post_init__(self) -> None:
        if int(self.images_per_tar) < 1:
            raise ValueError(f"images_per_tar={self.images_per_tar!r} must be at least 1")
        if not _PREFIX.match(self.name_prefix):
            raise ValueError(
                f"name_prefix={self.name_prefix!r} must be letters, digits, '_' or '-' "
                "(no '.', '/'), so shard names stay plain and brace patterns work"
            )
        check_choice("packing", self.packing, PACKING_CHOICES)
        check_choice("mode", self.mode, MODE_CHOICES)
        check_choice("on_error", self.on_error, ("raise", "skip"))
        if self.encode_threads is not None and int(self.encode_threads) < 1:
            raise ValueError(f"encode_threads={self.encode_threads!r} must be at least 1")

    # ------------------------------------------------------------------ names

    def _stem_prefix(self) -> str:
        if self.deterministic_name:
            return self.name_prefix
        return f"{self.name_prefix}-{self.job_id[:8]}"

    def exact_stem(self, index: int) -> str:
        """Base name of the ``index``-th shard of the dataset (exact packing)."""
        return f"{self._stem_prefix()}-{index:06d}"

    def partition_stem(self, partition: int, chunk: int) -> str:
        """Base name of chunk ``chunk`` of ``partition`` (per-partition packing)."""
        return f"{self._stem_prefix()}-{self.first_partition + partition:06d}-{chunk:06d}"

    # --------------------------------------------------------------- staging

    @property
    def staging_root(self) -> str:
        return join(self.root, STAGING_DIR)

    @property
    def job_dir(self) -> str:
        return join(self.staging_root, self.job_id)

    def new_attempt_dir(self, label: str) -> str:
        """A fresh staging folder for one attempt of one task (reruns never collide)."""
        return join(self.job_dir, f"{label}-{uuid.uuid4().hex[:12]}")

    def token(self) -> tuple:
        """What identifies these settings, for ``__dask_tokenize__``."""
        return ("dask_imgsink.WriteOptions", self.job_id, self.url, self.images_per_tar, self.packing)
