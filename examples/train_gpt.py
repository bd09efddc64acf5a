"""Train a character-level GPT on Shakespeare with funczero.

One process on the CPU (the README's main job: about 30 s of CPU time, loss from about 4.4
to about 2.1):

    python examples/train_gpt.py

Several processes and any ZeRO stage, from a DeepSpeed-style config:

    funczero launch --num_gpus 2 examples/train_gpt.py --config examples/configs/zero3.json
    torchrun --nproc_per_node 2 examples/train_gpt.py --config examples/configs/zero3.json

Checkpoints every ``--save-every`` steps into ``--save-dir``; ``--resume`` continues from the
latest one exactly (step, weights, optimizer, LR schedule, loss scale, RNG and data position),
also at another world size. Metrics go to ``--run-dir``/metrics.jsonl (and to the monitors the
config enables: TensorBoard, W&B, CSV, Comet); the last 5% of the text is held out and evaluated
every ``--eval-every`` steps (``funczero.make_eval_step``: no gradients, sharded at stage 3).

Each process computes with one CPU thread unless ``--threads`` or ``OMP_NUM_THREADS`` says
otherwise: on a machine whose cores are shared (other jobs, or several ranks on few cores),
more threads than free cores make PyTorch's CPU kernels wait on each other and run several
times slower, while one thread per process stays at full speed.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

import funczero
from funczero.cli_args import add_config_arguments
from funczero.config import Config
from funczero.models.gpt import GPT, GPTConfig, cross_entropy_loss
from funczero.progress import TrainingProgress
from funczero.train.metrics import MetricsLogger

HERE = Path(__file__).resolve().parent


class CharDataset:
    """Non-overlapping windows of ``seq_len + 1`` characters: (input ids, next-char targets).

    The alphabet is the text's distinct characters, sorted (80 for examples/data/shakespeare.txt).
    """

    def __init__(self, text: str, seq_len: int) -> None:
        self.chars = sorted(set(text))
        index = {c: i for i, c in enumerate(self.chars)}
        self.data = torch.tensor([index[c] for c in text], dtype=torch.long)
        self.seq_len = seq_len

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.seq_len

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.data[i * self.seq_len : (i + 1) * self.seq_len + 1]
        return chunk[:-1], chunk[1:]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_arguments(ap, default_config=str(HERE / "configs" / "fp32.json"))
    ap.add_argument("--data", default=str(HERE / "data" / "shakespeare.txt"))
    ap.add_argument(
        "--steps", type=int, default=None, help="default: the scheduler's total_num_steps"
    )
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads", type=int, default=None,
        help="CPU threads per process (default: $OMP_NUM_THREADS if set, else 1)",
    )
    ap.add_argument("--log-every", type=int, default=None, help="default: steps_per_print")
    ap.add_argument("--run-dir", default="runs/gpt", help="metrics.jsonl and monitor output")
    ap.add_argument("--eval-every", type=int, default=100, help="held-out evaluation period")
    ap.add_argument("--save-dir", default=None, help="checkpoint directory (off when unset)")
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--keep-last", type=int, default=3)
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    return ap.parse_args()


def cpu_threads(requested: int | None) -> int:
    """``--threads``, else ``OMP_NUM_THREADS``, else 1 (see the module docstring for why)."""
    if requested is None:
        requested = int(os.environ.get("OMP_NUM_THREADS") or 1)
    if requested < 1:
        raise SystemExit(f"--threads must be at least 1, got {requested}")
    return requested


def log_line(step: int, m: dict[str, float], skipped: int, tokens_per_s: float) -> str:
    return (
        f"step {step:5d} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | "
        f"grad norm {m['grad_norm']:.3f} | skipped {skipped} | {tokens_per_s:,.0f} tokens/s"
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(cpu_threads(args.threads))
    topo = funczero.init_distributed()
    config = Config.load(args.config, world_size=topo.world_size)
    steps = args.steps
    if steps is None:
        params = config.scheduler.params if config.scheduler else {}
        steps = int(params.get("total_num_steps", 400))

    text = Path(args.data).read_text(encoding="utf-8")
    dataset = CharDataset(text, args.seq_len)
    dataset.data, held_out = dataset.data[: len(text) * 95 // 100], dataset.data[len(text) * 95 // 100 :]
    torch.manual_seed(args.seed)  # same initial weights on every rank
    model = GPT(
        GPTConfig(
            vocab_size=len(dataset.chars),
            seq_len=args.seq_len,
            d_model=args.d_model,
            n_layers=args.layers,
            n_heads=args.heads,
            dropout=args.dropout,
        )
    )
    n_params = sum(p.numel() for p in model.parameters())
    run = funczero.initialize(
        model, config, cross_entropy_loss, training_data=dataset, seed=args.seed
    )
    state, loader = run.state, run.loader
    assert loader is not None

    if args.resume:
        if not args.save_dir:
            raise SystemExit("--resume needs --save-dir (where the checkpoints are)")
        from funczero import checkpoint

        state, client = checkpoint.load(args.save_dir, like=state)
        loader.load_state_dict(client["loader"])  # also at another world size
        if topo.rank == 0:
            print(f"resumed from step {int(state.step)}", flush=True)

    if topo.rank == 0:
        print(
            f"funczero: {n_params / 1e6:.2f}M params, {len(dataset.chars)} characters, "
            f"world size {topo.world_size}, ZeRO stage {config.zero.stage}, {config.precision}, "
            f"{config.train_batch_size} sequences x {args.seq_len} chars per step, "
            f"{torch.get_num_threads()} thread(s) per process",
            flush=True,
        )
    evaluate = held_out_evaluation(run, held_out, args.seq_len, topo.rank, topo.world_size)
    train(run, state, loader, config, args, steps, topo.rank, evaluate)


def held_out_evaluation(
    run: funczero.Initialized, data: torch.Tensor, seq_len: int, rank: int, world_size: int
) -> Any:
    """``evaluate(state) -> mean held-out loss`` over every rank's share of the held-out windows."""
    windows = (len(data) - 1) // seq_len
    mine = range(rank, windows, world_size)  # each rank its own windows, 16 at most
    x = torch.stack([data[i * seq_len : (i + 1) * seq_len] for i in mine][:16])
    y = torch.stack([data[i * seq_len + 1 : (i + 1) * seq_len + 1] for i in mine][:16])
    eval_step = funczero.make_eval_step(cross_entropy_loss, run.plan)

    def evaluate(state: Any) -> float:
        run.plan.module.eval()  # no dropout
        try:
            return float(eval_step(state, (x, y))["loss"])  # a host sync: only when evaluating
        finally:
            run.plan.module.train()

    return evaluate


