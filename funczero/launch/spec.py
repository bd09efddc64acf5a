"""What runs where: the world (nodes and slots), the program, and the worker env.

Global ranks are assigned node by node in node order and slot by slot in slot
order, so node ``i`` owns the contiguous block after all earlier nodes' slots and
``RANK = first_rank(node) + LOCAL_RANK``. (DeepSpeed computes ``RANK % n`` for
``LOCAL_RANK``, which permutes local ranks when nodes have different slot counts.)
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

__all__ = [
    "SCHEDULER_RANK_VARS",
    "Node",
    "NodeAssignment",
    "Program",
    "World",
    "decode_node_table",
    "encode_node_table",
    "worker_environment",
]

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

    @cached_property
    def _rank_offsets(self) -> tuple[int, ...]:
        # Prefix sums, so first_rank() is O(1) and a plan of thousands of nodes stays linear.
        return (0, *itertools.accumulate(len(n.slots) for n in self.nodes))

    @property
    def world_size(self) -> int:
        """Total number of workers."""
        return self._rank_offsets[-1]

    @property
    def hosts(self) -> list[str]:
        """Host names in node order."""
        return [n.host for n in self.nodes]

    def first_rank(self, node_rank: int) -> int:
        """Return the global rank of local rank 0 on ``node_rank``."""
        return self._rank_offsets[node_rank]

    def ranks(self, node_rank: int) -> range:
        """Return the global ranks that run on ``node_rank``."""
        return range(self._rank_offsets[node_rank], self._rank_offsets[node_rank + 1])

    def assignment(self, node_rank: int) -> NodeAssignment:
        """Return what node ``node_rank`` runs (all a node's launcher needs to know)."""
        node = self.nodes[node_rank]
        return NodeAssignment(
            host=node.host,
            node_rank=node_rank,
            num_nodes=len(self.nodes),
            first_rank=self.first_rank(node_rank),
            world_size=self.world_size,
            slots=node.slots,
            devices=node.devices,
            accelerator=self.accelerator,
        )


@dataclass(frozen=True)
class NodeAssignment:
    """One node's part of a job: its host, slots and place among the global ranks.

    The runner sends each remote node only its own assignment (or, for pdsh, a
    compact table of assignments looked up by host name; see :func:`encode_node_table`),
    never the whole world, so a node's command stays small at any job size.

    Attributes:
        host: Host name or address, as written in the hostfile.
        node_rank: This node's index among the job's nodes.
        num_nodes: Number of nodes in the job.
        first_rank: Global rank of this node's local rank 0.
        world_size: Total number of workers in the job.
        slots: Slot ids in local-rank order.
        devices: ``CUDA_VISIBLE_DEVICES`` tokens per slot, or None (the slot ids).
        accelerator: ``"cuda"`` or ``"cpu"``, as in :class:`World`.

    Example:
        >>> world = World((Node("a", (0, 1, 2)), Node("b", (0, 1))), "cuda")
        >>> node = world.assignment(1)
        >>> (node.first_rank, node.world_size, node.visible_devices())
        (3, 5, '0,1')
    """

    host: str
    node_rank: int
    num_nodes: int
    first_rank: int
    world_size: int
    slots: tuple[int, ...]
    devices: tuple[str, ...] | None = None
    accelerator: str = "cpu"

    @property
    def ranks(self) -> range:
        """The global ranks this node runs."""
        return range(self.first_rank, self.first_rank + len(self.slots))

    def visible_devices(self) -> str:
        """Return this node's ``CUDA_VISIBLE_DEVICES`` value."""
        return Node(self.host, self.slots, self.devices).visible_devices()


def encode_node_table(assignments: Iterable[NodeAssignment]) -> str:
    """Serialise node assignments compactly: consecutive alike nodes share one group.

    A group lists the slots once and then only host names, so a table of thousands of
    uniform nodes costs about one host name per node. The result is plain JSON (no
    whitespace); callers quote it for the shell.

    Example:
        >>> world = World(tuple(Node(f"n{i}", (0, 1)) for i in range(3)))
        >>> table = encode_node_table(world.assignment(i) for i in range(1, 3))
        >>> table
        '{"world_size":6,"num_nodes":3,"accelerator":"cpu","groups":[{"node":1,"rank":2,"slots":[0,1],"devices":null,"hosts":["n1","n2"]}]}'
        >>> decode_node_table(table, "n2").first_rank
        4
    """
    groups: list[dict[str, object]] = []
    head: dict[str, object] = {}
    last: NodeAssignment | None = None
    for node in assignments:
        if not head:
            head = {
                "world_size": node.world_size,
                "num_nodes": node.num_nodes,
                "accelerator": node.accelerator,
            }
        same_group = (
            last is not None
            and node.slots == last.slots
            and node.devices == last.devices
            and node.node_rank == last.node_rank + 1
        )
        if same_group:
            hosts = groups[-1]["hosts"]
            assert isinstance(hosts, list)
            hosts.append(node.host)
        else:
            groups.append(
                {
                    "node": node.node_rank,
                    "rank": node.first_rank,
                    "slots": list(node.slots),
                    "devices": None if node.devices is None else list(node.devices),
                    "hosts": [node.host],
                }
            )
        last = node
    return json.dumps({**head, "groups": groups}, separators=(",", ":"))


def decode_node_table(text: str, host: str | None = None) -> NodeAssignment:
    """Return ``host``'s assignment from :func:`encode_node_table` output.

    Args:
        text: The table.
        host: The node to look up; may be omitted when the table has one node.

    Raises:
        ValueError: If the table is malformed or does not list ``host`` (exactly once).
    """
    try:
        table = json.loads(text)
        found = [
            NodeAssignment(
                host=name,
                node_rank=int(group["node"]) + index,
                num_nodes=int(table["num_nodes"]),
                first_rank=int(group["rank"]) + index * len(group["slots"]),
                world_size=int(table["world_size"]),
                slots=tuple(int(s) for s in group["slots"]),
                devices=None if group["devices"] is None else tuple(group["devices"]),
                accelerator=str(table["accelerator"]),
            )
            for group in table["groups"]
            for index, name in enumerate(group["hosts"])
            if host is None or name == host
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"malformed node table: {exc}") from None
    if len(found) != 1:
        listed = "no node" if not found else f"{len(found)} nodes"
        raise ValueError(f"the node table lists {listed} for host {host!r}; expected exactly one")
    return found[0]


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
    node: NodeAssignment, local_rank: int, master_addr: str, master_port: int
) -> dict[str, str]:
    """Return the variables that identify one worker (set on top of the inherited env).

    Args:
        node: This node's assignment.
        local_rank: The worker's index on this node.
        master_addr: Address of the rank-0 host.
        master_port: Port of the rendezvous store on the rank-0 host.

    Example:
        >>> node = World((Node("a", (0, 1, 2)), Node("b", (0, 1))), "cuda").assignment(1)
        >>> env = worker_environment(node, 1, "a", 29500)
        >>> env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["CUDA_VISIBLE_DEVICES"]
        ('4', '1', '5', '0,1')
    """
    env = {
        "RANK": str(node.first_rank + local_rank),
        "WORLD_SIZE": str(node.world_size),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(len(node.slots)),
        "NODE_RANK": str(node.node_rank),
        # torchrun's names for the same two facts, for scripts written against it.
        "GROUP_RANK": str(node.node_rank),
        "GROUP_WORLD_SIZE": str(node.num_nodes),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
    }
    if node.accelerator == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = node.visible_devices()
    return env
