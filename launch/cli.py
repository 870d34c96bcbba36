"""The ``hecate`` command. Each subcommand validates its input first, then does one thing; user errors
are printed as one line without a traceback (``--debug`` shows it)."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from hecate.collectives.errors import HecateError

EXAMPLES = """examples:
  hecate prepare-data                                  # tokenize the Python standard library into data/stdlib
  hecate train examples/tiny.yaml                      # train the demo model on CPU (prepares data if needed)
  hecate train examples/tiny.yaml -o moe.num_experts=16 -o train.steps=50 --fresh
  hecate train examples/tiny.yaml --resume             # continue from the last complete checkpoint
  hecate train examples/tiny.yaml --simulate 4 -o parallel.ep=2   # 4 processes on this machine: DP=2 x EP=2
  hecate generate runs/tiny --prompt "def main("       # sample from the latest checkpoint
  hecate export runs/tiny --out exports/tiny           # safetensors + config.json; train ... --init-from exports/tiny
  hecate export runs/tiny --out hf/tiny --format hf    # a folder transformers loads
  hecate import-hf ~/Mixtral-tiny --out imports/mixtral  # a Hugging Face MoE folder for --init-from
  hecate plan examples/tiny.yaml --world 4 -o parallel.ep=4   # rank groups and memory per rank
  hecate train examples/tiny.yaml --launcher mpi --workers 4     # mpirun -np 4 on this node
  hecate train examples/tiny.yaml --launcher ray --address http://HEAD:8265 --workers 8
  hecate sbatch examples/tiny.yaml --nodes 2 --gpus-per-node 8 --partition gpu --time 02:00:00 --submit
  hecate simulate --cluster examples/clusters/a100-400gbps.yaml --model examples/models/gpt-moe-s.yaml --zipf 1.0
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hecate",
        description="Train Mixture-of-Experts transformers with sparse expert materialization.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show Python tracebacks")

    train = sub.add_parser(
        "train",
        parents=[common],
        help="train a model from a YAML config",
        description="Train a model. Unknown keys, wrong types and impossible values in the "
        "config are rejected before anything starts.",
    )
    train.add_argument("config", help="YAML config, e.g. examples/tiny.yaml")
    train.add_argument(
        "-o",
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. -o moe.num_experts=16 (repeatable)",
    )
    mode = train.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from the run folder's last complete checkpoint")
    mode.add_argument("--fresh", action="store_true", help="delete the run folder first and start over")
    train.add_argument(
        "--init-from",
        default=None,
        metavar="DIR",
        help="start from the weights of an exported model (`hecate export`); same as -o train.init_from=DIR",
    )
    train.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        metavar="T",
        help="one device's peak TFLOP/s for the MFU in metrics.jsonl (default: the GPU's datasheet figure, or a "
        "matmul measured on the CPU); same as -o train.peak_tflops=T",
    )
    train.add_argument(
        "--simulate",
        type=int,
        default=None,
        metavar="N",
        help="run N worker processes on this machine (gloo), as N ranks of a cluster",
    )
    train.add_argument(
        "--sim-nodes",
        type=int,
        default=None,
        metavar="K",
        help="with --simulate: group the ranks into K emulated nodes joined by a simulated network",
    )
    train.add_argument(
        "--sim-inter-node-gbps",
        type=float,
        default=None,
        metavar="G",
        help="with --sim-nodes: inter-node link bandwidth in Gbit/s (transfers are delayed to it)",
    )
    train.add_argument(
        "--sim-latency-us",
        type=float,
        default=0.0,
        metavar="L",
        help="with --sim-nodes: inter-node latency in microseconds (default 0)",
    )
    train.add_argument(
        "--sim-bind-cores",
        action="store_true",
        help="with --simulate: bind each rank to cores of its own, as mpirun binds ranks (ranks "
        "r and r + cores share one when there are more ranks than cores)",
    )
    train.add_argument(
        "--profile-step",
        type=int,
        default=None,
        metavar="K",
        help="write a Chrome/Perfetto timeline of step K (compute and each collective on its own "
        "track) to RUN_DIR/profile_stepK.json; same as -o logging.profile_step=K",
    )
    train.add_argument(
        "--launcher",
        choices=("mpi", "ray"),
        default=None,
        help="start --workers workers with mpirun on this node, or as actors of the Ray cluster at "
        "--address (torchrun and srun start `python -m hecate.launch.worker` themselves)",
    )
    train.add_argument("--workers", type=int, default=None, metavar="N", help="number of workers (ranks) to launch")
    train.add_argument("--address", default=None, help="Ray: the cluster's dashboard address, e.g. http://HEAD:8265")
    train.add_argument("--gpus-per-worker", type=float, default=0.0, help="Ray: GPUs reserved per worker")
    train.add_argument("--cpus-per-worker", type=float, default=1.0, help="Ray: CPUs reserved per worker")
    train.add_argument(
        "--placement",
        choices=("pack", "spread"),
        default="pack",
        help="Ray: workers on as few nodes as possible (pack) or as many (spread)",
    )
    train.add_argument(
        "--record-routing",
        action="store_true",
        help="write each step's expert counts per layer and source rank to RUN_DIR/routing_trace.bin "
        "(logging.record_routing; replay it with hecate simulate --trace)",
    )
    train.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        metavar="N",
        help="Ray: restart all workers up to N times after a failure; they resume from the last "
        "complete checkpoint (torchrun: pass its own --max-restarts)",
    )

    batch = sub.add_parser(
        "sbatch",
        parents=[common],
        help="write (and --submit) a SLURM batch script",
        description="Write a SLURM batch script that starts the workers with srun, one task per "
        "worker, and with --submit hand it to sbatch.",
    )
    batch.add_argument("config", help="YAML config")
    batch.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    batch.add_argument("--nodes", type=int, required=True)
    batch.add_argument("--gpus-per-node", type=int, default=0)
    batch.add_argument(
        "--tasks-per-node",
        type=int,
        default=None,
        help="workers per node (default: --gpus-per-node, or 1 without GPUs)",
    )
    batch.add_argument("--partition", default=None)
    batch.add_argument("--time", default=None, help="wall-clock limit, e.g. 02:00:00")
    batch.add_argument("--account", default=None)
    batch.add_argument("--job-name", default=None, help="default: hecate-<run folder name>")
    batch.add_argument("--out", default=None, help="where to write the script (default: <run_dir>.sbatch)")
    batch.add_argument("--resume", action="store_true", help="the job continues from the last checkpoint")
    batch.add_argument("--submit", action="store_true", help="submit it with sbatch and print the job id")

    prep = sub.add_parser(
        "prepare-data",
        parents=[common],
        help="collect text, train a BPE tokenizer, write token shards",
        description="Collect text files, train a byte-level BPE tokenizer on the training "
        "split, write memory-mapped token shards and a manifest.",
    )
    prep.add_argument(
        "--input",
        nargs="+",
        default=["stdlib"],
        metavar="stdlib|PATH",
        help="'stdlib' (the running Python's standard library .py files) and/or files or folders",
    )
    prep.add_argument("--out", default="data/stdlib", help="output folder (default: data/stdlib)")
    prep.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default: 8192)")
    prep.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out (default: 0.05)")
    prep.add_argument(
        "--tokenizer",
        metavar="HF_DIR_OR_TOKENIZER_JSON",
        help="tokenize with this pretrained tokenizer instead of training one (--vocab-size is ignored)",
    )
    prep.add_argument("--text-field", default="text", help="JSONL field / Parquet column of the text (default: text)")
    prep.add_argument("--workers", type=int, default=None, help="processes (default: every core)")

    export = sub.add_parser(
        "export",
        parents=[common],
        help="write a run's latest weights as safetensors",
        description="Write the newest complete checkpoint of a run, whatever layout trained it, "
        "as one safetensors file with readable parameter names, a config.json "
        "and the tokenizer; `hecate train ... --init-from DIR` starts from it.",
    )
    export.add_argument("run_dir", help="a run folder (train.run_dir), e.g. runs/tiny")
    export.add_argument("--out", required=True, help="folder to write model.safetensors and config.json into")
    export.add_argument(
        "--format",
        choices=("hecate", "hf"),
        default="hecate",
        help="hecate: Hecate's parameter names (for --init-from); hf: a Hugging Face folder that "
        "transformers' AutoModelForCausalLM.from_pretrained loads (Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE)",
    )

    import_hf = sub.add_parser(
        "import-hf",
        parents=[common],
        help="convert a local Hugging Face MoE model folder for --init-from",
        description="Read a local Hugging Face model folder (config.json, safetensors shards, tokenizer.json) of "
        "the Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE family and write Hecate's export format plus model.yaml, "
        "the model and moe sections of a config that fits it. `hecate train` also takes the HF folder "
        "itself as --init-from.",
    )
    import_hf.add_argument("hf_dir", help="a Hugging Face model folder")
    import_hf.add_argument("--out", required=True, help="a new or empty folder to write into")
    import_hf.add_argument(
        "--seq-len", type=int, default=None, help="model.seq_len (default: max_position_embeddings, at most 2048)"
    )

    checks = sub.add_parser("checkpoints", parents=[common], help="check a run's checkpoints")
    checks_sub = checks.add_subparsers(dest="action", required=True, metavar="ACTION")
    verify = checks_sub.add_parser(
        "verify",
        parents=[common],
        help="check every checkpoint against its checksums",
        description="List each checkpoint of a run as ok, corrupt (naming the file) or "
        "incomplete, and which one a resume would load; exit 1 when the "
        "newest is not ok.",
    )
    verify.add_argument("run_dir", help="a run folder (train.run_dir), e.g. runs/tiny")

    gen = sub.add_parser("generate", parents=[common], help="sample text from a run's latest checkpoint")
    gen.add_argument("run_dir", help="a run folder (train.run_dir), e.g. runs/tiny")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=50, help="0 = no top-k filtering")
    gen.add_argument("--seed", type=int, default=0)
    plan = sub.add_parser(
        "plan",
        parents=[common],
        help="show the rank groups and memory per rank of a layout",
        description="Validate a config's parallel layout for a world size and print which "
        "ranks form each group and an estimate of the memory each rank holds.",
    )
    plan.add_argument("config", help="YAML config")
    plan.add_argument("--world", type=int, required=True, help="number of ranks (processes / GPUs)")
    plan.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    plan.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="vocabulary size (default: from the prepared data, else data.vocab_size)",
    )

    sim = sub.add_parser(
        "simulate",
        parents=[common],
        help="predict step time per placement policy on a GPU cluster",
        description="Cost model of one training iteration (trainer/scaling/, docs/SCALING.md) "
        "with the training code's planner, from a routing trace or Zipf skew.",
    )
    sim.add_argument("--cluster", required=True, help="cluster YAML, e.g. examples/clusters/a100-400gbps.yaml")
    sim.add_argument("--model", required=True, help="run config YAML, e.g. examples/models/gpt-moe-s.yaml")
    source = sim.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", help="routing trace recorded with hecate train --record-routing")
    source.add_argument("--zipf", type=float, help="synthetic routing: Zipf exponent of expert popularity")
    sim.add_argument(
        "--trace-skip",
        type=int,
        default=0,
        metavar="N",
        help="replay the trace from its (N+1)-th step (leave out the routing right after initialisation)",
    )
    sim.add_argument("--policy", nargs="+", default=["ep", "fsdp", "shadow", "fssdp"], help="policies to compare")
    sim.add_argument("--gpus", type=int, nargs="+", default=None, help="cluster sizes (default 16 32 ... 1024)")
    sim.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    sim.add_argument("--tokens-per-gpu", type=int, default=8192, help="tokens per GPU per step (default 8192)")
    sim.add_argument("--steps", type=int, default=10, help="simulated steps after the load window fills")
    sim.add_argument(
        "--overlap-budget",
        type=int,
        default=None,
        help="fssdp.overlap_budget (default: derived from attention time and link bandwidth)",
    )
    sim.add_argument("--memory-budget", type=int, default=None, help="default: the config's fssdp.memory_budget")
    sim.add_argument("--reshard-every", type=int, default=None, help="default: the config's fssdp.reshard_every")
    sim.add_argument("--rematerialize", action="store_true", help="fssdp.rematerialize: gather again in backward")
    sim.add_argument(
        "--no-overlap-reduce-scatter",
        action="store_true",
        help="SparseReduceScatter waits instead of hiding under attention backward (the engine as built)",
    )
    sim.add_argument("--seed", type=int, default=0, help="Zipf permutation and draws")
    sim.add_argument("--out", default="runs/simulate", help="folder for results.json and step_time.png")
    return parser


