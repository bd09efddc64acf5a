"""Fine-tune a Hugging Face causal LM from a local directory with a DeepSpeed config.

The model directory is what ``save_pretrained`` or ``huggingface-cli download --local-dir``
writes (``config.json`` plus ``model.safetensors`` or a sharded index). The run loads its
weights straight into each rank's shards (``funczero.pretrained.load_pretrained``), trains on
a text file, and exports a directory that ``AutoModelForCausalLM.from_pretrained`` opens. The
model is built on the meta device, so no rank ever holds all of its weights (peak host memory
per rank: its shards plus one module).

Without a model at hand, ``--make-tiny`` first writes a tiny random Llama (byte vocabulary) to
``--model``, so the example runs offline on the CPU in seconds:

    python examples/finetune_hf.py --model /tmp/tiny-llama --make-tiny

A real model, several processes, any ZeRO stage (needs ``pip install transformers``):

    funczero launch --num_gpus 8 examples/finetune_hf.py --model Llama-3.2-1B \\
        --config examples/configs/zero3.json --data my_corpus.txt --out Llama-3.2-1B-tuned

Text is tokenised with the directory's tokenizer when it has one, else as UTF-8 bytes (a
model whose vocabulary has at least 256 entries).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import funczero
from funczero.config import Config
from funczero.pretrained import export_pretrained, load_pretrained
from funczero.train.metrics import read_metrics

HERE = Path(__file__).resolve().parent


class TokenWindows:
    """Non-overlapping windows of ``seq_len + 1`` tokens: (input ids, next-token targets)."""

    def __init__(self, ids: torch.Tensor, seq_len: int) -> None:
        if len(ids) < seq_len + 1:
            raise SystemExit(f"the text has {len(ids)} tokens, fewer than --seq-len + 1 = {seq_len + 1}")
        self.ids = ids
        self.seq_len = seq_len

    def __len__(self) -> int:
        return (len(self.ids) - 1) // self.seq_len

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.ids[i * self.seq_len : (i + 1) * self.seq_len + 1]
        return chunk[:-1], chunk[1:]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face model directory (local)")
    ap.add_argument("--make-tiny", action="store_true", help="first write a tiny random Llama to --model")
    ap.add_argument("--config", default=str(HERE / "configs" / "zero3.json"), help="DeepSpeed JSON config")
    ap.add_argument("--data", default=str(HERE / "data" / "shakespeare.txt"), help="UTF-8 text file")
    ap.add_argument("--out", default=None, help="export directory (default: <model>-finetuned)")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"], help="export dtype")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # launchers
    return ap.parse_args(argv)


def make_tiny_llama(directory: Path) -> None:
    """A 2-layer random Llama with a byte vocabulary, saved as a Hugging Face directory."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(1234)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)


def tokenizer_for(model_dir: Path, vocab_size: int) -> Callable[[str], list[int]]:
    """The directory's tokenizer, else UTF-8 bytes."""
    if (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer_config.json").is_file():
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(model_dir)
        return lambda text: tok(text)["input_ids"]
    if vocab_size < 256:
        raise SystemExit(f"{model_dir} has no tokenizer and a vocabulary of {vocab_size} < 256 bytes")
    return lambda text: list(text.encode("utf-8"))


def causal_lm_loss(model: Callable[..., Any], batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    ids, targets = batch
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def main(argv: Sequence[str] | None = None) -> Path:
    """Fine-tune and export; returns the export directory."""
    import transformers

    args = parse_args(argv)
    topo = funczero.init_distributed()
    model_dir = Path(args.model)
    if args.make_tiny and topo.rank == 0 and not (model_dir / "config.json").exists():
        make_tiny_llama(model_dir)
    if topo.world_size > 1:
        torch.distributed.barrier()  # the tiny model is written before anyone reads it
    config = Config.load(args.config, world_size=topo.world_size)

    hf_config = transformers.AutoConfig.from_pretrained(model_dir)
    tokenize = tokenizer_for(model_dir, hf_config.vocab_size)
    ids = torch.tensor(tokenize(Path(args.data).read_text(encoding="utf-8")), dtype=torch.long)
    dataset = TokenWindows(ids, args.seq_len)

    # The architecture from config.json, on the meta device: no rank ever holds the whole model.
    # initialize creates it module by module, each rank keeping only its shards (random values,
    # replaced below).
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    torch.manual_seed(args.seed)
    run = funczero.initialize(model, config, causal_lm_loss, training_data=dataset, seed=args.seed)
    start = time.perf_counter()
    # Each rank reads only its shards' bytes; donate=True writes into the state's own tensors
    # (no second copy in memory). initialize(..., init_from=model_dir) does the same in one call.
    state = load_pretrained(run.state, model_dir, plan=run.plan, donate=True)
    if topo.rank == 0:
        n = sum(math.prod(s) for _, s in state.layout.shapes)
        print(
            f"loaded {n / 1e6:.2f}M parameters from {model_dir} in {time.perf_counter() - start:.2f} s; "
            f"world size {topo.world_size}, ZeRO stage {config.zero.stage}, {config.precision}",
            flush=True,
        )

    assert run.loader is not None
    for step in range(args.steps):
        state, metrics = run.train_step(state, run.loader.next_batch())
        if step % args.log_every == 0 or step == args.steps - 1:
            m = read_metrics(metrics, step=step)
            if topo.rank == 0:
                print(f"step {step:4d} | loss {m['loss']:.4f} | lr {m['lr']:.2e}", flush=True)

    out = Path(args.out) if args.out else model_dir.with_name(model_dir.name + "-finetuned")
    export_pretrained(state, out, config_json=model_dir, dtype=args.dtype, plan=run.plan, overwrite=True)
    if topo.rank == 0:
        print(f"exported to {out} ({args.dtype}); open it with "
              f"AutoModelForCausalLM.from_pretrained({str(out)!r})", flush=True)
    return out


if __name__ == "__main__":
    main()
