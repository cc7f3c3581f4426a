"""The CPU sources compile with clang for x86-64 and for 64-bit ARM (no such compiler or CPU
needed: zig's clang, from the `ziglang` package, cross-compiles against torch's headers).

The build here uses GCC on x86-64, so without this check nothing would compile the clang branch
of isa.h's target pragmas (BAM_TARGET_BEGIN), and nothing would prove that every x86 intrinsic
stays behind BAM_X86, so that the extension builds on ARM servers and Apple silicon (where the
generic 4-lane vector code runs: BAM_FUSED_CPU_ISA=generic, tested on x86 like the others).
Compile only: nothing links or runs for ARM here."""

import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([ROOT / "csrc" / "bam_fused.cpp", *(ROOT / "csrc" / "cpu").glob("*.cpp")])

# ATen's OpenMP backend includes <omp.h>, which zig does not ship; the sources only need its
# declarations to compile.
OMP_H = """#pragma once
#ifdef __cplusplus
extern "C" {
#endif
int omp_get_num_threads(void);
int omp_get_max_threads(void);
int omp_get_thread_num(void);
int omp_in_parallel(void);
void omp_set_num_threads(int);
#ifdef __cplusplus
}
#endif
"""


def _compile(target: str, src: Path, flags: list[str], out: Path) -> tuple[Path, int, str]:
    cmd = [sys.executable, "-m", "ziglang", "c++", "-target", target, "-c", str(src), "-o", str(out), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    return src, proc.returncode, proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("target", ["x86_64-linux-gnu", "aarch64-linux-gnu"])
def test_cpu_sources_compile_with_clang(tmp_path, target):
    pytest.importorskip("ziglang", reason="the ziglang package (requirements-dev.txt) is not installed")
    from torch.utils.cpp_extension import include_paths

    (tmp_path / "omp.h").write_text(OMP_H)
    flags = [
        "-std=c++20", "-O1", "-fopenmp", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-fno-math-errno", "-fno-trapping-math", "-isystem", str(tmp_path),
        *(f"-I{p}" for p in include_paths()), f"-I{sysconfig.get_paths()['include']}",
        # Any warning fails, but clang's note that a float64 loop calling std::exp did not vectorise.
        "-Werror", "-Wno-pass-failed",
    ]  # fmt: skip
    with ThreadPoolExecutor(max_workers=2) as pool:  # header parsing dominates: ~10-25 s a file
        results = list(pool.map(lambda s: _compile(target, s, flags, tmp_path / f"{s.stem}.o"), SOURCES))
    failed = {src.name: err[-3000:] for src, rc, err in results if rc != 0}
    assert not failed, f"clang for {target}: " + "\n".join(f"--- {k}\n{v}" for k, v in failed.items())
    assert all((tmp_path / f"{s.stem}.o").stat().st_size > 0 for s in SOURCES)
    if target.startswith("aarch64"):
        # The objects are ARM's (ELF machine 183), not x86 code from a misread target.
        header = (tmp_path / "gate_cpu.o").read_bytes()[:20]
        assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
