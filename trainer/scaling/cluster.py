"""A cluster, as the scale simulator sees it: identical devices in nodes of ``gpus_per_node``, a fast link
inside a node (NVLink / NVSwitch; on this machine, shared memory) and a slower one between nodes (the NICs).

Presets live in ``examples/clusters/*.yaml``. Figures are the vendors' nominal ones times an ``efficiency``
(what a well-tuned run reaches), so that every assumption is one visible number:

    name: 8xA100-400Gbps
    gpus_per_node: 8
    dtype: bf16                  # training precision: bytes per weight / activation on the wire
    device: {name: A100-SXM4-80GB, tflops: 312, efficiency: 0.45, memory_gib: 80}
    intra_node: {gbytes_per_s: 300, efficiency: 0.7, latency_us: 10}      # per GPU, one direction
    inter_node: {gbits_per_s: 400, per: node, efficiency: 0.8, latency_us: 20}

``inter_node.per`` says whether the NIC bandwidth is per node (shared by its GPUs) or per GPU.

``cores_per_node`` (optional; only for simulated CPU ranks, e.g. the calibration on this machine) says that a
node's devices share fewer compute units than there are devices: ``device`` then describes one rank while all
ranks compute, and a rank that waits in a collective lends its core to the busy ones (see ``cost.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hecate.collectives.errors import ConfigError

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Device:
    name: str
    tflops: float  # peak dense matmul throughput in the training dtype
    efficiency: float  # achieved fraction of it
    memory_gib: float

    @property
    def flops_per_s(self) -> float:
        return self.tflops * 1e12 * self.efficiency


@dataclass(frozen=True)
class Link:
    bytes_per_s: float  # effective, one direction, per endpoint (a GPU inside a node, a node between nodes)
    latency_s: float


@dataclass(frozen=True)
class Cluster:
    name: str
    gpus_per_node: int
    dtype: str
    device: Device
    intra: Link
    inter: Link  # per node: all GPUs of a node share it
    cores_per_node: int | None = None  # compute units a node's devices share; None: each device its own

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def node_of(self, device: int) -> int:
        return device // self.gpus_per_node


def _section(values: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    section = values.get(key)
    if not isinstance(section, dict):
        raise ConfigError(f"{where}{key}", "must be a mapping (see examples/clusters/*.yaml)")
    return section


def _number(section: dict[str, Any], key: str, where: str, minimum: float = 0.0, integer: bool = False) -> float:
    value = section.get(key)
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not value > minimum:
        raise ConfigError(
            f"{where}{key}", f"must be a {'whole ' if integer else ''}number > {minimum:g}, got {value!r}"
        )
    return value


def _efficiency(section: dict[str, Any], where: str) -> float:
    value = section.get("efficiency", 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"{where}efficiency", f"must be in (0, 1], got {value!r}")
    return float(value)


def cluster_from_dict(values: dict[str, Any], source: str = "cluster") -> Cluster:
    """Build and check a cluster; errors name the field (e.g. ``inter_node.gbits_per_s``)."""
    if not isinstance(values, dict):
        raise ConfigError(source, "must be a YAML mapping (see examples/clusters/*.yaml)")
    known = {"name", "gpus_per_node", "cores_per_node", "dtype", "device", "intra_node", "inter_node"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(unknown[0], f"unknown key in {source}; allowed: {', '.join(sorted(known))}")
    gpus_per_node = int(_number(values, "gpus_per_node", "", integer=True))
    cores_per_node = int(_number(values, "cores_per_node", "", integer=True)) if "cores_per_node" in values else None
    dtype = values.get("dtype", "bf16")
    if dtype not in DTYPE_BYTES:
        raise ConfigError("dtype", f"must be one of {tuple(DTYPE_BYTES)}, got {dtype!r}")
    dev = _section(values, "device", "")
    device = Device(
        str(dev.get("name", "device")),
        float(_number(dev, "tflops", "device.")),
        _efficiency(dev, "device."),
        float(_number(dev, "memory_gib", "device.")),
    )
    intra = _section(values, "intra_node", "")
    intra_link = Link(
        _number(intra, "gbytes_per_s", "intra_node.") * 1e9 * _efficiency(intra, "intra_node."),
        float(intra.get("latency_us", 0.0)) * 1e-6,
    )
    inter = _section(values, "inter_node", "")
    per = inter.get("per", "node")
    if per not in ("node", "gpu"):
        raise ConfigError("inter_node.per", f"must be 'node' (NICs shared by the node's GPUs) or 'gpu', got {per!r}")
    node_bytes = _number(inter, "gbits_per_s", "inter_node.") / 8 * 1e9 * _efficiency(inter, "inter_node.")
    inter_link = Link(node_bytes * (gpus_per_node if per == "gpu" else 1), float(inter.get("latency_us", 0.0)) * 1e-6)
    for where, link in (("intra_node.latency_us", intra_link), ("inter_node.latency_us", inter_link)):
        if link.latency_s < 0:
            raise ConfigError(where, f"must be >= 0, got {link.latency_s * 1e6}")
    return Cluster(
        str(values.get("name", source)), gpus_per_node, dtype, device, intra_link, inter_link, cores_per_node
    )


def load_cluster(path: str | Path) -> Cluster:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--cluster", f"file {str(path)!r} does not exist (presets: examples/clusters/*.yaml)")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError("--cluster", f"{path} cannot be parsed: {str(err).splitlines()[0]}") from None
    return cluster_from_dict(values, str(path))
