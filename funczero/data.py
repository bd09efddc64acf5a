"""A distributed, deterministic, resumable batch loader for map-style datasets.

Which samples go where (the contract the tests pin down):

* Epoch ``e`` orders the dataset by ``torch.randperm(len(dataset))`` drawn from a private
  ``torch.Generator`` seeded with a mix of ``(seed, e)`` (``shuffle=False``: ``0, 1, 2, ...``).
  The global RNG is neither read nor advanced.
* Global step ``k`` of epoch ``e`` takes the next ``G = micro_batch_size * grad_accum *
  world_size`` indices of that order: ``global_batch = order[k*G:(k+1)*G]``. This depends on
  ``G`` but not on how it is split, so world sizes 1, 2 and 4 with the same ``G`` see the same
  global batches and training trajectories can be compared across world sizes.
* Rank ``r`` gets the contiguous slice ``global_batch[r*P:(r+1)*P]`` with ``P =
  micro_batch_size * grad_accum``, collated into one step batch whose dim 0 has ``P`` rows.
  Micro-batch ``i`` of that rank is rows ``[i*micro_batch_size, (i+1)*micro_batch_size)``.
  Concatenating all ranks' step batches in rank order gives the global batch in order.
* ``drop_last=True`` (default): an epoch has ``len(dataset) // G`` steps and the tail (a
  different one each epoch when shuffling) is skipped. ``drop_last=False``: an epoch has
  ``ceil(len / G)`` steps and the last global batch is filled by wrapping around to the start of
  the same epoch's order, as ``torch.utils.data.DistributedSampler`` pads.
* ``position`` counts global steps consumed since the start of training; in a run that did not
  change its global batch size, the epoch is ``position // steps_per_epoch``.

Resuming (``state_dict()`` saved, ``load_state_dict()`` in the new run) continues from the
exact sample where the saved run stopped: the state records the epoch and how
many samples of that epoch's order were consumed (``epoch_offset``), and an epoch's order does not
depend on the batch geometry. So a run may resume at another world size even when that changes
the global batch size (a fixed per-rank config on more or fewer ranks): the rest of the epoch is
cut into global batches of the new size starting at ``epoch_offset`` (with ``drop_last``, a tail
smaller than one new global batch is skipped), and later epochs follow the rules above. No
sample is repeated or skipped within an epoch by the change, and ``position`` keeps counting
global steps, so it stays equal to the training state's step.

Iterating a loader (``for batch in loader``) yields the rest of the current epoch, as
DeepSpeed's loader does (loop over epochs outside); :meth:`DistributedBatchLoader.next_batch`
and :meth:`DistributedBatchLoader.iter_steps` cross epoch boundaries.

Example:
    >>> import torch
    >>> data = torch.arange(10.0)
    >>> loader = DistributedBatchLoader(data, micro_batch_size=2, world_size=2, rank=1,
    ...                                 shuffle=False)
    >>> [b.tolist() for b in loader]  # rank 1's half of each global batch of 4
    [[2.0, 3.0], [6.0, 7.0]]
"""

from __future__ import annotations

import collections.abc as cabc
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol

import torch

__all__ = ["DistributedBatchLoader", "MapDataset", "default_collate"]


