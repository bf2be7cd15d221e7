"""Importing the package and running the ops never fails for lack of Triton or the
compiled extension: each case runs in a fresh interpreter in which those modules are
made unimportable."""

import json
import subprocess
import sys
import textwrap

import pytest

BLOCKER = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in {blocked!r} or any(name.startswith(b + ".") for b in {blocked!r}):
            raise ImportError(f"{{name}} hidden by the test")
        return None
sys.meta_path.insert(0, _Block())
"""

BODY = """
import json, torch
import edgeprune_fast
from edgeprune_fast.ops import edge_mix, hard_concrete, mix
from edgeprune_fast.ops.backends import choose, load_error
from edgeprune_fast.info import collect
la = torch.randn(3, 5, requires_grad=True)
clean = torch.randn(5, 2, 7, requires_grad=True)
x, z = edge_mix(la, clean, torch.randn(5, 2, 7), seed=1)
x.sum().backward()
m = mix(z.detach(), clean)
h = hard_concrete(la, seed=2)
info = collect()
print(json.dumps({{"chosen": choose("edge_mix", [clean]).name, "grad_ok": bool(la.grad.isfinite().all()),
                  "ext": info["extension _C"], "triton": info["triton"]}}))
"""


@pytest.mark.parametrize("blocked", [("triton",), ("edgeprune_fast._C",), ("triton", "edgeprune_fast._C")])
def test_import_and_ops_without(blocked):
    code = textwrap.dedent(BLOCKER.format(blocked=blocked)) + textwrap.dedent(BODY.format())
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["grad_ok"]
    if "edgeprune_fast._C" in blocked:
        assert result["chosen"] == "reference"
        assert "not built" in result["ext"] or "not available" in result["ext"]
    if "triton" in blocked:
        assert result["triton"].startswith("not available")
