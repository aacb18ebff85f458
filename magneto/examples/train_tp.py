"""Train a small Magneto language model with tensor parallelism, optionally × FSDP2.

    torchrun --nproc-per-node 2 -m magneto.examples.train_tp              # TP over 2 ranks
    torchrun --nproc-per-node 4 -m magneto.examples.train_tp --tp 2       # FSDP2 2 × TP 2
    torchrun --nproc-per-node 2 -m magneto.examples.train_tp --sequence-parallel
    torchrun --nproc-per-node 2 -m magneto.examples.train_tp --sequence-parallel --norm-scheme post

gloo on CPU, NCCL on GPUs. The data are the byte corpus of ``magneto.examples.data`` (the Python
standard library's sources): every rank of one tensor-parallel group reads the same batch, the
data-parallel ranks different ones (their own generator). The validation loss at the end, then a
greedy continuation decoded with the KV cache under tensor parallelism (rank 0 prints both; every
rank computes the same).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import magneto
from magneto.examples.data import VOCAB_SIZE, fixed_windows, load_corpus, random_windows
from magneto.parallel import (
    communication_log,
    tensor_parallelize,
    vocab_parallel_argmax,
    vocab_parallel_cross_entropy,
)


def arguments() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--tp", type=int, default=0, help="tensor-parallel degree (0: all ranks)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8, help="per data-parallel rank")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--width", type=int, default=128, help="embed_dim")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--norm", default="layer", choices=("layer", "rms"))
    p.add_argument("--norm-scheme", default="subln", choices=("subln", "pre", "post", "deepnorm"))
    p.add_argument(
        "--vocab-parallel",
        action="store_true",
        help="split the embedding and output projection by vocabulary blocks (the vocabulary "
        "padded to a multiple of --tp; the padding ids are never a target)",
    )
    p.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="split the residual stream on the sequence between the blocks too (--seq-len a "
        "multiple of --tp)",
    )
    p.add_argument("--backend", default=None, help="magneto_kernels backend (default: auto)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> None:
    args = arguments().parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    world = dist.get_world_size()
    tp = args.tp or world
    if world % tp:
        raise SystemExit(f"--tp {tp} does not divide the {world} ranks")
    mesh = init_device_mesh(
        "cuda" if cuda else "cpu", (world // tp, tp), mesh_dim_names=("dp", "tp")
    )
    torch.manual_seed(args.seed)  # the same parameters on every rank before sharding
    config = magneto.MagnetoConfig(
        embed_dim=args.width,
        num_heads=args.heads,
        ffn_dim=4 * args.width,
        decoder_layers=args.layers,
        vocab_size=-(-VOCAB_SIZE // tp) * tp if args.vocab_parallel else VOCAB_SIZE,
        max_positions=args.seq_len + 32,
        norm=args.norm,
        norm_scheme=args.norm_scheme,
        backend=args.backend,
    )
    model = magneto.Decoder(config).to(device)
    tensor_parallelize(
        model,
        mesh,
        "tp",
        vocab_parallel=args.vocab_parallel,
        sequence_parallel=args.sequence_parallel,
    )
    tp_group = mesh.get_group("tp")

    def loss_of(logits, targets):
        if args.vocab_parallel:
            return vocab_parallel_cross_entropy(logits, targets, tp_group)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def argmax(logits):
        return vocab_parallel_argmax(logits, tp_group) if args.vocab_parallel else logits.argmax(-1)

    if world // tp > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    corpus = load_corpus(train_bytes=1_000_000, valid_bytes=100_000)
    generator = torch.Generator().manual_seed(args.seed + 1 + mesh["dp"].get_local_rank())
    say = print if dist.get_rank() == 0 else (lambda *a, **k: None)
    say(f"{world} ranks: data-parallel {world // tp} × tensor-parallel {tp}")
    for step in range(args.steps):
        inputs, targets = (
            t.to(device)
            for t in random_windows(corpus.train, args.batch_size, args.seq_len, generator)
        )
        with communication_log() as log:
            loss = loss_of(model(inputs)[0], targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        if step == 0 and not args.vocab_parallel:  # per layer: only the blocks communicate
            say(f"tensor-parallel collectives of one step, per layer ({inputs.numel()} rows):")
            for name in ("all_reduce", "all_gather", "reduce_scatter"):
                sizes = [b for n, b in log if n == name]
                say(
                    f"  {name}: {len(sizes) // args.layers} calls, "
                    f"{sum(sizes) / args.layers / 2**10:.1f} KiB payload per rank"
                )
        if step % 20 == 0 or step == args.steps - 1:
            say(f"step {step:4d}  train loss {loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        inputs, targets = (t.to(device) for t in fixed_windows(corpus.valid, 16, args.seq_len))
        valid = loss_of(model(inputs)[0], targets)
        say(f"validation loss {valid.item():.3f}")
        tokens, state = torch.tensor([list(b"def ")], device=device), {}
        for _ in range(40):
            step_logits = model(tokens, incremental_state=state)[0]
            tokens = torch.cat([tokens, argmax(step_logits[:, -1]).unsqueeze(-1)], dim=1)
        say(
            "greedy:",
            repr(bytes(t for t in tokens[0].tolist() if t < 256).decode(errors="replace")),
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
