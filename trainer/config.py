"""The run config: typed dataclasses, loaded from YAML, overridable from the command line.

Everything is validated here, before any worker starts; an invalid value raises one
:class:`~hecate.collectives.errors.ConfigError` that names the field and says what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_origin, get_type_hints

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hecate.collectives.errors import ConfigError
from hecate.parallel.config import (
    ACTIVATIONS,
    CollectivesConfig,
    FssdpConfig,
    MoEConfig,
    ParallelConfig,
    require_finite,
)

DTYPES = ("fp32", "bf16")
QK_NORMS = ("none", "head", "full")  # RMSNorm of q and k: none, over each head (Qwen3), over the whole width (OLMoE)
NO_DECAY_GROUPS = ("norm", "bias", "embedding")
NONFINITE_POLICIES = ("stop", "skip")
ACTIVATION_CHECKPOINTING = ("none", "moe", "block")  # recompute nothing, each MoE layer, or each whole block
REDUCE_DTYPES = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
DEMO_DATA = ("data/stdlib", ["stdlib"])  # (data.dir, data.inputs) of the demo: prepared when missing without asking
OVERRIDE_KEY = re.compile(r"[A-Za-z_]\w*(\.\w+)*")  # section.field, as the dataclasses name them
MAX_SEED = 2**63 - 1  # torch.manual_seed takes a signed 64-bit seed
MAX_TIMEOUT_S = 7 * 24 * 3600.0  # longer is no timeout at all (and overflows the store's timedelta)


@dataclass
class ModelConfig:
    """Decoder-only transformer. The vocabulary size comes from the prepared data's tokenizer."""

    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # key/value heads (grouped-query attention); 0 = n_heads
    head_dim: int = 0  # size of one head; 0 = dim / n_heads
    seq_len: int = 256
    dense_ffn_dim: int = 1024  # hidden size of the dense FFN in non-MoE blocks
    dense_activation: str = "gelu"  # of the dense FFN: gelu (two matrices) or swiglu (three)
    attention_bias: bool = False  # biases on the q, k and v projections (Qwen2)
    qk_norm: str = "none"  # RMSNorm of q and k before RoPE: none, head (each head) or full (the whole width)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    tie_embeddings: bool = True
    vocab_size: int = 0  # rows of the embedding; 0 = the data's tokenizer's (a pretrained model's may be padded)

    def vocab_for(self, data_vocab: int) -> int:
        """The model's vocabulary for data tokenized into ``data_vocab`` ids (at most the model's)."""
        if self.vocab_size and self.vocab_size < data_vocab:
            raise ConfigError(
                "model.vocab_size",
                f"must hold the data's {data_vocab} token ids (0 = the data's), got {self.vocab_size}",
            )
        return self.vocab_size or data_vocab

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    def validate(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "seq_len", "dense_ffn_dim"):
            _positive(f"model.{name}", getattr(self, name))
        for name in ("n_kv_heads", "head_dim", "vocab_size"):
            _non_negative(f"model.{name}", getattr(self, name))
        if not self.head_dim and self.dim % self.n_heads:
            raise ConfigError("model.n_heads", f"must divide model.dim={self.dim}, got {self.n_heads}")
        if self.head_size % 2:
            raise ConfigError("model.head_dim", f"the head size must be even for RoPE, got {self.head_size}")
        if self.n_heads % self.kv_heads:
            raise ConfigError(
                "model.n_kv_heads",
                f"must divide model.n_heads={self.n_heads} (query heads share kv heads), got {self.n_kv_heads}",
            )
        if self.dense_activation not in ACTIVATIONS:
            raise ConfigError("model.dense_activation", f"must be one of {ACTIVATIONS}, got {self.dense_activation!r}")
        if self.qk_norm not in QK_NORMS:
            raise ConfigError("model.qk_norm", f"must be one of {QK_NORMS}, got {self.qk_norm!r}")
        _positive("model.norm_eps", self.norm_eps)
        _positive("model.rope_theta", self.rope_theta)
        _positive("model.init_std", self.init_std)


