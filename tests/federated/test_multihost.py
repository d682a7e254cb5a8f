"""Multi-host: 2 local processes × 2 CPU devices give the single-process numbers."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from fedjax_lm import federated as fl
from fedjax_lm.scale import launch
from fedjax_lm.scale.distributed import DistributedConfig, detect_cluster
from tests.federated import _multihost_worker as worker
from tests.federated import toy

ROOT = Path(__file__).resolve().parents[2]


def _run_launcher(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run the launcher in its own process group and kill the whole group whatever happens,
    so no worker (or coordinator port) outlives the test."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedjax_lm.scale.launch", *args], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _single_process(backend: str):
    """The worker's 3 rounds on this process (8 fake devices; the mesh uses 4 of them)."""
    population = toy.client_data(worker.POPULATION)
    eng = fl.build_engine(
        toy.loss_fn, optax.adam(0.05), fl.fedadam(0.05), backend=backend,
        clients_per_chunk=worker.CHUNK if backend == "mesh" else None,
        num_devices=4 if backend == "mesh" else None,
    )
    state = eng.init(toy.init_params(), jax.random.key(7))
    for r in range(worker.ROUNDS):
        ids = fl.sample_clients(fl.sampling_key(state.rng, r), worker.POPULATION, worker.COHORT)
        out = eng.run_round(state, {k: v[ids] for k, v in population.items()}, client_ids=ids)
        state = out.state
    return state.params, out.metrics.client_loss


def test_two_processes_match_one_process_and_loop(tmp_path):
    result = tmp_path / "result.npz"
    run = _run_launcher(
        ["--num-processes", "2", "--devices-per-process", "2", "--timeout", "150", "--",
         "-m", "tests.federated._multihost_worker", str(result)],
        timeout=180,
    )
    assert run.returncode == 0, run.stdout[-4000:]
    got = np.load(result)
    assert int(got["local_round"]) == worker.ROUNDS
    np.testing.assert_array_equal(got["positions"], [0, 1, 4, 5])  # process 0: half of each chunk
    for backend in ("mesh", "loop"):
        params, client_loss = _single_process(backend)
        for mode in ("local", "global"):
            np.testing.assert_allclose(got[f"{mode}_w"], params["w"], atol=1e-5, rtol=0)
            np.testing.assert_allclose(got[f"{mode}_b"], params["b"], atol=1e-5, rtol=0)
            np.testing.assert_allclose(got[f"{mode}_client_loss"], client_loss, atol=1e-5)


def test_process_client_ids_partition_the_padded_cohort():
    for chunk, shards, procs in [(None, 4, 2), (4, 4, 2), (3, 8, 4), (None, 2, 1)]:
        parts = [fl.process_client_ids(6, num_client_shards=shards, clients_per_chunk=chunk,
                                       num_processes=procs, process_index=i)
                 for i in range(procs)]
        width = -(-(chunk or 6) // shards) * shards
        padded = -(-6 // width) * width
        np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(padded))
        for p in parts:  # padding positions come last, so a process appends zero clients
            real = p < 6
            assert not np.any(real[np.argmax(~real):]) or real.all()
    np.testing.assert_array_equal(
        fl.process_client_ids(6, num_client_shards=4, num_processes=2, process_index=1),
        [4, 5, 6, 7],
    )
    with pytest.raises(ValueError, match="evenly"):
        fl.process_client_ids(6, num_client_shards=3, num_processes=2, process_index=0)


def test_detect_cluster_rules():
    auto = DistributedConfig()
    assert detect_cluster(auto, {}) is None
    assert detect_cluster(auto, {"SLURM_NTASKS": "1"}) is None
    assert detect_cluster(auto, {"SLURM_NTASKS": "4"}) == "slurm"
    assert detect_cluster(auto, {"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu"
    assert detect_cluster(auto, {}, tpu_present=True) == "tpu"
    assert detect_cluster(DistributedConfig(enabled="off"), {"SLURM_NTASKS": "4"}) is None
    env = {"FEDJAX_LM_COORDINATOR": "h:1234", "FEDJAX_LM_NUM_PROCESSES": "2",
           "FEDJAX_LM_PROCESS_ID": "1"}
    cfg = DistributedConfig.from_env(env, process_id=0)
    assert (cfg.coordinator_address, cfg.num_processes, cfg.process_id) == ("h:1234", 2, 0)
    assert detect_cluster(cfg, {}) == "config"
    with pytest.raises(ValueError, match="process_id"):
        DistributedConfig(num_processes=2, process_id=2)


def test_child_env_replaces_the_device_count():
    env = launch.child_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --foo"},
                           port=1234, num_processes=2, process_id=1, devices=2)
    assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=2"
    assert env["FEDJAX_LM_COORDINATOR"] == "127.0.0.1:1234"
    assert env["FEDJAX_LM_PROCESS_ID"] == "1" and env["JAX_PLATFORMS"] == "cpu"


def test_launcher_stops_everyone_when_one_fails_or_times_out():
    script = ("import os, sys, time\n"
              "if os.environ['FEDJAX_LM_PROCESS_ID'] == '1': sys.exit(3)\n"
              "time.sleep(60)\n")
    start = time.monotonic()
    assert launch.launch(["-c", script], num_processes=2, devices_per_process=1) == 3
    assert launch.launch(["-c", "import time; time.sleep(60)"], timeout=0.5) == 124
    assert time.monotonic() - start < 20  # the sleepers were killed, not waited for
