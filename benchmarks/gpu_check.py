"""Question: does Hecate train right and fast on a GPU? One command for a machine with at least one CUDA GPU,
written to finish in under 8 minutes; it has not been run yet (no GPU was available where it was written).

    python benchmarks/gpu_check.py --out runs/gpu_check        # or: make gpu-check

Without a GPU it prints one line and exits with status 2. It writes ``gpu_check.json`` (one row per figure) and
``gpu_check.md`` (the same as a table) into ``--out``. The checks:

a. the demo config (examples/tiny.yaml), 100 steps bf16 on one GPU: tokens/s, MFU (model FLOPs, see
   hecate/trainer/flops.py), peak memory; then 10 steps fp32 with TF32 off on the GPU and on the CPU, whose losses
   must agree within 1e-3 relative.
b. the simulated mode, 2 and 4 ranks - ep, FSSDP with skewed routing, tp=2, pp=2 - 5 steps fp32: losses equal
   a 1-rank GPU run within 1e-5 relative. With fewer GPUs than ranks the ranks share them, each capped to its
   share of memory, exchanging through host memory (hecate/collectives/host_staged.py); with enough GPUs, NCCL.
c. the MoE layer alone, bf16 forward + backward, hidden 2048, SwiGLU experts of 8192, 16 experts, top-2, 16384
   tokens: time and MFU, and DeepSpeed-MoE on the same shapes when deepspeed is installed.
d. the cupy NCCL transport's collectives on CUDA tensors equal torch's NCCL ones (as many ranks as GPUs, up to 4).

``--smoke`` runs every check at toy sizes on the CPU to test this script; its rows say device "cpu" and are
no GPU figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "tiny.yaml"
SKEW = [2.0, 1.2, 0.6, 0.0, -0.4, -0.8, -1.2, -1.6]  # router selection offsets, as the parity tests use
LOSS_RTOL_VS_CPU = 1e-3  # fp32, TF32 off: CPU and GPU kernels sum in other orders over 10 steps
LOSS_RTOL_LAYOUTS = 1e-5  # fp32: layouts differ only in the order of sums (tests/parity.py)
WARMUP_STEPS = 10
LAYOUTS = {
    "ep": lambda world: [f"parallel.ep={world}"],
    "fssdp-skewed": lambda world: ["fssdp.policy=fssdp"],
    "tp2": lambda world: ["parallel.tp=2"],
    "pp2": lambda world: ["parallel.pp=2", "train.grad_accum=2"],
}
SMALL = [  # section b's model: small enough that 4 ranks start and train in seconds
    "model.dim=128",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.seq_len=64",
    "model.dense_ffn_dim=256",
    "moe.num_experts=8",
    "moe.top_k=2",
    "moe.ffn_dim=128",
    "train.global_batch=8",
    "train.dtype=fp32",
    "train.eval_batches=1",
    "optim.warmup_steps=1",
]
QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.plots=false", "checkpoint.every=0"]


def hecate_train(run_dir: Path, overrides: list[str]) -> list[dict]:
    """``hecate train examples/tiny.yaml`` with ``overrides``; the step records of its metrics.jsonl."""
    command = [str(Path(sys.executable).parent / "hecate"), "train", str(DEMO), "--fresh"]
    for item in [f"train.run_dir={run_dir}", "train.eval_every=0", "train.eval_batches=1", *QUIET, *overrides]:
        command += ["-o", item]
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [line for line in lines if "step_time_s" in line]


def check_demo(out: Path, device: str, steps: int) -> list[dict]:
    """a: throughput, MFU and memory in bf16; fp32 losses on the device against the CPU's."""
    records = hecate_train(out / "a_bf16", [f"train.device={device}", "train.dtype=bf16", f"train.steps={steps}"])
    measured = records[min(WARMUP_STEPS, len(records) - 1) :]
    rows = [
        row("a", "demo bf16 tokens/s", statistics.median(r["tokens_per_s"] for r in measured), "tokens/s"),
        row("a", "demo bf16 MFU", statistics.median(r["mfu"] for r in measured), "fraction"),
        row("a", "demo bf16 peak memory", max(r.get("peak_memory_bytes", 0) for r in records) / 2**30, "GiB"),
    ]
    fp32 = ["train.dtype=fp32", "train.steps=10"]
    on_device = [r["loss"] for r in hecate_train(out / "a_fp32_device", [f"train.device={device}", *fp32])]
    on_cpu = [r["loss"] for r in hecate_train(out / "a_fp32_cpu", ["train.device=cpu", *fp32])]
    worst = max(abs(g - c) / abs(c) for g, c in zip(on_device, on_cpu, strict=True))
    rows.append(
        row(
            "a",
            "demo fp32 first 10 losses vs CPU, max relative difference",
            worst,
            "relative",
            passed=worst <= LOSS_RTOL_VS_CPU,
            limit=LOSS_RTOL_VS_CPU,
        )
    )
    return rows


