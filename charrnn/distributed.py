"""Where arrays live: one mesh over the devices, streams split along the batch axis.

Data parallelism with JAX's own machinery: a `Mesh` over the devices (of every
process, after `jax.distributed.initialize`), parameters and optimizer state
replicated, and the batch axis of minibatches and of the carried hidden state
split across devices. The compiler inserts the gradient all-reduce. Each process
supplies only the streams that belong to its own devices.
"""

from __future__ import annotations

import socket
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from charrnn.errors import PeerError, UsageError

AXIS = "streams"


# How long a process waits for the others to join, and how long a silent one is
# taken to be alive: long enough for hosts started by hand, short enough that a
# process whose peer died ends with an error instead of hanging for minutes.
JOIN_TIMEOUT_S = 120
HEARTBEAT_TIMEOUT_S = 30


def check_scale_out(coordinator: str | None, num_processes: int | None, process_id: int | None, auto: bool,
                    has_out: bool) -> None:
    """Usage errors for multi-process options that cannot work together, before anything starts."""
    if coordinator is None and not auto:
        if num_processes is not None or process_id is not None:
            raise UsageError("--num-processes and --process-id need --coordinator HOST:PORT (or --distributed)")
        return
    if not has_out:
        raise UsageError("a multi-process run needs --out or --resume: every process must name the same directory")
    if coordinator is None:
        return
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"--coordinator wants HOST:PORT with a port in 1-65535, got {coordinator!r}")
    if num_processes is None or process_id is None:
        raise UsageError("--coordinator needs --num-processes and --process-id")
    if process_id >= num_processes:
        raise UsageError(f"--process-id {process_id} must be below --num-processes {num_processes}")
    if process_id == 0:  # process 0 serves the coordinator: its port must be free
        try:
            with socket.socket(socket.AF_INET) as probe:
                # As the coordinator's own server binds: a port left in TIME_WAIT by a run that died is free.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(("", int(port)))
        except OSError as error:
            raise UsageError(f"--coordinator {coordinator}: cannot listen on port {port}: {error.strerror}") from None


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None, auto: bool) -> None:
    """Join a multi-process run (explicit coordinator, or JAX's cluster auto-detection)."""
    if coordinator is None and not auto:
        return
    if jax.config.jax_platforms in (None, "", "cpu") or jax.default_backend() == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id,
                                   initialization_timeout=JOIN_TIMEOUT_S, heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
    except ValueError as error:  # what JAX was told (or found in the environment) does not describe a run
        raise UsageError(f"cannot join the distributed run: {error}") from None
    except RuntimeError as error:  # the others did not come, or the coordinator cannot be reached
        raise PeerError(f"cannot join the distributed run: {error}") from None


class Placement(NamedTuple):
    mesh: Mesh
    replicated: NamedSharding  # every device holds the whole array
    batch: NamedSharding  # axis 0 split: carries [B, H]
    time_major: NamedSharding  # axis 1 split: chunks [T, B]
    stacked: NamedSharding  # axis 2 split: stacked minibatches [K, T, B]

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    @property
    def is_main(self) -> bool:
        """The process that writes checkpoints, logs and status."""
        return jax.process_index() == 0

    def local_streams(self, batch_size: int) -> slice:
        """The streams this process supplies: those of its own devices, a contiguous block."""
        per_process = batch_size // jax.process_count()
        return slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)


# On a CPU, XLA runs a small matmul on one core and leaves the others idle, so
# splitting the streams over one device per core runs the parts side by side; a
# large matmul XLA spreads over the cores already, and a split only adds the
# gradient all-reduce. The bound is where the two broke even (benchmarks/README.md).
CPU_SPLIT_MAX_STEP_MACS = 20_000_000
# The split's gains were measured with at least this many streams per core: fewer
# make each core's matmul smaller still, and more devices a costlier all-reduce.
CPU_MIN_STREAMS_PER_DEVICE = 16


