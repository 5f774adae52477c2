"""Task dataclasses shared with NeMo Curator: ImageObject, ImageBatch, FileGroupTask.

The field names follow NeMo Curator's ``nemo_curator.tasks`` so that code written
for ``ImageWriterStage`` there ports here unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ImageObject:
    """One image and its metadata.

    Attributes
    ----------
    image_path : str
        Where the image came from (kept in the metadata, never read by the writer).
    image_id : str
        The sample key inside the shard; must be a valid WebDataset key.
        Empty means "generate one".
    image_data : Any
        The pixels (NumPy ``[H, W, C]`` RGB, ``[H, W]`` gray, ...), encoded bytes,
        a PIL image or a ``{"bytes": ..., "path": ...}`` dict.
    metadata : dict
        Per-image metadata written to ``key.json`` and to the Parquet file.
    """

    image_path: str = ""
    image_id: str = ""
    image_data: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class ImageBatch:
    """A batch of images handed to :class:`~dask_imgsink.ImageWriterStage`."""

    task_id: str = ""
    dataset_name: str = ""
    data: list[ImageObject] = field(default_factory=list)
    _metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_items(self) -> int:
        return len(self.data)


@dataclass
class FileGroupTask:
    """A group of files that were written together.

    Attributes
    ----------
    task_id : str
        Identifier of the write (the shard name in the Dask accessor).
    dataset_name : str
        Name of the dataset the files belong to.
    data : list of str
        Paths of the written files: the ``.tar`` files first, then the ``.parquet`` files.
    _metadata : dict
        Facts about the write: ``output_dir``, ``images_per_tar``, ``num_images``,
        ``bytes`` and more (see the writer that made it).
    """

    task_id: str = ""
    dataset_name: str = ""
    data: list[str] = field(default_factory=list)
    _metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def metadata(self) -> dict[str, Any]:
        """The ``_metadata`` dict (read-only alias)."""
        return self._metadata

    @property
    def num_items(self) -> int:
        return len(self.data)
