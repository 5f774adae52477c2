"""Encoder and writer throughput against a serial Pillow baseline, in one run.

Images: the colour photographs bundled with scikit-image (``skimage.data``),
centre-cropped and resized to 512x512, varied by flips and shifts so each one is
different. Nothing is downloaded. Install with ``pip install -e ".[bench]"``.

Prints medians over ``--repeats`` runs of:

- encode only: our encoder on the process pool at 1 thread and at N threads
  (JPEG, and PNG/WebP to show whether they scale);
- ``ImageWriterStage.process``: encode + tar + Parquet, end to end;
- baseline: what the reference writer does, serially: Pillow JPEG q92,
  ``tarfile`` members, Parquet with the metadata as a ``repr`` string;

and the ratios between them, with the peak Python memory (tracemalloc) of the
stage and the baseline.

Usage: ``python benchmarks/bench_encode.py [--images 400] [--threads N] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import tarfile
import tempfile
import time
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from dask_imgsink import ImageBatch, ImageObject, ImageWriterStage
from dask_imgsink.core.encode import EncodeOptions, encode_image
from dask_imgsink.core.pool import default_encode_threads, map_ordered

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry",
          "hubble_deep_field", "retina", "stereo_motorcycle"]


def photographs(count: int, size: int = 512) -> list[np.ndarray]:
    """``count`` distinct 512x512 RGB photographs made from scikit-image's bundled ones."""
    import skimage.data

    bases = []
    for name in PHOTOS:
        img = getattr(skimage.data, name)()
        img = img[0] if isinstance(img, tuple) else img
        h, w = img.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        crop = Image.fromarray(img[top: top + side, left: left + side, :3])
        bases.append(np.asarray(crop.resize((size, size), Image.Resampling.LANCZOS)))
    out = []
    for i in range(count):
        img = bases[i % len(bases)]
        variant = i // len(bases)
        if variant % 2:
            img = img[:, ::-1]
        img = np.roll(img, variant * 7, axis=1)
        out.append(np.ascontiguousarray(img))
    return out


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median seconds over ``repeats`` runs, and the tracemalloc peak of one more run.

    The peak is measured apart: tracemalloc slows every allocation down.
    """
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return statistics.median(times), peak


def encode_only(images, options: EncodeOptions, threads: int) -> None:
    for fut in map_ordered(lambda img: encode_image(img, options), images, threads):
        fut.result()


def stage_write(images, out: str) -> None:
    shutil.rmtree(out, ignore_errors=True)
    batch = ImageBatch(task_id="bench", dataset_name="bench", data=[
        ImageObject(image_path=f"/src/{i}.jpg", image_id=f"img{i:06d}", image_data=img,
                    metadata={"score": float(i), "caption": f"photo {i}"})
        for i, img in enumerate(images)
    ])
    ImageWriterStage(out, images_per_tar=1000).process(batch)


def baseline_write(images, out: str, images_per_tar: int = 1000) -> None:
    """The reference writer's way: serial Pillow JPEG, tarfile, repr metadata."""
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    for start in range(0, len(images), images_per_tar):
        chunk = images[start: start + images_per_tar]
        tar_path = os.path.join(out, f"baseline-{start // images_per_tar:06d}.tar")
        rows = []
        with open(tar_path, "wb") as f, tarfile.open(fileobj=f, mode="w") as tf:
            for i, img in enumerate(chunk, start):
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="JPEG", quality=92)
                data = buf.getvalue()
                info = tarfile.TarInfo(f"img{i:06d}.jpg")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
                rows.append({"image_id": f"img{i:06d}", "tar_file": tar_path, "member_name": info.name,
                             "original_path": f"/src/{i}.jpg",
                             "metadata": repr({"score": float(i), "caption": f"photo {i}"})})
        pq.write_table(pa.Table.from_pylist(rows), tar_path[:-4] + ".parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--threads", type=int, default=default_encode_threads())
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    n, threads = args.images, args.threads
    images = photographs(n)
    tmp = tempfile.mkdtemp(prefix="imgsink-bench-")
    print(f"{n} photographs 512x512 RGB, {threads} threads, median of {args.repeats} runs, "
          f"{os.cpu_count()} CPUs\n")

    results = {}
    for fmt in ("jpeg", "png", "webp"):
        opts = EncodeOptions(image_format=fmt)
        imgs = images if fmt == "jpeg" else images[: max(16, n // 8)]  # PNG/WebP are slow
        t1, _ = timed(lambda: encode_only(imgs, opts, 1), args.repeats)
        tn, _ = timed(lambda: encode_only(imgs, opts, threads), args.repeats)
        results[fmt] = (len(imgs) / t1, len(imgs) / tn)
    stage_t, stage_peak = timed(lambda: stage_write(images, os.path.join(tmp, "stage")), args.repeats)
    base_t, base_peak = timed(lambda: baseline_write(images, os.path.join(tmp, "base")), args.repeats)
    pil_1, _ = timed(lambda: [Image.fromarray(i).save(io.BytesIO(), "JPEG", quality=92) for i in images], args.repeats)
    shutil.rmtree(tmp, ignore_errors=True)

    rate = lambda t: n / t  # noqa: E731
    print(f"{'measurement':48s} {'images/s':>10s}")
    for fmt, (r1, rn) in results.items():
        print(f"{'encode only, ' + fmt + ', 1 thread':48s} {r1:10.1f}")
        print(f"{'encode only, ' + fmt + f', {threads} threads':48s} {rn:10.1f}   x{rn / r1:.2f} vs 1 thread")
    print(f"{'Pillow JPEG encode only, serial':48s} {rate(pil_1):10.1f}")
    print(f"{'ImageWriterStage.process (encode+tar+parquet)':48s} {rate(stage_t):10.1f}")
    print(f"{'baseline: serial Pillow + tarfile + repr parquet':48s} {rate(base_t):10.1f}")
    print()
    print(f"simplejpeg 1 thread vs Pillow serial encode:        x{results['jpeg'][0] / rate(pil_1):.2f}")
    print(f"stage vs baseline (end to end):                     x{rate(stage_t) / rate(base_t):.2f}")
    print(f"stage vs encode only at {threads} threads:               {rate(stage_t) / results['jpeg'][1] * 100:.0f}%")
    print(f"peak Python memory: stage {stage_peak / 1e6:.1f} MB, baseline {base_peak / 1e6:.1f} MB "
          f"(images held by the caller: {sum(i.nbytes for i in images) / 1e6:.0f} MB, not counted)")


if __name__ == "__main__":
    main()
