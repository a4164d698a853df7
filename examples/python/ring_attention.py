"""Ring attention on torch.distributed with kernels einfuse derives from a cascade.

    torchrun --nproc-per-node 3 examples/python/ring_attention.py --seq 768 --heads 4 --dim 64 --causal
    torchrun --nproc-per-node 2 examples/python/ring_attention.py --kernel benches/pytorch.ein:sinks --seq 512

Each process holds a shard of the queries, keys and values along the sequence. The key and value
shards travel around the ring (process r sends to r + 1 and receives from r - 1), each step's
transfer posted before the step's computation so that the two overlap. Every step runs the
*chunk* kernel of the cascade's split-key form (`einfuse.emit(..., stage="split")`: the streamed
loop over one shard of keys, returning its running maximum and sums), told where its queries sit
relative to its keys (`offsets`), so that causal masks, sliding windows and ALiBi, which read the
distance `m - p`, see global distances.
At the end, the *merge* kernel einfuse derived combines every step's partial results. Any cascade
the split form accepts runs this way, not only softmax.

With `--causal`, the sequence is cut into 2W blocks and process r holds blocks r and 2W - 1 - r
(zigzag sharding): every process then has the same work at every step. Pairs of blocks whose keys
all come after the queries are skipped.

Rank 0 compares the gathered result with the whole cascade run in one process on the same inputs
(and, for the built-in kernel, with PyTorch's SDPA), and prints as its last line
`max_abs_diff=<number> seconds=<number>` (seconds: the slowest process's ring, barrier to barrier).

The shards are float32 CPU tensors and the processes talk through gloo.
"""

import argparse
import math
import os
import sys
import time

import torch
import torch.distributed as dist

import einfuse

#: Keys per chunk of the split form: the optimizer's tile, so every block must hold a multiple.
CHUNK = 64


def builtin_kernel(heads, dim, causal):
    mask = "where m <= p" if causal else ""
    return f"""
kernel attention {{
  rank H = {heads}, E = {dim}, F = {dim}, M, P
  input Q[H, P, E], K[H, M, E], V[H, M, F]
  param scale = {1 / math.sqrt(dim)!r}
  QK[h, p, m] = Q[h, p, e] * K[h, m, e] * scale
  S[h, p, m]  = QK[h, p, m] {mask}
  GM[h, p]    = max[m](S[h, p, m])
  SN[h, p, m] = exp(S[h, p, m] - GM[h, p])
  SD[h, p]    = SN[h, p, m]
  AV[h, p, f] = SN[h, p, m] / SD[h, p] * V[h, m, f]
  output AV
}}
"""


def parse():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=768, help="sequence length (queries = keys)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64, help="head dimension")
    parser.add_argument("--causal", action="store_true", help="causal mask, zigzag sharding")
    parser.add_argument("--kernel", help="FILE:NAME, another cascade (queries along rank P, keys along M)")
    parser.add_argument("--target", default="cpu", choices=["cpu", "cpu-llvm", "interp"])
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


class Cascade:
    """The user's kernel, its split-key form's chunk and merge kernels, and the shapes of inputs."""

    def __init__(self, source, name, target, threads):
        self.whole = einfuse.compile(source, target, threads=threads).kernel(name)
        split = einfuse.emit(source, "split", name, chunk=CHUNK)
        program = einfuse.compile(split, target, optimize=False, threads=threads, check_finite=False)
        self.chunks = program.kernel(f"{name}_chunks")
        self.merge = program.kernel(f"{name}_merge")
        self.partials = {p.name for p in self.chunks.outputs}


def blocks_of(rank, world, seq, causal):
    """The global [start, end) of each block of the sequence that process `rank` holds."""
    if not causal:
        size = seq // world
        return [(rank * size, (rank + 1) * size)]
    size = seq // (2 * world)
    return [(rank * size, (rank + 1) * size), ((2 * world - 1 - rank) * size, (2 * world - rank) * size)]


def take(tensor, axis, blocks):
    return torch.cat([tensor.narrow(axis, a, b - a) for a, b in blocks], dim=axis).contiguous()


def inputs_for(cascade, seq, heads, dim, seed):
    """The same random inputs on every process: torch's generator, seeded."""
    generator = torch.Generator().manual_seed(seed)
    values = {}
    for port in cascade.whole.inputs:
        shape = []
        for rank, fixed in zip(port.ranks, port.extents):
            shape.append(fixed if fixed is not None else (seq if rank in ("P", "M") else heads))
        values[port.name] = torch.rand(shape, generator=generator) * 2 - 1
    return values


