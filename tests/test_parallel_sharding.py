"""ShardSpec and Unit against a naive reference (pad, cut, torch.cat, slicing), worlds 1-4."""

from __future__ import annotations

import pytest
import torch

from funczero.parallel.sharding import ShardSpec, Unit

# Shapes that shard evenly, unevenly, with fewer elements than ranks, and a 0-d scalar.
SHAPES = {"w": (4, 3), "b": (5,), "one": (1,), "two": (2,), "scalar": (), "cube": (2, 3, 3)}
WORLDS = (1, 2, 3, 4)


def values(shapes: dict[str, tuple[int, ...]] = SHAPES, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in shapes.items()}


def naive_shards(full: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Flatten, zero-pad to a multiple of ``world`` and cut in ``world`` equal chunks."""
    flat = full.reshape(-1)
    per = -(-flat.numel() // world)
    padded = torch.cat([flat, flat.new_zeros(per * world - flat.numel())])
    return [padded[r * per : (r + 1) * per] for r in range(world)]


def make_unit(world: int, shapes: dict[str, tuple[int, ...]] = SHAPES) -> Unit:
    names = tuple(shapes)
    return Unit("blk", names, tuple(ShardSpec(n, torch.Size(shapes[n]), world) for n in names))


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", list(SHAPES))
def test_shard_spec_shards_are_padded_chunks_and_full_round_trips(name: str, world: int) -> None:
    full = values()[name]
    spec = ShardSpec(name, full.shape, world)
    expected = naive_shards(full, world)
    shards = [spec.shard(full, r) for r in range(world)]
    for r in range(world):
        torch.testing.assert_close(shards[r], expected[r], rtol=0, atol=0)
        assert shards[r].shape == (spec.shard_numel,)
    assert spec.numel == full.numel()
    assert spec.padded_numel == spec.shard_numel * world >= spec.numel
    assert spec.padded_numel - spec.numel < world  # never a whole chunk of padding more than needed
    torch.testing.assert_close(spec.full(shards), full, rtol=0, atol=0)
    assert spec.full(shards).shape == full.shape


@pytest.mark.parametrize(
    ("numel", "world", "bounds"),
    [
        (5, 2, [(0, 3), (3, 5)]),
        (5, 4, [(0, 2), (2, 4), (4, 5), (5, 5)]),  # the last rank holds only padding
        (9, 4, [(0, 3), (3, 6), (6, 9), (9, 9)]),  # an empty rank although numel > world
        (2, 4, [(0, 1), (1, 2), (2, 2), (2, 2)]),  # fewer elements than ranks
        (8, 4, [(0, 2), (2, 4), (4, 6), (6, 8)]),
        (0, 3, [(0, 0), (0, 0), (0, 0)]),
    ],
)
def test_shard_spec_bounds_cover_the_parameter_once_and_leave_trailing_ranks_empty(
    numel: int, world: int, bounds: list[tuple[int, int]]
) -> None:
    spec = ShardSpec("p", torch.Size([numel]), world)
    assert [spec.bounds(r) for r in range(world)] == bounds
    full = torch.arange(float(numel))
    for r, (start, stop) in enumerate(bounds):
        shard = spec.shard(full, r)
        torch.testing.assert_close(shard[: stop - start], full[start:stop], rtol=0, atol=0)
        assert not shard[stop - start :].any(), "padding must be zeros"
    torch.testing.assert_close(spec.full([spec.shard(full, r) for r in range(world)]), full)


def test_shard_spec_shard_copies_instead_of_viewing_the_parameter() -> None:
    full = torch.arange(6.0)
    spec = ShardSpec("p", full.shape, 2)
    shard = spec.shard(full, 0)
    shard.add_(100)
    torch.testing.assert_close(full, torch.arange(6.0))


def test_shard_spec_rejects_wrong_shape_and_wrong_shard_count_naming_the_parameter() -> None:
    spec = ShardSpec("blocks.0.w", torch.Size([2, 3]), 2)
    with pytest.raises(ValueError, match=r"blocks\.0\.w: expected shape \(2, 3\), got \(3, 2\)"):
        spec.shard(torch.zeros(3, 2), 0)
    with pytest.raises(ValueError, match=r"blocks\.0\.w: need 2 shards, got 3"):
        spec.full([torch.zeros(3)] * 3)


def rank_shards(world: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    full = values(seed=seed)
    return [{n: naive_shards(full[n], world)[r].clone() for n in SHAPES} for r in range(world)]


@pytest.mark.parametrize("world", WORLDS)
def test_unit_sizes_are_the_sums_of_its_parameters(world: int) -> None:
    unit = make_unit(world)
    sizes = [-(-torch.Size(s).numel() // world) for s in SHAPES.values()]
    assert list(unit.shard_sizes) == sizes
    assert unit.shard_numel == sum(sizes)
    assert unit.numel == sum(torch.Size(s).numel() for s in SHAPES.values())
    assert unit.world_size == world


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize(
    ("stored", "dtype"),
    [
        (torch.float32, torch.float32),
        (torch.float32, torch.bfloat16),  # cast while packing
        (torch.bfloat16, torch.float32),
        ("mixed", torch.float16),
    ],
)
def test_unit_pack_shards_concatenates_shards_in_parameter_order_and_casts(
    world: int, stored: torch.dtype | str, dtype: torch.dtype
) -> None:
    unit = make_unit(world)
    for r, shards in enumerate(rank_shards(world)):
        if stored == "mixed":
            shards = {
                n: s.to(torch.bfloat16 if i % 2 else torch.float32)
                for i, (n, s) in enumerate(shards.items())
            }
        else:
            shards = {n: s.to(stored) for n, s in shards.items()}
        packed = unit.pack_shards(shards, dtype)
        expected = torch.cat([shards[n].reshape(-1).to(dtype) for n in unit.params])
        assert packed.dtype == dtype and packed.shape == (unit.shard_numel,), r
        torch.testing.assert_close(packed, expected, rtol=0, atol=0)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unit_unpack_gathered_rebuilds_full_parameters_as_views_of_one_buffer(
    world: int, dtype: torch.dtype
) -> None:
    unit = make_unit(world)
    full = {n: v.to(dtype) for n, v in values().items()}
    per_rank = rank_shards(world)
    gathered = torch.cat([unit.pack_shards(shards, dtype) for shards in per_rank])
    out = unit.unpack_gathered(gathered)
    assert list(out) == list(unit.params)
    for n in unit.params:
        assert out[n].shape == full[n].shape and out[n].dtype == dtype
        torch.testing.assert_close(out[n], full[n], rtol=0, atol=0)
    storages = {t.untyped_storage().data_ptr() for t in out.values()}
    assert len(storages) == 1, "the ZeRO-3 re-gather hooks recognise a unit by its one storage"
    assert gathered.untyped_storage().data_ptr() not in storages, "must not alias the gather buffer"


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize(
    ("stored", "dtype"),
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),  # bf16 gradients reduced in fp32
        (torch.float32, torch.bfloat16),
        ("mixed", torch.float32),
    ],
)
def test_unit_chunk_grads_puts_each_ranks_chunk_of_every_parameter_in_its_row(
    world: int, stored: torch.dtype | str, dtype: torch.dtype
) -> None:
    unit = make_unit(world)
    grads = values(seed=3)
    if stored == "mixed":
        grads = {
            n: g.to(torch.bfloat16 if i % 2 else torch.float32)
            for i, (n, g) in enumerate(grads.items())
        }
    else:
        grads = {n: g.to(stored) for n, g in grads.items()}
    chunks = unit.chunk_grads(grads, dtype)
    assert chunks.shape == (world, unit.shard_numel) and chunks.dtype == dtype
    for r in range(world):
        expected = torch.cat([naive_shards(grads[n].to(dtype), world)[r] for n in unit.params])
        torch.testing.assert_close(chunks[r], expected, rtol=0, atol=0)


@pytest.mark.parametrize("world", WORLDS)
def test_unit_split_shard_returns_per_parameter_views_of_the_packed_buffer(world: int) -> None:
    unit = make_unit(world)
    flat = torch.arange(float(unit.shard_numel))
    parts = unit.split_shard(flat)
    assert list(parts) == list(unit.params)
    offset = 0
    for n, size in zip(unit.params, unit.shard_sizes):
        torch.testing.assert_close(parts[n], flat[offset : offset + size], rtol=0, atol=0)
        assert parts[n].untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
        offset += size
    assert offset == unit.shard_numel
    # split_shard inverts pack_shards.
    shards = rank_shards(world)[world - 1]
    back = unit.split_shard(unit.pack_shards(shards, torch.float32))
    for n in unit.params:
        torch.testing.assert_close(back[n], shards[n].reshape(-1), rtol=0, atol=0)


@pytest.mark.parametrize("world", WORLDS)
def test_unit_restrict_keeps_the_units_order_and_name_and_drops_the_rest(world: int) -> None:
    unit = make_unit(world)
    sub = unit.restrict(["one", "w", "not-a-param", "cube"])
    assert sub.name == "blk"
    assert sub.params == ("w", "one", "cube")
    assert sub.specs == tuple(s for s in unit.specs if s.name in sub.params)
    assert sub.world_size == world
    # The restricted unit packs exactly the kept parameters' slices of the full unit's buffer.
    shards = rank_shards(world)[0]
    full = unit.split_shard(unit.pack_shards(shards, torch.float32))
    part = sub.split_shard(sub.pack_shards(shards, torch.float32))
    for n in sub.params:
        torch.testing.assert_close(part[n], full[n], rtol=0, atol=0)
    empty = unit.restrict(())
    assert empty.params == () and empty.specs == () and empty.shard_numel == 0
