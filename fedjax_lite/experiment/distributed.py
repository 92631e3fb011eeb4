"""Several processes, one run: ``fedjax-lite run`` over ``jax.distributed``.

Launch one process per host (or per GPU) with ``--coordinator HOST:PORT --num-processes N
--process-id I``; under SLURM (``srun``), Open MPI (``mpirun``) and on Cloud TPU pods JAX
finds all three in the environment (and reads ``JAX_COORDINATOR_ADDRESS``), so those
launches need no flags. Then:

* the client mesh spans every process's devices (:func:`spread`): each process reads the
  same config and builds the same (seeded) data, the population is replicated on every
  device (:func:`replicate`), and every process runs the same compiled rounds (SPMD; the
  cohort is sharded over all devices, gloo collectives on CPUs);
* process 0 alone writes ``config.yaml``, metrics, summary, plots and ``params.npz`` and
  prints; every process takes part in checkpoint saves and restores (orbax's
  multi-process support: the primary process writes the replicated arrays);
* a signal stops every process after the same round (:func:`agreed_signal`).

Losing a process: :mod:`.liveness` (a process that dies or fails makes the others exit
4 within seconds, with one line naming it).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from fedjax_lite.experiment.liveness import (EXIT_LOST, Group, install_abort_hook,
                                             uninstall_abort_hook)

# cluster environments detected without flags (JAX's own detection; k8s and mpi4py are
# left out: they need a library and would be "detected" in any pod)
_AUTO = ("SlurmCluster", "OmpiCluster", "GceTpuCluster", "GkeTpuCluster")


class DistributedError(RuntimeError):
    """The processes could not form a run; ``exit_code`` 2 (bad flags) or 4."""

    def __init__(self, message: str, exit_code: int = EXIT_LOST):
        super().__init__(message)
        self.exit_code = exit_code


def wanted(coordinator: str | None, num_processes: int | None,
           process_id: int | None) -> bool:
    """Whether to start ``jax.distributed``: any of the flags, ``JAX_COORDINATOR_ADDRESS``,
    or a cluster launch (SLURM, Open MPI, Cloud TPU pod) of more than one process."""
    if (coordinator, num_processes, process_id) != (None, None, None):
        return True
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    try:
        from jax._src.clusters import ClusterEnv
        for env in ClusterEnv._cluster_types:
            if env.__name__ in _AUTO and env.is_env_present():
                return int(env.get_process_count()) > 1
    except Exception:  # noqa: BLE001 -- no detectable cluster: one process
        return False
    return False


_GROUP: Group | None = None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout: float = 30.0,
               init_timeout: int = 300) -> int:
    """Starts ``jax.distributed`` (before anything touches a device) and, with more
    than one process, the watchdog and the SIGABRT hook. Returns the process count.

    Raises DistributedError (one line) if the processes cannot form a run; a process
    that no coordinator answers within ``init_timeout`` s exits 4 with one line (JAX
    aborts it)."""
    global _GROUP
    import jax
    if heartbeat_timeout <= 0:
        raise DistributedError(
            f"--heartbeat-timeout must be > 0, got {heartbeat_timeout:g}", 2)
    # interrupt.py handles SIGINT / SIGTERM for every process (a round boundary they agree
    # on); JAX's preemption service would install its own SIGTERM handler
    jax.config.update("jax_enable_preemption_service", False)
    where = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or "(detected)"
    install_abort_hook(lambda: (
        f"fedjax-lite: process {process_id if process_id is not None else '?'} could not "
        f"join the run at {where} (no coordinator answered within {init_timeout} s, or "
        f"it failed); exit {EXIT_LOST}"))
    try:
        jax.distributed.initialize(
            coordinator, num_processes, process_id, initialization_timeout=init_timeout,
            # JAX's own deadline comes after the watchdog's, which names the process
            heartbeat_timeout_seconds=int(2 * heartbeat_timeout + 10))
    except (ValueError, TypeError) as e:
        uninstall_abort_hook()
        raise DistributedError(f"{e} (give --coordinator HOST:PORT --num-processes N "
                               "--process-id I, or launch under SLURM / mpirun / a TPU "
                               "pod)", 2) from None
    except Exception as e:  # noqa: BLE001 -- XlaRuntimeError: no coordinator, timeout
        uninstall_abort_hook()
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(f"process {process_id} could not join the run at "
                               f"{where}: {first}") from None
    n = jax.process_count()
    if n > 1:
        _native_stdout_to_stderr()
        from jax._src import distributed as jd
        _GROUP = Group(jax.process_index(), n, jd.global_state.coordinator_address or "",
                        heartbeat_timeout)
        _GROUP.watchdog.start()
        install_abort_hook(_GROUP.abort_line)
    else:
        uninstall_abort_hook()
    return n


def _native_stdout_to_stderr() -> None:
    """Gloo prints a line per connection to the C-level stdout; send that to stderr so
    stdout keeps only what this program prints (process 0's one JSON line)."""
    try:
        sys.stdout.flush()
        keep = os.dup(1)
        os.dup2(2, 1)
        sys.stdout = os.fdopen(keep, "w", buffering=1)
    except (OSError, ValueError, AttributeError):   # no real file descriptors
        pass


def finish() -> None:
    """A normal end: records it, stops the watchdog, and waits for every process at
    ``jax.distributed.shutdown``'s barrier (process 0 writes its outputs meanwhile)."""
    global _GROUP
    group = _GROUP
    if group is None:
        return
    group.set(f"exit/{group.pid}", "done")
    group.watchdog.stop()
    import jax
    try:
        jax.distributed.shutdown()
    finally:
        uninstall_abort_hook()
        _GROUP = None


def await_verdict() -> None:
    """After an unexpected error in a multi-process run (a collective that failed because
    a peer died, say): gives the watchdog up to the heartbeat timeout to name a lost
    process (it then exits with its one line); returns if it finds none."""
    group = _GROUP
    if group is None or not group.watchdog.is_alive():
        return
    dog = group.watchdog
    dog.suspicious = True            # a silent process is now lost after 3 ticks
    deadline = time.monotonic() + group.timeout + 3 * dog.tick
    while dog.is_alive() and (dog.verdict is not None or time.monotonic() < deadline):
        time.sleep(0.05)


def leave(code: int, reason: str) -> None:
    """An abnormal end of this process (an error or a signal): records ``reason`` so the
    others stop at once naming this process, then exits with ``code`` (never returns
    while a group is running; a no-op with one process)."""
    group = _GROUP
    if group is None:
        return
    group.watchdog.stop()
    group.set(f"exit/{group.pid}", reason)
    if group.pid == 0:
        group.set("p0/verdict", f"0\tfailed ({reason})")
        group.wait_for_others()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def processes_started() -> int:
    """The process count of the run :func:`initialize` started (1: none; no device is
    touched)."""
    return 1 if _GROUP is None else _GROUP.n


def process_index() -> int:
    return 0 if _GROUP is None else _GROUP.pid


# --- for the runner -----------------------------------------------------------------

def processes() -> int:
    import jax
    return jax.process_count()


def is_primary() -> bool:
    """Whether this process writes outputs and prints (process 0; the only one alone)."""
    import jax
    return jax.process_index() == 0


def spread(engine):
    """``engine`` (from ``builders.engine_options``, whose mesh covers this process's
    devices) with the client mesh over every process's devices: the same number of
    devices from each process, in process order. Unchanged with one process."""
    import jax

    from fedjax_lite.core import client_mesh
    if jax.process_count() == 1:
        return engine
    if engine.backend == "pmap":
        from fedjax_lite.experiment.config_schema import ConfigError
        raise ConfigError("config key 'engine.backend': pmap runs within one process; use "
                          "shard_map (the default) with several processes")
    per_process = 1 if engine.mesh is None else engine.mesh.devices.size
    devices = []
    for p in range(jax.process_count()):
        mine = sorted((d for d in jax.devices() if d.process_index == p),
                      key=lambda d: d.id)
        devices += mine[:per_process]
    return engine._replace(mesh=client_mesh(devices))


def placement(mesh):
    """``(sharding, put, jit)`` for a run's replicated values: the sharding replicated
    over ``mesh`` (None: the first local device); ``put(tree)`` places host values there
    (global arrays with several processes); ``jit(f)`` is ``jax.jit``, with every output
    replicated when there are several processes, so each can read them."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec
    where = (NamedSharding(mesh, PartitionSpec()) if mesh is not None
             else jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    if jax.process_count() == 1:
        return where, lambda tree: jax.device_put(tree, where), jax.jit
    return (where, lambda tree: replicate(tree, where),
            lambda f: jax.jit(f, out_shardings=where))


def replicate(tree, sharding):
    """Places a pytree of host-identical values (NumPy or local arrays) on every device of
    ``sharding`` (a replicated NamedSharding whose devices may span processes); typed
    PRNG keys keep their type."""
    import jax

    def put(a):
        if isinstance(a, jax.Array) and a.sharding == sharding:
            return a                                 # already there (a round's output)
        if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(a)),
                                            impl=jax.random.key_impl(a))
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, tree)


def agreed_signal(local: int | None) -> int | None:
    """The signal to stop on, the same in every process: the largest signal number any
    process received (None: none did). One small all-gather per call with several
    processes."""
    import jax
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils
    got = multihost_utils.process_allgather(np.int32(local or 0))
    return int(np.max(got)) or None


def differing(value) -> list[int]:
    """The processes whose ``value`` (anything JSON can write) differs from process 0's:
    a digest is all-gathered (a collective, so also a barrier). [] with one process."""
    import jax
    if jax.process_count() == 1:
        return []
    import hashlib
    import json

    from jax.experimental import multihost_utils
    text = json.dumps(value, sort_keys=True, default=str).encode()
    digest = np.frombuffer(hashlib.sha256(text).digest(), np.uint8)
    got = np.asarray(multihost_utils.process_allgather(digest))
    return [j for j in range(len(got)) if not np.array_equal(got[j], got[0])]


def check_same_config(resolved: dict) -> None:
    """Every process must run the same resolved config (same file, same ``--set``).
    Raises ConfigError naming the processes that differ from process 0."""
    from fedjax_lite.experiment.config_schema import ConfigError
    if bad := differing(resolved):
        raise ConfigError(f"process(es) {', '.join(map(str, bad))} resolved a different "
                          "config than process 0: every process needs the same CONFIG file "
                          "and --set values")


def sync(name: str) -> None:
    """A barrier of every process (no-op with one)."""
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def from_primary(make_key):
    """A PRNG key made by process 0 alone (``make_key()``: e.g. from OS entropy), the same
    in every process."""
    import jax
    if jax.process_count() == 1:
        return make_key()
    from jax.experimental import multihost_utils
    like = np.asarray(jax.random.key_data(jax.random.key(0)))
    data = (np.asarray(jax.random.key_data(make_key())) if is_primary()
            else np.zeros_like(like))
    return jax.random.wrap_key_data(np.asarray(multihost_utils.broadcast_one_to_all(data)))


__all__ = ["DistributedError", "EXIT_LOST", "agreed_signal", "await_verdict",
           "check_same_config", "differing", "finish", "from_primary", "initialize",
           "is_primary", "leave", "placement", "process_index", "processes",
           "processes_started", "replicate", "spread", "sync", "wanted"]
