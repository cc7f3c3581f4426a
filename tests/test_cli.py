"""The main job's commands: info, verify and bench, run as a user would (in-process)."""

import json
import re

import pytest
import torch
from helpers import bench_row, run_python

import bam_fused
from bam_fused import _backends, cli
from bam_fused.ops import gate as gate_module
from bam_fused.ops import gate_cpp


def test_info_text_and_json(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "torch:" in text and "gate (C++, CPU)" in text and "branches (CUDA)" in text
    assert cli.main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kernels"]["gate (C++, CPU)"]["active"] is True
    triton_gate = data["kernels"]["gate (Triton, CUDA)"]
    if torch.cuda.is_available():
        assert triton_gate["active"] is True
    else:
        assert triton_gate["reason"]  # no GPU here: says why


@pytest.mark.parametrize(
    ("content", "asked", "says"),
    [
        ("always [madvise] never\n", None, "madvise: torch does not ask (THP_MEM_ALLOC_ENABLE=1 would)"),
        ("always [madvise] never\n", "1", "madvise: torch asks (THP_MEM_ALLOC_ENABLE=1)"),
        ("[always] madvise never\n", "1", "always"),
        ("always madvise [never]\n", None, "never"),
        ("", None, "unknown"),
        (None, None, "not available"),
    ],
)
def test_info_says_whether_tensors_get_huge_pages(tmp_path, monkeypatch, content, asked, says):
    import bam_fused
    from bam_fused.info import cpu_huge_pages

    mode = tmp_path / "enabled"
    if content is not None:
        mode.write_text(content)
    if asked is None:
        monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    else:
        monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", asked)
    assert cpu_huge_pages(str(mode)) == says
    assert isinstance(bam_fused.info()["cpu_huge_pages"], str)


def test_verify_quick_passes_and_writes_rows(tmp_path, capsys):
    assert cli.main(["verify", "--device", "cpu", "--quick", "--dtype", "bf16", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert " passed, 0 failed" in out and "d_channel" in out and "d2_spatial" in out
    assert "bam[eval]" in out and "bam[train]" in out and "bam[grad]" in out
    # Every CPU path: the C++ gate, the Triton one where the interpreter runs it, and BAM.
    paths = "gate[cpp], gate[triton], bam" if _backends.triton_interpreted() else "gate[cpp], bam"
    assert f" passed, 0 failed ({paths} on cpu)" in out
    rows = json.loads((tmp_path / "verify.json").read_text())
    assert rows and {"path", "shape", "dtype", "max_abs", "tolerance", "passed"} <= set(rows[0])
    gates = {p for p in paths.split(", ") if p.startswith("gate")}
    assert {r["path"] for r in rows} == gates | {"bam[eval]", "bam[grad]", "bam[train]"}
    # Training gradients where a switched ReLU is improbable: the odd shapes of the quick grid.
    assert {tuple(r["shape"]) for r in rows if r["path"] == "bam[train]" and r["quantity"] == "d_x"} == {(2, 37, 7, 9)}


def test_verify_fails_on_a_broken_kernel(monkeypatch, capsys):
    real = gate_cpp.gate_forward

    def off_by_a_little(x3, row, col, product):
        out = real(x3, row, col, product)
        out.view(-1)[::97] += 1e-2  # a few wrong elements
        return out

    monkeypatch.setattr(gate_cpp, "gate_forward", off_by_a_little)
    assert cli.main(["verify", "--device", "cpu", "--quick", "--dtype", "fp32"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_verify_fails_when_a_repeated_eval_call_differs(monkeypatch, capsys):
    """The module's short path for repeated eval calls one ulp off: within every tolerance, so only
    the "out again" rows' same-bits check sees it."""
    real = bam_fused.BAM._eval_again

    def one_ulp_up(self, x):
        out = real(self, x)
        return None if out is None else torch.nextafter(out, torch.full_like(out, float("inf")))

    monkeypatch.setattr(bam_fused.BAM, "_eval_again", one_ulp_up)
    assert cli.main(["verify", "--device", "cpu", "--quick", "--dtype", "fp32"]) == 1
    failed = [line for line in capsys.readouterr().out.splitlines() if line.endswith("FAIL")]
    assert failed and all(" out again " in line for line in failed)


def test_verify_fails_on_a_wrong_second_derivative(monkeypatch, capsys):
    real = gate_module.differentiable_backward

    def off_by_a_little(*args):
        dx, dc, ds = real(*args)
        return dx, dc * 1.01, ds  # d channel_att 1% off: only the create_graph rows see it

    monkeypatch.setattr(gate_module, "differentiable_backward", off_by_a_little)
    assert cli.main(["verify", "--device", "cpu", "--quick", "--dtype", "fp32"]) == 1
    failed = [line for line in capsys.readouterr().out.splitlines() if line.endswith("FAIL")]
    assert failed and all(" d2_" in line for line in failed)


def test_verify_fails_on_a_broken_training_path(monkeypatch, capsys):
    """BatchNorm normalising with its running statistics in training mode: only the train rows see it."""
    from bam_fused.ops import training

    monkeypatch.setattr(training, "_batch_stats", lambda bn: False)
    assert cli.main(["verify", "--device", "cpu", "--quick", "--dtype", "fp32"]) == 1
    failed = [line for line in capsys.readouterr().out.splitlines() if line.endswith("FAIL")]
    assert failed and all(line.startswith("bam[train]") for line in failed)
    assert any(" out " in line for line in failed) and any(" d_x " in line for line in failed)


def test_bench_quick_writes_json_and_plots(tmp_path, capsys):
    assert cli.main(["bench", "--device", "cpu", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "speed-up of fused" in table and "resnet50" in table
    data = json.loads((tmp_path / "results.json").read_text())
    assert {"device", "device_name", "torch", "triton", "bam_fused", "cpu_huge_pages"} <= set(data["meta"])
    rows = data["rows"]
    benches = {r["bench"] for r in rows}
    assert benches == {"gate_fwd", "gate_fwd_bwd", "bam_eval", "bam_train", "resnet50"}
    for r in rows:
        assert {"median_ms", "iqr_ms", "gbps", "pct_copy", "roofline_ratio", "device_name", "torch"} <= set(r)
        if r["bench"] != "resnet50":
            assert r["median_ms"] > 0 and r["gbps"] > 0 and r["copy_gbps"] > 0
            assert r["roofline_ratio"] == pytest.approx(100 / r["pct_copy"], rel=1e-6)
    fused = [r for r in rows if r["contender"] == "fused" and r["bench"] == "bam_eval"]
    assert set(fused[0]["speedup"]) == {"eager", "compiled"}
    for name in ("speedup.png", "bandwidth.png"):
        png = tmp_path / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_cli_rejects_cuda_without_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="no CUDA device is visible"):
        cli.main(["verify", "--device", "cuda"])


def test_device_is_auto_by_default():
    for command in ("bench", "verify"):
        assert cli.build_parser().parse_args([command]).device == "auto"
        assert cli.build_parser().parse_args([command, "--device", "auto"]).device == "auto"


def test_one_thread_is_a_positive_count():
    assert cli.build_parser().parse_args(["bench", "--threads", "1"]).threads == 1
    assert cli.build_parser().parse_args(["bench"]).threads is None  # (torch's own count)


def test_the_command_exits_with_mains_status():
    """python -m bam_fused.cli (the bam-fused script calls the same main)."""
    import subprocess
    import sys

    for argv, status in ((["info"], 0), (["verify", "--device", "cuda:99"], 1)):
        command = [sys.executable, "-m", "bam_fused.cli", *argv]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == status, (argv, done.stderr[-2000:])


def test_device_names_a_visible_gpu(monkeypatch):
    assert cli._device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cli._device("auto") == torch.device("cuda") and cli._device("cuda:1") == torch.device("cuda", 1)
    assert cli._device("cpu") == torch.device("cpu")
    with pytest.raises(SystemExit, match=re.escape("--device cuda:2 asked for, but 2 CUDA device(s) are visible")):
        cli._device("cuda:2")


@pytest.mark.parametrize(("argv", "keeps", "says", "malloc"), [
    ([], True, "allocator: glibc keeps freed memory (on;", "glibc keeps freed memory (mallopt)"),
    ([], False, "allocator: glibc keeps freed memory (unavailable;", "system defaults (mallopt unavailable)"),
    (["--system-malloc"], None, None, "system defaults"),
])  # fmt: skip
def test_bench_takes_its_options(tmp_path, monkeypatch, capsys, argv, keeps, says, malloc):
    """What cmd_bench does before and after the run (the run itself: test_bench_quick_...)."""
    from bam_fused import bench

    plans, threads = [], []

    def keep_freed_memory():
        assert keeps is not None, "--system-malloc asked glibc to keep freed memory"
        return keeps

    def run(p, progress):
        plans.append((p, progress))
        return [bench_row("fused", 1.0, device_name="a CPU")]

    monkeypatch.setattr(bench, "keep_freed_memory", keep_freed_memory)
    monkeypatch.setattr(bench, "run", run)
    monkeypatch.setattr(bench, "_plots", lambda rows, out_dir, meta: [])
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    out_dir = tmp_path / "new" / "folder"  # (made with its parents)
    argv = ["bench", "--device", "cpu", "--dtype", "bf16", "--threads", "3", "--out", str(out_dir), *argv]
    assert cli.main(argv) == 0
    ((p, progress),) = plans
    assert p.dtypes == ["bf16"] and p.shapes == bench.plan(torch.device("cpu"), quick=False).shapes
    assert progress is True and threads == [3]
    out = capsys.readouterr().out
    assert ("allocator:" in out) == (says is not None) and (says is None or says in out)
    assert "1 rows on a CPU" in out and f"wrote {out_dir / 'results.json'}" in out
    assert json.loads((out_dir / "results.json").read_text())["meta"]["malloc"] == malloc


def test_bench_quick_keeps_the_plans_dtypes(monkeypatch):
    from bam_fused import bench

    plans = []
    monkeypatch.setattr(bench, "run", lambda p, progress: plans.append((p, progress)) or [])
    monkeypatch.setattr(bench, "keep_freed_memory", lambda: True)
    assert cli.main(["bench", "--device", "cpu", "--quick", "--no-progress"]) == 0
    ((p, progress),) = plans
    assert p.dtypes == bench.plan(torch.device("cpu"), quick=True).dtypes and progress is False


def test_verify_gives_the_same_figures_whatever_the_random_state(monkeypatch, tmp_path):
    from bam_fused import verify

    cases = verify.cases

    def few(*args):  # the small odd shape on each path suffices
        return [case for case in cases(*args) if case[1].endswith("(2, 37, 7, 9) fp32 nchw sum")]

    monkeypatch.setattr(verify, "cases", few)
    for seed in (1, 2):
        torch.manual_seed(seed)
        out = str(tmp_path / str(seed))
        assert cli.main(["verify", "--device", "cpu", "--quick", "--dtype", "fp32", "--out", out]) == 0
    first, second = (json.loads((tmp_path / s / "verify.json").read_text()) for s in ("1", "2"))
    assert first == second and len(first) >= 3


@pytest.mark.parametrize(("argv", "dtypes", "quick"), [
    ([], ["fp32", "fp16", "bf16"], False), (["--dtype", "bf16", "--quick"], ["bf16"], True),
])  # fmt: skip
def test_verify_takes_its_options(monkeypatch, capsys, argv, dtypes, quick):
    from bam_fused import verify

    asked = []
    monkeypatch.setattr(verify, "cases", lambda *args: asked.append(args) or [])
    assert cli.main(["verify", "--device", "cpu", *argv]) == 0
    assert asked == [(torch.device("cpu"), quick, dtypes)]
    assert "0 passed, 0 failed" in capsys.readouterr().out


def test_verify_says_when_no_path_is_active(monkeypatch, capsys):
    from bam_fused import verify

    monkeypatch.setattr(verify, "active_paths", lambda device: ([], ["gate[cpp]: why not", "bam: why not either"]))
    assert cli.main(["verify", "--device", "cpu", "--quick"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == ["inactive: gate[cpp]: why not", "inactive: bam: why not either",
                   "bam-fused verify: no fused path is active on cpu; nothing was checked"]  # fmt: skip


@pytest.mark.parametrize("command", ["bench", "verify"])
def test_out_that_cannot_be_written_stops_before_the_run(tmp_path, monkeypatch, command):
    """Before 2026-11-28 bench ran every case, then raised FileNotFoundError writing the results."""
    from bam_fused import bench, verify

    def must_not_run(*args, **kwargs):
        raise AssertionError("ran before checking --out")

    monkeypatch.setattr(bench, "run", must_not_run)
    monkeypatch.setattr(verify, "cases", must_not_run)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for out, why in ((a_file / "out", "Not a directory"), (a_file, "File exists")):
        with pytest.raises(SystemExit, match=re.escape(f"--out {out}: cannot write there ({why})")):
            cli.main([command, "--device", "cpu", "--quick", "--out", str(out)])


@pytest.mark.parametrize(
    "argv,says",
    [
        (["bench", "--device", "tpu"], "argument --device: expected auto, cpu, cuda or cuda:<i>, got 'tpu'"),
        (["verify", "--device", "cuda:x"], "argument --device: expected auto, cpu, cuda or cuda:<i>, got 'cuda:x'"),
        (["bench", "--threads", "0"], "argument --threads: expected a positive integer, got '0'"),
        (["bench", "--threads", "two"], "argument --threads: expected a positive integer, got 'two'"),
        ([], "the following arguments are required: command"),
    ],
)
def test_cli_rejects_bad_arguments_as_usage_errors(capsys, argv, says):
    """Before 2026-11-26 --device tpu raised torch's RuntimeError with a traceback, and --threads 0
    was ignored (the whole benchmark ran with the default count)."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2 and says in capsys.readouterr().err


@pytest.mark.parametrize(
    "value,active,says",
    [(None, True, "at 16 and 32 reduced channels"), ("kernel", True, "BAM_FUSED_CPU_SPATIAL=kernel"),
     ("library", False, "oneDNN"), ("fast", False, "must be auto, kernel or library, got 'fast'")],
)  # fmt: skip
def test_info_says_who_runs_the_cpu_dilated_convs(monkeypatch, capsys, value, active, says):
    if value is None:
        monkeypatch.delenv("BAM_FUSED_CPU_SPATIAL", raising=False)
    else:
        monkeypatch.setenv("BAM_FUSED_CPU_SPATIAL", value)
    assert cli.main(["info", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)["kernels"]["dilated convs (C++, CPU)"]
    assert st["active"] is active and says in (st.get("note") if active else st["reason"])


@pytest.mark.parametrize(
    "value,says",
    [(None, "Winograd F(2x2, 3x3) from 16 channels"), ("on", "BAM_FUSED_CPU_WINOGRAD=on"),
     ("off", "direct (BAM_FUSED_CPU_WINOGRAD=off)"), (" OFF ", "direct (BAM_FUSED_CPU_WINOGRAD=off)"),
     ("yes", "must be auto, on or off, got 'yes'")],
)  # fmt: skip
def test_info_says_how_our_cpu_dilated_convs_compute(monkeypatch, capsys, value, says):
    monkeypatch.setenv("BAM_FUSED_CPU_ISA", "generic")
    monkeypatch.delenv("BAM_FUSED_CPU_SPATIAL", raising=False)
    if value is None:
        monkeypatch.delenv("BAM_FUSED_CPU_WINOGRAD", raising=False)
    else:
        monkeypatch.setenv("BAM_FUSED_CPU_WINOGRAD", value)
    assert cli.main(["info", "--json"]) == 0
    assert says in json.loads(capsys.readouterr().out)["kernels"]["dilated convs (C++, CPU)"]["note"]


def test_cpu_probe_runs_its_subcommands():
    """benchmarks/cpu_probe.py (not part of the package) on a small shape, so that it cannot rot."""
    from pathlib import Path

    probe = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_probe.py"
    common = ["--shape", "2,64,7,9", "--reps", "1", "--threads", "1"]
    runs = ((["stages"], "convs+mlp", "fp32"), (["stages", "--dtype", "bf16"], "convs+mlp", "bf16"),
            (["ab", "BAM_FUSED_CPU_SPATIAL", "library", "kernel"], "eval BAM_FUSED_CPU_SPATIAL=kernel", "fp32"),
            (["ab", "BAM_FUSED_CPU_WINOGRAD", "off", "on", "--train"], "train BAM_FUSED_CPU_WINOGRAD=on", "fp32"),
            (["compiled"], "reference compiled", "fp32"),
            (["compiled", "--in-model"], "no BAM compiled", "fp32"))  # fmt: skip
    for args, want, dtype in runs:
        out = run_python(str(probe), *args, *common)
        assert want in out and f"(2, 64, 7, 9) {dtype} nchw" in out


def test_every_environment_variable_read_is_documented():
    """Each BAM_FUSED_* variable that the package, the extension or setup.py reads appears in
    bam_fused/env.py's table and in the README, so that a new switch cannot go undocumented."""
    import re
    from pathlib import Path

    from bam_fused import env

    root = Path(__file__).resolve().parents[1]
    files = [root / "setup.py", *(root / "bam_fused").rglob("*.py"), *(root / "csrc").rglob("*.[ch]*")]
    read = re.compile(r"""(?:choice|getenv|flag|environ\.get|environ\[)\(?\s*["'](BAM_FUSED_[A-Z0-9_]+)""")
    names = {m for f in files for m in read.findall(f.read_text(errors="replace"))}
    scanned = {"BAM_FUSED_CPU_WINOGRAD", "BAM_FUSED_DISABLE_EXT", "BAM_FUSED_FORCE_CUDA", "BAM_FUSED_CUDA_EVAL"}
    assert scanned <= names  # the scan works
    readme = (root / "README.md").read_text()
    for name in sorted(names):
        assert name in env.__doc__, name
        assert f"`{name}`" in readme, name
