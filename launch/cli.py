"""The ``hecate`` command. Each subcommand validates its input first, then does one thing; user errors
are printed as one line without a traceback (``--debug`` shows it)."""
from __future__ import annotations

import argparse
import json
import logging
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
  hecate plan examples/tiny.yaml --world 4 -o parallel.ep=4   # rank groups and memory per rank
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hecate", description="Train Mixture-of-Experts transformers with sparse expert materialization.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show Python tracebacks")

    train = sub.add_parser("train", parents=[common], help="train a model from a YAML config",
                           description="Train a model. Unknown keys, wrong types and impossible values in the "
                                       "config are rejected before anything starts.")
    train.add_argument("config", help="YAML config, e.g. examples/tiny.yaml")
    train.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. -o moe.num_experts=16 (repeatable)")
    mode = train.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from the run folder's last complete checkpoint")
    mode.add_argument("--fresh", action="store_true", help="delete the run folder first and start over")
    train.add_argument("--simulate", type=int, default=None, metavar="N",
                       help="run N worker processes on this machine (gloo), as N ranks of a cluster")

    prep = sub.add_parser("prepare-data", parents=[common], help="collect text, train a BPE tokenizer, write token shards",
                          description="Collect text files, train a byte-level BPE tokenizer on the training "
                                      "split, write memory-mapped token shards and a manifest.")
    prep.add_argument("--input", nargs="+", default=["stdlib"], metavar="stdlib|PATH",
                      help="'stdlib' (the running Python's standard library .py files) and/or files or folders")
    prep.add_argument("--out", default="data/stdlib", help="output folder (default: data/stdlib)")
    prep.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default: 8192)")
    prep.add_argument("--val-fraction", type=float, default=0.05, help="share of files held out (default: 0.05)")

    gen = sub.add_parser("generate", parents=[common], help="sample text from a run's latest checkpoint")
    gen.add_argument("run_dir", help="a run folder (train.run_dir), e.g. runs/tiny")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=50, help="0 = no top-k filtering")
    gen.add_argument("--seed", type=int, default=0)
    plan = sub.add_parser("plan", parents=[common], help="show the rank groups and memory per rank of a layout",
                          description="Validate a config's parallel layout for a world size and print which "
                                      "ranks form each group and an estimate of the memory each rank holds.")
    plan.add_argument("config", help="YAML config")
    plan.add_argument("--world", type=int, required=True, help="number of ranks (processes / GPUs)")
    plan.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    plan.add_argument("--vocab-size", type=int, default=None,
                      help="vocabulary size (default: from the prepared data, else data.vocab_size)")
    return parser


def cmd_plan(args: argparse.Namespace) -> int:
    from hecate.trainer.config import load_config
    from hecate.trainer.plan import describe_plan

    cfg = load_config(args.config, args.override)
    vocab = args.vocab_size
    if vocab is None:
        manifest = Path(cfg.data.dir) / "manifest.json"
        vocab = json.loads(manifest.read_text())["vocab_size"] if manifest.is_file() else cfg.data.vocab_size
    print(describe_plan(cfg, args.world, vocab))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from hecate.trainer.config import load_config
    from hecate.trainer.log import setup_logging
    from hecate.trainer.train import Trainer

    cfg = load_config(args.config, args.override)
    setup_logging(None, rank=0, level=cfg.logging.level)
    if args.simulate is not None:
        summary = _train_simulated(cfg, args.simulate, args.resume, args.fresh)
    else:
        _ensure_data(cfg.data)
        trainer = Trainer(cfg, resume=args.resume, fresh=args.fresh)
        setup_logging(trainer.run_dir, rank=0, level=cfg.logging.level)
        logging.getLogger("hecate").info("run folder %s; %s", trainer.run_dir, trainer.describe())
        summary = trainer.run()
    gzip = summary.get("gzip9_val_bpb")
    print(f"done: {summary['steps']} steps in {summary['train_seconds']:.0f} s; held-out val_loss "
          f"{summary['val_loss']:.3f} nats/token, {summary['val_bpb']:.3f} bits/byte"
          + (f" (gzip -9 on the same files: {gzip:.3f} bits/byte)" if gzip else ""))
    return 0


def _train_simulated(cfg, world: int, resume: bool, fresh: bool) -> dict:
    """Validate everything here, then run ``world`` workers on this machine; the first failure stops all."""
    import os

    from hecate.launch.simulate import start_workers
    from hecate.launch.worker import train_worker
    from hecate.trainer.plan import layout_of
    from hecate.trainer.train import prepare_run_dir

    cores = os.cpu_count() or 1
    if not 1 <= world <= MAX_SIMULATED_PER_CORE * cores:
        raise HecateError(f"--simulate {world}: this machine has {cores} cores; simulate between 1 and "
                          f"{MAX_SIMULATED_PER_CORE * cores} ranks")
    layout_of(cfg, world)
    _ensure_data(cfg.data)
    prepare_run_dir(Path(cfg.train.run_dir), resume, fresh)
    group = start_workers(train_worker, world, (cfg.to_dict(), resume), threads_per_worker=max(1, cores // world))
    return group.join(timeout_s=SIMULATE_TIMEOUT_S)[0]


def _ensure_data(data) -> None:
    """Prepare ``data.dir`` from ``data.inputs`` when it holds no complete dataset yet."""
    from hecate.trainer.data import load_manifest, prepare_data

    if not (Path(data.dir) / "manifest.json").is_file():
        logging.getLogger("hecate").info("no prepared data in %s: preparing it from %s", data.dir, data.inputs)
        prepare_data(data.inputs, Path(data.dir), vocab_size=data.vocab_size, val_fraction=data.val_fraction)
    load_manifest(Path(data.dir))


def cmd_prepare_data(args: argparse.Namespace) -> int:
    from hecate.trainer.data import prepare_data

    manifest = prepare_data(args.input, Path(args.out), vocab_size=args.vocab_size, val_fraction=args.val_fraction)
    splits = {split: {k: entry[k] for k in ("documents", "tokens", "bytes")} for split, entry in manifest["splits"].items()}
    print(json.dumps({"vocab_size": manifest["vocab_size"], **splits, "gzip9_val_bpb": manifest["gzip9_val_bpb"]},
                     indent=1))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from hecate.trainer.generate import generate, load_trained

    model, tokenizer, step = load_trained(Path(args.run_dir))
    print(f"# {args.run_dir}, checkpoint of step {step}", file=sys.stderr)
    print(generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed))
    return 0


MAX_SIMULATED_PER_CORE = 8  # beyond this the processes only fight for the cores and memory
SIMULATE_TIMEOUT_S = 7 * 24 * 3600.0  # a job's wall-clock limit belongs to the scheduler; hangs end by collective timeouts

COMMANDS = {"train": cmd_train, "prepare-data": cmd_prepare_data, "generate": cmd_generate, "plan": cmd_plan}


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
