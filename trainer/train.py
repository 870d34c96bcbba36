"""The training loop. One optimizer step: for each micro-batch, forward + loss + backward; then clip, step,
update the router biases, log, and now and then evaluate and checkpoint.

The single-process run is the reference every parallel layout is checked against, so everything here is a
pure function of (config, seed, step): the batch of step s, the learning rate of step s, the initial weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from hecate.collectives.errors import HecateError
from hecate.parallel.activation_checkpoint import apply_activation_checkpointing
from hecate.parallel.parallelize import Parallel
from hecate.parallel.pipeline import MicroBatch
from hecate.trainer import checkpoint as ckpt
from hecate.trainer.config import RunConfig
from hecate.trainer.data import TrainLoader, ValLoader, load_manifest, token_bytes
from hecate.trainer.device import select_device, set_parity_precision
from hecate.trainer.errors import TrainingError
from hecate.trainer.export import import_weights
from hecate.trainer.faults import maybe_inject
from hecate.trainer.flops import peak_flops, step_flops
from hecate.trainer.metrics import METRICS_FILE, MetricsWriter, truncate_metrics, write_plots
from hecate.trainer.model import build_model
from hecate.trainer.model_adapter import TRANSFORMER
from hecate.trainer.nonfinite import NonFiniteTracer
from hecate.trainer.optim import build_optimizer, lr_at, set_lr
from hecate.trainer.profile import profiled_step
from hecate.trainer.routing_trace import TRACE_FILE, RoutingRecorder

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
RUN_MARKER = ".hecate-run"  # written into each run folder Hecate makes: the only folders it writes into or deletes


@dataclass
class StepLosses:
    """Per-step sums over micro-batches (each already divided by the number of micro-batches)."""

    loss: float = 0.0
    lm_loss: float = 0.0
    aux_loss: float = 0.0
    z_loss: float = 0.0
    counts: dict[int, torch.Tensor] = field(default_factory=dict)  # block index -> tokens per expert
    dropped: int = 0
    grad_norm: float = 0.0
    lr: float = 0.0
    skipped: str | None = None  # where the first non-finite value appeared, when train.nonfinite=skip dropped the step


class Trainer:
    """Builds model, optimizer and data from a validated config, and runs or resumes the loop.

    ``parallel`` places this process in the run's layout (one process when omitted); every rank runs this same
    code, and rank 0 alone writes the run folder's shared files.
    """

    def __init__(
        self,
        cfg: RunConfig,
        resume: bool = False,
        fresh: bool = False,
        parallel: Parallel | None = None,
    ):
        self.cfg = cfg
        self.parallel = parallel = (
            parallel if parallel is not None else Parallel.single(select_device(cfg.train.device))
        )
        self.device = device = parallel.device
        set_parity_precision(device, cfg.train.dtype)
        self.run_dir = Path(cfg.train.run_dir)
        if parallel.is_main:
            prepare_run_dir(self.run_dir, resume, fresh)
        parallel.barrier()
        data_dir = Path(cfg.data.dir)
        self.manifest = load_manifest(data_dir)
        self.vocab_size = cfg.model.vocab_for(int(self.manifest["vocab_size"]))
        with torch.device("cpu"):  # the same initial weights on every device: drawn on the CPU, then moved
            self.model = build_model(cfg.model, cfg.moe, self.vocab_size, cfg.train.seed)
            if cfg.train.init_from:
                import_weights(Path(cfg.train.init_from), self.model, self.checkpoint_identity())
        self.model.to(device)
        rows = cfg.train.global_batch // cfg.train.grad_accum // parallel.dp_size
        parallel.apply(
            self.model,
            TRANSFORMER,
            MicroBatch(
                cfg.train.grad_accum,
                rows,
                cfg.model.seq_len,
                torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32,
            ),
            grad_reduce_dtype=torch.bfloat16 if cfg.train.grad_reduce_dtype == "bf16" else torch.float32,
        )
        apply_activation_checkpointing(self.model, TRANSFORMER, cfg.train.activation_checkpointing)
        self.nonfinite = NonFiniteTracer(self.model)
        self.checkpointer = ckpt.Checkpointer(
            self.run_dir / "checkpoints", cfg.checkpoint.keep, parallel, async_save=cfg.checkpoint.async_save
        )
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.loader = TrainLoader(
            data_dir,
            cfg.model.seq_len,
            cfg.train.global_batch,
            cfg.train.grad_accum,
            dp_rank=parallel.dp_rank,
            dp_size=parallel.dp_size,
            seed=cfg.train.seed,
        )
        self.val_loader = ValLoader(
            data_dir,
            cfg.model.seq_len,
            cfg.train.global_batch // cfg.train.grad_accum,
            cfg.train.eval_batches,
            dp_rank=parallel.dp_rank,
            dp_size=parallel.dp_size,
        )
        self.token_bytes_V = torch.from_numpy(token_bytes(data_dir / TOKENIZER_FILE)).to(device)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.dtype == "bf16")
        self.peak_flops, self.peak_source = peak_flops(device, cfg.train.dtype, cfg.train.peak_tflops)
        self.mfu: list[float] = []  # per step of this session, for the summary
        self.step = 0
        if resume:
            self._resume()
        if parallel.is_main:
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
            shutil.copyfile(data_dir / TOKENIZER_FILE, self.run_dir / TOKENIZER_FILE)
        self.metrics = MetricsWriter(self.run_dir, cfg.logging.tensorboard) if parallel.is_main else None
        self.routing = (
            RoutingRecorder(
                self.run_dir / TRACE_FILE,
                self.model.moe_layers(),
                parallel.dp,
                cfg.train.global_batch * cfg.model.seq_len // parallel.dp_size,
                parallel.is_main,
                resume_step=self.step,
            )
            if cfg.logging.record_routing and self.model.moe_layers()
            else None
        )

    # ---- the loop -------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train until ``train.steps``; returns the summary (also written to ``summary.json``)."""
        cfg = self.cfg.train
        tokens_per_step = cfg.global_batch * self.cfg.model.seq_len
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not (self.cfg.logging.progress and self.parallel.is_main),
            mininterval=1.0,
        )
        started, last_eval = time.perf_counter(), None
        try:
            # log lines print above the progress bar, not through it (only where there is a bar: tqdm's redirect
            # would otherwise give every rank a console)
            with logging_redirect_tqdm() if not bar.disable else contextlib.nullcontext():
                while self.step < cfg.steps:
                    t0 = time.perf_counter()
                    with profiled_step(
                        self.model, self.parallel, self.run_dir, self.step + 1, self.cfg.logging.profile_step
                    ):
                        losses = self.train_step(self.step)
                    self.step += 1
                    if self.routing is not None:
                        self.routing.end_step(self.step)
                    step_time = time.perf_counter() - t0
                    record = self._step_record(losses, step_time, tokens_per_step)
                    self._write_metrics(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                    bar.update(1)
                    if self.step == cfg.steps or (cfg.eval_every and self.step % cfg.eval_every == 0):
                        last_eval = self.evaluate()
                        self._write_metrics({"step": self.step, **last_eval})
                        log.info(
                            "step %d: val_loss %.4f, val_bpb %.3f",
                            self.step,
                            last_eval["val_loss"],
                            last_eval["val_bpb"],
                        )
                    every = self.cfg.checkpoint.every
                    if self.step == cfg.steps or (every and self.step % every == 0):
                        self.save()
            self.checkpointer.wait()
        finally:
            bar.close()
            if self.metrics is not None:
                self.metrics.close()
        if last_eval is None:
            last_eval = self.evaluate()
        return self._finish(last_eval, time.perf_counter() - started)

    def train_step(self, step: int) -> StepLosses:
        """One optimizer step (``step`` counts from 0). Raises TrainingError on a non-finite value, before
        the optimizer touches the weights, so no later checkpoint can hold a poisoned state."""
        cfg = self.cfg
        maybe_inject(self.parallel.rank, step + 1)
        micro_batches = cfg.train.grad_accum
        set_lr(self.optimizer, lr_at(step, cfg.train.steps, cfg.optim))
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite.reset()
        out = StepLosses()
        if self.parallel.pipeline is not None:
            self._pipeline_micro_batches(step, out)
        else:
            for micro in range(micro_batches):
                inputs_BS, targets_BS = self._on_device(self.loader.batch(step, micro))
                with self.autocast:
                    logits_BSV = self.model(inputs_BS)
                lm_loss = self.parallel.cross_entropy(logits_BSV, targets_BS)
                aux_loss, z_loss = self._router_losses(out)
                loss = lm_loss + cfg.moe.aux_loss_coef * aux_loss + cfg.moe.z_loss_coef * z_loss
                if not torch.isfinite(loss) and cfg.train.nonfinite == "stop":
                    raise TrainingError(
                        self._nonfinite_message(
                            f"loss ({loss.item()}) at step {step + 1}, micro-batch {micro}", self.nonfinite.where()
                        )
                    )
                (loss / micro_batches).backward()
                out.loss += loss.item() / micro_batches
                out.lm_loss += lm_loss.item() / micro_batches
                out.aux_loss += aux_loss.detach().item() / micro_batches
                out.z_loss += z_loss.detach().item() / micro_batches
        self.parallel.average_gradients()
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        grad_norm = self.parallel.clip_grad_norm(self.model, max_norm)
        if not torch.isfinite(grad_norm):
            where = self.nonfinite.where() or "the gradient norm"
            if cfg.train.nonfinite == "stop":
                raise TrainingError(self._nonfinite_message(f"gradient norm at step {step + 1}", where))
            return self._skip_step(step, out, where)
        self.optimizer.step()
        self.parallel.end_step(self.optimizer)
        for index, layer in self.model.moe_layers().items():
            layer.update_bias(out.counts[index])
        out.loss, out.lm_loss, out.aux_loss, out.z_loss = self.parallel.data_mean(
            [out.loss, out.lm_loss, out.aux_loss, out.z_loss]
        )
        out.grad_norm = grad_norm.item()
        out.lr = self.optimizer.param_groups[0]["lr"]
        return out

    def _nonfinite_message(self, what: str, where: str | None) -> str:
        return (
            f"non-finite {what}; first non-finite value in {where or 'the loss'}; stopped before the update, "
            f"nothing was saved from this state (last good checkpoint: "
            f"{ckpt.latest_checkpoint(self.run_dir / 'checkpoints')}; train.nonfinite=skip drops such steps)"
        )

    def _skip_step(self, step: int, out: StepLosses, where: str) -> StepLosses:
        """train.nonfinite=skip: drop this step's update (weights, moments, router biases stay as they were) on
        every rank - the global gradient norm is non-finite on all of them - and go on with the next batch."""
        log.warning("non-finite values at step %d, first in %s: skipping the step's update", step + 1, where)
        self.optimizer.zero_grad(set_to_none=True)
        self.parallel.end_step(self.optimizer)
        out.loss, out.lm_loss, out.aux_loss, out.z_loss = self.parallel.data_mean(
            [out.loss, out.lm_loss, out.aux_loss, out.z_loss]
        )
        out.grad_norm, out.lr, out.skipped = math.nan, self.optimizer.param_groups[0]["lr"], where
        return out

    def _pipeline_micro_batches(self, step: int, out: StepLosses) -> None:
        """pp > 1: the step's micro-batches go through the pipeline schedule together (forwards and backwards
        interleaved); losses, loads and dropped pairs come back summed over the stages."""
        batches = [self._on_device(self.loader.batch(step, micro)) for micro in range(self.cfg.train.grad_accum)]
        with self.autocast:
            losses = self.parallel.pipeline.step(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
        moe = self.cfg.moe
        out.lm_loss, out.aux_loss, out.z_loss = losses.lm_loss, losses.aux_loss, losses.z_loss
        out.loss = losses.lm_loss + moe.aux_loss_coef * losses.aux_loss + moe.z_loss_coef * losses.z_loss
        out.counts, out.dropped = losses.counts, losses.dropped
        if not math.isfinite(out.loss) and self.cfg.train.nonfinite == "stop":
            raise TrainingError(
                self._nonfinite_message(f"loss ({out.loss}) at step {step + 1}", self.nonfinite.where())
            )

    def _router_losses(self, out: StepLosses) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum the MoE layers' (unscaled) aux and z losses of the last forward; accumulate their loads."""
        aux = z = torch.zeros((), device=self.device)
        for index, layer in self.model.moe_layers().items():
            stats = layer.stats
            aux, z = aux + stats.aux_loss, z + stats.z_loss
            out.counts[index] = out.counts.get(index, 0) + stats.counts_E
            out.dropped += int(stats.dropped)
        return aux, z

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (nats/token) and bits per byte over the held-out files."""
        self.model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # nats, tokens, bytes
        for batch in self.val_loader:
            inputs_BS, targets_BS = self._on_device(batch)
            with self.autocast:
                logits_BSV = self.parallel.forward(self.model, inputs_BS)
            if logits_BSV is None:  # a pipeline stage without the head
                continue
            totals[0] += self.parallel.cross_entropy(logits_BSV, targets_BS, reduction="sum")
            totals[1] += targets_BS.numel()
            totals[2] += self.token_bytes_V[targets_BS].sum()
        nats, tokens, bytes_ = self.parallel.data_sum(self.parallel.pipeline_sum(totals)).tolist()
        return {"val_loss": nats / tokens, "val_bpb": nats / (math.log(2) * bytes_)}

    def _on_device(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """A (inputs, targets) batch from the loader (host memory) on this rank's device."""
        return tuple(t.to(self.device, non_blocking=True) for t in batch)

    def describe(self) -> str:
        total = sum(p.numel() for p in self.model.parameters())
        experts = sum(p.numel() for layer in self.model.moe_layers().values() for p in layer.experts.parameters())
        return f"{total / 1e6:.2f}M parameters ({experts / 1e6:.2f}M in experts), vocabulary {self.vocab_size}"

    # ---- records, checkpoints, the run folder ---------------------------------------------------

    def _step_record(self, losses: StepLosses, step_time: float, tokens_per_step: int) -> dict[str, Any]:
        record: dict[str, Any] = {
            "step": self.step,
            "loss": losses.loss,
            "lm_loss": losses.lm_loss,
            "aux_loss": losses.aux_loss,
            "z_loss": losses.z_loss,
            "lr": losses.lr,
            "grad_norm": losses.grad_norm,
            "tokens_per_s": tokens_per_step / step_time,
            "step_time_s": step_time,
            **self._flops_record(losses, step_time, tokens_per_step),
        }
        if self.device.type == "cuda":
            record["peak_memory_bytes"] = torch.cuda.max_memory_allocated(self.device)
        if self.parallel.dims.world > 1:
            record.update(self.parallel.step_metrics())
        if losses.counts:
            record["expert_load"] = {str(i): c.tolist() for i, c in losses.counts.items()}
            record["expert_imbalance"] = {
                str(i): (c.max() / c.float().mean().clamp(min=1e-9)).item() for i, c in losses.counts.items()
            }
            record["dropped_pairs"] = losses.dropped
        if losses.skipped is not None:
            record["skipped_nonfinite"] = losses.skipped
        return record

    def _flops_record(self, losses: StepLosses, step_time: float, tokens: int) -> dict[str, float]:
        """Model FLOPs per token (the routed expert rows this step computed), FLOP/s per device, MFU."""
        expert_rows = sum(int(c.sum()) for c in losses.counts.values()) - losses.dropped
        flops = step_flops(self.cfg, self.vocab_size, tokens, expert_rows)
        per_device = flops / step_time / self.parallel.dims.world
        self.mfu.append(per_device / self.peak_flops)
        return {"model_flops_per_token": flops / tokens, "flops_per_s_per_device": per_device, "mfu": self.mfu[-1]}

    def checkpoint_identity(self) -> dict[str, Any]:
        """What a checkpoint must match to be loaded into this run: the shape of the model."""
        return ckpt.model_identity(self.cfg.model, self.cfg.moe, self.vocab_size)

    def save(self) -> Path:
        state = {**self.checkpoint_identity(), "parallel": self.parallel.state_dict()}
        return self.checkpointer.save(self.step, self.model, self.optimizer, state)

    def _resume(self) -> None:
        path = ckpt.usable_checkpoint(self.run_dir / "checkpoints", self.parallel)
        if path is None:
            log.info("no complete checkpoint in %s: starting from step 0", self.run_dir / "checkpoints")
            if self.parallel.is_main:
                truncate_metrics(self.run_dir, after_step=0)
            return
        self.parallel.load_state_dict(ckpt.read_trainer_state(path).get("parallel", {}))
        state = ckpt.load_checkpoint(
            path, self.model, self.optimizer, expect=self.checkpoint_identity(), parallel=self.parallel
        )
        self.step = int(state["step"])
        if self.parallel.is_main:
            truncate_metrics(self.run_dir, after_step=self.step)
        log.info("resumed from %s (step %d)", path, self.step)

    def _write_metrics(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(record)

    def _finish(self, last_eval: dict[str, float], seconds: float) -> dict[str, Any]:
        summary = {
            "steps": self.step,
            "train_seconds": seconds,
            **last_eval,
            "gzip9_val_bpb": self.manifest.get("gzip9_val_bpb"),
            "device": str(self.device),
            "peak_flops_per_s_per_device": self.peak_flops,
            "peak_source": self.peak_source,
            # the first step of a session warms up (allocations, kernel selection): left out when there are more
            "mfu": statistics.median(self.mfu[1:] or self.mfu) if self.mfu else None,
        }
        if not self.parallel.is_main:
            return summary
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        if self.cfg.logging.plots:
            for path in write_plots(self.run_dir):
                log.info("wrote %s", path)
        return summary


def check_run_dir(run_dir: Path, resume: bool, fresh: bool) -> None:
    """Refuse, changing nothing, a run folder this run may not use. Hecate writes into (and ``--fresh`` deletes)
    only a new or empty folder or one it created, recognised by its :data:`RUN_MARKER` file: a folder of the
    user's, or the prepared data, is never touched. A finished or running run needs ``--resume`` or ``--fresh``."""
    try:
        if run_dir.exists() and not run_dir.is_dir():
            raise HecateError(f"train.run_dir {run_dir} is a file, not a folder: pick another train.run_dir")
        if not run_dir.is_dir() or not any(run_dir.iterdir()):
            return
        marked = (run_dir / RUN_MARKER).is_file()
        holds_run = (run_dir / METRICS_FILE).exists()
    except OSError as err:
        raise HecateError(f"train.run_dir {run_dir}: cannot read it ({err.strerror})") from None
    if not marked and (holds_run or (run_dir / "config.yaml").is_file() or (run_dir / "checkpoints").is_dir()):
        raise HecateError(
            f"run folder {run_dir} has no {RUN_MARKER} file: it was made by a Hecate older than that "
            f"marker, or by something else. Hecate deletes (--fresh) and writes into only the run "
            f"folders it made: if this is a Hecate run, mark it with `touch {run_dir / RUN_MARKER}` "
            f"and run again; else pick another train.run_dir"
        )
    if not marked:
        raise HecateError(
            f"train.run_dir {run_dir} is a folder that Hecate did not make (no {RUN_MARKER} file) and "
            f"is not empty: Hecate writes a run into a new or empty folder only; pick another "
            f"train.run_dir"
        )
    if holds_run and not resume and not fresh:
        raise HecateError(
            f"run folder {run_dir} already holds a run: pass --resume to continue it, "
            f"--fresh to start it over, or -o train.run_dir=OTHER"
        )


def prepare_run_dir(run_dir: Path, resume: bool, fresh: bool) -> None:
    """Make ``run_dir`` this run's folder after :func:`check_run_dir`: ``--fresh`` deletes the old run first,
    ``--resume`` drops a record torn by a kill mid-write. Launchers call this before starting workers, so an
    error comes before anything runs."""
    check_run_dir(run_dir, resume, fresh)
    try:
        if fresh and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        marker = run_dir / RUN_MARKER
        if not marker.is_file():
            marker.write_text("A Hecate run folder: `hecate train --fresh` may delete it.\n")
    except OSError as err:
        raise HecateError(f"train.run_dir {run_dir}: cannot make it this run's folder ({err})") from None
    if resume:
        truncate_metrics(run_dir)
