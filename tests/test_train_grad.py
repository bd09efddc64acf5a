from __future__ import annotations

import pytest
import torch

from funczero import value_and_grad
from funczero.module import apply_module, extract_tensors, module_spec
from funczero.models.gpt import GPT, GPTConfig


def _gpt_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=33, seq_len=8, d_model=16, n_layers=2, n_heads=2))
    spec = module_spec(model)
    params, buffers = extract_tensors(model, spec)
    x = torch.randint(0, 33, (4, 8))
    y = torch.randint(0, 33, (4, 8))

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        logits, _ = apply_module(model, spec, p, buffers, x)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())

    return loss, params, model, x, y


def test_autograd_and_func_backends_give_identical_grads() -> None:
    loss, params, _, _, _ = _gpt_loss()
    v1, g1 = value_and_grad(loss)(params)
    v2, g2 = value_and_grad(loss, backend="func")(params)
    assert torch.equal(v1, v2)
    for n in params:
        assert torch.equal(g1[n], g2[n]), n


def test_value_and_grad_matches_eager_backward_including_tied_weight() -> None:
    loss, params, model, x, y = _gpt_loss()
    _, grads = value_and_grad(loss)(params)
    eager = GPT(model.cfg)
    eager.load_state_dict({**{k: v for k, v in params.items()}, "head.weight": params["wte.weight"]}, strict=False)
    torch.nn.functional.cross_entropy(eager(x).flatten(0, 1), y.flatten()).backward()
    assert "head.weight" not in grads  # one canonical name for the tied pair
    for n, p in eager.named_parameters():
        assert torch.equal(grads[n], p.grad), n


def test_inputs_are_left_untouched() -> None:
    loss, params, _, _, _ = _gpt_loss()
    before = {n: p.clone() for n, p in params.items()}
    value_and_grad(loss)(params)
    for n, p in params.items():
        assert not p.requires_grad and p.grad is None and p.grad_fn is None
        assert torch.equal(p, before[n])


def test_has_aux_returns_detached_aux() -> None:
    f = lambda p: ((p["w"] ** 2).sum(), {"w2": p["w"] * 2})  # noqa: E731
    (value, aux), grads = value_and_grad(f, has_aux=True)({"w": torch.ones(2)})
    assert value.item() == 2.0 and not aux["w2"].requires_grad
    assert torch.equal(grads["w"], torch.full((2,), 2.0))


def test_non_scalar_loss_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="0-d tensor"):
        value_and_grad(lambda p: p["w"] * 2)({"w": torch.ones(2)})


def test_unknown_backend_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        value_and_grad(lambda p: p, backend="jax")  # type: ignore[arg-type]