def layout_losses(cfg_dict: dict, device_type: str) -> list[float]:
    """One rank of a section-b run: this rank's device as a launched worker picks it, skewed routing, the
    step's losses."""
    import torch.distributed as dist

    from hecate.launch.environment import detect
    from hecate.launch.worker import init_distributed, process_group_backend
    from hecate.parallel.parallelize import Parallel
    from hecate.trainer.config import config_from_dict
    from hecate.trainer.device import select_device
    from hecate.trainer.plan import layout_of
    from hecate.trainer.train import Trainer

    cfg = config_from_dict(cfg_dict)
    env = detect()
    device = select_device(device_type, env.local_rank, env.local_world_size, simulated=True)
    init_distributed(env, cfg.train.collective_timeout_s, process_group_backend(device, env.local_world_size))
    try:
        parallel = Parallel.from_world(
            layout_of(cfg, dist.get_world_size()), cfg.parallel, cfg.moe, cfg.fssdp, device=device
        )
        trainer = Trainer(cfg, parallel=parallel)
        for layer in trainer.model.moe_layers().values():
            layer.router.expert_bias.copy_(torch.tensor(SKEW[: cfg.moe.num_experts], device=device))
        return [trainer.train_step(step).loss for step in range(cfg.train.steps)]
    finally:
        dist.destroy_process_group()


def check_layouts(out: Path, device: str, worlds: list[int]) -> list[dict]:
    """b: every layout on 2 and 4 ranks against one rank, fp32."""
    from hecate.launch.simulate import start_workers
    from hecate.trainer.config import load_config

    def run(name: str, world: int, overrides: list[str]) -> list[float]:
        cfg = load_config(
            DEMO, [f"train.run_dir={out / f'b_{name}_{world}'}", "train.steps=5", *SMALL, *QUIET, *overrides]
        )
        group = start_workers(layout_losses, world, (cfg.to_dict(), device), backend=None)
        return group.join(timeout_s=300)[0]

    prepare_demo_data()
    reference = run("reference", 1, [])
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    rows = []
    for world in worlds:
        for name, layout in LAYOUTS.items():
            how = f"{world} ranks on {gpus} GPU(s), host-staged" if world > gpus else f"{world} GPUs, NCCL"
            how = how if device == "cuda" else f"{world} CPU ranks, gloo"
            what = f"{name}, {how}: first 5 losses vs 1 rank, max relative difference"
            losses = run(name, world, layout(world))
            worst = max(abs(g - w) / abs(w) for g, w in zip(losses, reference, strict=True))
            rows.append(row("b", what, worst, "relative", passed=worst <= LOSS_RTOL_LAYOUTS, limit=LOSS_RTOL_LAYOUTS))
    return rows


def prepare_demo_data() -> None:
    """The demo's data, prepared as ``hecate train`` prepares it when it is missing."""
    from hecate.trainer.config import load_config
    from hecate.trainer.data import MANIFEST_FILE, prepare_data

    data = load_config(DEMO).data
    if not (ROOT / data.dir / MANIFEST_FILE).is_file():
        prepare_data(data.inputs, ROOT / data.dir, vocab_size=data.vocab_size, val_fraction=data.val_fraction)


