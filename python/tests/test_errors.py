"""Every kind of user error raises `einfuse.EinfuseError`, a `ValueError`, with the text the
command line prints: the place and a caret for source errors, the tensor, rank and both sizes for
shape errors, the names for an unknown kernel or input."""

import numpy as np
import pytest

import einfuse
from conftest import ATTENTION, path, random


def test_error_is_a_value_error():
    assert issubclass(einfuse.EinfuseError, ValueError)


def test_source_error_has_file_line_column_and_caret(tmp_path):
    file = tmp_path / "bad.ein"
    file.write_text("kernel k {\n  rank M\n  input A[M]\n  B[m] = A[m] +\n  output B\n}\n")
    with pytest.raises(einfuse.EinfuseError) as caught:
        einfuse.compile_file(file)
    message = str(caught.value)
    assert f"{file}:4:" in message
    assert "^" in message
    assert "error: 1 error(s) found" in message


def test_check_error_names_the_place():
    with pytest.raises(einfuse.EinfuseError) as caught:
        einfuse.compile("kernel k {\n  rank M\n  input A[M]\n  B[m] = C[m]\n  output B\n}\n", path="k.ein")
    assert "k.ein:4:" in str(caught.value) and "C" in str(caught.value)


def test_missing_file():
    with pytest.raises(einfuse.EinfuseError, match="nope.ein"):
        einfuse.compile_file("nope.ein")


def test_shape_error_names_tensor_rank_and_sizes():
    kernel = einfuse.compile(ATTENTION).kernel("attention")
    q, k, v = random((2, 5, 16), 1), random((2, 9, 16), 2), random((2, 9, 16), 3)
    with pytest.raises(einfuse.EinfuseError) as caught:
        kernel(Q=random((2, 5, 12), 1), K=k, V=v)
    message = str(caught.value)
    assert "`Q`" in message and "`E`" in message and "16" in message and "12" in message
    with pytest.raises(einfuse.EinfuseError) as caught:
        kernel(Q=q, K=k, V=random((2, 10, 16), 3))
    message = str(caught.value)
    assert "`M`" in message and "9" in message and "10" in message
    with pytest.raises(einfuse.EinfuseError, match="`Q`"):
        kernel(Q=random((2, 5), 1), K=k, V=v)


def test_unknown_and_missing_names():
    program = einfuse.compile(ATTENTION)
    with pytest.raises(einfuse.EinfuseError, match=r"no kernel `nope` \(there are: attention, causal\)"):
        program.kernel("nope")
    with pytest.raises(einfuse.EinfuseError, match="several kernels"):
        program.kernel()
    kernel = program.kernel("attention")
    q, k, v = random((2, 5, 16), 1), random((2, 9, 16), 2), random((2, 9, 16), 3)
    with pytest.raises(einfuse.EinfuseError, match="`W`"):
        kernel(Q=q, K=k, V=v, W=v)
    with pytest.raises(einfuse.EinfuseError, match="`V`"):
        kernel(Q=q, K=k)
    with pytest.raises(einfuse.EinfuseError, match="no kernel `nope`"):
        einfuse.analyze(ATTENTION, "nope")
    with pytest.raises(einfuse.EinfuseError, match="no stage `nope`"):
        einfuse.emit(ATTENTION, "nope")


def test_bad_values():
    with pytest.raises(einfuse.EinfuseError, match="no target `tpu`"):
        einfuse.compile(ATTENTION, "tpu")
    kernel = einfuse.compile(ATTENTION).kernel("attention")
    q, k, v = random((2, 5, 16), 1), random((2, 9, 16), 2), random((2, 9, 16), 3)
    with pytest.raises(einfuse.EinfuseError, match="float64"):
        kernel(Q=q.astype(np.float64), K=k, V=v)
    with pytest.raises(einfuse.EinfuseError, match="list"):
        kernel(Q=q.tolist(), K=k, V=v)
    with pytest.raises(einfuse.EinfuseError, match="does not split"):
        einfuse.compile("kernel k {\n rank M\n input A[M]\n B[m] = A[m]\n output B\n}", split_keys=64)


def test_non_finite_output_names_the_tensor():
    source = "kernel k {\n  rank M\n  input A[M]\n  B[m] = exp(A[m])\n  output B\n}\n"
    kernel = einfuse.compile(source).kernel()
    with pytest.raises(einfuse.EinfuseError, match="output `B` has a non-finite value"):
        kernel(A=np.array([1.0, 1000.0], dtype=np.float32))
    relaxed = einfuse.compile(source, check_finite=False).kernel()
    assert np.isinf(relaxed(A=np.array([1000.0], dtype=np.float32))["B"][0])


def test_bad_options_are_einfuse_errors():
    for options in [{"tile": -1}, {"tile": 0}, {"threads": "2"}, {"split_keys": 1.5}, {"params": {"scale": "x"}},
                    {"params": [1]}]:
        with pytest.raises(einfuse.EinfuseError):
            einfuse.compile(ATTENTION, **options)
    with pytest.raises(einfuse.EinfuseError, match="chunk"):
        einfuse.emit(ATTENTION, "split", "attention", chunk=-64)
    kernel = einfuse.compile(ATTENTION).kernel("causal")
    q = random((1, 4, 16), 1)
    for offsets in [{"P": 1.5}, [("P", 1)], {"P": 1 << 60}]:
        with pytest.raises(einfuse.EinfuseError):
            kernel.call({"Q": q, "K": q, "V": q}, offsets=offsets)
