"""What the FSSDP engine measures for ``auto`` budgets and calibration, agreed by every rank of the group.

Each rank takes its samples during a step with its own clock:

- non-MoE seconds per layer: from the block's forward pre-hook (where the gather is issued) to the router's
  forward (the MoE layer's begin) - the attention the gather hides under;
- expert seconds per row: the forward of the held experts' matmul chain over the rows it computed;
- gather bandwidth and free memory, probed now and then (:data:`PROBE_STEPS`, :data:`PROBE_EVERY`): a blocking
  SparseAllGather of one expert to the next rank, timed, and the device's free memory.

At the end of the step one all-reduce MIN combines them (a rank without a sample sends +inf): the shortest
attention, the slowest link, the least free memory, the fastest expert rows - every estimate on the cautious
side. The agreed values go into :class:`~hecate.parallel.fssdp.budgets.RecentMedian` windows, so that every
rank derives the same budgets and the same calibration from the same numbers.
"""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path

import torch

from hecate.collectives import Transport
from hecate.parallel.fssdp.budgets import RecentMedian, memory_budget, overlap_budget

PROBE_STEPS = 3  # the first steps each probe the gather bandwidth and the free memory ...
PROBE_EVERY = 20  # ... then every this many steps
BACKWARD_OVER_FORWARD = 2.0  # a matmul chain's backward does twice its forward's flops (dL/dx and dL/dW)
FREE_MEMORY_SHARE = 0.5  # replicas may take this share of the free memory; the rest stays for activations
MIB = 2**20


def should_probe(step: int) -> bool:
    """Whether the step that just ended (1-based) probes bandwidth and memory."""
    return step <= PROBE_STEPS or step % PROBE_EVERY == 0


def free_device_bytes(device: torch.device) -> float:
    """Free memory where the experts live: CUDA's free bytes, else the host's available RAM."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


class Measurements:
    """The step's local samples and the group's agreed medians, one non-MoE time per MoE layer."""

    def __init__(self):
        self.non_moe_s: list[RecentMedian] = []
        self.row_s = RecentMedian()  # expert seconds per (token, expert) row, forward and backward
        self.bandwidth = RecentMedian()  # gather bytes per second of one device
        self.free_bytes = RecentMedian()
        self._non_moe: list[list[float]] = []
        self._rows, self._row_seconds = 0, 0.0
        self._probe: tuple[float, float] | None = None

    def add_layer(self) -> int:
        """Measure one more MoE layer; returns its index."""
        self.non_moe_s.append(RecentMedian())
        self._non_moe.append([])
        return len(self.non_moe_s) - 1

    # ---- local samples during the step ---------------------------------------------------------

    def add_non_moe(self, layer: int, seconds: float) -> None:
        self._non_moe[layer].append(seconds)

    def add_rows(self, rows: int, seconds: float) -> None:
        self._rows += rows
        self._row_seconds += seconds

    def add_probe(self, bytes_per_s: float, free_bytes: float) -> None:
        self._probe = (bytes_per_s, free_bytes)

    # ---- agreed at the end of the step ---------------------------------------------------------

    def agree(self, transport: Transport, device: torch.device) -> None:
        """All-reduce MIN of the step's samples over the group; every rank adds the same values. The samples
        travel on ``device`` (the experts'), where every MoE transport can carry them."""
        local = [statistics.median(s) if s else math.inf for s in self._non_moe]
        row = (1 + BACKWARD_OVER_FORWARD) * self._row_seconds / self._rows if self._rows else math.inf
        probe = self._probe or (math.inf, math.inf)
        agreed = torch.tensor([*local, row, *probe], dtype=torch.float64, device=device)
        agreed = transport.all_reduce(agreed, reduce="min", name="fssdp.measurements").wait().tolist()
        for median, value in zip([*self.non_moe_s, self.row_s, self.bandwidth, self.free_bytes], agreed):
            if math.isfinite(value):
                median.add(value)
        self._non_moe = [[] for _ in self._non_moe]
        self._rows, self._row_seconds, self._probe = 0, 0.0, None

    # ---- what the planner and calibration read -------------------------------------------------

    def overlap_budget(self, layer: int, expert_bytes: int, num_experts: int) -> int:
        """t of ``layer``: copies that arrive during its measured attention; 0 (plain EP) until measured."""
        seconds, bandwidth = self.non_moe_s[layer].value, self.bandwidth.value
        if seconds is None or bandwidth is None:
            return 0
        return overlap_budget(seconds, bandwidth, expert_bytes, num_experts)

    def memory_budget(
        self, cap_mib: int, bytes_per_replica: int, num_experts: int, num_devices: int, layers_alive: int
    ) -> int:
        """m: replicas per device per layer in ``cap_mib`` MiB (a configured cap, the same everywhere) or in
        :data:`FREE_MEMORY_SHARE` of the measured free memory; 0 until measured."""
        free = cap_mib * MIB if cap_mib else self.free_bytes.value
        if free is None:
            return 0
        share = 1.0 if cap_mib else FREE_MEMORY_SHARE
        return memory_budget(share * free, bytes_per_replica, num_experts, num_devices, layers_alive)

    def calibration_costs(self) -> tuple[float, float] | None:
        """(seconds per row, gather bytes per second) once both are measured, else None."""
        row, bandwidth = self.row_s.value, self.bandwidth.value
        return None if row is None or bandwidth is None else (row, bandwidth)
