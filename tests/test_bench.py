"""bam_fused.bench: its timing (on the CPU the contenders and the copy take turns), the figures
each row derives from the times, what each contender runs, the plans and the reports."""

import itertools
import json
import platform

import pytest
import torch
from helpers import bench_row, needs_ext

import bam_fused
from bam_fused import bench


def test_cpu_contenders_take_turns():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("copy", "eager", "fused")}
    times = bench.interleaved_ms(fns, torch.device("cpu"), budget_s=0.006, turns=3)
    # A warm-up call each, then three turns in order; within a turn many calls of one contender.
    assert [k for k, _ in itertools.groupby(calls)] == ["copy", "eager", "fused"] * 4
    assert set(times) == set(fns) and all(med > 0 and iqr >= 0 for med, iqr in times.values())


def test_one_turn_times_each_contender_once_in_a_row():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("eager", "fused")}
    times = bench.interleaved_ms(fns, torch.device("cpu"), budget_s=0.002, turns=1)
    assert [k for k, _ in itertools.groupby(calls)] == ["eager", "fused"]
    assert set(times) == set(fns) and all(med > 0 and iqr >= 0 for med, iqr in times.values())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_asks_glibc(monkeypatch):
    import ctypes

    assert bench.keep_freed_memory() is True

    def no_libc(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert bench.keep_freed_memory() is False


def test_compile_raises_dynamos_recompile_limit():
    """The sweep compiles the same reference function for every shape and dtype: past Dynamo's
    default limit (8) it would run eager and be timed as "compiled"."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    # (config.patch, not monkeypatch: monkeypatch's undo deletes a config module's entry)
    with config.patch(**{name: 8}):
        compiled = bench._compile(bench.bam_gate_reference)
        assert callable(compiled) and compiled is not bench.bam_gate_reference
        assert getattr(config, name) == 256


# -- what each row reports, from given times ------------------------------------------------
CPU = torch.device("cpu")
SMALL = (2, 32, 7, 9)


def fixed_times(monkeypatch, ms: dict[str, float]) -> None:
    """interleaved_ms returns ms[k] (iqr 0.1) for each contender k, without running any."""

    def fake(fns, device, budget_s=0.4, turns=bench.CPU_TURNS):
        assert set(fns) == set(ms), "the contenders timed"
        return {k: (ms[k], 0.1) for k in fns}

    monkeypatch.setattr(bench, "interleaved_ms", fake)


@pytest.mark.parametrize(("name", "x_bytes"), [("gate_fwd", 2), ("gate_fwd_bwd", 5), ("bam_eval", 3), ("bam_train", 9)])
def test_rows_put_the_roofline_bytes_against_the_copy_of_the_same_run(monkeypatch, name, x_bytes):
    fixed_times(monkeypatch, {"copy": 0.5, "eager": 6.0, "compiled": 3.0, "fused": 2.0})
    built = []

    def contenders(kind):
        def build(shape, dtype, layout, device, **flag):
            built.append((kind, shape, dtype, layout, device, flag))
            return dict.fromkeys(bench.CONTENDERS, lambda: None)

        return build

    monkeypatch.setattr(bench, "gate_contenders", contenders("gate"))
    monkeypatch.setattr(bench, "bam_contenders", contenders("bam"))
    p = bench.plan(CPU, quick=True)
    rows = bench.run_task(p, name, SMALL, "bf16", "nchw")
    flag = {"gate_fwd": {"backward": False}, "gate_fwd_bwd": {"backward": True}, "bam_eval": {"train": False},
            "bam_train": {"train": True}}[name]  # fmt: skip
    assert built == [(name.split("_")[0], SMALL, torch.bfloat16, "nchw", CPU, flag)]
    assert [r.contender for r in rows] == ["eager", "compiled", "fused"]
    x = 2 * 32 * 7 * 9 * 2  # bytes of x in bf16
    copy = 2 * x / 0.5e-3 / 1e9  # a copy reads and writes x
    for r in rows:
        assert (r.bench, r.shape, r.dtype, r.layout, r.iqr_ms) == (name, SMALL, "bf16", "nchw", 0.1)
        assert r.copy_gbps == pytest.approx(copy)
        assert r.gbps == pytest.approx(x_bytes * x / (r.median_ms * 1e-3) / 1e9)
        assert r.pct_copy == pytest.approx(100 * r.gbps / copy)
        # The roofline time: x_bytes |x| at the copy's bandwidth (0.25 ms for each 2|x|).
        assert r.roofline_ratio == pytest.approx(r.median_ms / (x_bytes * 0.25))
        assert r.device == "cpu" and r.device_name and r.graph_ms is None
    assert rows[2].speedup == pytest.approx({"eager": 3.0, "compiled": 1.5})
    assert rows[0].speedup == rows[1].speedup == {}


def test_resnet_rows_give_the_share_of_the_bams(monkeypatch):
    fixed_times(monkeypatch, {"no_bam": 10.0, "eager": 12.5, "fused": 11.0})
    p = bench.plan(CPU, quick=True)
    rows = bench.run_task(p, "resnet50", (1, 3, 224, 224), "fp32", "nchw")
    by = {r.contender: r for r in rows}
    assert list(by) == ["eager", "fused", "compiled"]
    assert by["eager"].note == "BAM share 20.0% of 12.50 ms (no-BAM net 10.00 ms)"
    assert by["fused"].note == "BAM share 9.1% of 11.00 ms (no-BAM net 10.00 ms)"
    assert by["fused"].speedup == pytest.approx({"eager": 12.5 / 11.0})
    assert by["compiled"].median_ms != by["compiled"].median_ms and by["compiled"].note.startswith("skipped")
    assert all(r.gbps is None and r.pct_copy is None for r in rows)


def test_graph_speedups_compare_graph_times():
    rows = [bench_row("eager", 4.0, graph_ms=2.0), bench_row("compiled", 3.0), bench_row("fused", 1.0, graph_ms=0.5)]
    bench._speedups(rows)
    assert rows[2].speedup == {"eager": 4.0, "compiled": 3.0}
    assert rows[2].graph_speedup == {"eager": 4.0}  # compiled could not be captured: no ratio


# -- what each contender runs ------------------------------------------------------------------
def ops_run(fn) -> set[str]:
    """The names of our extension's ops that fn calls."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("bam_fused")}


@pytest.mark.parametrize(
    ("name", "fused_ops"),
    [
        ("gate_fwd", {"bam_fused_C::gate_forward"}),
        ("gate_fwd_bwd", {"bam_fused_C::gate_forward", "bam_fused_C::gate_backward"}),
        ("bam_eval", {"bam_fused_C::bam_eval"}),
        ("bam_train", {"bam_fused_C::reduce_pool", "bam_fused_C::reduce_pool_backward", "bam_fused_C::gate_backward"}),
    ],
)
@needs_ext  # (without it "fused" runs the reference, with a warning: none of our ops to see)
def test_each_contender_runs_what_it_is_named(monkeypatch, name, fused_ops):
    compiled_from = []

    def fake_compile(fn):
        compiled_from.append(fn)
        return lambda *args: ("compiled", fn(*args))

    monkeypatch.setattr(bench, "_compile", fake_compile)
    if name.startswith("gate"):
        fns = bench.gate_contenders(SMALL, torch.float32, "channels_last", CPU, backward=name == "gate_fwd_bwd")
        assert compiled_from == [bench.bam_gate_reference]
    else:
        fns = bench.bam_contenders(SMALL, torch.float32, "channels_last", CPU, train=name == "bam_train")
        (ref,) = compiled_from
        assert type(ref) is bench.RefBAM and ref.training == (name == "bam_train")
    assert list(fns) == list(bench.CONTENDERS)
    assert ops_run(fns["eager"]) == set()
    assert fused_ops <= ops_run(fns["fused"])
    if name in ("gate_fwd", "bam_eval"):  # forward only: the thunks return the outputs
        eager, (tag, compiled), fused = fns["eager"](), fns["compiled"](), fns["fused"]()
        assert tag == "compiled" and torch.equal(compiled, eager)
        assert eager.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
        assert not fused.requires_grad  # timed without autograd's bookkeeping
    else:  # forward and backward, which returns nothing
        for k in ("eager", "fused"):
            assert fns[k]() is None


@needs_ext
def test_resnet_contenders_run_one_network(monkeypatch):
    """The eager and fused ResNet-50s share their weights; the plain one has no BAM."""
    monkeypatch.setattr(bench, "_compile", lambda fn: fn)
    fns = bench.resnet_contenders(1, torch.float32, "channels_last", CPU, with_compile=True)
    assert list(fns) == ["no_bam", "eager", "fused", "compiled"]
    outs = {}
    for k, f in fns.items():
        ops = ops_run(lambda k=k, f=f: outs.__setitem__(k, f()))
        assert bool(ops) == (k == "fused"), k
    assert outs["eager"].shape == outs["no_bam"].shape == (1, 1000)
    assert not torch.allclose(outs["no_bam"], outs["eager"])  # (the BAMs change the output)
    torch.testing.assert_close(outs["fused"], outs["eager"], rtol=1e-4, atol=1e-4)
    assert torch.equal(outs["compiled"], outs["eager"])
    nchw = bench.resnet_contenders(1, torch.float32, "nchw", CPU, with_compile=False)
    assert "compiled" not in nchw
    for layout, thunks in (("channels_last", fns), ("nchw", nchw)):
        models = [f.__defaults__[0] for f in thunks.values()]  # (each thunk's model, bound as a default)
        cl = [m.conv1.weight.is_contiguous(memory_format=torch.channels_last) for m in models]
        assert cl == [layout == "channels_last"] * len(models)


def test_run_goes_through_the_tasks_in_order(monkeypatch):
    p = bench.plan(CPU, quick=True)
    monkeypatch.setattr(bench, "run_task", lambda p_, *task: [task] if p_ is p else [])
    assert bench.run(p, progress=False) == bench.tasks(p)


def test_copy_of_copies_and_copy_gbps_counts_read_and_write():
    x = torch.randn(1000)
    copy = bench.copy_of(x)
    assert torch.equal(copy(), x)
    assert bench.copy_gbps(x, 1.0) == pytest.approx(2 * 4000 / 1e-3 / 1e9)


# -- the plan and the reports --------------------------------------------------------------------
def test_plans():
    quick, full = bench.plan(CPU, quick=True), bench.plan(CPU, quick=False)
    assert (quick.shapes, quick.dtypes, quick.layouts) == ([(8, 256, 56, 56)], ["fp32"], ["nchw"])
    assert quick.resnet_batch == 1
    assert full.shapes == [(8, 256, 56, 56), (8, 512, 28, 28), (8, 1024, 14, 14)]
    assert (full.dtypes, full.layouts, full.resnet_batch) == (["fp32", "bf16"], ["nchw", "channels_last"], 8)
    assert not quick.compile_resnet and not full.compile_resnet and quick.budget_s < full.budget_s
    gpu = bench.plan(torch.device("cuda"), quick=False)
    assert all(s[0] == 32 for s in gpu.shapes) and gpu.layouts == ["nchw", "channels_last"] and gpu.compile_resnet
    tasks = bench.tasks(full)
    assert len(tasks) == 3 * 2 * 2 * 4 + 1 and tasks[-1] == ("resnet50", (8, 3, 224, 224), "fp32", "nchw")
    assert tasks[:4] == [(b, (8, 256, 56, 56), "fp32", "nchw") for b in bench.ROOFLINE_BYTES]


def test_markdown_summary_and_table():
    def row(contender, ms, graph=None, **fields):
        return bench_row(contender, ms, shape=(8, 256, 56, 56), pct_copy=40.0, graph_ms=graph, **fields)

    rows = [row("eager", 8.0), row("compiled", 4.0), row("fused", 2.0, note="a note")]
    bench._speedups(rows)
    lines = bench.markdown_summary(rows).splitlines()
    assert lines[0] == ("| bench | shape | dtype | layout | eager ms | compiled ms | fused ms | fused % copy | "
                        "vs eager | vs compiled |")  # fmt: skip
    assert lines[1] == "|" + "---|" * 10
    assert lines[2:] == ["| bam_eval | 8x256x56x56 | fp32 | nchw | 8.000 | 4.000 | 2.000 | 40% | 4.00x | 2.00x |"]
    table = bench.format_table(rows).splitlines()
    assert len(table) == 5 and table[4].endswith("eager 4.00x, compiled 2.00x  a note")
    # With CUDA graphs: their columns, and "-" where a contender has no time.
    rows = [row("eager", 8.0, 1.0, graph_pct_copy=40.0), row("fused", 2.0, 0.5, graph_pct_copy=80.0)]
    bench._speedups(rows)
    line = bench.markdown_summary(rows).splitlines()[2]
    assert line.endswith("| 8.000 | - | 2.000 | 40% | 4.00x | - | 1.000 | - | 0.500 | 80% | 2.00x | - |")
    assert "[graph 0.500 ms, 80% copy, eager 2.00x]" in bench.format_table(rows).splitlines()[3]


def test_write_results_records_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "_plots", lambda rows, out_dir, meta: [])
    rows = [bench_row("fused", 1.0, bench="gate_fwd", shape=SMALL, device_name="a CPU")]
    paths = bench.write_results(rows, tmp_path / "new", {"malloc": "x"})
    assert [p.name for p in paths] == ["results.json", "summary.md"]
    data = json.loads(paths[0].read_text())
    assert data["meta"]["device_name"] == "a CPU" and data["meta"]["malloc"] == "x"
    assert data["meta"]["cpu_threads"] == torch.get_num_threads()
    assert data["rows"][0]["median_ms"] == 1.0 and data["rows"][0]["shape"] == list(SMALL)
    assert (data["rows"][0]["torch"], data["rows"][0]["bam_fused"]) == (torch.__version__, bam_fused.__version__)
    assert paths[1].read_text().startswith(f"Device: a CPU (cpu), torch {torch.__version__}")
