"""The ``lora-theory data`` command: which data sets are available and from where; ``--fetch`` fills the cache."""

from __future__ import annotations

import argparse
import json
import sys
import time

from toymodels import data
from toymodels.data import DATASETS, REAL_DATASETS

HELP = "show which data sets are available and from where, and convert them into the cache"
DESCRIPTION = (
    "Print one row per data set (MNIST, Fashion-MNIST, CIFAR-10 and the synthetic one): whether it is available, "
    "its train and test sizes, and the source it is read from or why it is missing. With --fetch, convert the "
    "named data sets into the local cache first, so that later runs need no network. The exit status is 1 when "
    "a data set asked for cannot be fetched."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fetch", nargs="+", metavar="NAME", choices=(*REAL_DATASETS, "all"),
                        help=f"convert these data sets into the cache: {', '.join(REAL_DATASETS)}, or all")
    parser.add_argument("--refresh", action="store_true",
                        help="with --fetch: convert again even when the cache already holds the data set")
    parser.add_argument("--cifar10-dir", default=None,
                        help="the cifar-10-batches-py folder to read CIFAR-10 from (default: the "
                             "LORA_THEORY_CIFAR10 environment variable)")
    parser.add_argument("--no-network", action="store_true",
                        help="do not probe the network for torchvision's downloader")


def run(args: argparse.Namespace) -> int:
    rc = 0
    if args.fetch:
        names = list(REAL_DATASETS) if "all" in args.fetch else list(dict.fromkeys(args.fetch))
        for name in names:
            start = time.perf_counter()
            try:
                path = data.fetch(name, cifar10_dir=args.cifar10_dir, refresh=args.refresh)
            except data.DatasetUnavailable as exc:
                print(f"{name}: UNAVAILABLE: {exc}", file=sys.stderr)
                rc = 1
                continue
            meta = json.loads(path.with_suffix(".json").read_text())
            print(f"{name}: cached in {path} ({path.stat().st_size / 2**20:.1f} MiB, from {meta['source']}, "
                  f"{time.perf_counter() - start:.1f} s)")
        print()

    print(f"cache directory: {data.cache_dir()}")
    rows = [("data set", "available", "train/test", "source or reason")]
    for name in DATASETS:
        ok, where = data.available(name, cifar10_dir=args.cifar10_dir, probe_network=not args.no_network)
        if name == "synthetic":
            sizes = f"{data.SYNTHETIC_DEFAULTS['n_train']}/{data.SYNTHETIC_DEFAULTS['n_test']}"
        else:
            sizes = "{train}/{test}".format(**data.OFFICIAL_SIZES[name])
            meta_path = data.cache_paths(name)[1]
            if ok and where.startswith("cache") and meta_path.exists():
                shapes = json.loads(meta_path.read_text())["shapes"]
                sizes = f"{shapes['x_train'][0]}/{shapes['x_test'][0]}"
        rows.append((name, "yes" if ok else "NO", sizes, where))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3])
    if not data.available("cifar10", cifar10_dir=args.cifar10_dir, probe_network=False)[0]:
        print(f"\nsecond real data set: {data.second_dataset(cifar10_dir=args.cifar10_dir)} (CIFAR-10 absent)")
    return rc
