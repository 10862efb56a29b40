"""Test set-up: every test process sees 8 simulated CPU devices; fixtures build meshes and temp homes."""

import atexit
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

# The tests' programs are tiny: LLVM's optimisations (level 2, XLA's default) cost more compile time than they save
# at run time (the suite: about a third less CPU time at level 0), and so do XLA:CPU's fusion emitters (a tiny
# train step: 2.5 s of backend compile with them, 1.1 s without). Scripts the tests start get the same flags.
def cpu_xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process or a script a test starts: `devices` simulated CPU devices, compiled fast."""
    return (f"--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
            f"--xla_force_host_platform_device_count={devices}")


os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {cpu_xla_flags(8)}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One on-disk XLA cache for the whole run (xdist workers and the scripts tests start inherit it): the same tiny
# train steps are compiled by dozens of tests and processes, each after the first reads them back.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="nanochat-jax-tests-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from hypothesis import settings  # noqa: E402

settings.register_profile("repeatable", derandomize=True)  # the same examples every run: CI cannot flake on a new one
settings.load_profile("repeatable")


def load_script(name: str, folder: str = "scripts"):
    """The repo's folder/name.py imported as a module (its functions, not its `__main__`)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def make_mesh():
    """make_mesh(data, fsdp, tensor) -> a Mesh over the first data*fsdp*tensor simulated devices."""
    from jax.sharding import Mesh

    def _make(data: int = 1, fsdp: int = 1, tensor: int = 1) -> Mesh:
        n = data * fsdp * tensor
        devices = np.array(jax.devices()[:n]).reshape(data, fsdp, tensor)
        return Mesh(devices, ("data", "fsdp", "tensor"))

    return _make


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh artifacts home for the test (checkpoints in it too, whatever the developer's environment says)."""
    monkeypatch.setenv("NANOCHAT_JAX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("NANOCHAT_JAX_CHECKPOINTS", raising=False)
    return tmp_path / "home"