def check_moe_layer(device: str, dim: int, hidden: int, experts: int, tokens: int, repeats: int) -> list[dict]:
    """c: the MoE layer alone, bf16 autocast, forward + backward; DeepSpeed-MoE beside it when installed."""
    from hecate.parallel.config import MoEConfig
    from hecate.parallel.moe import MoE
    from hecate.trainer.flops import peak_flops

    top_k = 2
    torch.manual_seed(0)
    flops = 3 * tokens * (2 * dim * experts + top_k * 2 * 2 * dim * hidden * 1.5)  # router + SwiGLU experts
    peak, source = peak_flops(torch.device(device), "bf16")
    layer = MoE(dim, MoEConfig(num_experts=experts, top_k=top_k, ffn_dim=hidden, activation="swiglu")).to(device)
    x = torch.randn(tokens, dim, device=device, requires_grad=True)
    seconds = time_fwd_bwd(lambda: layer(x.view(1, tokens, dim)), device, repeats)
    rows = [
        row("c", f"Hecate MoE layer fwd+bwd ({layer.experts.unbound().gemm} GEMMs)", seconds * 1e3, "ms"),
        row("c", "Hecate MoE layer MFU", flops / seconds / peak, "fraction", note=f"peak: {source}"),
    ]
    rows += deepspeed_moe_rows(device, dim, hidden, experts, top_k, tokens, repeats, flops, peak)
    return rows


def time_fwd_bwd(forward, device: str, repeats: int) -> float:
    """Median seconds of forward + backward (a sum of the output as the loss), after one warm-up."""
    times = []
    for i in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            out = forward()
        (out[0] if isinstance(out, tuple) else out).float().sum().backward()
        synchronize(device)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def deepspeed_moe_rows(device, dim, hidden, experts, top_k, tokens, repeats, flops, peak) -> list[dict]:
    """DeepSpeed-MoE's layer (ep_size=1, no token dropping) with the same SwiGLU experts, in this process."""
    try:
        import deepspeed
        from deepspeed.moe.layer import MoE as DeepSpeedMoE
    except ImportError as err:
        return [row("c", "DeepSpeed-MoE fwd+bwd", None, "ms", note=f"not run: deepspeed is not installed ({err})")]
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.update(
            {
                "RANK": "0",
                "WORLD_SIZE": "1",
                "LOCAL_RANK": "0",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": os.environ.get("MASTER_PORT", "29517"),
            }
        )
        deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
    layer = DeepSpeedMoE(
        dim,
        SwiGLU(dim, hidden),
        num_experts=experts,
        ep_size=1,
        k=top_k,
        capacity_factor=float(experts),
        drop_tokens=False,
    ).to(device)
    x = torch.randn(1, tokens, dim, device=device, requires_grad=True)
    seconds = time_fwd_bwd(lambda: layer(x), device, repeats)
    return [
        row("c", "DeepSpeed-MoE fwd+bwd", seconds * 1e3, "ms"),
        row("c", "DeepSpeed-MoE MFU", flops / seconds / peak, "fraction"),
    ]


class SwiGLU(torch.nn.Module):
    """The expert DeepSpeed replicates: (silu(x w1) * x w3) w2, as Hecate's SwiGLU expert."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = torch.nn.Linear(dim, hidden, bias=False)
        self.w3 = torch.nn.Linear(dim, hidden, bias=False)
        self.w2 = torch.nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))


def transports_agree(device_type: str) -> dict[str, bool]:
    """One rank of section d: every collective through cupy NCCL and through torch NCCL on the same inputs."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from hecate.collectives import CupyNcclTransport, PeerOp, TorchTransport
    from hecate.launch.environment import detect
    from hecate.launch.worker import init_distributed, process_group_backend
    from hecate.trainer.device import select_device

    env = detect()
    device = select_device(device_type, env.local_rank, env.local_world_size)
    init_distributed(env, 120.0, process_group_backend(device, env.local_world_size))
    try:
        mesh = init_device_mesh(device.type, (env.world_size,), mesh_dim_names=("all",))
        rank, world = env.rank, env.world_size
        kinds = {"torch": TorchTransport.from_mesh(mesh, "all"), "cupy": CupyNcclTransport.from_mesh(mesh, "all")}
        results: dict[str, dict[str, list]] = {}
        for kind, transport in kinds.items():
            gen = torch.Generator(device="cpu").manual_seed(rank)
            data = torch.randn(6 * world, generator=gen).to(device)
            out: dict[str, list] = {}
            splits = [(rank + peer) % 3 for peer in range(world)]  # uneven, some empty
            receive = [(peer + rank) % 3 for peer in range(world)]
            out["all_to_all"] = (
                transport.all_to_all(
                    torch.empty(sum(receive), device=device), data[: sum(splits)].clone(), receive, splits
                )
                .wait()
                .tolist()
            )
            out["all_gather"] = transport.all_gather(torch.empty(6 * world, device=device), data[:6].clone()).wait()
            out["reduce_scatter"] = transport.reduce_scatter(torch.empty(6, device=device), data.clone()).wait()
            out["all_reduce_bf16"] = transport.all_reduce(data.bfloat16()).wait().float()
            out["broadcast"] = transport.broadcast(data.clone(), 0).wait()
            peer = (rank + 1) % world
            received = torch.empty(6, device=device)
            transport.batch_p2p(
                [PeerOp("send", data[:6].clone(), peer), PeerOp("recv", received, (rank - 1) % world)]
            ).wait()
            out["batch_p2p"] = received
            results[kind] = {name: torch.as_tensor(v).tolist() for name, v in out.items()}
        return {name: results["torch"][name] == results["cupy"][name] for name in results["torch"]}
    finally:
        dist.destroy_process_group()


