"""Per-core cost of each column codec on the ``images`` shape (256x256x3 uint8 photos).

    python bench/codec_costs.py [--n 200]

One process, one thread: encode and decode every image with edcache's codec functions
(``edcache.format.columnar.codecs``: what a build worker and a reader run per row), and
decode the same JPEG bytes with Pillow (what MDS, HF and litdata-without-torchvision
use) for reference. Prints a markdown table: stored/raw, encode and decode µs per image
and decoded MB/s per core."""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "src")]

from bench.common import make_examples
from edcache.format.columnar.codecs import decode, encode, parse_codec

CODECS = ["zstd:1", "zstd:3", "zstd:9", "lz4", "png", "webp:lossless", "jpeg:90", "jpeg:75", "webp:90"]


def best_of(fn, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    args = ap.parse_args()
    images = [ex["image"] for ex in make_examples("images", args.n)]
    raw = sum(a.nbytes for a in images)
    shape, dtype = images[0].shape, images[0].dtype
    print(f"{args.n} images {shape} {dtype}; load average {os.getloadavg()[0]:.2f}\n")
    print("| codec | stored / raw | encode µs/image | decode µs/image | decode MB/s per core |")
    print("|---|---|---|---|---|")
    for text in CODECS:
        codec = parse_codec(text)
        enc_s = best_of(lambda c=codec: [encode(c, a) for a in images], 1)
        blobs = [encode(codec, a) for a in images]
        dec_s = best_of(lambda c=codec, bs=blobs: [decode(c, b, shape, dtype) for b in bs])
        n = len(images)
        print(f"| `{text}` | {sum(map(len, blobs)) / raw:.3f} | {enc_s / n * 1e6:.0f} | {dec_s / n * 1e6:.0f} | "
              f"{raw / dec_s / 1e6:.0f} |")
    from PIL import Image

    blobs = []
    for a in images:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    dec_s = best_of(lambda: [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])
    print(f"| Pillow JPEG q90 (peers' decoder) | {sum(map(len, blobs)) / raw:.3f} | – | "
          f"{dec_s / len(blobs) * 1e6:.0f} | {raw / dec_s / 1e6:.0f} |")
    copy_s = best_of(lambda: [a.copy() for a in images])
    print(f"| raw (a copy of the row) | 1.000 | – | {copy_s / len(images) * 1e6:.0f} | {raw / copy_s / 1e6:.0f} |")


if __name__ == "__main__":
    main()
