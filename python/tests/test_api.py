"""The Python API on NumPy arrays: every target against the interpreter and NumPy, dtypes and
strides, offsets, params, threads, and the text functions against the command line."""

import json
import os
import shutil
import subprocess
import threading

import numpy as np
import pytest

import einfuse
from conftest import ATTENTION, path, random, reference_attention

CPU_TARGETS = ["cpu", "cpu-llvm"]


@pytest.fixture(scope="module")
def programs():
    return {t: einfuse.compile(ATTENTION, t) for t in ["interp"] + CPU_TARGETS}


def test_program_lists_kernels_and_ports(programs):
    program = programs["cpu"]
    assert [k.name for k in program.kernels] == ["attention", "causal"]
    kernel = program.kernel("causal")
    assert program["causal"] is kernel
    assert [p.name for p in kernel.inputs] == ["Q", "K", "V"]
    assert kernel.inputs[0].ranks == ("H", "P", "E")
    assert kernel.inputs[0].extents == (None, None, 16)
    assert kernel.inputs[0].dtype == "f32"
    assert [p.name for p in kernel.outputs] == ["AV"]
    assert "kernel causal" in kernel.source


@pytest.mark.parametrize("target", CPU_TARGETS + ["interp"])
@pytest.mark.parametrize("name,causal", [("attention", False), ("causal", True)])
@pytest.mark.parametrize("p,m", [(1, 1), (5, 77), (70, 130)])
def test_kernels_agree_with_numpy(programs, target, name, causal, p, m):
    """Ragged sizes (not multiples of any tile), one query, one key; large logits."""
    if causal and m < p:
        m = p
    for scale in [1.0, 300.0]:
        q, k, v = random((3, p, 16), 1, scale), random((3, m, 16), 2, scale), random((3, m, 16), 3)
        got = programs[target].kernel(name)(Q=q, K=k, V=v)["AV"]
        assert got.dtype == np.float32 and got.shape == (3, p, 16)
        want = reference_attention(q, k, v, 0.25, causal)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * max(1.0, np.abs(want).max()))


def test_fully_masked_rows_match_the_interpreter():
    source = ATTENTION.replace("where m <= p", "where m < p")
    q, k, v = random((2, 9, 16), 4), random((2, 9, 16), 5), random((2, 9, 16), 6)
    want = einfuse.compile(source, "interp").kernel("causal")(Q=q, K=k, V=v)["AV"]
    for target in CPU_TARGETS:
        got = einfuse.compile(source, target).kernel("causal")(Q=q, K=k, V=v)["AV"]
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_every_example_file_compiles_and_its_first_kernel_runs_like_the_interpreter():
    program = einfuse.compile_file(path("examples", "attention.ein"))
    kernel = program.kernel("attention")
    q, k, v = random((64, 8), 1), random((64, 300), 2), random((64, 300), 3)
    want = einfuse.compile_file(path("examples", "attention.ein"), "interp").kernel("attention")(Q=q, K=k, V=v)
    np.testing.assert_allclose(kernel(Q=q, K=k, V=v)["AV"], want["AV"], atol=1e-5)


def test_strided_and_16_bit_inputs():
    kernel = einfuse.compile(ATTENTION).kernel("attention")
    q, k, v = random((2, 6, 16), 1), random((2, 40, 16), 2), random((2, 40, 16), 3)
    want = kernel(Q=q, K=k, V=v)["AV"]
    # A transposed view and a Fortran-ordered copy: copied once, same values.
    q_view = np.ascontiguousarray(q.transpose(1, 0, 2)).transpose(1, 0, 2)
    assert not q_view.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(kernel(Q=q_view, K=np.asfortranarray(k), V=v)["AV"], want)
    # Reversed and stepped views.
    reversed_keys = kernel(Q=q, K=k[:, ::-1][:, ::-1], V=v[:, ::-1][:, ::-1])["AV"]
    np.testing.assert_array_equal(reversed_keys, want)
    wide = np.zeros((2, 6, 32), np.float32)
    wide[:, :, ::2] = q
    np.testing.assert_array_equal(kernel(Q=wide[:, :, ::2], K=k, V=v)["AV"], want)
    # float16 inputs are widened; the result is the attention of the rounded values.
    half = kernel(Q=q.astype(np.float16), K=k.astype(np.float16), V=v.astype(np.float16))["AV"]
    rounded = kernel(Q=q.astype(np.float16).astype(np.float32), K=k.astype(np.float16).astype(np.float32),
                     V=v.astype(np.float16).astype(np.float32))["AV"]
    np.testing.assert_array_equal(half, rounded)


def test_narrow_storage_types_come_back_in_their_type():
    source = """
    kernel narrow {
      rank M
      input A[M]: f16, B[M]
      Y[m] = A[m] * B[m]
      output Y: f16
    }"""
    kernel = einfuse.compile(source).kernel()
    assert kernel.inputs[0].dtype == "f16" and kernel.outputs[0].dtype == "f16"
    a, b = random((10,), 1), random((10,), 2)
    y = kernel(A=a, B=b)["Y"]
    assert y.dtype == np.float16
    want = (a.astype(np.float16).astype(np.float32) * b).astype(np.float16)
    np.testing.assert_array_equal(y, want)