def check_transports(device: str) -> list[dict]:
    """d: cupy NCCL against torch NCCL, on every visible GPU (up to 4)."""
    from hecate.collectives.cupy_transport import load_cupy_nccl
    from hecate.collectives.errors import TransportUnavailable
    from hecate.launch.simulate import start_workers

    try:
        load_cupy_nccl()
    except TransportUnavailable as err:
        return [row("d", "cupy NCCL collectives equal torch NCCL", None, "", note=f"not run: {err}")]
    world = min(4, torch.cuda.device_count())
    agree = start_workers(transports_agree, world, (device,), backend=None).join(timeout_s=300)
    return [
        row(
            "d",
            f"cupy NCCL {name} equals torch NCCL ({world} ranks)",
            float(all(a[name] for a in agree)),
            "1 = equal",
            passed=all(a[name] for a in agree),
        )
        for name in agree[0]
    ]


def row(
    section: str,
    what: str,
    value: float | None,
    unit: str,
    passed: bool | None = None,
    limit: float | None = None,
    note: str = "",
) -> dict:
    return {
        "section": section,
        "check": what,
        "value": value,
        "unit": unit,
        "passed": passed,
        "limit": limit,
        "note": note,
    }


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def markdown(rows: list[dict], device_name: str, command: str) -> str:
    lines = [
        f"# gpu_check on {device_name}",
        "",
        f"`{command}`",
        "",
        "| section | check | value | unit | passed | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        value = "-" if r["value"] is None else f"{r['value']:.4g}"
        passed = "" if r["passed"] is None else ("yes" if r["passed"] else "NO")
        lines.append(f"| {r['section']} | {r['check']} | {value} | {r['unit']} | {passed} | {r['note']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check")
    parser.add_argument("--sections", default="abcd", help="which checks to run, e.g. ac")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: tests this script only")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False): nothing measured", file=sys.stderr)
        return 2
    device = "cpu" if args.smoke else "cuda"
    device_name = "CPU (smoke run: no GPU figures)" if args.smoke else torch.cuda.get_device_name(0)
    args.out.mkdir(parents=True, exist_ok=True)
    started, rows = time.perf_counter(), []
    if "a" in args.sections:
        rows += check_demo(args.out, device, steps=3 if args.smoke else 100)
    if "b" in args.sections:
        rows += check_layouts(args.out, device, [2] if args.smoke else [2, 4])
    if "c" in args.sections:
        shape = (64, 128, 4, 256, 1) if args.smoke else (2048, 8192, 16, 16384, 5)
        rows += check_moe_layer(device, *shape)
    if "d" in args.sections:
        rows += check_transports(device)
    seconds = time.perf_counter() - started
    rows.append(row("-", "wall time of the whole check", seconds, "s"))
    command = " ".join(["python benchmarks/gpu_check.py", *sys.argv[1:]])
    for r in rows:
        r.update(device=device_name, command=command, torch=torch.__version__)
    (args.out / "gpu_check.json").write_text(json.dumps(rows, indent=1) + "\n")
    table = markdown(rows, device_name, command)
    (args.out / "gpu_check.md").write_text(table)
    print(table)
    failed = [r for r in rows if r["passed"] is False or (isinstance(r["value"], float) and math.isnan(r["value"]))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
