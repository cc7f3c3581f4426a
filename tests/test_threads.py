"""Python threads sharing fused modules, as a serving process does. The C++ ops release the GIL,
so calls overlap in the extension (the packed-weight cache, OpenMP teams) and interleave in
Python (the module's cached fold). Each call must give the bits of the same call made alone."""

import copy

import pytest
import torch
from helpers import THREADS, make_layout, run_threads

import bam_fused
from bam_fused.ops import bam_gate
from bam_fused.testing import randomize_


def test_shared_eval_modules_give_the_bits_of_serial_calls():
    # 16 modules of 5 packings each (1x1 conv, dilated convs, Winograd's) and bf16 copies: more
    # than the cache's 64 entries, so entries are evicted while other threads look them up.
    torch.manual_seed(0)
    mods = [randomize_(bam_fused.BAM(64, 4, backend="fused")).eval() for _ in range(16)]
    mods += [copy.deepcopy(m).to(torch.bfloat16) for m in mods[:4]]
    cases = []
    for i in range(40):
        m = mods[i % len(mods)]
        n, (h, w) = 1 + i % 3, [(7, 9), (9, 13), (28, 28)][i % 3]  # 28x28: Winograd convs
        x = torch.randn(n, 64, h, w, dtype=next(m.parameters()).dtype)
        cases.append((m, make_layout(x, ["nchw", "channels_last", "strided"][i % 3])))
    with torch.no_grad():
        want = [m(x) for m, x in cases]

    def work(k: int) -> None:
        with torch.no_grad():
            for r in range(3):
                for j in range(len(cases)):  # every thread every case, each from its own start
                    j = (j + 11 * k + r) % len(cases)
                    m, x = cases[j]
                    if k == 0 and j % 5 == 0:
                        m.eval()  # serving code does this per request: it must keep the fold
                    got = m(x)
                    assert torch.equal(got, want[j]) and got.stride() == want[j].stride(), (k, r, j)

    run_threads(work)


def test_a_weight_update_reaches_every_thread():
    # A fold made after an update, by whichever thread comes first, serves all the others.
    torch.manual_seed(1)
    m = randomize_(bam_fused.BAM(64, 4, backend="fused")).eval()
    x = torch.randn(2, 64, 9, 13)
    with torch.no_grad():
        before = m(x)
        m.spatial_att.gate_s.gate_s_conv_di_1.weight.data.mul_(-2.0)  # through .data: no version bump
        twin = copy.deepcopy(m)
        want = twin(x)
    assert not torch.equal(want, before)

    def work(k: int) -> None:
        with torch.no_grad():
            for _ in range(10):
                assert torch.equal(m(x), want)

    run_threads(work)


@pytest.mark.parametrize("reset", ["load_state_dict", "eval", "backend"])
def test_calls_while_another_thread_resets_the_fold(reset):
    # Loading the same weights drops the cached fold, as a backend assignment drops the routing,
    # while the other threads' calls are inside folded() or the short path (their op calls
    # release the GIL): each call must still use one whole, current fold.
    torch.manual_seed(4)
    m = randomize_(bam_fused.BAM(64, 4, backend="fused")).eval()
    state = copy.deepcopy(m.state_dict())
    x = torch.randn(2, 64, 9, 13)
    with torch.no_grad():
        want = m(x)

    def work(k: int) -> None:
        with torch.no_grad():
            for _ in range(60):
                if k > 0:
                    assert torch.equal(m(x), want)
                elif reset == "load_state_dict":
                    m.load_state_dict(state)
                elif reset == "eval":
                    m.eval()
                else:
                    m.backend = "fused"

    run_threads(work)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_forward_and_backward_in_threads(dtype):
    g = torch.Generator().manual_seed(2)
    cases = []
    for i in range(8):
        x = make_layout(torch.randn(1 + i % 3, 37, 7, 9, generator=g).to(dtype), ["nchw", "channels_last"][i % 2])
        cases.append((x, torch.randn(x.shape[0], 37, generator=g), torch.randn(x.shape[0], 7, 9, generator=g)))

    def run(case):
        x, c, s = (t.detach().clone().requires_grad_() for t in case)
        out = bam_gate(x, c, s, backend="cpp")
        out.backward(torch.ones_like(out))
        return out.detach(), x.grad, c.grad, s.grad

    want = [run(case) for case in cases]

    def work(k: int) -> None:
        for r in range(5):
            for j in range(len(cases)):
                j = (j + 3 * k + r) % len(cases)
                got = run(cases[j])
                assert all(torch.equal(a, b) for a, b in zip(got, want[j], strict=True)), (k, r, j)

    run_threads(work)