@pytest.mark.parametrize("target", CPU_TARGETS + ["interp"])
def test_offsets_place_a_shard_in_a_longer_sequence(programs, target):
    """A causal kernel run on the last queries of a sequence, told where they sit, gives the
    rows of the whole run."""
    q, k, v = random((2, 50, 16), 7), random((2, 50, 16), 8), random((2, 50, 16), 9)
    kernel = programs[target].kernel("causal")
    whole = kernel(Q=q, K=k, V=v)["AV"]
    shard = kernel.call({"Q": q[:, 30:], "K": k, "V": v}, offsets={"P": 30})["AV"]
    np.testing.assert_allclose(shard, whole[:, 30:], atol=1e-6)
    # Without the offset the mask sees positions 0..20: another result.
    assert not np.allclose(kernel(Q=q[:, 30:], K=k, V=v)["AV"], whole[:, 30:], atol=1e-3)


@pytest.mark.parametrize("target", CPU_TARGETS + ["interp"])
@pytest.mark.parametrize("offset", [-37, 0, 5, 1 << 40])
def test_offsets_reach_index_values_in_lanes(target, offset):
    """Positions as values, in lanes along the offset rank, negative or large."""
    source = """
    kernel positions {
      rank A, B
      input X[A, B]
      Y[a, b] = X[a, b] * b where a <= b + 3
      output Y
    }"""
    x = random((5, 70), 3)
    y = einfuse.compile(source, target).kernel().call({"X": x}, offsets={"B": offset})["Y"]
    b = np.arange(70)[None, :] + offset
    a = np.arange(5)[:, None]
    want = np.where(a <= b + 3, x * b.astype(np.float32), 0)
    np.testing.assert_array_equal(y, want.astype(np.float32))


def test_offsets_only_along_batch_ranks(programs):
    kernel = programs["cpu"].kernel("causal")
    q, k, v = random((1, 4, 16), 1), random((1, 4, 16), 2), random((1, 4, 16), 3)
    with pytest.raises(einfuse.EinfuseError, match="rank `E` of kernel `causal` cannot be offset"):
        kernel.call({"Q": q, "K": k, "V": v}, offsets={"E": 3})
    with pytest.raises(einfuse.EinfuseError, match="has no rank `X` to offset"):
        kernel.call({"Q": q, "K": k, "V": v}, offsets={"X": 3})


def test_params_per_call(programs):
    kernel = programs["cpu"].kernel("attention")
    q, k, v = random((2, 5, 16), 1), random((2, 33, 16), 2), random((2, 33, 16), 3)
    for scale in [0.25, 0.5, 0.5, 2.0]:
        got = kernel.call({"Q": q, "K": k, "V": v}, params={"scale": scale})["AV"]
        np.testing.assert_allclose(got, reference_attention(q, k, v, scale), atol=2e-5)
    with pytest.raises(einfuse.EinfuseError, match="has no param `nope`"):
        kernel.call({"Q": q, "K": k, "V": v}, params={"nope": 1.0})


def test_split_keys_option():
    kernel = einfuse.compile(ATTENTION, split_keys=64).kernel("attention")
    q, k, v = random((2, 3, 16), 1), random((2, 300, 16), 2), random((2, 300, 16), 3)
    np.testing.assert_allclose(kernel(Q=q, K=k, V=v)["AV"], reference_attention(q, k, v, 0.25), atol=2e-5)


def test_calls_from_several_threads_at_once(programs):
    kernel = programs["cpu"].kernel("causal")
    inputs = [(random((2, 40, 16), s), random((2, 90, 16), s + 1), random((2, 90, 16), s + 2)) for s in range(8)]
    want = [kernel(Q=q, K=k, V=v)["AV"] for q, k, v in inputs]
    got = [None] * len(inputs)

    def work(i):
        for _ in range(5):
            q, k, v = inputs[i]
            got[i] = kernel(Q=q, K=k, V=v)["AV"]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def einfuse_binary():
    for profile in ["release", "debug"]:
        candidate = path("target", profile, "einfuse")
        if os.path.exists(candidate):
            return candidate
    return shutil.which("einfuse")


def test_analyze_and_emit_match_the_command_line():
    binary = einfuse_binary()
    if binary is None:
        pytest.skip("no einfuse binary built (cargo build) to compare with")
    file = path("examples", "attention.ein")
    source = open(file).read()
    cli = subprocess.run([binary, "analyze", file, "--json"], check=True, capture_output=True, text=True).stdout
    assert einfuse.analyze(source) == json.loads(cli)
    assert einfuse.analyze(source, "attention")["kernels"][0]["passes"]["M"] == 3
    for stage in ["ir", "opt", "loops"]:
        cli = subprocess.run([binary, "emit", "--stage", stage, file, "--kernel", "attention"], check=True,
                             capture_output=True, text=True).stdout
        assert einfuse.emit(source, stage, "attention") == cli
    cli = subprocess.run([binary, "explain", file, "--kernel", "attention"], check=True, capture_output=True,
                         text=True).stdout
    assert einfuse.explain(source, "attention") == cli


def test_the_split_form_compiles_back():
    """The split stage's text is a program: its chunk and merge kernels run, and the merge of
    the chunks is the attention."""
    text = einfuse.emit(ATTENTION, "split", "attention", chunk=64)
    program = einfuse.compile(text, optimize=False)
    chunks, merge = program.kernel("attention_chunks"), program.kernel("attention_merge")
    q, k, v = random((2, 3, 16), 1), random((2, 200, 16), 2), random((2, 200, 16), 3)
    partial = chunks(Q=q, K=k, V=v)
    out = merge(**partial)["AV"]
    np.testing.assert_allclose(out, reference_attention(q, k, v, 0.25), atol=2e-5)