def default_device_count(devices: list, batch_size: int, step_macs: int, cpu_split: bool = True) -> int:
    """How many devices a run uses without --devices.

    All of them on accelerators and in multi-process runs. On one CPU host, for
    a model that gains from a split there (`cpu_split`) while one time step's
    recurrent matmul (`step_macs` multiply-adds) is small enough, the most that
    divide the streams evenly with at least CPU_MIN_STREAMS_PER_DEVICE each;
    otherwise one.
    """
    if devices[0].platform != "cpu" or jax.process_count() > 1:
        return len(devices)
    if not cpu_split or step_macs > CPU_SPLIT_MAX_STEP_MACS:
        return 1
    return max((count for count in range(1, len(devices) + 1)
                if batch_size % count == 0 and batch_size // count >= CPU_MIN_STREAMS_PER_DEVICE), default=1)


def local_split(num_streams: int, step_macs: int) -> Placement | None:
    """Where generation (one process) runs its `num_streams` streams.

    Split over a CPU's cores by `default_device_count`'s rule, or None: the default device.
    """
    devices = jax.local_devices()
    if devices[0].platform != "cpu":
        return None
    count = default_device_count(devices, num_streams, step_macs)
    return make_placement(count, num_streams, step_macs) if count > 1 else None


def make_placement(num_devices: int | None, batch_size: int, step_macs: int, one_device: str = "",
                   cpu_split: bool = True) -> Placement:
    """A mesh over `num_devices` devices (default: `default_device_count`), checking the streams divide among them.

    `one_device`: why the run cannot be split over devices, or "" where it can.
    """
    devices = jax.devices()
    if one_device and (num_devices not in (None, 1) or jax.process_count() > 1):
        raise UsageError(f"{one_device}: use --devices 1 in one process")
    if num_devices is None:
        devices = devices[:1 if one_device else default_device_count(devices, batch_size, step_macs, cpu_split)]
    else:
        if not 1 <= num_devices <= len(devices):
            raise UsageError(f"--devices {num_devices}: JAX sees {len(devices)} device(s)")
        if jax.process_count() > 1 and num_devices != len(devices):
            raise UsageError("--devices must be all devices in a multi-process run")
        devices = devices[:num_devices]
    if batch_size % len(devices):
        raise UsageError(f"train.batch_size {batch_size} must be divisible by the {len(devices)} devices")
    mesh = Mesh(np.array(devices), (AXIS,))

    def split(axis: int) -> NamedSharding:
        return NamedSharding(mesh, PartitionSpec(*([None] * axis), AXIS))

    return Placement(mesh, NamedSharding(mesh, PartitionSpec()), split(0), split(1), split(2))


def put(tree: Any, sharding: NamedSharding, local_part=None) -> Any:
    """Host arrays onto the mesh: whole arrays when replicated, this process's slice when split."""
    def one(leaf):
        leaf = np.asarray(leaf)
        if jax.process_count() == 1:
            return jax.device_put(leaf, sharding)
        return jax.make_array_from_process_local_data(sharding, leaf if local_part is None else local_part(leaf))

    return jax.tree.map(one, tree)


def put_streams(tree: Any, placement: Placement, num_streams: int, axis: int = 0) -> Any:
    """Arrays whose `axis` (0: carries [B, H]; 1: chunks [T, B]) runs over `num_streams`
    streams onto the mesh, split with their streams; each process supplies its own."""
    local = (slice(None),) * axis + (placement.local_streams(num_streams),)
    return put(tree, (placement.batch, placement.time_major)[axis], lambda leaf: leaf[local])


def put_batches(batches, placement: Placement):
    """Stacked minibatches onto the mesh: fields [K, T, B] split with their streams, the rest ([K] flags) whole."""
    return type(batches)(*(put(part, placement.stacked if np.ndim(part) >= 3 else placement.replicated)
                           for part in batches))


def to_host(tree: Any) -> Any:
    """Whole arrays on the host, gathered from every process when they are split across processes."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def agree(values: np.ndarray) -> np.ndarray:
    """Process 0's values on every process (decisions that must not differ: stop, schedule position)."""
    if jax.process_count() == 1:
        return values
    return np.asarray(multihost_utils.broadcast_one_to_all(values))
