"""bench/mib_agreement.py: our MIB evaluation against MIB's own (its evaluate_area_under_curve
with its pinned EAP-IG on TransformerLens), on the tiny cases, to 1e-4 (Gemma-2 with
post_norm="reader", MIB's graph for its post-norms).

MIB's code needs an environment of its own (transformer_lens 2.9.1, transformers 4.46.3, eap
at 7af394a, MIB_circuit_track); the test runs when MIB_REFERENCE_PYTHON names its interpreter
and is skipped otherwise (see the bench's docstring for how that environment was built).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REFERENCE = os.environ.get("MIB_REFERENCE_PYTHON")
# Gemma-2's zero ablation in float64 only: in float32 EAP-IG's empty readers carry rounding that
# Gemma-2's norms scale up (bench/mib_agreement.py, FLOAT64)
TINY = ("gpt2-ioi-patching-signed,gpt2-ioi-zero-abs,qwen2-ioi-patching-abs,qwen2-ioi-zero-abs,"
        "gemma2-ioi-patching-abs,gemma2-ioi-zero-abs-float64")


def _has_mib(python: str) -> bool:
    probe = "import transformer_lens, eap.evaluate, MIB_circuit_track.evaluation"
    return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0


@pytest.mark.skipif(not REFERENCE or not _has_mib(REFERENCE),
                    reason="MIB's environment not given (MIB_REFERENCE_PYTHON with transformer_lens, eap, MIB)")
def test_faithfulness_agrees_with_mibs_own_evaluation(tmp_path):
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "agreement.json"
    subprocess.run([REFERENCE, str(root / "bench" / "mib_agreement.py"), "--stage", "reference", "--work",
                    str(tmp_path), "--cases", TINY], check=True, cwd=root)
    from bench.mib_agreement import CASES, ours

    cases = [c for c in CASES if c[0] in TINY.split(",")]
    result = ours(tmp_path, cases)["cases"]
    out.write_text(json.dumps(result))
    assert set(result) == set(TINY.split(","))
    for name, r in result.items():
        assert r["n_examples"] == r["n_examples_mib"] and r["n_edges"] == r["n_edges_mib"], name
        assert r["max_abs_diff"] < 1e-4, name
        assert abs(r["cpr"] - r["cpr_mib"]) < 1e-4 and abs(r["cmd"] - r["cmd_mib"]) < 1e-4, name
        if r["post_norm"] == "reader":  # Gemma-2: our default mode is not MIB's graph
            assert r["max_abs_diff_post_norm_writer"] > 1e-2, name