def cmd_simulate(args: argparse.Namespace) -> int:
    from hecate.trainer.scaling.report import DEFAULT_GPUS, run_simulation, table, write_outputs

    results = run_simulation(
        args.cluster,
        args.model,
        args.policy,
        args.gpus or list(DEFAULT_GPUS),
        args.trace,
        args.zipf,
        args.override,
        args.tokens_per_gpu,
        args.steps,
        args.overlap_budget,
        args.memory_budget,
        args.rematerialize,
        args.reshard_every,
        not args.no_overlap_reduce_scatter,
        args.seed,
        args.trace_skip,
    )
    print(table(results))
    source = f"trace {args.trace}" if args.trace else f"Zipf s={args.zipf}"
    title = f"{Path(args.model).stem} on {Path(args.cluster).stem}, {source}"
    for path in write_outputs(results, Path(args.out), title, dict(vars(args))):
        print(f"wrote {path}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from hecate.trainer.config import load_config
    from hecate.trainer.plan import describe_plan

    cfg = load_config(args.config, args.override)
    print(describe_plan(cfg, args.world, args.vocab_size or cfg.model.vocab_for(_vocab_size(cfg.data))))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from hecate.trainer.config import load_config
    from hecate.trainer.device import check_device
    from hecate.trainer.log import setup_logging
    from hecate.trainer.train import Trainer, check_run_dir

    profile = [f"logging.profile_step={args.profile_step}"] if args.profile_step is not None else []
    if args.record_routing:  # an override, so that launched workers record too
        args.override = [*args.override, "logging.record_routing=true"]
    if args.peak_tflops is not None:
        args.override = [*args.override, f"train.peak_tflops={args.peak_tflops}"]
    if args.init_from is not None:  # workers get it as an override
        args.override = [*args.override, f"train.init_from={Path(args.init_from).resolve()}"]
    cfg = load_config(args.config, args.override + profile)
    if cfg.train.init_from:
        _check_init_from(cfg)
    setup_logging(None, rank=0, level=cfg.logging.level)
    if args.simulate is not None and args.launcher is not None:
        raise HecateError("--simulate and --launcher exclude each other: pick one way to start the workers")
    if args.sim_bind_cores and args.simulate is None:
        raise HecateError("--sim-bind-cores binds simulated ranks to cores: it needs --simulate N")
    network = _simulated_network(args)
    check_run_dir(Path(cfg.train.run_dir), args.resume, args.fresh)
    _check_data(cfg.data)
    if args.launcher is None:  # the workers run on this machine: a GPU asked for must be here
        check_device(cfg.train.device)
    if args.simulate is not None:
        summary = _train_simulated(cfg, args.simulate, args.resume, args.fresh, network, args.sim_bind_cores)
    elif args.launcher is not None:
        summary = _train_launched(args, cfg)
    else:
        _ensure_data(cfg.data)
        trainer = Trainer(cfg, resume=args.resume, fresh=args.fresh)
        setup_logging(trainer.run_dir, rank=0, level=cfg.logging.level)
        logging.getLogger("hecate").info("run folder %s; %s", trainer.run_dir, trainer.describe())
        summary = trainer.run()
    gzip = summary.get("gzip9_val_bpb")
    print(
        f"done: {summary['steps']} steps in {summary['train_seconds']:.0f} s; held-out val_loss "
        f"{summary['val_loss']:.3f} nats/token, {summary['val_bpb']:.3f} bits/byte"
        + (f" (gzip -9 on the same files: {gzip:.3f} bits/byte)" if gzip else "")
    )
    return 0


def _vocab_size(data) -> int:
    """The vocabulary of ``data.dir`` once prepared, else the one asked for (``data.vocab_size``)."""
    from hecate.trainer.data import MANIFEST_FILE, load_manifest

    return int(load_manifest(data.dir)["vocab_size"]) if (Path(data.dir) / MANIFEST_FILE).is_file() else data.vocab_size


def _check_init_from(cfg) -> None:
    """Refuse, before any worker starts, an exported model that is not this config's model (naming what differs)."""
    from hecate.trainer.checkpoint import model_identity
    from hecate.trainer.export import check_export_fits

    vocab_size = cfg.model.vocab_for(_vocab_size(cfg.data))
    check_export_fits(Path(cfg.train.init_from), model_identity(cfg.model, cfg.moe, vocab_size))


def _simulated_network(args: argparse.Namespace):
    """The ``--sim-*`` options as a SimulatedNetwork (None without ``--sim-nodes``), checked before workers start."""
    from hecate.collectives.simulated_network import SimulatedNetwork

    if args.sim_nodes is None:
        if args.sim_inter_node_gbps is not None or args.sim_latency_us:
            raise HecateError("--sim-inter-node-gbps / --sim-latency-us need --sim-nodes K (and --simulate N)")
        return None
    if args.simulate is None:
        raise HecateError("--sim-nodes simulates a network between simulated ranks: it needs --simulate N")
    if args.sim_inter_node_gbps is None:
        raise HecateError("--sim-nodes needs --sim-inter-node-gbps G, the inter-node bandwidth in Gbit/s")
    network = SimulatedNetwork(args.sim_nodes, args.sim_inter_node_gbps, args.sim_latency_us)
    network.validate(args.simulate)
    return network


def _train_simulated(cfg, world: int, resume: bool, fresh: bool, network=None, bind_cores: bool = False) -> dict:
    """Validate everything here, then run ``world`` workers on this machine; the first failure stops all."""
    from hecate.launch.environment import usable_cores
    from hecate.launch.simulate import network_environment, start_workers
    from hecate.launch.worker import run_from_environment
    from hecate.parallel.tensor_parallel import check_tensor_parallel
    from hecate.trainer.plan import layout_of
    from hecate.trainer.train import prepare_run_dir

    cores = len(usable_cores())
    if not 1 <= world <= MAX_SIMULATED_PER_CORE * cores:
        raise HecateError(
            f"--simulate {world}: this machine has {cores} cores; simulate between 1 and "
            f"{MAX_SIMULATED_PER_CORE * cores} ranks"
        )
    dims = layout_of(cfg, world)
    _check_transport(cfg, "simulate")
    _ensure_data(cfg.data)
    check_tensor_parallel(
        dims.tp, cfg.model.vocab_for(_vocab_size(cfg.data)), cfg.model.dense_ffn_dim, cfg.model.kv_heads
    )
    _check_gpu_share(cfg, dims, world)
    prepare_run_dir(Path(cfg.train.run_dir), resume, fresh)
    group = start_workers(
        run_from_environment,
        world,
        (cfg.to_dict(), resume),
        threads_per_worker=max(1, cores // world),
        backend=None,
        bind_cores=bind_cores,
        env=network_environment(network) if network else None,
    )
    return group.join(timeout_s=SIMULATE_TIMEOUT_S)[0]


def _check_gpu_share(cfg, dims, world: int) -> None:
    """--simulate on GPUs: the ranks sharing one GPU must fit in its memory (each is capped to its share)."""
    import torch

    from hecate.collectives.errors import ConfigError
    from hecate.trainer.device import device_type, ranks_per_gpu
    from hecate.trainer.plan import check_ranks_fit_gpu

    if device_type(cfg.train.device) == "cuda":
        sharing = ranks_per_gpu(world, simulated=True)
        total = torch.cuda.get_device_properties(0).total_memory
        check_ranks_fit_gpu(cfg, dims, cfg.model.vocab_for(_vocab_size(cfg.data)), sharing, total)
        if sharing > 1 and cfg.collectives.transport == "cupy":
            raise ConfigError(
                "collectives.transport",
                f"cupy builds NCCL communicators, and NCCL refuses two ranks of one on one GPU: --simulate {world} "
                f"puts {sharing} ranks on each GPU; use collectives.transport=torch (exchanges through host memory)",
            )


def _train_launched(args: argparse.Namespace, cfg) -> dict:
    """Validate here, then let mpirun / Ray start the workers; the summary comes back through the run folder."""
    from hecate.parallel.tensor_parallel import check_tensor_parallel
    from hecate.trainer.plan import layout_of
    from hecate.trainer.train import prepare_run_dir

    if args.workers is None or args.workers < 1:
        raise HecateError(f"--launcher {args.launcher} needs --workers N (N >= 1)")
    if args.launcher == "ray" and not args.address:
        raise HecateError("--launcher ray needs --address, the Ray dashboard's address (e.g. http://HEAD:8265)")
    dims = layout_of(cfg, args.workers)
    _check_transport(cfg, args.launcher)
    _ensure_data(cfg.data)
    check_tensor_parallel(
        dims.tp, cfg.model.vocab_for(_vocab_size(cfg.data)), cfg.model.dense_ffn_dim, cfg.model.kv_heads
    )
    run_dir = Path(cfg.train.run_dir)
    prepare_run_dir(run_dir, args.resume, args.fresh)
    worker_args = _worker_args(args.config, args.override, args.resume)
    if args.launcher == "mpi":
        from hecate.launch.mpi import run_mpi

        run_mpi(args.workers, worker_args, run_dir)
    else:
        from hecate.launch.ray_job import submit

        submit(
            args.address,
            args.workers,
            worker_args,
            run_dir,
            gpus_per_worker=args.gpus_per_worker,
            cpus_per_worker=args.cpus_per_worker,
            placement=args.placement,
            max_restarts=args.max_restarts,
        )
    return json.loads((run_dir / "summary.json").read_text())


def _check_transport(cfg, launcher: str) -> None:
    """Refuse, before any worker starts, a ``collectives.transport`` that the chosen launcher cannot provide."""
    from hecate.collectives.cupy_transport import load_cupy_nccl
    from hecate.collectives.errors import ConfigError

    if cfg.collectives.transport == "mpi" and launcher != "mpi":
        raise ConfigError(
            "collectives.transport",
            f"mpi needs workers started by mpirun, not by {launcher}: use "
            f"--launcher mpi, or collectives.transport=torch",
        )
    if cfg.collectives.transport == "cupy" and launcher == "simulate":
        load_cupy_nccl()  # simulated ranks run here: without a GPU, say so now


def _worker_args(config: str, overrides: list[str], resume: bool) -> list[str]:
    """``CONFIG -o ... [--resume]`` for ``python -m hecate.launch.worker``, with the config's absolute path."""
    args = [str(Path(config).resolve())]
    for item in overrides:
        args += ["-o", item]
    return args + (["--resume"] if resume else [])


def cmd_sbatch(args: argparse.Namespace) -> int:
    from hecate.launch.slurm import BatchJob, submit, write_script
    from hecate.trainer.config import load_config
    from hecate.trainer.plan import layout_of

    cfg = load_config(args.config, args.override)
    tasks = args.tasks_per_node if args.tasks_per_node is not None else (args.gpus_per_node or 1)
    if args.nodes < 1 or tasks < 1 or args.gpus_per_node < 0:
        raise HecateError(
            f"--nodes {args.nodes} / --tasks-per-node {tasks} / --gpus-per-node {args.gpus_per_node}: "
            f"nodes and tasks must be >= 1, GPUs >= 0"
        )
    layout_of(cfg, args.nodes * tasks)
    run_dir = Path(cfg.train.run_dir)
    job = BatchJob(
        job_name=args.job_name or f"hecate-{run_dir.name}",
        nodes=args.nodes,
        tasks_per_node=tasks,
        gpus_per_node=args.gpus_per_node,
        workdir=Path.cwd(),
        output=Path(f"{run_dir}.slurm-%j.out"),
        worker_args=_worker_args(args.config, args.override, args.resume),
        partition=args.partition,
        time=args.time,
        account=args.account,
    )
    path = write_script(
        job, Path(args.out or f"{run_dir}.sbatch"), "hecate " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    )
    print(f"wrote {path} ({job.workers} workers: {job.nodes} node(s) x {tasks})")
    if args.submit:
        print(f"submitted job {submit(path)}; its output goes to {str(job.output).replace('%j', '<job id>')}")
    return 0


def _check_data(data) -> None:
    """Refuse, before anything is written, a missing ``data.dir`` that the config does not ask to prepare."""
    from hecate.collectives.errors import ConfigError
    from hecate.trainer.data import MANIFEST_FILE

    if not (Path(data.dir) / MANIFEST_FILE).is_file() and not data.may_prepare:
        raise ConfigError(
            "data.dir",
            f"{data.dir} holds no prepared data (no {MANIFEST_FILE}): prepare it with "
            f"`hecate prepare-data --input ... --out {data.dir}`, set data.prepare=true to "
            f"prepare it from data.inputs={data.inputs}, or fix the path",
        )


def _ensure_data(data) -> None:
    """Prepare ``data.dir`` from ``data.inputs`` when it holds no complete dataset yet and may be prepared."""
    from hecate.trainer.data import MANIFEST_FILE, load_manifest, prepare_data

    _check_data(data)
    if not (Path(data.dir) / MANIFEST_FILE).is_file():
        logging.getLogger("hecate").info("no prepared data in %s: preparing it from %s", data.dir, data.inputs)
        prepare_data(data.inputs, Path(data.dir), vocab_size=data.vocab_size, val_fraction=data.val_fraction)
    load_manifest(Path(data.dir))


def cmd_prepare_data(args: argparse.Namespace) -> int:
    from hecate.trainer.data import prepare_data

    manifest = prepare_data(
        args.input,
        Path(args.out),
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        tokenizer=args.tokenizer,
        text_field=args.text_field,
        workers=args.workers,
    )
    splits = {
        split: {k: entry[k] for k in ("documents", "tokens", "bytes")} for split, entry in manifest["splits"].items()
    }
    print(
        json.dumps(
            {"vocab_size": manifest["vocab_size"], **splits, "gzip9_val_bpb": manifest["gzip9_val_bpb"]}, indent=1
        )
    )
    return 0


def _check_out(out: Path, marker: str) -> None:
    """Write only into a new or empty folder, or an earlier output of the same command (holding ``marker``)."""
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / marker).is_file())):
        raise HecateError(
            f"--out {out} exists and is not an earlier export (no {marker}): export into a new "
            f"or empty folder, so that nothing else is overwritten"
        )


