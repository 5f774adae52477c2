"""dask-imgsink: write Dask DataFrames of images as WebDataset shards with Parquet metadata."""

from .core.encode import EncodedImage, EncodeOptions, encode_image
from .core.stage import ImageWriterStage
from .core.tasks import FileGroupTask, ImageBatch, ImageObject
from .errors import BadRowError, CorruptSampleError
from .job.accessor import to_webdataset
from .job.bag import WriteBag
from .job.cleanup import CleanReport, clean
from .job.lock import LostLockError, OutputLockedError
from .read.dataset import read_webdataset
from .read.show import show
from .read.verify import verify_dataset

__version__ = "0.1.0"

__all__ = [
    "BadRowError",
    "CleanReport",
    "CorruptSampleError",
    "EncodeOptions",
    "EncodedImage",
    "FileGroupTask",
    "ImageBatch",
    "ImageObject",
    "ImageWriterStage",
    "LostLockError",
    "OutputLockedError",
    "WriteBag",
    "clean",
    "encode_image",
    "read_webdataset",
    "show",
    "to_webdataset",
    "verify_dataset",
]