def ring(cascade, inputs, rank, world, seq, causal):
    """This process's rows of the output, block by block, and the seconds the ring took."""
    mine = blocks_of(rank, world, seq, causal)
    query_inputs = {}
    key_inputs = {}
    shared = {}
    for port in cascade.chunks.inputs:
        x = inputs[port.name]
        if "P" in port.ranks and "M" in port.ranks:
            sys.exit(f"input `{port.name}` runs along both the queries (P) and the keys (M): not sharded yet")
        if "P" in port.ranks:
            query_inputs[port.name] = (port.ranks.index("P"), x)
        elif "M" in port.ranks:
            key_inputs[port.name] = take(x, port.ranks.index("M"), mine)
        else:
            shared[port.name] = x
    key_axes = {p.name: p.ranks.index("M") for p in cascade.chunks.inputs if p.name in key_inputs}
    # Each local query block's partial results, appended step by step.
    partials = [[] for _ in mine]
    dist.barrier()
    start = time.perf_counter()
    current = key_inputs
    for step in range(world):
        source = (rank - step) % world
        requests, incoming = [], None
        if step + 1 < world:
            # Post this step's transfer before computing, so that the two overlap.
            incoming = {name: torch.empty_like(x) for name, x in current.items()}
            operations = []
            for name in sorted(current):
                operations.append(dist.P2POp(dist.isend, current[name], (rank + 1) % world))
                operations.append(dist.P2POp(dist.irecv, incoming[name], (rank - 1) % world))
            requests = dist.batch_isend_irecv(operations)
        key_blocks = blocks_of(source, world, seq, causal)
        offset = 0
        for k0, k1 in key_blocks:
            keys = {name: x.narrow(key_axes[name], offset, k1 - k0) for name, x in current.items()}
            offset += k1 - k0
            for i, (q0, q1) in enumerate(mine):
                if causal and k0 > q1 - 1:
                    continue  # every key of the block comes after every query
                queries = {name: x.narrow(axis, q0, q1 - q0) for name, (axis, x) in query_inputs.items()}
                # The chunk kernel's keys start at position 0; its queries are placed relative
                # to them, so that masks and biases of `m - p` see global distances.
                out = cascade.chunks.call({**queries, **keys, **shared}, offsets={"P": q0 - k0})
                partials[i].append(out)
        for request in requests:
            request.wait()
        if incoming is not None:
            current = incoming
    outputs = []
    for i, (q0, q1) in enumerate(mine):
        merged = {}
        for port in cascade.merge.inputs:
            if port.name in cascade.partials:
                axis = port.ranks.index("C")
                merged[port.name] = torch.cat([p[port.name] for p in partials[i]], dim=axis)
            elif "P" in port.ranks:
                merged[port.name] = inputs[port.name].narrow(port.ranks.index("P"), q0, q1 - q0)
            else:
                merged[port.name] = inputs[port.name]
        outputs.append(cascade.merge.call(merged, offsets={"P": q0}))
    seconds = time.perf_counter() - start
    return outputs, seconds


def main():
    args = parse()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(args.threads)
    if args.kernel:
        file, _, name = args.kernel.rpartition(":")
        source = open(file).read()
    else:
        source, name = builtin_kernel(args.heads, args.dim, args.causal), "attention"
    block = args.seq // (2 * world if args.causal else world)
    if block * (2 * world if args.causal else world) != args.seq or block % CHUNK:
        sys.exit(f"--seq must split into {2 * world if args.causal else world} blocks of a multiple of {CHUNK}")
    cascade = Cascade(source, name, args.target, args.threads)
    inputs = inputs_for(cascade, args.seq, args.heads, args.dim, args.seed)
    outputs, seconds = ring(cascade, inputs, rank, world, args.seq, args.causal)

    # Gather every process's blocks on rank 0, in global order.
    slowest = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    diff = 0.0
    for port in cascade.whole.outputs:
        axis = port.ranks.index("P")
        local = torch.cat([o[port.name] for o in outputs], dim=axis).contiguous()
        gathered = [torch.empty_like(local) for _ in range(world)] if rank == 0 else None
        dist.gather(local, gathered, dst=0)
        if rank == 0:
            whole = cascade.whole.call(inputs)[port.name]
            pieces = []
            for r, part in enumerate(gathered):
                offset = 0
                for a, b in blocks_of(r, world, args.seq, args.causal):
                    pieces.append((a, part.narrow(axis, offset, b - a)))
                    offset += b - a
            result = torch.cat([p for _, p in sorted(pieces, key=lambda x: x[0])], dim=axis)
            diff = max(diff, (result - whole).abs().max().item())
            if not args.kernel:
                q, k, v = (inputs[n].unsqueeze(0) for n in ("Q", "K", "V"))
                sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=args.causal)
                print(f"max_abs_diff_vs_sdpa={(result - sdpa.squeeze(0)).abs().max().item():.3g}")
    if rank == 0:
        print(f"max_abs_diff={diff:.3g} seconds={slowest.item():.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
