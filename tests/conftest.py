"""Test-wide setup: 8 fake CPU devices so mesh / pmap backends run multi-device on a laptop.

XLA reads the flag when jax initialises its backends, so it must be set before any test
module touches a device; conftest is imported first.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# A persistent compilation cache shared by this session's tests and the subprocesses they
# start (CLI runs, multi-process runs): the same program compiles once per test session.
_CACHE = os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "jax_compilation_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
