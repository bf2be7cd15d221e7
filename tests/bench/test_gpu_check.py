"""bench/gpu_check.sh before a GPU is there: ``--cpu-smoke`` runs the whole pipeline (tiny
shapes, the kernels under Triton's interpreter) and writes a JSON and a Markdown file with
every section; a failing part is recorded and the script goes on; the report's reading of
how each part ended (bench/gpu_report.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_check import PEAK_BANDWIDTH_TBPS, peak_bandwidth
from bench.gpu_report import PARTS, assemble, markdown

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
SECTIONS = ("## Targets", "## Parts", "## Versions", "## CUDA tests", "## IOI step", "## edge_mix bandwidth",
            "## Llama-3.1-8B-shaped step")


def _run(out: Path, python: str, *args: str, timeout: float) -> tuple[subprocess.CompletedProcess, dict, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "EDGEPRUNE_BACKEND")}
    proc = subprocess.run(["bash", str(SCRIPT), *args, "--out", str(out), "--python", python], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)
    (js,), (md,) = sorted(out.glob("gpu-*.json")), sorted(out.glob("gpu-*.md"))
    return proc, json.loads(js.read_text()), md.read_text()


@pytest.mark.slow
def test_cpu_smoke_runs_every_part_and_writes_every_section(tmp_path):
    proc, report, md = _run(tmp_path, sys.executable, "--cpu-smoke", timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report["mode"] == "cpu-smoke" and report["wall_seconds"] < 400
    assert {n: report[n]["status"] for n in PARTS} == dict.fromkeys(PARTS, "ok"), proc.stdout[-3000:]
    assert all(s in md for s in SECTIONS)
    v = report["versions"]
    assert v["machine"]["torch"] and "edge_mix on cpu" in v["info_text"] and v["triton_kernels_unavailable"] == []
    t = report["tests"]
    assert t["passed"] > 0 and t["failures"] == t["errors"] == 0 and "-m cuda" in t["command"]
    ioi = {r["method"]: r for r in report["ioi_step"]["rows"]}
    assert set(ioi) == {"hf_floor", "ours", "original"}
    assert all(r["seconds"] > 0 and r["edge_mix_backend"] == "triton" for r in ioi.values())
    assert "EdgeMixFunctionBackward" in report["ioi_step"]["profile"]
    rows = report["edge_mix_bandwidth"]["rows"]
    assert len(rows) == 6 and report["edge_mix_bandwidth"]["interpreted"]
    assert all(r["check"]["ok"] and r["forward_bytes"] > 0 and r["backward_seconds"] > 0 for r in rows)
    llama = report["llama_8b"]
    assert [p["fits"] for p in llama["plans"]] == [True, True]
    (run,) = llama["runs"]  # the first plan that fits ran
    assert run["measured"]["step_seconds"] > 0 and run["measured"]["predicted_step_bytes"] > 0
    targets = report["targets"]
    assert targets["ioi_step_seconds"]["met"] is None and targets["llama_8b_on_one_gpu"]["met"] is None  # not judged
    assert targets["cuda_tests_pass"]["met"] is True and targets["edge_mix_matches_reference"]["met"] is True


def test_failing_parts_are_recorded_and_the_script_goes_on(tmp_path):
    """Every part fails at once (a stand-in interpreter); the report still runs on the real
    one and records each failure with its output, then the JSON and MD exist."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\nif [[ "$2" == bench.gpu_report ]]; then exec {sys.executable} "$@"; fi\n'
                    'echo "part $3 broke on purpose" >&2; exit 3\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    proc, report, md = _run(out, str(fake), "--cpu-smoke", timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in PARTS:
        assert report[name]["status"] == "failed" and report[name]["exit_code"] == 3
        assert f"part {name} broke on purpose" in report[name]["error"]
    assert report["targets"]["ioi_step_seconds"]["met"] is None
    assert all(s in md for s in SECTIONS[:3])


def test_a_failing_report_still_leaves_a_json(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/usr/bin/env bash\nexit 1\n")
    fake.chmod(0o755)
    proc, report, md = _run(tmp_path / "out", str(fake), "--cpu-smoke", timeout=120)
    assert proc.returncode == 0
    assert report["report_failed"] is True and set(report["parts"]) == set(PARTS)
    assert report["parts"]["tests"].startswith("1 ")  # exit code 1


def test_report_reads_timeouts_skips_and_saved_results(tmp_path):
    (tmp_path / "versions.status").write_text("0 1500 30\n")
    (tmp_path / "versions.json").write_text(json.dumps({"machine": {"torch": "x"}}))
    (tmp_path / "tests.status").write_text("124 150000 150\n")
    (tmp_path / "tests.log").write_text("collected 60 items\n...")
    (tmp_path / "tests.json").write_text(json.dumps({"pytest": "9", "command": "-m cuda"}))
    (tmp_path / "ioi_step.status").write_text("0 9000 80\n")
    (tmp_path / "ioi_step.json").write_text(json.dumps({"rows": [
        {"method": "hf_floor", "seconds": 0.04, "peak_bytes": 10**9, "reps": 10},
        {"method": "ours", "seconds": 0.08, "peak_bytes": 2 * 10**9, "reps": 10},
        {"method": "original", "seconds": 0.8, "peak_bytes": 9 * 10**9, "reps": 3}]}))
    (tmp_path / "edge_mix_bandwidth.status").write_text("skipped 0 0\n")
    report = assemble(tmp_path, "gpu", "bash bench/gpu_check.sh", None)
    assert report["versions"]["status"] == "ok" and report["versions"]["seconds"] == 1.5
    assert report["tests"]["status"] == "timed out" and "collected 60" in report["tests"]["error"]
    assert report["edge_mix_bandwidth"]["status"] == "skipped" and report["llama_8b"]["status"] == "not run"
    t = report["targets"]
    assert t["ioi_step_seconds"]["met"] is True and t["ioi_time_over_hf_floor"]["value"] == 2.0
    assert t["ioi_time_over_hf_floor"]["met"] is False and t["ioi_speedup_vs_original"]["value"] == 10.0
    assert t["llama_8b_on_one_gpu"]["met"] is None and t["cuda_tests_pass"]["met"] is None
    assert "| ours | 0.0800 | 2.00 | 10 |" in markdown(report)


def test_peak_bandwidth_by_device_name():
    assert peak_bandwidth("NVIDIA H100 80GB HBM3")["peak_TBps"] == 3.35
    assert peak_bandwidth("NVIDIA H100 PCIe")["peak_TBps"] == 2.0
    assert peak_bandwidth("NVIDIA H200")["peak_TBps"] == 4.8
    assert peak_bandwidth("NVIDIA A100-SXM4-80GB")["peak_TBps"] == 2.039
    assert peak_bandwidth("Some Future GPU")["peak_TBps"] is None and peak_bandwidth(None)["matched"] is None
    # a more specific name is listed before any name it contains, so it is the one found
    keys = [k for k, _, _ in PEAK_BANDWIDTH_TBPS]
    assert all(keys.index(a) < keys.index(b) for a in keys for b in keys if a != b and b in a)