@dataclass
class DataConfig:
    """Where the tokenized corpus lives, and what ``prepare-data`` reads when it is missing."""

    dir: str = DEMO_DATA[0]
    inputs: list[str] = field(default_factory=lambda: list(DEMO_DATA[1]))
    vocab_size: int = 8192
    val_fraction: float = 0.05
    prepare: bool = False  # prepare data.dir from data.inputs when it holds no prepared data (the demo data always is)

    def validate(self) -> None:
        _path("data.dir", self.dir)
        if not self.inputs:
            raise ConfigError("data.inputs", "must list at least one input ('stdlib' or a path)")
        for item in self.inputs:
            _path("data.inputs", item)
        if not 256 < self.vocab_size <= 2**16:
            raise ConfigError(
                "data.vocab_size",
                f"must be > 256 (the byte alphabet) and <= 65536 (tokens are "
                f"stored as 16-bit ids), got {self.vocab_size}",
            )
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError("data.val_fraction", f"must be in (0, 1), got {self.val_fraction}")

    @property
    def may_prepare(self) -> bool:
        """Whether a missing ``data.dir`` is prepared: when the config asks for it, or it is the demo data. A
        mistyped path to a user's corpus must not silently train on something else."""
        return self.prepare or (self.dir, self.inputs) == DEMO_DATA


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay to ``min_lr_ratio * lr``."""

    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    no_decay: list[str] = field(default_factory=lambda: list(NO_DECAY_GROUPS))
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping

    def validate(self) -> None:
        _positive("optim.lr", self.lr)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _non_negative("optim.warmup_steps", self.warmup_steps)
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"optim.{name}", f"must be in [0, 1), got {getattr(self, name)}")
        _positive("optim.eps", self.eps)
        _non_negative("optim.weight_decay", self.weight_decay)
        _non_negative("optim.grad_clip", self.grad_clip)
        for group in self.no_decay:
            if group not in NO_DECAY_GROUPS:
                raise ConfigError("optim.no_decay", f"entries must be among {NO_DECAY_GROUPS}, got {group!r}")


@dataclass
class TrainConfig:
    """The loop: how many steps, how big a batch, which precision, how often to evaluate."""

    steps: int = 300
    global_batch: int = 16  # sequences per optimizer step, over all data-parallel ranks and micro-batches
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 0
    dtype: str = "fp32"  # fp32, or bf16 autocast (master weights and optimizer stay fp32)
    eval_every: int = 100  # 0 = only at the end
    eval_batches: int = 8
    run_dir: str = "runs/tiny"
    collective_timeout_s: float = 600.0  # a collective (or the rendezvous) waiting longer fails the job, naming it
    nonfinite: str = "stop"  # a NaN/inf in a step: stop (naming step and layer) or skip the step's update
    init_from: str = ""  # an exported model folder (`hecate export`) whose weights start the run
    device: str = "auto"  # auto (cuda when a GPU is visible), cpu or cuda (cuda:LOCAL_RANK for each rank)
    activation_checkpointing: str = "none"  # none, moe (recompute MoE layers in backward) or block (whole blocks)
    grad_reduce_dtype: str = "fp32"  # dtype in which data-parallel gradients are summed (fp32 or bf16)
    peak_tflops: float = 0.0  # one device's peak for MFU; 0 = the GPU's datasheet figure, or measured on the CPU

    def validate(self) -> None:
        _positive("train.steps", self.steps)
        _positive("train.global_batch", self.global_batch)
        _positive("train.grad_accum", self.grad_accum)
        if self.global_batch % self.grad_accum:
            raise ConfigError(
                "train.grad_accum", f"must divide train.global_batch={self.global_batch}, got {self.grad_accum}"
            )
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError("train.seed", f"must be in [0, {MAX_SEED}], got {self.seed}")
        if self.dtype not in DTYPES:
            raise ConfigError("train.dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        _non_negative("train.eval_every", self.eval_every)
        _positive("train.eval_batches", self.eval_batches)
        _path("train.run_dir", self.run_dir)
        _positive("train.collective_timeout_s", self.collective_timeout_s)
        if self.collective_timeout_s > MAX_TIMEOUT_S:
            raise ConfigError(
                "train.collective_timeout_s",
                f"must be at most {MAX_TIMEOUT_S:g} s (a week), got {self.collective_timeout_s:g}",
            )
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ConfigError("train.nonfinite", f"must be one of {NONFINITE_POLICIES}, got {self.nonfinite!r}")
        if self.init_from:
            _path("train.init_from", self.init_from)
        if self.device not in DEVICES:  # whether a GPU is there is checked where the run starts (trainer/device.py)
            raise ConfigError("train.device", f"must be one of {DEVICES}, got {self.device!r}")
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise ConfigError(
                "train.activation_checkpointing",
                f"must be one of {ACTIVATION_CHECKPOINTING}, got {self.activation_checkpointing!r}",
            )
        _non_negative("train.peak_tflops", self.peak_tflops)
        if self.grad_reduce_dtype not in REDUCE_DTYPES:
            raise ConfigError(
                "train.grad_reduce_dtype", f"must be one of {REDUCE_DTYPES}, got {self.grad_reduce_dtype!r}"
            )


@dataclass
class CheckpointConfig:
    """Periodic, atomic checkpoints in ``RUN_DIR/checkpoints``."""

    every: int = 100  # steps between checkpoints; 0 = only at the end
    keep: int = 3  # complete checkpoints kept; older ones are deleted
    async_save: bool = False  # write in a background thread while training goes on (the copy is taken at once)

    def validate(self) -> None:
        _non_negative("checkpoint.every", self.every)
        _positive("checkpoint.keep", self.keep)


@dataclass
class LoggingConfig:
    """Where the run reports: console progress, metrics.jsonl (always), TensorBoard, plots."""

    progress: bool = True
    tensorboard: bool = True
    plots: bool = True
    level: str = "INFO"
    profile_step: int = 0  # write a Chrome/Perfetto timeline of this step (1-based) to the run folder; 0 = off
    record_routing: bool = False  # routing_trace.bin: expert counts per step, layer and source rank (hecate simulate)

    def validate(self) -> None:
        if self.level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError("logging.level", f"must be DEBUG, INFO, WARNING or ERROR, got {self.level!r}")
        if self.profile_step < 0:
            raise ConfigError("logging.profile_step", f"must be >= 0 (0 = off), got {self.profile_step}")


@dataclass
class RunConfig:
    """One training run: every section of the YAML file."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    fssdp: FssdpConfig = field(default_factory=FssdpConfig)
    collectives: CollectivesConfig = field(default_factory=CollectivesConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> RunConfig:
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()
        _apart("train.run_dir", self.train.run_dir, "data.dir", self.data.dir)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.structured(self))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults, then the YAML file, then ``key=value`` overrides; typed, checked and validated."""
    layers = [] if path is None else [_read_file(Path(path))]
    for item in overrides:
        if not OVERRIDE_KEY.fullmatch(item.split("=", 1)[0]) or "=" not in item:
            raise ConfigError(
                _printable(item),
                "overrides are written key=value with a dotted field name as the key, e.g. -o moe.num_experts=16",
            )
        layers.append(_parse(lambda item=item: OmegaConf.from_dotlist([item]), f"in override {item!r}"))
    return _build(layers)


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    """Rebuild a validated config from ``RunConfig.to_dict()`` output (e.g. what a launcher hands its workers)."""
    return _build([_parse(lambda: OmegaConf.create(values), "in the config handed to this worker")])


def _read_file(path: Path) -> DictConfig:
    """One YAML file of sections; a folder, an empty file or a file that is not a mapping is refused by name."""
    if path.is_dir():
        raise ConfigError("CONFIG", f"{str(path)!r} is a folder, not a YAML file")
    if not path.is_file():
        raise ConfigError("CONFIG", f"file {str(path)!r} does not exist")
    where = f"in {_printable(str(path))}"
    layer = _parse(lambda: OmegaConf.load(path), where)
    if not isinstance(layer, DictConfig):
        raise ConfigError(where, f"must be a mapping of sections ({', '.join(_allowed_keys(''))}), got a list")
    if not layer:
        raise ConfigError(
            where,
            "holds no settings: training on the defaults alone is not what a config "
            "file is for; set at least one field (see examples/tiny.yaml)",
        )
    return layer


def _build(layers: list[DictConfig]) -> RunConfig:
    """Merge the layers over the defaults into a typed, validated RunConfig."""
    for layer in layers:
        _check_shapes(layer)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), *layers)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _as_config_error(err) from None
    return config.validate()


def _check_shapes(layer: DictConfig) -> None:
    """A mapping for each section, a list of single values for a list field, a single value for the others.
    OmegaConf's merge raises a bare TypeError, naming no field, for a list or mapping in the wrong place."""
    sections = {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}
    for section, values in OmegaConf.to_container(layer, resolve=False).items():
        if section not in sections or values is None:
            continue  # the merge names an unknown section, or a missing one
        if not isinstance(values, dict):
            raise ConfigError(str(section), f"must be a mapping of {section} fields, got {values!r}")
        hints = get_type_hints(sections[section])
        for name, value in values.items():
            if name not in hints:
                continue
            if get_origin(hints[name]) is not list:
                if isinstance(value, (dict, list)):
                    raise ConfigError(f"{section}.{name}", f"must be a single value, got {value!r}")
            elif isinstance(value, dict) or isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
                raise ConfigError(f"{section}.{name}", f"must be a list of single values, got {value!r}")