def cmd_export(args: argparse.Namespace) -> int:
    from hecate.trainer.export import CONFIG_FILE, WEIGHTS_FILE, export_run

    out = Path(args.out)
    if args.format == "hf":
        from hecate.trainer.hf.exporter import export_hf
        from hecate.trainer.hf.reader import INDEX_FILE

        _check_out(out, INDEX_FILE)
        config = export_hf(Path(args.run_dir), out)
        print(f"wrote {out} ({config['model_type']}, {config['tensors']} tensors, step {config['step']})")
        return 0
    _check_out(out, WEIGHTS_FILE)
    config = export_run(Path(args.run_dir), out)
    print(
        f"wrote {out / WEIGHTS_FILE} ({len(config['parameters'])} tensors, step {config['step']}) and "
        f"{out / CONFIG_FILE}"
    )
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from hecate.trainer.export import WEIGHTS_FILE
    from hecate.trainer.hf.importer import MODEL_CONFIG_FILE, import_hf

    out = Path(args.out)
    _check_out(out, WEIGHTS_FILE)
    if args.seq_len is not None and args.seq_len < 1:
        raise HecateError(f"--seq-len must be >= 1, got {args.seq_len}")
    config = import_hf(Path(args.hf_dir), out, args.seq_len)
    print(
        f"wrote {out} ({config['hf_family']}, {len(config['parameters'])} tensors; peak memory "
        f"{config['peak_rss_mib']:.0f} MiB); train from it with: hecate train {out / MODEL_CONFIG_FILE} "
        f"-o data.dir=DATA --init-from {out}"
    )
    return 0


