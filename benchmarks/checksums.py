"""Question: which checksum should checkpoints carry? Throughput of the standard library's candidates on one core,
hashing a file the way ``trainer/integrity.py`` does (``hashlib.file_digest``; CRC32 in 1 MiB chunks), the file
in the page cache as right after a save. Best of ``--repeats``.

    python benchmarks/checksums.py [--mib 256] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
import zlib
from pathlib import Path

CHUNK = 1 << 20


def crc32_file(path: Path) -> int:
    value = 0
    with open(path, "rb") as stream:
        while chunk := stream.read(CHUNK):
            value = zlib.crc32(chunk, value)
    return value


def digest_file(path: Path, name: str) -> str:
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, name).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="file size in MiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    candidates = {
        "sha256": lambda p: digest_file(p, "sha256"),
        "blake2b": lambda p: digest_file(p, "blake2b"),
        "sha1": lambda p: digest_file(p, "sha1"),
        "crc32": crc32_file,
    }
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data"
        path.write_bytes(os.urandom(args.mib * CHUNK))
        for name, run in candidates.items():
            times = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                run(path)
                times.append(time.perf_counter() - started)
            results[name] = args.mib / min(times)
    if args.json:
        print(json.dumps({"mib": args.mib, "mib_per_s": results}, indent=1))
        return
    print(f"{'checksum':<10}{'MiB/s':>10}")
    for name, speed in results.items():
        print(f"{name:<10}{speed:>10.0f}")


if __name__ == "__main__":
    main()
