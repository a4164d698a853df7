"""Ring attention (examples/python/ring_attention.py) under torchrun with 2 and 3 gloo processes,
plain and causal, against one-process attention to 1e-4."""

import os
import re
import socket
import subprocess
import sys

import pytest

from conftest import path

pytest.importorskip("torch")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ring(processes, *arguments):
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}",
        "--master-addr=127.0.0.1", f"--master-port={free_port()}",
        path("examples", "python", "ring_attention.py"), *arguments,
    ]
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert done.returncode == 0, done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-1]
    found = re.fullmatch(r"max_abs_diff=(\S+) seconds=(\S+)", last)
    assert found, done.stdout
    return float(found.group(1)), done.stdout


@pytest.mark.parametrize("processes", [2, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_ring_attention_matches_one_process(processes, causal):
    arguments = ["--seq", "768", "--heads", "2", "--dim", "32"] + (["--causal"] if causal else [])
    diff, out = run_ring(processes, *arguments)
    assert diff <= 1e-4, out
    sdpa = float(re.search(r"max_abs_diff_vs_sdpa=(\S+)", out).group(1))
    assert sdpa <= 1e-4, out


def test_ring_runs_another_cascade_with_global_positions():
    """ALiBi with soft-capping and a causal mask, from the benchmark file: the chunk kernel must
    see global positions for both the mask and the distances."""
    diff, out = run_ring(2, "--kernel", path("benches", "pytorch.ein") + ":alibi_softcap_causal", "--seq", "512",
                         "--heads", "8", "--causal")
    assert diff <= 1e-4, out
