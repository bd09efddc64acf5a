"""Ranks that diverge: step_scope and the opt-in SPMD check (funczero.parallel.divergence).

The multi-rank tests run one 2-rank gloo world with the check on. Each diverging case is caught
by the check before any real collective is issued, on every rank at the same point, so the ranks
stay matched and the world goes on to the next case. A case the check missed would hang until
the world's deadline (or raise a timeout's CollectiveError, which does not name the check): the
test would fail either way, and the assertions are on the messages, not on timing.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

from funczero.parallel import divergence
from funczero.parallel.divergence import (
    CollectiveError,
    StepCounter,
    current_step,
    set_spmd_check,
    spmd_check_enabled,
    step_scope,
)

WORLD = 2
WIDTH = 16


class _Blocks(torch.nn.Module):
    """Three blocks of one shape; ``skip`` (a rank's branch) leaves one out, and inputs longer
    than 4 along dim 1 also run ``long_context`` (a branch on the batch's shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(WIDTH, WIDTH) for _ in range(3))
        self.long_context = torch.nn.ModuleList([torch.nn.Linear(WIDTH, WIDTH)])
        self.skip: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            if i != self.skip:
                x = torch.tanh(block(x))
        if x.dim() == 3 and x.shape[1] > 4:
            x = self.long_context[0](x)
        return x


def _train(
    rank: int, stage: int, batches: list[torch.Tensor], *, skip: int | None = None
) -> dict[str, torch.Tensor]:
    """Train a fresh ``_Blocks`` on ``batches`` (one step each, inside ``step_scope``); the
    full fp32 master weights."""
    import funczero
    from funczero import optim
    from funczero.module import extract_tensors, release_module_tensors
    from funczero.parallel.plan import build_plan
    from funczero.parallel.stages import gather_full

    torch.manual_seed(0)
    model = _Blocks()
    model.skip = skip
    plan = build_plan(model, stage=stage)
    params, buffers = extract_tensors(model, plan.spec)
    release_module_tensors(model)
    opt = optim.adamw(1e-2)
    state = funczero.init_state(plan, opt, params, buffers)
    step = funczero.make_train_step(lambda m, b: m(b).pow(2).mean(), opt, plan)
    for i, batch in enumerate(batches):
        with step_scope(i):
            state, _ = step(state, batch)
    return gather_full(plan, state.master, sharded=plan.master_sharded)


def _batches(rank: int, shape: tuple[int, ...], steps: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(shape, generator=g) for _ in range(steps)]


def _message_of(fn: Any) -> torch.Tensor:
    """Run ``fn``; the CollectiveError it must raise, as UTF-8 bytes in a tensor."""
    try:
        fn()
    except CollectiveError as e:
        return torch.tensor(list(str(e).encode()), dtype=torch.uint8)
    raise AssertionError("the diverging ranks raised no CollectiveError")


def _spmd_world(rank: int, world: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    # Bit-identical training with the check off and on, at stages 0 and 3 (every kind of
    # collective funczero issues in a step: all-reduce, reduce-scatter, all-gather, the norm's
    # all-reduce, stage 3's shard sums), and a record of what the check compared.
    checked: list[str] = []
    real_check = divergence.check_same_collective

    def recording(describe: Any, **kwargs: Any) -> None:
        checked.append(describe())
        real_check(describe, **kwargs)

    for stage in (0, 3):
        batches = _batches(rank, (4, WIDTH), steps=3)
        set_spmd_check(False)
        off = _train(rank, stage, batches)
        set_spmd_check(True)
        divergence.check_same_collective = recording  # type: ignore[assignment]
        try:
            on = _train(rank, stage, batches)
        finally:
            divergence.check_same_collective = real_check  # type: ignore[assignment]
        for n in off:
            out[f"stage{stage}/off/{n}"], out[f"stage{stage}/on/{n}"] = off[n], on[n]
    out["checked"] = torch.tensor(list("\n".join(checked).encode()), dtype=torch.uint8)

    # Batches of different sizes that run the same modules issue the same collectives: no error.
    _train(rank, 3, _batches(rank, (2 + 2 * rank, WIDTH), steps=1))

    # Rank 1 skips block 1.
    out["skip"] = _message_of(
        lambda: _train(rank, 3, _batches(rank, (4, WIDTH)), skip=1 if rank == 1 else None)
    )
    # Rank 1's batch is longer along dim 1, which makes its model run one more unit.
    out["shape"] = _message_of(lambda: _train(rank, 3, _batches(rank, (2, 4 + 4 * rank, WIDTH))))
    # Rank 1 reduces a tensor of another shape (say, a metric of its batch) in a labelled
    # collective: without the check gloo would fail or hang; with it both ranks name the shapes.
    from funczero.parallel.collectives import all_reduce_labelled

    out["labelled"] = _message_of(
        lambda: all_reduce_labelled(torch.ones(2 + rank), "all-reduce of a probe", group=None)
    )
    return out


@pytest.fixture(scope="module")
def reports(gloo_world: Any) -> list[dict[str, torch.Tensor]]:
    return gloo_world(_spmd_world, WORLD, timeout=240.0)


def _text(t: torch.Tensor) -> str:
    return bytes(t.tolist()).decode()


def test_training_with_the_spmd_check_is_bit_identical_to_training_without(
    reports: list[dict[str, torch.Tensor]],
) -> None:
    for rep in reports:
        for stage in (0, 3):
            names = [k.split("/", 2)[2] for k in rep if k.startswith(f"stage{stage}/off/")]
            assert names
            for n in names:
                torch.testing.assert_close(
                    rep[f"stage{stage}/on/{n}"], rep[f"stage{stage}/off/{n}"], rtol=0, atol=0
                )


def test_the_spmd_check_compares_every_collective_of_a_step(
    reports: list[dict[str, torch.Tensor]],
) -> None:
    checked = _text(reports[0]["checked"])
    for kind in (
        "all-reduce of unit 'blocks.0'",  # stage 0, one micro-batch: per unit in backward
        "reduce-scatter of unit 'blocks.2'",
        "all-gather of unit 'blocks.1'",
        "all-reduce of the step's gradient norm and loss",
    ):
        assert kind in checked, (kind, checked)
    assert _text(reports[1]["checked"]) == checked, "both ranks compared the same collectives"


@pytest.mark.parametrize(
    ("case", "runs_it", "unit"),
    [("skip", 0, "blocks.1"), ("shape", 1, "long_context.0")],
)
def test_diverging_ranks_raise_at_once_on_every_rank_naming_each_ranks_collective(
    reports: list[dict[str, torch.Tensor]], case: str, runs_it: int, unit: str
) -> None:
    """``unit`` runs on rank ``runs_it`` only: the first divergent collective moves it there."""
    messages = [_text(rep[case]) for rep in reports]
    for rank, message in enumerate(messages):
        assert message.startswith(f"rank {rank}, step 0: "), message
        assert "FUNCZERO_SPMD_CHECK" in message and "did not complete" not in message, message
        lines = re.findall(r"^  group rank (\d)( \(this rank\))?: collective (\d+) of step 0: (.*)$",
                           message, re.MULTILINE)  # fmt: skip
        assert [int(r) for r, *_ in lines] == [0, 1], message
        assert [bool(me) for _, me, *_ in lines] == [r == rank for r in range(WORLD)], message
        (_, _, n0, what0), (_, _, n1, what1) = lines
        assert n0 == n1, "the first divergent collective is at the same position on both ranks"
        assert what0 != what1 and " of unit '" in what0 + what1, message
        assert f"of unit '{unit}'" in (what0, what1)[runs_it], message
    # Both ranks name the same divergence.
    bodies = [m.split("\n", 1)[1].replace(" (this rank)", "") for m in messages]
    assert bodies[0] == bodies[1], messages


def test_step_scope_nests_and_restores_the_outer_step_even_on_error() -> None:
    assert current_step() is None
    with pytest.raises(KeyError), step_scope(3):
        with step_scope(4):
            assert current_step() == 4
        assert current_step() == 3
        raise KeyError("boom")
    assert current_step() is None


def test_step_counter_numbers_calls_from_one_and_yields_to_a_scope_the_caller_opened() -> None:
    steps = StepCounter()
    seen = []
    for _ in range(2):
        with steps.scope():
            seen.append(current_step())
    with step_scope(1000), steps.scope():
        seen.append(current_step())
    with steps.scope():
        seen.append(current_step())
    assert seen == [1, 2, 1000, 4]
    assert current_step() is None


@pytest.mark.parametrize("bad", [-1, 1.0, True, "3"])
def test_step_scope_rejects_what_is_not_a_host_step_number(bad: Any) -> None:
    with pytest.raises(TypeError, match="int >= 0"), step_scope(bad):
        pass


def test_set_spmd_check_returns_the_previous_setting_and_rejects_non_bools() -> None:
    before = spmd_check_enabled()
    try:
        assert set_spmd_check(True) is before
        assert spmd_check_enabled() is True
        assert set_spmd_check(False) is True
        with pytest.raises(TypeError, match="True or False"):
            set_spmd_check(1)  # type: ignore[arg-type]
    finally:
        set_spmd_check(before)


@pytest.mark.parametrize(("value", "on"), [("1", True), ("true", True), ("0", False), ("", False)])
def test_the_env_switch_reads_common_spellings(value: str, on: bool) -> None:
    assert divergence._env_flag(value) is on


def test_the_env_switch_rejects_a_value_it_cannot_read() -> None:
    with pytest.raises(ValueError, match=r"FUNCZERO_SPMD_CHECK='maybe'.*set it to 1"):
        divergence._env_flag("maybe")


def test_a_single_process_step_runs_unchanged_with_the_check_on() -> None:
    batches = _batches(0, (4, WIDTH))
    before = set_spmd_check(False)
    try:
        off = _train(0, 3, batches)
        set_spmd_check(True)
        on = _train(0, 3, batches)
    finally:
        set_spmd_check(before)
    for n in off:
        torch.testing.assert_close(on[n], off[n], rtol=0, atol=0)


def test_the_check_is_off_unless_the_env_switch_turns_it_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import subprocess
    import sys

    monkeypatch.delenv("FUNCZERO_SPMD_CHECK", raising=False)
    code = "from funczero.parallel import divergence as d; print(d.spmd_check_enabled())"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"  # fmt: skip
    monkeypatch.setenv("FUNCZERO_SPMD_CHECK", "1")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "True"  # fmt: skip


def test_a_labelled_collective_of_another_shape_on_one_rank_names_both_shapes(
    reports: list[dict[str, torch.Tensor]],
) -> None:
    for rank, rep in enumerate(reports):
        message = _text(rep["labelled"])
        assert message.startswith(f"rank {rank}: the ranks are about to issue different"), message
        assert re.search(
            r"group rank 0.*: collective \d+: all-reduce of a probe \(\(2,\) torch.float32", message
        ), message
        assert re.search(
            r"group rank 1.*: collective \d+: all-reduce of a probe \(\(3,\) torch.float32", message
        ), message
