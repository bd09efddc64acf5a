"""What runs where: the world (nodes and slots), the program, and the worker env.

Global ranks are assigned node by node in node order and slot by slot in slot
order, so node ``i`` owns the contiguous block after all earlier nodes' slots and
``RANK = first_rank(node) + LOCAL_RANK``. (DeepSpeed computes ``RANK % n`` for
``LOCAL_RANK``, which permutes local ranks when nodes have different slot counts.)
"""

from __future__ import annotations

import base64
import json
import sys
from dataclasses import dataclass, field

__all__ = ["SCHEDULER_RANK_VARS", "Node", "Program", "World", "worker_environment"]

#: Rank variables of MPI and Slurm. Workers started by the per-node launcher must
#: not inherit the launcher's own values (e.g. when it runs inside ``srun``), or
#: a worker-side resolver that reads them would pick the wrong rank.
SCHEDULER_RANK_VARS = (
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "PMI_RANK",
    "PMI_SIZE",
    "PMI_LOCAL_RANK",
    "PMI_LOCAL_SIZE",
    "MPI_LOCALRANKID",
    "MPI_LOCALNRANKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NTASKS",
    "SLURM_NPROCS",
)


@dataclass(frozen=True)
class Node:
    """One host and the slots (device ids, or CPU process slots) used on it.

    Attributes:
        host: Host name or address, as written in the hostfile.
        slots: Slot ids in local-rank order.
        devices: ``CUDA_VISIBLE_DEVICES`` tokens per slot when they are not the slot
            ids themselves (GPU UUIDs from the user's ``CUDA_VISIBLE_DEVICES``).
    """

    host: str
    slots: tuple[int, ...]
    devices: tuple[str, ...] | None = None

    def visible_devices(self) -> str:
        """Return this node's ``CUDA_VISIBLE_DEVICES`` value."""
        return ",".join(self.devices if self.devices is not None else map(str, self.slots))


@dataclass(frozen=True)
class World:
    """All nodes of a job, in rank order.

    Attributes:
        nodes: The nodes; node ``i`` has node rank ``i``.
        accelerator: ``"cuda"`` when slots are GPUs (``CUDA_VISIBLE_DEVICES`` is set
            per node), ``"cpu"`` when slots are plain processes.
    """

    nodes: tuple[Node, ...]
    accelerator: str = "cpu"

    @property
    def world_size(self) -> int:
        """Total number of workers."""
        return sum(len(n.slots) for n in self.nodes)

    @property
    def hosts(self) -> list[str]:
        """Host names in node order."""
        return [n.host for n in self.nodes]

    def first_rank(self, node_rank: int) -> int:
        """Return the global rank of local rank 0 on ``node_rank``."""
        return sum(len(n.slots) for n in self.nodes[:node_rank])

    def ranks(self, node_rank: int) -> range:
        """Return the global ranks that run on ``node_rank``."""
        first = self.first_rank(node_rank)
        return range(first, first + len(self.nodes[node_rank].slots))

    def encode(self) -> str:
        """Serialise to a shell-safe string (URL-safe base64 of JSON)."""
        payload = {
            "accelerator": self.accelerator,
            "nodes": [
                {"host": n.host, "slots": list(n.slots), "devices": n.devices} for n in self.nodes
            ],
        }
        return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()

    @classmethod
    def decode(cls, text: str) -> World:
        """Inverse of :meth:`encode`."""
        payload = json.loads(base64.urlsafe_b64decode(text.encode()))
        nodes = tuple(
            Node(
                host=n["host"],
                slots=tuple(n["slots"]),
                devices=None if n.get("devices") is None else tuple(n["devices"]),
            )
            for n in payload["nodes"]
        )
        return cls(nodes=nodes, accelerator=payload["accelerator"])


@dataclass(frozen=True)
class Program:
    """The user's command: a script, a module (``-m``) or an executable.

    Attributes:
        script: Script path, module name (``module=True``) or executable (``no_python``).
        args: Arguments passed through unchanged.
        module: Run as ``python -m script``.
        no_python: Execute ``script`` directly instead of through Python.
        no_local_rank: Do not append ``--local_rank=N``.
        python: Interpreter for Python programs.
    """

    script: str
    args: tuple[str, ...] = ()
    module: bool = False
    no_python: bool = False
    no_local_rank: bool = False
    python: str = field(default=sys.executable)

    def argv(self, local_rank: int | str) -> list[str]:
        """Return the worker command line for ``local_rank``.

        ``local_rank`` may be a macro such as ``"${local_rank}"`` that
        torch.distributed.elastic substitutes per worker.
        """
        if self.no_python:
            cmd = [self.script]
        else:
            cmd = [self.python, "-u", *(["-m"] if self.module else []), self.script]
        if not self.no_local_rank:
            cmd.append(f"--local_rank={local_rank}")
        cmd.extend(self.args)
        return cmd


def worker_environment(
    world: World, node_rank: int, local_rank: int, master_addr: str, master_port: int
) -> dict[str, str]:
    """Return the variables that identify one worker (set on top of the inherited env).

    Args:
        world: The job's nodes.
        node_rank: This node's index in ``world.nodes``.
        local_rank: The worker's index on this node.
        master_addr: Address of the rank-0 host.
        master_port: Port of the rendezvous store on the rank-0 host.
    """
    node = world.nodes[node_rank]
    env = {
        "RANK": str(world.first_rank(node_rank) + local_rank),
        "WORLD_SIZE": str(world.world_size),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(len(node.slots)),
        "NODE_RANK": str(node_rank),
        # torchrun's names for the same two facts, for scripts written against it.
        "GROUP_RANK": str(node_rank),
        "GROUP_WORLD_SIZE": str(len(world.nodes)),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
    }
    if world.accelerator == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = node.visible_devices()
    return env
