"""The benchmark script runs and writes what it promises (no timing is asserted)."""

import json
import subprocess

from tests.helpers import PYTHON, REPO, job_env


def test_quick_benchmark_writes_json_table_and_plot(tmp_path):
    result = subprocess.run([PYTHON, "benchmarks/run.py", "--quick", "--out", str(tmp_path)], cwd=REPO,
                            env=job_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert {case["name"] for case in results["cases"]} == {"data np1", "data np2"}
    for case in results["cases"]:
        assert case["median"] > 0 and case["min"] <= case["median"] <= case["max"], case
        assert len(case["windows"]) == 2
    sizes = results["allreduce"]["shipped"]["sizes"]
    assert [size["bytes"] for size in sizes] == [1024, 4096, 16384]
    assert all(size["horovod_bytes_per_sec"] > 0 and size["mpi4py_bytes_per_sec"] > 0 for size in sizes)
    gpu = results["gpu"]  # measured where CUDA is, else a record of why not
    assert gpu["gpu"] is None and "no CUDA device" in gpu["reason"] or gpu["cases"], gpu
    table = (tmp_path / "results.md").read_text()
    assert "| data np2 | torch | 2 |" in table and "scaling efficiency" in table
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
