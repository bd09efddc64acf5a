"""Train a character-level GPT on Shakespeare with funczero.

One process on the CPU (the README's main job):

    python examples/train_gpt.py

Several processes and any ZeRO stage, from a DeepSpeed-style config:

    funczero launch --num_gpus 2 examples/train_gpt.py --config examples/configs/zero3.json
    torchrun --nproc_per_node 2 examples/train_gpt.py --config examples/configs/zero3.json

Checkpoints every ``--save-every`` steps into ``--save-dir``; ``--resume`` continues from the
latest one exactly (step, weights, optimizer, LR schedule, loss scale, RNG and data position).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

import funczero
from funczero.config import Config
from funczero.models.gpt import GPT, GPTConfig, cross_entropy_loss
from funczero.train.metrics import read_metrics

HERE = Path(__file__).resolve().parent


class CharDataset:
    """Non-overlapping windows of ``seq_len + 1`` characters: (input ids, next-char targets)."""

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(HERE / "configs" / "fp32.json"))
    ap.add_argument("--data", default=str(HERE / "data" / "shakespeare.txt"))
    ap.add_argument("--steps", type=int, default=None, help="default: the scheduler's total_num_steps")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=None, help="default: steps_per_print")
    ap.add_argument("--save-dir", default=None, help="checkpoint directory (off when unset)")
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--keep-last", type=int, default=3)
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # launchers
    args = ap.parse_args()

    topo = funczero.init_distributed()
    config = Config.load(args.config, world_size=topo.world_size)
    steps = args.steps
    if steps is None:
        params = config.scheduler.params if config.scheduler else {}
        steps = int(params.get("total_num_steps", 600))

    dataset = CharDataset(Path(args.data).read_text(encoding="utf-8"), args.seq_len)
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
    run = funczero.initialize(model, config, cross_entropy_loss, training_data=dataset, seed=args.seed)
    state, train_step, loader = run.state, run.train_step, run.loader
    assert loader is not None

    if args.resume:
        if not args.save_dir:
            raise SystemExit("--resume needs --save-dir (where the checkpoints are)")
        from funczero import checkpoint

        state, client = checkpoint.load(args.save_dir, like=state)
        loader.load_state_dict(client["loader"])
        if topo.rank == 0:
            print(f"resumed from step {int(state.step)}", flush=True)

    if topo.rank == 0:
        print(
            f"funczero: {n_params / 1e6:.2f}M params, world size {topo.world_size}, "
            f"ZeRO stage {config.zero.stage}, {config.precision}, "
            f"{config.train_batch_size} sequences x {args.seq_len} chars per step",
            flush=True,
        )
    every = args.log_every or config.steps_per_print or 50
    tokens_per_step = config.train_batch_size * args.seq_len
    start = int(state.step)
    t0, last = time.perf_counter(), start
    metrics: dict[str, torch.Tensor] = {}
    for step in range(start, steps):
        state, metrics = train_step(state, loader.next_batch())  # across epochs
        done = step + 1
        if done % every == 0 or done == steps:
            # The only host sync: once per steps_per_print (skipped steps are counted in state).
            m = read_metrics(
                metrics, step=done, raise_at_min_scale=config.funczero.raise_at_min_loss_scale
            )
            loss = m["loss"]
            dt = time.perf_counter() - t0
            if topo.rank == 0:
                print(
                    f"step {done:5d} | loss {loss:.4f} | lr {m['lr']:.2e} | "
                    f"grad norm {m['grad_norm']:.3f} | skipped {int(state.skipped)} | "
                    f"{tokens_per_step * (done - last) / dt:,.0f} tokens/s",
                    flush=True,
                )
            if not math.isfinite(loss):
                raise SystemExit(f"loss is {loss} at step {done}; stopping")
            t0, last = time.perf_counter(), done
        if args.save_dir and (done % args.save_every == 0 or done == steps):
            from funczero import checkpoint

            checkpoint.save(
                args.save_dir,
                state,
                client_state={"loader": loader.state_dict()},
                keep_last=args.keep_last,
                config=config.to_dict(),
            )


if __name__ == "__main__":
    main()
