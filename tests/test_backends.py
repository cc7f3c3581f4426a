"""bam_fused._backends, the one place that decides which kernel runs: every reason it gives, and
"auto" falling back where an explicit backend raises. The other tests reach it only through the
kernels a machine has (here: the CPU and the Triton interpreter), so most of its branches are
checked here directly."""

import re
import warnings

import pytest
import torch
from conftest import NO_EXTENSION
from helpers import needs_ext, run_python

from bam_fused import _backends, _ext


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(_backends, "_warned", set())


def test_triton_is_interpreted_exactly_where_there_is_no_gpu():
    """conftest.py sets TRITON_INTERPRET=1 without a GPU and skips the CPU Triton cases when the
    kernels are not interpreted: a triton_interpreted() that said False would skip them silently."""
    assert _backends.triton_interpreted() is (not torch.cuda.is_available())


def test_each_impl_gets_its_own_kernels():
    """backend="triton" must not run the C++ kernels (on the CPU, under the interpreter, both give
    the same values to rounding, so no comparison with the reference would notice)."""
    assert _backends.kernels("triton").__name__ == "bam_fused.ops.gate_triton"
    assert _backends.kernels("cpp").__name__ == "bam_fused.ops.gate_cpp"


@needs_ext
@pytest.mark.parametrize("first", ["forward", "backward"])
def test_cpp_kernels_load_the_extension_themselves(first):
    """Called first in a fresh process (nothing has asked _backends or loaded the extension), each
    C++ gate launcher still finds its op."""
    calls = {
        "forward": "y = gate_cpp.gate_forward(x, r, c, False); "
        "torch.testing.assert_close(y, x * torch.sigmoid(r[:, :, None] + c[:, None, :]) + x); print(y.shape)",
        "backward": "print([t.shape for t in gate_cpp.gate_backward(torch.ones_like(x), x, r, c, False)])",
    }
    code = (
        "import torch; from bam_fused.ops import gate_cpp; "
        "x, r, c = torch.randn(2, 3, 4), torch.randn(2, 3), torch.randn(2, 4); " + calls[first]
    )
    out = run_python("-c", code)
    want = {
        "forward": "torch.Size([2, 3, 4])",
        "backward": "[torch.Size([2, 3, 4]), torch.Size([2, 3]), torch.Size([2, 4])]",
    }
    assert out.strip() == want[first]


def test_warn_once_warns_once_per_key():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for key in ("a", "a", "b", "a"):
            _backends.warn_once(key, f"message {key}")
    assert [str(w.message) for w in caught] == ["message a", "message b"]
    assert all(w.category is RuntimeWarning for w in caught)


@pytest.mark.parametrize(
    ("disable", "importable", "says"),
    [
        ("1", True, "disabled by BAM_FUSED_DISABLE_TRITON=1"),
        ("0", False, "Triton is not importable (simulated: no module named triton)"),
    ],
)
def test_triton_unavailable_says_why(monkeypatch, disable, importable, says):
    real_import = _backends.importlib.import_module

    def import_module(name, *args):
        if not importable and name == "bam_fused.ops.gate_triton":
            raise ImportError("simulated: no module named triton")
        return real_import(name, *args)

    monkeypatch.setenv("BAM_FUSED_DISABLE_TRITON", disable)
    monkeypatch.setattr(_backends.importlib, "import_module", import_module)
    _backends._triton.cache_clear()
    try:
        assert _backends._triton() == (None, says)
        assert _backends.triton_reason(torch.device("cuda")) == says
        assert not _backends.triton_interpreted()
        with pytest.raises(_backends.BackendUnavailable, match=re.escape(says)):
            _backends.kernels("triton")
    finally:
        _backends._triton.cache_clear()  # later tests see the real module again


def test_cpp_gate_is_a_cpu_kernel_and_needs_the_extension(monkeypatch):
    assert _backends.cpp_reason(torch.device("cpu")) is None
    assert _backends.cpp_reason(torch.device("cuda")) == "the C++ gate kernels are CPU kernels, x is on cuda"
    monkeypatch.setattr(_ext, "reason", lambda: "simulated: no extension")
    assert _backends.cpp_reason(torch.device("cpu")) == "simulated: no extension"


def test_dtype_reasons_name_the_kernel_and_its_dtypes():
    assert _backends._dtype_reason("triton", torch.bfloat16) is None
    assert _backends._dtype_reason("cpp", torch.float64) is None
    assert _backends._dtype_reason("triton", torch.float64) == (
        "the triton gate supports float32, float16, bfloat16; x has dtype float64"
    )
    assert _backends._dtype_reason("cpp", torch.int8) == (
        "the cpp gate supports float32, float16, bfloat16, float64; x has dtype int8"
    )


def test_auto_falls_back_where_an_explicit_backend_raises(monkeypatch):
    """A CUDA machine is simulated (the Triton gate available on CUDA): fp64 is no Triton dtype, so
    "auto" runs the reference and says why once; "triton" raises a TypeError naming x."""
    monkeypatch.setattr(_backends, "triton_reason", lambda device: None)
    assert _backends._gate_impl("auto", "cuda", torch.float32) == "triton"
    with pytest.warns(RuntimeWarning, match="using the reference gate: the triton gate supports .* float64"):
        assert _backends._gate_impl("auto", "cuda", torch.float64) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per device, dtype and reason
        assert _backends._gate_impl("auto", "cuda", torch.float64) == "reference"
    with pytest.raises(TypeError, match="x: the triton gate supports"):
        _backends._gate_impl("triton", "cuda", torch.float64)
    # The C++ gate on a CUDA tensor: a dtype it takes, a device it does not.
    with pytest.raises(_backends.BackendUnavailable, match=r"backend='cpp' cannot run: the C\+\+ gate kernels"):
        _backends._gate_impl("cpp", "cuda", torch.float32)
    assert _backends._gate_impl("reference", "cuda", torch.float64) == "reference"
    assert _backends._gate_impl("auto", "cpu", torch.float64) == "cpp"


def test_branch_kernel_reasons(monkeypatch):
    assert _backends.branch_kernel_reason("cpu") is None
    assert _backends.branch_kernel_reason("mps") == "no branch kernel for mps"
    monkeypatch.setattr(_ext, "has_cuda_kernels", lambda: False)
    assert _backends.branch_kernel_reason("cuda") == "the extension was built without CUDA kernels"


def test_branch_kernel_reasons_without_the_extension(no_extension):
    for device_type in ("cpu", "cuda"):
        assert _backends.branch_kernel_reason(device_type) == NO_EXTENSION
