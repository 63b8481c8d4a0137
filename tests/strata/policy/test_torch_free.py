"""strata.policy is torch-free and grpc-free as a whole: the planner runs (`strata plan`,
the bench's and serve's planning) without loading either."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[3]


def test_importing_every_policy_module_loads_neither_torch_nor_grpc():
    code = ("import importlib, pkgutil, sys; import strata.policy as p; "
            "names = sorted(m.name for m in pkgutil.walk_packages(p.__path__, 'strata.policy.')); "
            "[importlib.import_module(n) for n in names]; "
            "print(' '.join(names)); print(' '.join(m for m in ('torch', 'grpc') if m in sys.modules) or '-')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    names, loaded = out.stdout.splitlines()
    assert {"strata.policy.planner", "strata.policy.cost_model", "strata.policy.run_plan"} <= set(names.split())
    assert loaded == "-", f"importing strata.policy loads {loaded}"