def _parse(load, where: str):
    try:
        return load()
    except OmegaConfBaseException as err:
        raise ConfigError(where, _first_line(err)) from None
    except (yaml.YAMLError, UnicodeDecodeError, OSError, ValueError, AssertionError) as err:
        # a syntax or encoding error, or a scalar document (OmegaConf asserts on a top-level string)
        raise ConfigError(where, f"cannot be parsed: {_first_line(err)}") from None


def _as_config_error(err: OmegaConfBaseException) -> ConfigError:
    key = _printable(str(getattr(err, "full_key", None) or "config"))
    first = _first_line(err)
    if "not in" in first or "Key '" in first:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        allowed = _allowed_keys(parent)
        return ConfigError(key, f"unknown key; allowed here: {', '.join(allowed)}")
    return ConfigError(key, first)


def _allowed_keys(parent: str) -> list[str]:
    node: Any = RunConfig()
    for part in filter(None, parent.split(".")):
        node = getattr(node, part, None)
    if node is None or not dataclasses.is_dataclass(node):
        return [f.name for f in dataclasses.fields(RunConfig)]
    return [f.name for f in dataclasses.fields(node)]


def _first_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


def _printable(text: str) -> str:
    """A key or path as typed, or quoted with escapes when it holds a line break or other control character."""
    return text if text.isprintable() else repr(text)


