"""src/gpu_session.py, the one command for a lent GPU: every part that needs no GPU, run
on the CPU at tiny sizes, so that the GPU session's first minute is not its first test."""
import json
import sys
import time
from pathlib import Path

import pytest

import gpu_session


@pytest.mark.slow
def test_dry_run_on_the_cpu_writes_every_figure(tmp_path):
    out_file = tmp_path / "out" / "gpu_session.json"
    returned = gpu_session.main(["--device", "cpu", "--tiny", "--no-compile", "--parts", "paper_run", "cuda_tests",
                                 "benchmark", "--out-file", str(out_file), "--work-dir", str(tmp_path)])
    figures = json.loads(out_file.read_text())
    assert figures == json.loads(json.dumps(returned))
    assert figures["machine"]["device"] == "cpu" and figures["settings"]["epochs"] == 2
    parts = figures["parts"]
    assert list(parts) == ["data", "paper_run", "cuda_tests", "benchmark"]
    assert {name: part["status"] for name, part in parts.items()} == dict.fromkeys(parts, "ok")
    assert parts["data"]["rows"] == 24

    run = parts["paper_run"]
    assert "--split random" in run["command"] and "--epochs 2 --device cpu" in run["command"]
    assert run["choices"] == dict(precision="fp32", fused_adam=False, resident=False, cudnn_benchmark=False,
                                  compile=False)  # the CPU's defaults, stated by the run itself
    assert len(run["epoch_s"]) == 2 and 0 < sum(run["epoch_s"]) < run["wall_s"]
    assert run["startup_s"] == pytest.approx(run["wall_s"] - sum(run["epoch_s"]), abs=0.01)
    assert run["projected_40_epochs_s"] == pytest.approx(
        run["startup_s"] + run["epoch_s"][0] + 39 * run["epoch_s"][1], abs=0.1)

    tests = parts["cuda_tests"]  # on a CPU every CUDA test skips, and says why
    assert (tests["passed"], tests["failed"], tests["error"], tests["skipped"]) == (0, 0, 0, len(tests["tests"]))
    assert len(tests["tests"]) >= 10
    for test in tests["tests"]:
        assert "no CUDA GPU" in test["message"] or "needs 2 CUDA GPUs" in test["message"], test

    bench = parts["benchmark"]
    assert bench["device"] == "cpu" and "fast+compile" not in bench
    for mode in ("baseline", "fast"):
        assert bench[mode]["ms_per_step"] > 0 and bench[mode]["projected_40_epochs_s"] > 0
    assert figures["best"]["run"] == "paper_run"
    assert figures["best"]["speedup_vs_benchmark_baseline"] == pytest.approx(
        bench["baseline"]["projected_40_epochs_s"] / run["projected_40_epochs_s"], rel=0.01)
    log = out_file.with_suffix(".log").read_text()
    assert log.count("\n$ ") == 3 and "trainer.py" in log and "test_cuda.py" in log
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # data and runs removed


def test_parts_left_without_time_are_skipped_and_say_how_to_run_them(tmp_path):
    figures = gpu_session.main(["--device", "cpu", "--tiny", "--parts", "cuda_tests", "benchmark",
                                "--budget-s", "0", "--out-file", str(tmp_path / "f.json"), "--work-dir", str(tmp_path)])
    assert list(figures["parts"]) == ["cuda_tests", "benchmark"]  # no paper run: no data made
    for name, part in figures["parts"].items():
        assert part["status"] == "skipped" and f"--parts {name}" in part["reason"]


def test_a_part_past_its_time_is_killed_with_its_children(tmp_path):
    """A hung part (here a process and its child, both asleep) ends at its limit, children
    included, so the rest of the session still runs."""
    code = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(60)']); print(child.pid, flush=True); time.sleep(60)")
    status, seconds, output = gpu_session.run_logged([sys.executable, "-c", code], 3, tmp_path / "log")
    assert status == "timeout" and seconds < 10
    stat = Path(f"/proc/{int(output.split()[0])}/stat")
    for _ in range(50):  # SIGKILL takes effect soon, not at once
        if not stat.exists() or stat.read_text().split(") ")[1][0] in "ZX":  # gone, or a zombie
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the part's child {stat.parent.name} still runs")
    assert f"$ {sys.executable} -c" in (tmp_path / "log").read_text()
