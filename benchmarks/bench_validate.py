"""What checking pass-through bytes costs, and what the readers' extras cost, in one run.

Pass-through inputs (already-encoded JPEG and PNG photographs) are checked before
they are written unchanged. This measures, per image on one thread, each
``validate`` level against the cheapest (``"header"``: the header parses):

- ``"complete"`` (default): the file is whole (JPEG EOI, PNG chunk chain to IEND);
- ``"decode"``: a full decode;

then a whole pass-through job through the accessor (threaded scheduler) at each
level, and the same job with and without what this release adds for readers
(DALI ``.idx`` files and the duplicate-key check from key hashes).

Images: 512x512 photographs from scikit-image's bundled ones (see
``bench_encode.py``); nothing is downloaded. Install with ``pip install -e ".[bench]"``.

Usage: ``python benchmarks/bench_validate.py [--images 400] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile

import dask
import dask.dataframe as dd
import pandas as pd
from bench_encode import photographs
from measure import median_seconds
from PIL import Image

import dask_imgsink  # noqa: F401
from dask_imgsink.core.encode import EncodeOptions, encode_bytes


def _png(pixels) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def per_image(encoded: list[bytes], repeats: int) -> None:
    print(f"{'check, one thread':<34}{'us/image':>10}{'vs header':>11}")
    for label in ("jpeg", "png"):
        data = [d for d in encoded if (d[:3] == b"\xff\xd8\xff") == (label == "jpeg")]
        base = None
        for level in ("header", "complete", "decode"):
            options = EncodeOptions(validate=level)
            seconds = median_seconds(lambda: [encode_bytes(d, options) for d in data], repeats)
            micros = seconds / len(data) * 1e6
            base = base or micros
            print(f"{label + ' ' + level:<34}{micros:>10.1f}{micros / base:>10.2f}x")


def job(encoded: list[bytes], repeats: int) -> None:
    frame = pd.DataFrame({"key": [f"k{i:06d}" for i in range(len(encoded))],
                          "image": pd.Series(encoded, dtype=object)})
    with dask.config.set({"dataframe.convert-string": False}):
        ddf = dd.from_pandas(frame, npartitions=8, sort=False)
    cases = [("validate=header, no .idx", dict(validate="header", dali_index=False, key_column="key")),
             ("validate=complete, no .idx", dict(validate="complete", dali_index=False, key_column="key")),
             ("validate=complete + .idx (default)", dict(validate="complete", key_column="key")),
             ("validate=decode + .idx", dict(validate="decode", key_column="key")),
             ("generated keys (no key check)", dict(validate="complete", metadata_columns=[]))]
    total = sum(len(d) for d in encoded) / 1e6
    print(f"\n{'accessor, pass-through, threads':<38}{'s':>7}{'MB/s':>8}{'vs first':>10}")
    base = None
    for n, (label, options) in enumerate(cases):
        def run():
            out = tempfile.mkdtemp(prefix="imgsink-bench-")
            try:
                ddf.imgsink.to_webdataset(out, images_per_tar=100, mode="overwrite", compute=True, **options)
            finally:
                shutil.rmtree(out)
        if n == 0:
            run()  # warm up: imports, the encoder pool, the filesystem cache
        seconds = median_seconds(run, repeats)
        base = base or seconds
        print(f"{label:<38}{seconds:>7.2f}{total / seconds:>8.0f}{seconds / base:>9.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    pixels = photographs(args.images)
    options = EncodeOptions()
    encoded = [encode_bytes(_png(p), options).data if i % 4 == 0 else
               dask_imgsink.encode_image(p, options).data for i, p in enumerate(pixels)]
    jpegs = sum(1 for d in encoded if d[:3] == b"\xff\xd8\xff")
    megabytes = sum(len(d) for d in encoded) / 1e6
    print(f"{len(encoded)} photographs, 512x512: {jpegs} JPEG q92, the rest PNG; {megabytes:.1f} MB; "
          f"medians of {args.repeats}")
    print()
    per_image(encoded, args.repeats)
    job(encoded, args.repeats)


if __name__ == "__main__":
    main()
