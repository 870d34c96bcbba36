"""Does ``hecate prepare-data`` stream? Peak memory and throughput on generated corpora of growing size.

For each size it generates a corpus in a temporary folder (JSONL files of ~4 KB records plus a few large
plain-text files, words drawn from a Zipf law over a made-up vocabulary), runs ``hecate prepare-data`` on it as
a subprocess, and samples the memory of the whole process tree (the command and its workers) every 0.2 s:
the peak of the summed RSS, and of the summed PSS (shared pages counted once, the fairer total for forked
workers). If prepare-data streams, the peaks stay flat while the corpus grows.

    python benchmarks/prepare_data.py --sizes-gb 0.25 1.0 --json runs/bench/prepare_data.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

WORDS = 20_000
RECORD_CHARS = 4096
JSONL_FILE_MB = 24
TEXT_FILES = 4  # large single-document text files, 1/8 of the corpus together


def generate_corpus(folder: Path, size_bytes: int, seed: int = 0) -> int:
    """Write JSONL files and a few text files totalling about ``size_bytes``; returns the bytes written."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 11, WORDS)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    vocabulary = np.array([rng.choice(letters, n).tobytes().decode() for n in lengths])
    folder.mkdir(parents=True, exist_ok=True)
    written, index = 0, 0
    text_share = size_bytes // 8 // TEXT_FILES
    for t in range(TEXT_FILES):
        written += _write(folder / f"book_{t:02d}.txt", _prose(rng, vocabulary, text_share))
    while written < size_bytes:
        text = _prose(rng, vocabulary, JSONL_FILE_MB << 20)
        records = [
            json.dumps({"id": index + i, "text": text[a : a + RECORD_CHARS]})
            for i, a in enumerate(range(0, len(text), RECORD_CHARS))
        ]
        index += len(records)
        written += _write(folder / f"part_{index:09d}.jsonl", "\n".join(records) + "\n")
    return written


def _prose(rng: np.random.Generator, vocabulary: np.ndarray, chars: int) -> str:
    ranks = np.minimum(rng.zipf(1.2, chars // 5), len(vocabulary)) - 1
    words = vocabulary[ranks]
    words[rng.random(len(words)) < 0.07] = "\n"
    return " ".join(words.tolist())[:chars]


def _write(path: Path, text: str) -> int:
    data = text.encode("utf-8")
    path.write_bytes(data)
    return len(data)


class TreeMemory(threading.Thread):
    """Samples the summed RSS and PSS (MiB) of a process and all its descendants until it exits."""

    def __init__(self, pid: int, every_s: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.peak_rss_mb = self.peak_pss_mb = 0.0
        self.peak_processes = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            pids = _tree(self.pid)
            rss = sum(_status_kb(p, "VmRSS") for p in pids) / 1024
            pss = sum(_pss_kb(p) for p in pids) / 1024
            self.peak_rss_mb, self.peak_pss_mb = max(self.peak_rss_mb, rss), max(self.peak_pss_mb, pss)
            self.peak_processes = max(self.peak_processes, len(pids))
            time.sleep(self.every_s)


def _tree(root: int) -> list[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(size_gb: float, workdir: Path, vocab_size: int) -> dict:
    corpus, out = workdir / f"corpus_{size_gb}", workdir / f"data_{size_gb}"
    t0 = time.perf_counter()
    corpus_bytes = generate_corpus(corpus, int(size_gb * (1 << 30)))
    generate_s = time.perf_counter() - t0
    command = [
        sys.executable,
        "-m",
        "hecate.launch.cli",
        "prepare-data",
        "--input",
        str(corpus),
        "--out",
        str(out),
        "--vocab-size",
        str(vocab_size),
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    memory = TreeMemory(proc.pid)
    memory.start()
    stdout, _ = proc.communicate()
    seconds = time.perf_counter() - t0
    memory.done.set()
    memory.join()
    if proc.returncode:
        raise SystemExit(f"prepare-data failed ({proc.returncode}):\n{stdout}")
    manifest = json.loads((out / "manifest.json").read_text())
    row = {
        "corpus_gb": round(corpus_bytes / (1 << 30), 3),
        "generate_s": round(generate_s, 1),
        "prepare_s": round(seconds, 1),
        "mb_per_s": round(corpus_bytes / 1e6 / seconds, 2),
        "peak_rss_tree_mb": round(memory.peak_rss_mb),
        "peak_pss_tree_mb": round(memory.peak_pss_mb),
        "processes": memory.peak_processes,
        "documents": sum(s["documents"] for s in manifest["splits"].values()),
        "tokens": sum(s["tokens"] for s in manifest["splits"].values()),
        "shards": sum(len(s["shards"]) for s in manifest["splits"].values()),
        "vocab_size": manifest["vocab_size"],
        "cores": os.cpu_count(),
    }
    shutil.rmtree(corpus)
    shutil.rmtree(out)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[0.25, 1.0])
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--workdir", default=None, help="where the corpora go (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="hecate-prepare-bench-", dir=args.workdir))
    try:
        rows = []
        for size in args.sizes_gb:
            rows.append(measure(size, workdir, args.vocab_size))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    header = ("corpus GB", "prepare s", "MB/s", "peak RSS tree MB", "peak PSS tree MB", "documents", "shards")
    keys = ("corpus_gb", "prepare_s", "mb_per_s", "peak_rss_tree_mb", "peak_pss_tree_mb", "documents", "shards")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[k]) for k in keys))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