def cmd_checkpoints(args: argparse.Namespace) -> int:
    from hecate.trainer.checkpoint import checkpoint_statuses

    root = Path(args.run_dir) / "checkpoints"
    statuses = checkpoint_statuses(root)
    if not statuses:
        raise HecateError(f"{args.run_dir} holds no checkpoints (no {root} with step_* folders)")
    for path, status in statuses:
        print(f"{path.name}  {status}")
    usable = [path for path, status in statuses if status == "ok"]
    print(f"a resume would load {usable[-1].name}" if usable else "no usable checkpoint: a resume would fail")
    return 0 if statuses[-1][1] == "ok" else 1


def cmd_generate(args: argparse.Namespace) -> int:
    from hecate.trainer.generate import check_sampling, generate_stream, load_trained

    check_sampling(args.prompt, args.max_new_tokens, args.temperature, args.top_k)
    model, tokenizer, step = load_trained(Path(args.run_dir))
    print(f"# {args.run_dir}, checkpoint of step {step}", file=sys.stderr)
    for text in generate_stream(
        model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed
    ):
        print(text, end="", flush=True)
    print()
    return 0


MAX_SIMULATED_PER_CORE = 8  # beyond this the processes only fight for the cores and memory
SIMULATE_TIMEOUT_S = (
    7 * 24 * 3600.0
)  # a job's wall-clock limit belongs to the scheduler; hangs end by collective timeouts

COMMANDS = {
    "train": cmd_train,
    "prepare-data": cmd_prepare_data,
    "generate": cmd_generate,
    "plan": cmd_plan,
    "sbatch": cmd_sbatch,
    "export": cmd_export,
    "import-hf": cmd_import_hf,
    "simulate": cmd_simulate,
    "checkpoints": cmd_checkpoints,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except HecateError as err:
        if args.debug:
            raise
        print(f"hecate: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hecate: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
