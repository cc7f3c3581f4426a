"""Shared fixtures. Without a GPU the Triton kernels run under the interpreter: the variable
must be set before Triton decorates the kernels, so it is set here, before any import."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


NO_EXTENSION = "simulated: bam_fused._C is not importable; JIT build failed"


@pytest.fixture
def no_extension(monkeypatch):
    """Simulates an extension that neither imports nor builds (the reason: NO_EXTENSION)."""
    from bam_fused import _backends, _ext

    def broken():
        raise _ext.ExtensionUnavailable(NO_EXTENSION)

    monkeypatch.setattr(_ext, "load", broken)
    monkeypatch.setattr(_backends, "_warned", set())


@pytest.fixture
def routed(monkeypatch):
    """Counts the BAM calls that went through the full routing (BAM._gate_impl runs there only,
    not on the short path for repeated eval calls)."""
    import bam_fused

    calls = []
    full = bam_fused.BAM._gate_impl

    def counted(self, x):
        calls.append(1)
        return full(self, x)

    monkeypatch.setattr(bam_fused.BAM, "_gate_impl", counted)
    return calls


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test compiles from a fresh Dynamo state. Its recompile limit counts per code object
    (BAM.forward) over the whole process, so without this a compiled test failed with "recompile
    limit exceeded" only when enough compiling tests ran before it in the same session."""
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    from bam_fused import _backends

    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    # With a GPU the kernels are compiled, not interpreted, and cannot take CPU tensors;
    # tests/test_cuda.py covers them there.
    skip_cpu_triton = pytest.mark.skip(reason="Triton runs compiled for the GPU here (see test_cuda.py)")
    interpreted = _backends.triton_interpreted()
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
        params = getattr(item, "callspec", None)
        if params is not None and params.params.get("backend") == "triton" and not interpreted:
            item.add_marker(skip_cpu_triton)