class MapDataset(Protocol):
    """Anything with ``__len__`` and integer ``__getitem__`` (a map-style dataset, a tensor...)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


def default_collate(samples: Sequence[Any]) -> Any:
    """Stack samples along a new dim 0, recursing into dicts, tuples and lists.

    Tensors are stacked (shapes must match); Python ints, floats and bools become 1-D tensors
    (int64, the default float dtype, bool); numpy arrays are converted; strings stay a list.

    Raises:
        TypeError: samples differ in type, keys, length or shape, or hold an unsupported type.

    Example:
        >>> import torch
        >>> batch = default_collate([{"x": torch.zeros(3), "y": 1}, {"x": torch.ones(3), "y": 0}])
        >>> batch["x"].shape, batch["y"]
        (torch.Size([2, 3]), tensor([1, 0]))
    """
    return _collate(list(samples), "sample")


def _collate(samples: list[Any], where: str) -> Any:
    first = samples[0]
    for i, s in enumerate(samples[1:], 1):
        if type(s) is not type(first) and not (
            isinstance(first, (int, float)) and isinstance(s, (int, float))
        ):
            raise TypeError(
                f"default_collate: {where} {i} is a {type(s).__name__} but {where} 0 is a "
                f"{type(first).__name__}; pass collate_fn= for mixed samples"
            )
    if isinstance(first, torch.Tensor):
        shapes = {tuple(s.shape) for s in samples}
        if len(shapes) > 1:
            raise TypeError(
                f"default_collate: tensors in {where} have different shapes {sorted(shapes)}; "
                "pad them to one shape or pass collate_fn="
            )
        return torch.stack(samples)
    if isinstance(first, bool):
        return torch.tensor(samples, dtype=torch.bool)
    if isinstance(first, (int, float)):
        is_int = all(isinstance(s, int) for s in samples)
        return torch.tensor(samples, dtype=torch.int64 if is_int else torch.get_default_dtype())
    if isinstance(first, str):
        return list(samples)
    if isinstance(first, cabc.Mapping):
        keys = list(first)
        for i, s in enumerate(samples):
            if set(s) != set(keys):
                raise TypeError(
                    f"default_collate: {where} {i} has keys {sorted(s)} but {where} 0 has "
                    f"{sorted(keys)}"
                )
        return {k: _collate([s[k] for s in samples], f"{where}[{k!r}]") for k in keys}
    if isinstance(first, (tuple, list)):
        n = len(first)
        if any(len(s) != n for s in samples):
            raise TypeError(f"default_collate: {where} items have different lengths")
        fields = [_collate([s[j] for s in samples], f"{where}[{j}]") for j in range(n)]
        if isinstance(first, tuple) and hasattr(first, "_fields"):  # namedtuple
            return type(first)(*fields)
        return tuple(fields) if isinstance(first, tuple) else fields
    if type(first).__module__ == "numpy":
        return _collate([torch.as_tensor(s) for s in samples], where)
    raise TypeError(
        f"default_collate: cannot batch {where} of type {type(first).__name__}; "
        "pass collate_fn= to DistributedBatchLoader"
    )


def _mix(seed: int, epoch: int) -> int:
    """Hash (seed, epoch) into a 63-bit generator seed (splitmix64 finaliser).

    ``seed + epoch`` (DistributedSampler's choice) makes seed 0 / epoch 1 replay seed 1 / epoch 0.
    """
    x = (seed * 0x9E3779B97F4A7C15 + epoch + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) >> 1


class _ResumePoint(NamedTuple):
    """Where iteration (re)started: global step ``position`` is sample ``offset`` of ``epoch``."""

    position: int
    epoch: int
    offset: int


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(
            f"DistributedBatchLoader: {name} must be an integer >= {low}, got {value!r}"
        )
    return value


class DistributedBatchLoader:
    """Per-rank step batches of a map-style dataset, deterministic and resumable.

    See the module docstring for exactly which samples each rank and micro-batch receives.

    Args:
        dataset: a map-style dataset (``len`` and integer indexing).
        micro_batch_size: samples per micro-batch on one rank.
        grad_accum: micro-batches per optimizer step; each yielded batch holds
            ``micro_batch_size * grad_accum`` samples along dim 0.
        rank: this process's data-parallel rank.
        world_size: the data-parallel size.
        seed: shuffling seed; every rank must pass the same one.
        shuffle: reshuffle every epoch (with ``seed``); false keeps dataset order.
        drop_last: skip the tail that does not fill a global batch (true), or fill the last
            global batch by wrapping around to the start of the epoch (false).
        collate_fn: turns a list of samples into a batch; :func:`default_collate` by default.
        position: global steps already consumed (to resume); see also :meth:`load_state_dict`.

    Raises:
        ValueError: a bad argument, or (with ``drop_last``) a dataset smaller than one global
            batch.

    Example:
        >>> import torch
        >>> loader = DistributedBatchLoader(torch.arange(100), micro_batch_size=4, grad_accum=2,
        ...                                 world_size=2, rank=0, seed=1)
        >>> loader.steps_per_epoch, loader.next_batch().shape, loader.position
        (6, torch.Size([8]), 1)
    """

    def __init__(
        self,
        dataset: MapDataset,
        *,
        micro_batch_size: int,
        grad_accum: int = 1,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        position: int = 0,
    ) -> None:
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise TypeError(
                "DistributedBatchLoader: dataset must be map-style (define __len__ and "
                f"__getitem__), got {type(dataset).__name__}; wrap an iterable dataset in a list "
                "or use torch.utils.data.DataLoader for streaming data"
            )
        self.dataset = dataset
        self.micro_batch_size = _check_int("micro_batch_size", micro_batch_size, 1)
        self.grad_accum = _check_int("grad_accum", grad_accum, 1)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if rank >= world_size:
            raise ValueError(
                f"DistributedBatchLoader: rank {rank} is out of range for world_size {world_size} "
                f"(ranks are 0..{world_size - 1})"
            )
        self.seed = _check_int("seed", seed, 0)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.collate_fn = collate_fn if collate_fn is not None else default_collate
        self.num_samples = len(dataset)
        if self.num_samples == 0:
            raise ValueError("DistributedBatchLoader: the dataset is empty")
        if drop_last and self.num_samples < self.global_batch_size:
            raise ValueError(
                f"DistributedBatchLoader: the dataset has {self.num_samples} samples, fewer than "
                f"one global batch of {self.global_batch_size} = micro_batch_size "
                f"{self.micro_batch_size} * grad_accum {self.grad_accum} * world_size "
                f"{self.world_size}, so an epoch has no step; use a smaller batch, more data, "
                "or drop_last=False (which repeats samples to fill the batch)"
            )
        self._order_epoch = -1
        self._order = torch.empty(0, dtype=torch.int64)
        self._position = 0
        self._resume_point = _ResumePoint(0, 0, 0)
        self.position = position

    # --- geometry ----------------------------------------------------------------------------

    @property
    def per_rank_batch_size(self) -> int:
        """Samples in one yielded step batch: ``micro_batch_size * grad_accum``."""
        return self.micro_batch_size * self.grad_accum

    @property
    def global_batch_size(self) -> int:
        """Samples per global step over all ranks (DeepSpeed's ``train_batch_size``)."""
        return self.per_rank_batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        """Global steps in one epoch (floor with ``drop_last``, ceil without)."""
        if self.drop_last:
            return self.num_samples // self.global_batch_size
        return math.ceil(self.num_samples / self.global_batch_size)

    def __len__(self) -> int:
        """Steps per epoch, as ``len()`` of a DeepSpeed/torch loader."""
        return self.steps_per_epoch

    @property
    def position(self) -> int:
        """Global steps consumed since the start of training (the next batch's index).

        Setting it starts afresh from that step in this loader's geometry (epoch
        ``position // steps_per_epoch``); :meth:`load_state_dict` resumes a saved run instead.
        """
        return self._position

    @position.setter
    def position(self, value: int) -> None:
        self._position = _check_int("position", value, 0)
        self._resume_point = _ResumePoint(0, 0, 0)

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self._locate(self.position)[0]

    @property
    def epoch_offset(self) -> int:
        """Samples of the current epoch's order consumed before the next batch."""
        return self._locate(self.position)[1]

    @property
    def steps_left_in_epoch(self) -> int:
        """Global batches left in the current epoch, the next one included."""
        return self._steps_from(self.epoch_offset)

    def _steps_from(self, offset: int) -> int:
        """Global batches an epoch yields from sample ``offset`` of its order to its end."""
        left = self.num_samples - offset
        if self.drop_last:
            return left // self.global_batch_size
        return math.ceil(left / self.global_batch_size)

    def _locate(self, position: int) -> tuple[int, int]:
        """(epoch, samples of that epoch consumed) before the batch at global step ``position``."""
        start = self._resume_point
        if position < start.position:
            raise ValueError(
                f"DistributedBatchLoader: position {position} precedes the resumed step "
                f"{start.position}, whose batches were drawn by the saved run (perhaps with "
                "another global batch size); only positions from the resumed step on are known"
            )
        steps = position - start.position
        first = self._steps_from(start.offset)  # the rest of the epoch resumed in
        if steps < first:
            return start.epoch, start.offset + steps * self.global_batch_size
        epochs, step = divmod(steps - first, self.steps_per_epoch)
        return start.epoch + 1 + epochs, step * self.global_batch_size

    # --- which samples -----------------------------------------------------------------------

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if epoch != self._order_epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(_mix(self.seed, epoch))
                self._order = torch.randperm(self.num_samples, generator=gen)
            else:
                self._order = torch.arange(self.num_samples)
            self._order_epoch = epoch
        return self._order

    def global_indices(self, position: int | None = None) -> list[int]:
        """Dataset indices of the global batch at ``position`` (default: the next one), in order.

        Example:
            >>> loader = DistributedBatchLoader(list(range(10)), micro_batch_size=3,
            ...                                 shuffle=False, drop_last=False)
            >>> loader.global_indices(3)  # the last batch of the epoch wraps around
            [9, 0, 1]
        """
        position = self.position if position is None else _check_int("position", position, 0)
        epoch, start = self._locate(position)
        order = self._epoch_order(epoch)
        picks = torch.arange(start, start + self.global_batch_size) % self.num_samples
        return order[picks].tolist()

    def rank_indices(self, position: int | None = None) -> list[int]:
        """Dataset indices of this rank's step batch at ``position`` (default: the next one)."""
        p = self.per_rank_batch_size
        return self.global_indices(position)[self.rank * p : (self.rank + 1) * p]

    # --- iteration ---------------------------------------------------------------------------

    def next_batch(self) -> Any:
        """Return this rank's next step batch and advance ``position`` (crosses epochs)."""
        batch = self.collate_fn([self.dataset[i] for i in self.rank_indices()])
        self._position += 1
        return batch

    def __iter__(self) -> Iterator[Any]:
        """Yield the remaining step batches of the current epoch, advancing ``position``.

        A loop over a fresh loader is one full epoch; after a resume mid-epoch it is the rest of
        that epoch. Loop again for the next epoch (DeepSpeed's loader convention).
        """
        for _ in range(self.steps_left_in_epoch):
            yield self.next_batch()

    def iter_steps(self, num_steps: int | None = None) -> Iterator[Any]:
        """Yield ``num_steps`` step batches across epochs (forever when ``None``)."""
        if num_steps is not None:
            _check_int("num_steps", num_steps, 0)
        done = 0
        while num_steps is None or done < num_steps:
            yield self.next_batch()
            done += 1

    # --- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-able resumable state: where the next batch starts, and what must match to resume.

        Example:
            >>> import torch
            >>> loader = DistributedBatchLoader(torch.arange(8), micro_batch_size=2)
            >>> _ = loader.next_batch()
            >>> state = loader.state_dict()
            >>> state["position"], state["epoch"], state["epoch_offset"]
            (1, 0, 2)
        """
        epoch, offset = self._locate(self.position)
        return {
            "position": self.position,
            "epoch": epoch,
            "epoch_offset": offset,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "num_samples": self.num_samples,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next batch starts at the sample the saved run
        would have read next.

        The world size and global batch size may differ from the saving run's (see the module
        docstring); ``position`` continues the saved run's step count.

        Raises:
            ValueError: the state was saved with a different seed, dataset length, ``shuffle``
                or ``drop_last``, any of which would change the sample order, or it is malformed.

        Example:
            >>> import torch
            >>> two_ranks = DistributedBatchLoader(torch.arange(12), micro_batch_size=2,
            ...                                    world_size=2, shuffle=False)
            >>> _ = two_ranks.next_batch()  # the global batch [0, 1, 2, 3]
            >>> three_ranks = DistributedBatchLoader(torch.arange(12), micro_batch_size=2,
            ...                                      world_size=3, shuffle=False)
            >>> three_ranks.load_state_dict(two_ranks.state_dict())
            >>> three_ranks.global_indices(), three_ranks.position
            ([4, 5, 6, 7, 8, 9], 1)
        """
        where = "DistributedBatchLoader.load_state_dict"
        if not isinstance(state, cabc.Mapping):
            raise ValueError(
                f"{where}: expected the dict of state_dict(), got {type(state).__name__}"
            )
        for key in ("seed", "num_samples", "shuffle", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"{where}: the state was saved with {key}={state[key]!r} but this loader has "
                    f"{key}={getattr(self, key)!r}; resuming would not continue the same sample "
                    f"order. Build the loader with {key}={state[key]!r}, or set loader.position "
                    "yourself to start afresh"
                )
        if "position" not in state:
            raise ValueError(f"{where}: the state has no 'position' (keys: {sorted(state)})")
        position = _check_int("position", state["position"], 0)
        epoch, offset = self._saved_location(state, position)
        self._position = position
        self._resume_point = _ResumePoint(position, epoch, offset)

    def _saved_location(self, state: cabc.Mapping[str, Any], position: int) -> tuple[int, int]:
        """(epoch, epoch_offset) of a saved state; states without ``epoch_offset`` (written
        before it existed) had whole global batches of the saved size from each epoch's start."""
        if "epoch_offset" in state:
            epoch = _check_int("epoch", state.get("epoch"), 0)
            offset = _check_int("epoch_offset", state["epoch_offset"], 0)
        elif "epoch" in state and "global_batch_size" in state:
            epoch = _check_int("epoch", state["epoch"], 0)
            saved_batch = _check_int("global_batch_size", state["global_batch_size"], 1)
            saved_steps = (
                self.num_samples // saved_batch
                if self.drop_last
                else math.ceil(self.num_samples / saved_batch)
            )
            offset = (position - epoch * saved_steps) * saved_batch
        else:  # the oldest format: position alone, in this loader's geometry
            epoch, step = divmod(position, self.steps_per_epoch)
            return epoch, step * self.global_batch_size
        if offset < 0 or offset >= self.num_samples:
            raise ValueError(
                f"DistributedBatchLoader.load_state_dict: epoch_offset {offset} (epoch {epoch}, "
                f"position {position}) is outside the dataset's {self.num_samples} samples; the "
                "state is corrupt or belongs to another dataset"
            )
        return epoch, offset

    @classmethod
    def from_config(
        cls,
        dataset: MapDataset,
        config: Any,
        *,
        rank: int = 0,
        seed: int | None = None,
        **kwargs: Any,
    ) -> DistributedBatchLoader:
        """Build from a :class:`funczero.config.Config` (batch keys, world size, drop_last, seed).

        ``drop_last`` follows DeepSpeed's ``dataloader_drop_last`` (default false: wrap).

        Example:
            >>> import torch
            >>> from funczero.config import Config
            >>> cfg = Config.load({"train_batch_size": 8, "gradient_accumulation_steps": 2},
            ...                   world_size=2)
            >>> loader = DistributedBatchLoader.from_config(torch.arange(32), cfg, rank=1)
            >>> loader.per_rank_batch_size, loader.world_size
            (4, 2)
        """
        if seed is None:
            seed = config.seed if config.seed is not None else 0
        return cls(
            dataset,
            micro_batch_size=config.train_micro_batch_size_per_gpu,
            grad_accum=config.gradient_accumulation_steps,
            rank=rank,
            world_size=config.world_size,
            seed=seed,
            drop_last=kwargs.pop("drop_last", config.dataloader_drop_last),
            **kwargs,
        )
