"""Where a run reports: ``metrics.jsonl`` (one JSON object per step or evaluation), TensorBoard events,
and PNG plots at the end (loss curves, and an expert-load heatmap: one panel per MoE layer, expert x step)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from hecate.collectives.errors import HecateError

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Appends records to ``metrics.jsonl`` and mirrors the scalar ones to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.path = run_dir / METRICS_FILE
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``. A torn last line (the run was killed while writing it) is dropped with a
    warning; a damaged line before it is an error naming the file and line."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = _record(line)
        if record is None and number == len(lines):
            log.warning("%s: dropped its torn last line (the run was stopped while writing it): %.60r", path, line)
        elif record is None:
            raise HecateError(
                f"{path}: line {number} is not a metrics record ({line[:60]!r}); it was edited or "
                f"damaged: repair or remove that line, or move the file away to resume without it"
            )
        else:
            records.append(record)
    return records


def truncate_metrics(run_dir: Path, after_step: float = math.inf) -> None:
    """Drop records past ``after_step`` (a resumed run rewrites them), keeping the file one clean history; with
    no step, drop only a torn last line."""
    if not (run_dir / METRICS_FILE).is_file():
        return
    records = [r for r in read_metrics(run_dir) if r["step"] <= after_step]
    (run_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))


def _record(line: str) -> dict[str, Any] | None:
    """One line's record, or None when it is not a JSON object with an integer step."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or type(record.get("step")) is not int:
        return None
    return record


def write_plots(run_dir: Path) -> list[Path]:
    """``loss.png`` (train loss, its parts, validation loss) and ``expert_load.png``; returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    records = read_metrics(run_dir)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    written = []
    if steps:
        fig, (ax_loss, ax_aux) = plt.subplots(1, 2, figsize=(11, 4))
        x = [r["step"] for r in steps]
        ax_loss.plot(x, [r["lm_loss"] for r in steps], label="train lm_loss", lw=1)
        if evals:
            ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val_loss")
        ax_loss.set(xlabel="step", ylabel="nats / token", title="language-model loss")
        ax_loss.legend()
        ax_aux.plot(x, [r["aux_loss"] for r in steps], label="aux_loss", lw=1)
        ax_aux.plot(x, [r["z_loss"] for r in steps], label="z_loss", lw=1)
        ax_aux.set(xlabel="step", title="router losses (unscaled)")
        ax_aux.legend()
        fig.tight_layout()
        written.append(run_dir / "loss.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    loads = [r for r in steps if r.get("expert_load")]
    if loads:
        layers = sorted(loads[0]["expert_load"], key=int)
        fig, axes = plt.subplots(len(layers), 1, figsize=(10, 1.8 + 1.6 * len(layers)), squeeze=False)
        for ax, layer in zip(axes[:, 0], layers):
            counts_SE = np.array([r["expert_load"][layer] for r in loads], dtype=float)
            share_ES = (counts_SE / np.maximum(counts_SE.sum(1, keepdims=True), 1)).T
            image = ax.imshow(
                share_ES,
                aspect="auto",
                interpolation="nearest",
                cmap="viridis",
                extent=(loads[0]["step"], loads[-1]["step"], share_ES.shape[0] - 0.5, -0.5),
            )
            ax.set(ylabel=f"layer {layer}\nexpert")
            fig.colorbar(image, ax=ax, label="token share")
        axes[-1, 0].set_xlabel("step")
        fig.suptitle("expert load (share of routed tokens)")
        fig.tight_layout()
        written.append(run_dir / "expert_load.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written
