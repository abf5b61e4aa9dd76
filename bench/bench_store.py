"""Store throughput: activation Parquet written to and read from a local folder and an S3 server.

    python bench/bench_store.py [--files 4] [--mb 24] [--repeats 2]

The S3 server is moto, started here in its own process on 127.0.0.1 (no network, no real S3), so
its absolute numbers measure moto on this machine, not a cloud bucket; the comparison between
upload settings is the point: one PUT per file against multipart uploads of 8 MiB parts sent one
at a time or several in parallel (s3fs ``max_concurrency``). Write: ``Store.put`` of the files.
Read: ``Store.local_dir`` into an empty cache (download and sha256 check; the local folder is
only hashed) and decoding every file with pyarrow. Each cell is the best of ``--repeats`` runs.
Prints a Markdown table. Not part of CI.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from bench_metrics import best_time

from unlearning_audit.activations import COLUMN
from unlearning_audit.store import Store, filesystem

PART = 8 * 2**20
BUCKET = "bench"


def write_activations(folder: Path, files: int, mb: int, dim: int = 1024) -> int:
    """``files`` Parquet files of float32 activation rows (fixed-size lists, zstd) of about
    ``mb`` MiB each, random as real activations nearly are; returns the bytes written."""
    rng = np.random.default_rng(0)
    rows = mb * 2**20 // (4 * dim)
    for i in range(files):
        values = rng.standard_normal((rows, dim), dtype=np.float32)
        column = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), dim)
        table = pa.table({"sample": pa.array(np.arange(rows)), COLUMN: column})
        pq.write_table(table, folder / f"layer={i}.parquet", compression="zstd")
    return sum(p.stat().st_size for p in folder.iterdir())


@contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server in its own process; yields its endpoint URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait()


def measure(open_store: Callable[[Path], Store], src: Path, repeats: int, scratch: Path):
    """Seconds to put ``src`` as a new artifact, and to read it back through an empty cache."""
    writer = open_store(scratch / "writer")
    keys: list[str] = []

    def write() -> None:
        inputs = {"run": uuid.uuid4().hex}
        keys.append(Store.key_for("bench", inputs, {}, "v"))
        writer.put(keys[-1], src, {"inputs": inputs, "config": {}, "version": "v"})

    write_s = best_time(write, repeats)
    ref = writer.get(keys[-1])

    def read() -> None:
        reader = open_store(scratch / uuid.uuid4().hex)
        for path in sorted(reader.local_dir(ref).iterdir()):
            pq.read_table(path)

    return write_s, best_time(read, repeats)


def opener(url: str, part_size: int, concurrency: int | None) -> Callable[[Path], Store]:
    """Stores at ``url`` with one cache folder each, and the given transfer settings."""

    def open_store(cache: Path) -> Store:
        options = {} if concurrency is None else {"max_concurrency": concurrency}
        store = Store(url, cache_dir=cache, storage_options=options)
        store.part_size = part_size
        return store

    return open_store


def main() -> None:
    """Run every configuration and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=4, help="Parquet files (default 4)")
    parser.add_argument("--mb", type=int, default=24, help="MiB per file (default 24)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per cell (default 2)")
    args = parser.parse_args()
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp, moto_server() as endpoint:
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        root = Path(tmp)
        src = root / "src"
        src.mkdir()
        size_mb = write_activations(src, args.files, args.mb) / 2**20
        filesystem(f"s3://{BUCKET}")[0].mkdir(BUCKET)
        s3 = f"s3://{BUCKET}/store"
        configs = [
            ("local folder", "-", "-", opener(str(root / "store"), PART, None)),
            ("S3 (moto)", "one PUT per file", "-", opener(s3, 2**30, None)),
            *(("S3 (moto)", "8 MiB parts", str(n), opener(s3, PART, n)) for n in (1, 4, 10)),
        ]
        print(
            f"{args.files} activation Parquet files, {size_mb:.0f} MiB in all; "
            f"best of {args.repeats}; MiB/s\n"
        )
        print("| store | upload | parallel parts | write MiB/s | read MiB/s |")
        print("|---|---|---|---:|---:|")
        for i, (target, upload, parallel, open_store) in enumerate(configs):
            write_s, read_s = measure(open_store, src, args.repeats, root / "caches" / str(i))
            print(
                f"| {target} | {upload} | {parallel} | "
                f"{size_mb / write_s:.0f} | {size_mb / read_s:.0f} |"
            )


if __name__ == "__main__":
    main()
