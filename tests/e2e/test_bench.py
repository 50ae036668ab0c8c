"""The benchmark script runs and writes what it promises (no timing is asserted)."""

import json
import re
import subprocess

from tests.helpers import PYTHON, REPO, job_env


def test_quick_benchmark_writes_json_table_and_plot(tmp_path):
    result = subprocess.run([PYTHON, "benchmarks/run.py", "--quick", "--out", str(tmp_path)], cwd=REPO,
                            env=job_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert {case["name"] for case in results["cases"]} == {"data np1", "data np2"}
    for case in results["cases"]:  # both are a goal's sides: one run a round, two rounds
        assert case["median"] > 0 and case["min"] <= case["median"] <= case["max"], case
        assert case["runs"] == 2 and [len(windows) for windows in case["windows"]] == [2, 2]
    rounds = results["paired"]["rounds"]  # np2 then np1, then the other way round
    assert [[(run["name"], run["position"]) for run in runs] for runs in rounds] == \
        [[("data np2", 0), ("data np1", 1)], [("data np1", 0), ("data np2", 1)]]
    sizes = results["allreduce"]["shipped"]["sizes"]
    assert [size["bytes"] for size in sizes] == [1024, 4096, 16384]
    assert all(size["horovod_bytes_per_sec"] > 0 and size["mpi4py_bytes_per_sec"] > 0 for size in sizes)
    gpu = results["gpu"]  # measured where CUDA is, else a record of why not
    assert gpu["gpu"] is None and "no CUDA device" in gpu["reason"] or gpu["cases"], gpu
    table = (tmp_path / "results.md").read_text()
    assert "| data np2 | torch | 2 |" in table and "scaling efficiency" in table
    scaling = next(line for line in table.splitlines() if line.startswith("| seed CNN: data scaling"))
    assert re.search(r"\| \d\.\d\d \(\d\.\d\d–\d\.\d\d\) (met|not met|within noise) \| – \|$", scaling), scaling
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failing_or_timed_out_case_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    """The harness's own case list with a bad flag, a job that outlives its time limit, and a
    bf16 case on a CPU without native bf16 (played by CNN_PARALLEL_CPU_FLAGS): the good
    case is measured, the bad ones recorded with why and their output's end, the bf16 one
    skipped without running; every file is written and the exit status says cases failed."""
    import pytest

    from benchmarks import run

    def unrunnable():
        raise AssertionError("a bf16 case must not run on a CPU that emulates bf16")

    def cases(settings, quick):
        return [("data np1", "data", "torch", 1, False, lambda: run.entry_case(settings, "torch", 1)),
                ("data np1 --no-such-flag", "data", "torch", 1, False,
                 lambda: run.entry_case(settings, "torch", 1, ["--no-such-flag"])),
                ("a job that outlives its limit", "data", "torch", 1, False,
                 lambda: run.run(["sleep", "30"], run.job_env(), timeout=1)),
                ("data np1 --amp bf16", "data", "torch", 1, False, unrunnable)]
    monkeypatch.setattr(run, "main_cases", cases)
    monkeypatch.setenv("CNN_PARALLEL_CPU_FLAGS", "sse4_2 avx2 fma")
    with pytest.raises(SystemExit) as exited:
        run.main(["--quick", "--out", str(tmp_path)])
    assert exited.value.code == 1
    results = json.loads((tmp_path / "results.json").read_text())
    assert [case["name"] for case in results["cases"]] == ["data np1"] and results["cases"][0]["median"] > 0
    failed = {case["name"]: case for case in results["failed"]}
    assert failed["data np1 --no-such-flag"]["failed"].startswith("exited 2")
    assert "unrecognized arguments: --no-such-flag" in failed["data np1 --no-such-flag"]["tail"]
    assert failed["a job that outlives its limit"]["failed"].startswith("timed out after 1 s")
    assert [case["name"] for case in results["skipped"]] == ["data np1 --amp bf16"]
    assert "no native bf16" in results["skipped"][0]["skipped"]
    assert results["machine"]["cpu_features"] == ["AVX2"]
    table = (tmp_path / "results.md").read_text()
    assert "; AVX2)" in table  # the machine line names the CPU's features
    assert "data np1 --no-such-flag: failed, exited 2" in table and "data np1 --amp bf16: skipped" in table
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
