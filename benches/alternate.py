#!/usr/bin/env python3
"""Ratios of kernels timed in alternating processes, for a noisy machine.

    python3 benches/alternate.py ROUNDS FILE 'M=4096 P=4096' TARGET A:B [C:D ...] [--bin PATH]

Each round runs `einfuse bench FILE --kernel K --runs 3 --target TARGET --json` once for every
kernel named in the pairs, one process each, in the same order. A kernel may name its binary,
`K@PATH`, to compare two builds. Printed: each kernel's lowest and middle median (fused and as
written), and for each pair A:B the ratio of A to B: of the lowest medians, and the median of the
per-round ratios with their range. Absolute times drift between processes on a shared machine; a
ratio measured within each round holds.
"""
import json
import statistics
import subprocess
import sys


def main() -> None:
    args = sys.argv[1:]
    binary = "target/release/einfuse"
    if "--bin" in args:
        at = args.index("--bin")
        binary = args[at + 1]
        del args[at : at + 2]
    if len(args) < 5:
        sys.exit(__doc__)
    rounds, path, binds, target = int(args[0]), args[1], args[2].split(), args[3]
    pairs = [pair.split(":") for pair in args[4:]]
    kernels: list[str] = []
    for a, b in pairs:
        for k in (b, a):
            if k not in kernels:
                kernels.append(k)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in kernels}
    for _ in range(rounds):
        for k in kernels:
            name, _, build = k.partition("@")
            command = [build or binary, "bench", path, "--kernel", name, "--runs", "3", "--target", target, "--json"]
            for bind in binds:
                command += ["--bind", bind]
            out = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
            times[k].append((out["median_s"] * 1e3, out["unfused_median_s"] * 1e3))
    for k in kernels:
        fused = [t[0] for t in times[k]]
        unfused = [t[1] for t in times[k]]
        gain = statistics.median(u / f for f, u in times[k])
        print(
            f"{k:32s} fused {min(fused):9.2f} ms (median {statistics.median(fused):9.2f}) | "
            f"as written {min(unfused):9.2f} | fused against as written, per-round median {gain:.2f}x"
        )
    for a, b in pairs:
        per_round = [x[0] / y[0] for x, y in zip(times[a], times[b])]
        lowest = min(t[0] for t in times[a]) / min(t[0] for t in times[b])
        print(
            f"{a} / {b}: {lowest:.3f} (lowest medians), per-round median {statistics.median(per_round):.3f} "
            f"[{min(per_round):.3f}-{max(per_round):.3f}]"
        )


if __name__ == "__main__":
    main()
