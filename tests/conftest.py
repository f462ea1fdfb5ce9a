"""Shared test setup: Triton kernels run natively on a GPU, and under Triton's interpreter on a CPU-only machine."""
import json
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")    # must be set before any @triton.jit is decorated
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Run by check_references_run_off_gpu. argv: the module, the setup code, and
# {entry point: [its reference, the arguments as Python source]}.
_OFF_GPU_SCRIPT = """
import json, sys, warnings
import torch
module, setup, calls = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
namespace = {"torch": torch, **vars(__import__(module))}
torch.manual_seed(0)
exec(setup, namespace)
report = {}
for name, (reference, args) in calls.items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, _ = (eval(f"{name}({args})", namespace) for _ in range(2))      # the second must not warn
    expected = eval(f"{reference}({args})", namespace)
    pairs = zip(*(o if isinstance(o, tuple) else (o,) for o in (out, expected)))
    report[name] = dict(equal=all(torch.equal(a, b) for a, b in pairs), warnings=[str(w.message) for w in caught])
print(json.dumps(report))
"""


def check_references_run_off_gpu(module, setup, calls):
    """In a subprocess without TRITON_INTERPRET (where Triton cannot launch on CPU tensors): each kernel entry point of
    `module`, called twice, equals its reference and warns once, naming it. calls: {entry point: (reference, the
    arguments as Python source)}, evaluated after the code `setup` on CPU tensors."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", _OFF_GPU_SCRIPT, module, setup, json.dumps(calls)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"tests/conftest.py: {module} off a GPU failed:\n{done.stderr}"
    report = json.loads(done.stdout.splitlines()[-1])
    for name, (reference, _) in calls.items():
        assert report[name]["equal"], f"{module}.{name} differs from {reference} off a GPU"
        warned = report[name]["warnings"]
        assert len(warned) == 1 and all(s in warned[0] for s in (name, reference, "CPU", "TRITON_INTERPRET=1")), warned


@pytest.fixture(scope="module")
def timm():
    """timm, the oracle for the released vision towers (tests/timm_oracle.py); the test skips where it is missing."""
    import timm_oracle
    module = timm_oracle.load_timm()
    if module is None:
        pytest.skip("timm is not installed")
    return module