def train(
    run: funczero.Initialized,
    state: Any,
    loader: Any,
    config: Config,
    args: argparse.Namespace,
    steps: int,
    rank: int,
    evaluate: Any,
) -> None:
    """Steps ``state.step .. steps - 1``; logs step 0, every ``--log-every`` steps and the last."""
    every = args.log_every or config.steps_per_print or 50
    tokens_per_step = config.train_batch_size * args.seq_len
    start = int(state.step)
    begin = t0 = time.perf_counter()
    last = start
    # A progress bar on a terminal; in a log file (or under tests) only the lines below.
    bar = TrainingProgress(steps, start_step=start, mode="rich" if sys.stdout.isatty() else "off")
    logger = MetricsLogger.from_config(
        config, args.run_dir, tokens_per_sample=args.seq_len, log_every=every, timer=run.timer,
        echo=False, progress=bar,  # this script prints its own line (0-based step numbers)
    )
    with bar, logger:
        for step in range(start, steps):  # ``step`` updates are done before this one
            state, metrics = run.train_step(state, loader.next_batch())  # across epochs
            done = step + 1
            if step % every == 0 or done == steps:
                # The only host sync: once per --log-every (skipped steps are counted in state).
                m = logger.log(done, metrics, force=True)
                assert m is not None
                tokens_per_s = tokens_per_step * (done - last) / (time.perf_counter() - t0)
                if rank == 0:
                    print(log_line(step, m, int(state.skipped), tokens_per_s), flush=True)
                if not math.isfinite(m["loss"]):
                    raise SystemExit(f"loss is {m['loss']} at step {step}; stopping")
                t0, last = time.perf_counter(), done
            else:
                logger.log(done, metrics)  # counts skipped steps on the device, no sync
            if done % args.eval_every == 0 or done == steps:
                held_out = evaluate(state)
                if rank == 0:
                    print(f"held-out cross-entropy {held_out:.4f} after {done} steps", flush=True)
            if args.save_dir and (done % args.save_every == 0 or done == steps):
                from funczero import checkpoint

                checkpoint.save(
                    args.save_dir,
                    state,
                    client_state={"loader": loader.state_dict()},
                    keep_last=args.keep_last,
                    config=config.to_dict(),
                )
    elapsed = time.perf_counter() - begin
    if rank == 0 and steps > start:
        print(
            f"trained steps {start}-{steps - 1} in {elapsed:.1f} s "
            f"({tokens_per_step * (steps - start) / elapsed:,.0f} tokens/s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