def test_training_steps_in_threads():
    # One module per thread (BatchNorm's running statistics are per module), the CPU autograd path.
    torch.manual_seed(3)
    base = randomize_(bam_fused.BAM(64, 4, backend="fused")).train()
    xs = [make_layout(torch.randn(2, 64, 9, 13), ["nchw", "channels_last"][k % 2]) for k in range(THREADS)]

    def step(m, x):
        x = x.detach().clone().requires_grad_()
        out = m(x)
        out.square().sum().backward()
        return [out.detach(), x.grad, *(p.grad for p in m.parameters()), *m.buffers()]

    want = [step(copy.deepcopy(base), x) for x in xs]
    mods = [copy.deepcopy(base) for _ in range(THREADS)]

    def work(k: int) -> None:
        got = step(mods[k], xs[k])
        assert all(torch.equal(a, b) for a, b in zip(got, want[k], strict=True)), k

    run_threads(work)


@pytest.mark.cuda
def test_shared_cuda_eval_modules_and_gates_in_threads(monkeypatch):
    # The CUDA eval path with BAM_FUSED_CUDA_EVAL=auto. First all threads meet one untimed shape:
    # one thread times it (CUDA graph captures) while the others wait for its picks, launching
    # nothing. Then, as the README advises, every shape timed, calls on all of them in every
    # thread, and the Triton gate forward and backward. auto may pick another path than the
    # serial calls' (3xTF32 or CUDA cores), so outputs agree to float32 rounding, not bits.
    from bam_fused import _backends, _ext, reference
    from bam_fused.ops import attention_cuda

    if not _ext.has_cuda_kernels():
        pytest.skip("extension built without CUDA kernels")
    monkeypatch.setenv("BAM_FUSED_CUDA_EVAL", "auto")
    monkeypatch.setattr(attention_cuda, "_chosen", {})
    torch.manual_seed(5)
    mods = [randomize_(bam_fused.BAM(64, 4, backend="fused")).cuda().eval() for _ in range(2)]
    cases = []
    for i, (n, h, w) in enumerate([(1, 7, 9), (2, 9, 13), (3, 28, 28), (2, 14, 14)]):
        x = make_layout(torch.randn(n, 64, h, w, device="cuda"), ["nchw", "channels_last"][i % 2])
        cases.append((mods[i % 2], x))
    with torch.no_grad():
        want = [m(x) for m, x in cases]  # (folds each module and times each shape)
    dev = torch.device("cuda")
    timed = _backends.triton_reason(dev) is None and attention_cuda._has_tf32(dev)
    assert len(attention_cuda._chosen) == (len(cases) if timed else 0)
    if timed:
        first = next(iter(attention_cuda._chosen))
        picks = attention_cuda._chosen.pop(first)  # that shape untimed again
    torch.cuda.synchronize()
    got_first: list[torch.Tensor] = []

    def meet_untimed(k: int) -> None:
        with torch.no_grad():
            got_first.append(cases[0][0](cases[0][1]))

    run_threads(meet_untimed)
    torch.cuda.synchronize()
    for out in got_first:
        torch.testing.assert_close(out, want[0], rtol=1e-4, atol=1e-4)
    if timed:
        assert len(attention_cuda._chosen) == len(cases)  # timed once more, by one thread
        assert set(attention_cuda._chosen[first]) <= {"kernel", "triton-pass", "triton"}
        assert set(picks) <= {"kernel", "triton-pass", "triton"}

    def work(k: int) -> None:
        with torch.no_grad():
            for r in range(3):
                for j in range(len(cases)):
                    j = (j + k + r) % len(cases)
                    m, x = cases[j]
                    torch.testing.assert_close(m(x), want[j], rtol=1e-4, atol=1e-4)
        x = make_layout(torch.randn(2, 37, 7, 9, device="cuda"), ["nchw", "channels_last"][k % 2])
        c, sp = torch.randn(2, 37, device="cuda"), torch.randn(2, 7, 9, device="cuda")
        got = bam_gate(x.requires_grad_(), c, sp, backend="triton")
        got.backward(torch.ones_like(got))
        xd = x.detach().double().requires_grad_()
        want_gate = reference.bam_gate_reference(xd, c.double(), sp.double(), "sum")
        want_gate.backward(torch.ones_like(want_gate))
        torch.testing.assert_close(got, want_gate.float())
        torch.testing.assert_close(x.grad, xd.grad.float())

    run_threads(work)
    assert len(attention_cuda._chosen) == (len(cases) if timed else 0)  # nothing timed again