def _positive(name: str, value: float) -> None:
    require_finite(name, value)
    if value <= 0:
        raise ConfigError(name, f"must be > 0, got {value}")


def _non_negative(name: str, value: float) -> None:
    require_finite(name, value)
    if value < 0:
        raise ConfigError(name, f"must be >= 0, got {value}")


def _path(name: str, value: str) -> None:
    """A path the file system can take: not empty, no NUL character."""
    if not value:
        raise ConfigError(name, "must be a path, got an empty string")
    if "\0" in value:
        raise ConfigError(name, f"must be a path, got {value!r} (it holds a NUL character)")


def _apart(run_field: str, run_dir: str, data_field: str, data_dir: str) -> None:
    """The run folder is written into and ``--fresh`` deletes it: it must not be the data folder, nor lie inside
    it, nor hold it."""
    run, data = _resolved(run_field, run_dir), _resolved(data_field, data_dir)
    if run == data or run in data.parents or data in run.parents:
        raise ConfigError(
            run_field,
            f"{run_dir!r} overlaps {data_field}={data_dir!r}: the run folder is written "
            f"into and --fresh deletes it, so it must be neither the data folder, nor "
            f"inside it, nor around it",
        )


def _resolved(name: str, value: str) -> Path:
    try:
        return Path(value).resolve()
    except (OSError, RuntimeError, ValueError) as err:  # a symlink loop, a name too long
        raise ConfigError(name, f"cannot resolve {value!r}: {err}") from None
