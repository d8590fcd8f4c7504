"""Two processes on JAX's multi-host runtime (jax.distributed on 127.0.0.1, gloo CPU
collectives, 4 devices each) train a synced BatchNorm; their outputs, running statistics
and parameters equal one process training on the same global batches."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import multiprocess_worker as worker
import numpy as np
import pytest

from jaxnorm import linen as jl

PROCESSES = 2
TIMEOUT_S = 180
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_processes(tmp_path: Path) -> list[dict]:
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    port = _free_port()
    outputs = [tmp_path / f"process_{i}.npz" for i in range(PROCESSES)]
    processes = [
        subprocess.Popen(
            [sys.executable, str(Path(worker.__file__)), str(i), str(PROCESSES), str(port),
             str(outputs[i])],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(PROCESSES)
    ]
    logs = []
    try:
        for process in processes:
            logs.append(process.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for process, log in zip(processes, logs, strict=True):
        assert process.returncode == 0, log[-4000:]
    return [dict(np.load(path)) for path in outputs]


def _one_process_run() -> dict:
    module = jl.BatchNorm(use_running_average=False, **worker.SETTINGS)
    variables = worker.initial_variables(module)
    step = jax.jit(functools.partial(worker.train_step, module))
    outputs = []
    for x, w in zip(*worker.global_batches(), strict=True):
        y, variables = step(variables, x, w)
        outputs.append(np.asarray(y))
    return {
        "outputs": np.stack(outputs),
        **{k: np.asarray(v) for k, v in variables["batch_stats"].items()},
        **{k: np.asarray(v) for k, v in variables["params"].items()},
    }


@pytest.mark.slow
def test_two_processes_train_batch_norm_like_one(tmp_path):
    results = _run_processes(tmp_path)
    for result in results:
        np.testing.assert_array_equal(result["devices"], [8, 4])
    reference = _one_process_run()
    for result in results:
        for name in ("outputs", "mean", "var", "scale", "bias"):
            np.testing.assert_allclose(
                result[name], reference[name], rtol=1e-5, atol=1e-5, err_msg=name
            )
