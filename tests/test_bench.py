"""The bench's timing: on the CPU the contenders (and the copy) take turns."""

import itertools

import torch

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
    bench.interleaved_ms(fns, torch.device("cpu"), budget_s=0.002, turns=1)
    assert [k for k, _ in itertools.groupby(calls)] == ["eager", "fused"]
