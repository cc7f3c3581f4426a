"""bam_fused.info() and `bam-fused info`: what a user pastes into a bug report must say what runs
and why the rest does not. A GPU machine is simulated where the real one would be needed (the
reasons are computed from torch's answers, which are patched)."""

import importlib
import sys

import pytest
import torch
from conftest import NO_EXTENSION

import bam_fused
from bam_fused import _ext

info_module = importlib.import_module("bam_fused.info")  # (bam_fused.info is the function)


def active(data: dict) -> dict[str, str | None]:
    """kernel name -> None when active, else its reason."""
    return {name: None if st["active"] else st["reason"] for name, st in data["kernels"].items()}


@pytest.fixture
def simulated_gpu(monkeypatch):
    """torch sees one sm_90 GPU, and the extension has CUDA kernels."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Simulated GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(_ext, "has_cuda_kernels", lambda: True)
    monkeypatch.delenv("BAM_FUSED_CUDA_EVAL", raising=False)
    monkeypatch.delenv("BAM_FUSED_DISABLE_TRITON", raising=False)


def test_info_on_a_gpu_machine_says_which_cuda_paths_run(simulated_gpu, monkeypatch):
    data = bam_fused.info()
    assert (data["device"], data["device_name"], data["cuda_available"]) == ("cuda", "Simulated GPU", True)
    status = active(data)
    for name in ("gate (Triton, CUDA)", "branches (CUDA)", "branches (Triton, CUDA)"):
        assert status[name] is None, (name, status[name])
    # Why the Triton eval path does not run: chosen away, no TF32, a bad setting.
    monkeypatch.setenv("BAM_FUSED_CUDA_EVAL", "kernel")
    assert active(bam_fused.info())["branches (Triton, CUDA)"] == "BAM_FUSED_CUDA_EVAL=kernel"
    monkeypatch.setenv("BAM_FUSED_CUDA_EVAL", "fastest")
    assert "BAM_FUSED_CUDA_EVAL must be one of" in active(bam_fused.info())["branches (Triton, CUDA)"]
    monkeypatch.delenv("BAM_FUSED_CUDA_EVAL")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    status = active(bam_fused.info())
    assert status["branches (Triton, CUDA)"] == "they need TF32 tensor cores (sm_80 or later)"
    assert status["branches (CUDA)"] is None and status["gate (Triton, CUDA)"] is None
    # Without CUDA kernels in the extension both branch paths say so (the Triton one needs the op).
    monkeypatch.setattr(_ext, "has_cuda_kernels", lambda: False)
    status = active(bam_fused.info())
    for name in ("branches (CUDA)", "branches (Triton, CUDA)"):
        assert status[name] == "the extension was built without CUDA kernels", (name, status[name])


def test_info_without_a_gpu_says_so(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.setattr(_ext, "has_cuda_kernels", lambda: True)  # (as in a CUDA build)
    data = bam_fused.info()
    assert (data["device"], data["cuda_available"]) == ("cpu", False)
    status = active(data)
    for name in ("gate (Triton, CUDA)", "branches (CUDA)", "branches (Triton, CUDA)"):
        assert status[name] == "no CUDA device is visible", (name, status[name])
    for name in ("gate (C++, CPU)", "branches (C++, CPU)", "branch autograd (CPU)", "dilated convs (C++, CPU)"):
        assert status[name] is None, (name, status[name])


def test_info_without_the_extension_says_why_for_every_cpu_kernel(no_extension):
    status = active(bam_fused.info())
    for name in ("gate (C++, CPU)", "branches (C++, CPU)", "branch autograd (CPU)", "dilated convs (C++, CPU)"):
        assert status[name] == NO_EXTENSION, (name, status[name])


def test_versions_and_device_name(monkeypatch):
    import triton

    data = bam_fused.info()
    assert (data["bam_fused"], data["torch"], data["triton"]) == (
        bam_fused.__version__, torch.__version__, triton.__version__,
    )  # fmt: skip
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    assert bam_fused.info()["triton"] is None
    threads = f"({torch.get_num_threads()} threads)"
    name = info_module.device_name(torch.device("cpu"))
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        assert name == f"{model} {threads}"
    except (OSError, StopIteration):
        pass
    # Without /proc/cpuinfo: what platform says, else "cpu".

    def no_file(*args, **kwargs):
        raise OSError("simulated")

    monkeypatch.setattr(info_module, "open", no_file, raising=False)
    monkeypatch.setattr(info_module.platform, "processor", lambda: "")
    monkeypatch.setattr(info_module.platform, "machine", lambda: "simulated64")
    assert info_module.device_name(torch.device("cpu")) == f"simulated64 {threads}"
    monkeypatch.setattr(info_module.platform, "machine", lambda: "")
    assert info_module.device_name(torch.device("cpu")) == f"cpu {threads}"


def test_format_info_shows_every_field_and_kernel():
    data = bam_fused.info()
    lines = info_module.format_info(data).splitlines()
    assert lines[0] == f"bam_fused: {bam_fused.__version__}"
    assert f"extension: {', '.join(f'{k}={v}' for k, v in data['extension'].items())}" in lines
    kernels = lines[lines.index("kernels:") + 1 :]
    assert len(kernels) == len(data["kernels"])
    for line, (name, st) in zip(kernels, data["kernels"].items(), strict=True):
        assert line.startswith(f"  {name}")
        if st["active"]:
            assert line.endswith(f"active ({st['note']})" if st.get("note") else "active")
        else:
            assert line.endswith(f"inactive: {st['reason']}")
    assert any(st.get("note") for st in data["kernels"].values())  # (the dilated convs have one)
