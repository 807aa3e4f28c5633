"""Training-pair throughput of the input pipeline on the synthetic set (host CPU only).

Generates (or reuses) a synthetic set, writes a KNN table from raw pooled pixels (the
backbone is not what is measured here), then times `make_train_loader` batches: each
example is an (anchor, positive) pair, both decoded from PNG (image, depth, label) and
resized/cropped to --res. Reports pairs/s per read-thread setting, side by side, same run.

    python bench/input_pipeline.py [--root=/tmp/depthg_bench_synth] [--batches=30]

With --records: loose files against ArrayRecord for the same training batches. The synthetic
train split is five-cropped twice: as loose files (`five_crop.py`, the `directory` layout) and
as the `directory` builder's prepared train records; both get the same KNN table, then the
same `make_train_loader` batches (checked equal) are timed: CPU per pair in one thread
(pairs/s per core) and wall pairs/s with 2 read threads.

    python bench/input_pipeline.py --records [--num_train=100]
"""

import argparse
import os
import platform
import time

import ml_collections

from depthg_jax.data import knn, pipeline, synthetic
from depthg_jax.data.datasets import make_source


def make_config(root, res, threads, workers, prefetch):
    return ml_collections.ConfigDict(
        dict(
            name="synthetic",
            root=root,
            n_classes=len(synthetic.SYNTHETIC_CLASSES),
            train_split="train",
            eval_split="val",
            train_res=res,
            eval_res=res,
            num_neighbors=7,
            worker_count=workers,
            prefetch=prefetch,
            read_threads=threads,
        )
    )


def time_loader(cfg, batch, batches, warmup=3):
    it = pipeline.make_train_loader(
        cfg, global_batch_size=batch, seed=0, process_index=0, process_count=1
    )
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - start)


def compare_records(args):
    import numpy as np

    from depthg_jax.data import five_crop, prepare, records

    n_classes = len(synthetic.SYNTHETIC_CLASSES)
    crops, data_dir = args.root + "_crops", args.root + "_records"
    start, cpu = time.perf_counter(), time.process_time()
    five_crop.write_five_crops(
        make_source("synthetic", args.root, "train", n_classes), crops, "train"
    )
    print(
        f"loose five-crops: {time.perf_counter() - start:.1f} s wall, "
        f"{time.process_time() - cpu:.1f} s CPU (or reused)"
    )
    start, cpu = time.perf_counter(), time.process_time()
    prepare.prepare("directory", args.root, data_dir, configs=["train"])
    print(
        f"prepared records: {time.perf_counter() - start:.1f} s wall, "
        f"{time.process_time() - cpu:.1f} s CPU (or reused)"
    )
    rec_src = records.make_source("directory", data_dir, "train", n_classes)
    path = knn.knn_table_path(crops, "train", "pix", args.res)
    if not os.path.exists(path):
        g = args.res // 8
        pool = lambda x: x.reshape(len(x), g, 8, g, 8, 3).mean((2, 4)).reshape(len(x), -1)
        src = make_source("directory", crops, "train", n_classes)
        table = knn.build_knn_table(src, pool, res=args.res, global_batch_size=32, path=path)
        knn.save_knn_table(records.knn_table_path(rec_src, "pix", args.res), table, src.ids)
    cfgs = {}
    for kind, where in (
        ("loose", dict(name="directory", root=crops)),
        ("records", dict(name="directory", root="", data_dir=data_dir)),
    ):
        cfg = make_config(args.root, args.res, 2, 0, 2)
        cfg.update(dict(where, knn_variant="pix"))
        cfgs[kind] = cfg
    first = {
        k: next(
            pipeline.make_train_loader(
                c, global_batch_size=args.batch, seed=0, process_index=0, process_count=1
            )
        )
        for k, c in cfgs.items()
    }
    for key in first["loose"]:
        np.testing.assert_array_equal(first["loose"][key], first["records"][key])
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"{len(rec_src)} five-crops, batch {args.batch}, res {args.res}; first batches equal"
    )
    for kind, cfg in cfgs.items():
        stream = pipeline.TrainStream(
            pipeline.make_source_from_config(cfg, "train"),
            records.load_neighbors(cfg, rec_src) if kind == "records" else knn.load_knn_table(path),
            res=args.res,
            num_neighbors=7,
            seed=0,
            global_batch_size=args.batch,
            process_index=0,
            process_count=1,
        )
        for i in range(5):
            stream[i]
        cpu = time.process_time()
        for i in range(5, 105):
            stream[i]
        per_pair = (time.process_time() - cpu) / 100
        rate = time_loader(cfg, args.batch, args.batches)
        print(
            f"{kind:8s}: {per_pair * 1e3:.1f} ms CPU per pair ({1 / per_pair:.0f} pairs/s per "
            f"core); read_threads=2 wall: {rate:.0f} pairs/s"
        )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="/tmp/depthg_bench_synth")
    parser.add_argument("--num_train", type=int, default=300)
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--threads", default="1,2,4,8")
    parser.add_argument("--records", action="store_true", help="Loose vs ArrayRecord instead.")
    args = parser.parse_args()

    start, cpu = time.perf_counter(), time.process_time()
    synthetic.generate_dataset(args.root, num_train=args.num_train, num_val=20, size=224)
    print(
        f"synthetic set ready in {time.perf_counter() - start:.1f} s wall, "
        f"{time.process_time() - cpu:.1f} s CPU ({args.num_train} train + 20 val, or reused)"
    )
    if args.records:
        return compare_records(args)
    path = knn.knn_table_path(args.root, "train", "S/8", args.res)
    if not os.path.exists(path):
        src = make_source("synthetic", args.root, "train", len(synthetic.SYNTHETIC_CLASSES))
        g = args.res // 8
        pool = lambda x: x.reshape(len(x), g, 8, g, 8, 3).mean((2, 4)).reshape(len(x), -1)
        knn.build_knn_table(src, pool, res=args.res, global_batch_size=32, k=30, path=path)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    # CPU seconds per pair in one thread: insensitive to other load on the machine.
    cfg = make_config(args.root, args.res, 1, 0, 2)
    it_ds = pipeline.TrainStream(
        pipeline.make_source_from_config(cfg, "train"),
        knn.load_knn_table(path),
        res=args.res,
        num_neighbors=7,
        seed=0,
        global_batch_size=args.batch,
        process_index=0,
        process_count=1,
    )
    cpu = time.process_time()
    for i in range(100):
        it_ds[i]
    per_pair = (time.process_time() - cpu) / 100
    print(f"serial: {per_pair * 1e3:.1f} ms CPU per pair ({1 / per_pair:.0f} pairs/s per core)")
    for threads in [int(t) for t in args.threads.split(",")]:
        cfg = make_config(args.root, args.res, threads, 0, max(threads, 2))
        rate = time_loader(cfg, args.batch, args.batches)
        print(f"read_threads={threads} workers=0 batch={args.batch}: {rate:.0f} pairs/s")


if __name__ == "__main__":
    main()
