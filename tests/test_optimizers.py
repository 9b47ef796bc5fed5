"""vram.optimizer: AdamW, 8-bit AdamW (bitsandbytes), Adafactor (transformers) — each trains, resumes
exactly from its state_dict, and keeps the state the planner's formula says (measured on the real
optimizer's tensors)."""

from __future__ import annotations

import copy
import importlib.util
import sys

import pytest
import torch
from torch import nn

from jointdit import optimizers as O


# bitsandbytes is the optional [lowmem] extra; its CPU backend works (0.50 checked) but importing it costs
# every diffusers import several seconds, so the shared test venv does not install it.
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
NAMES = [pytest.param(n, marks=pytest.mark.skipif(n == "adamw8bit" and not HAS_BNB, reason="pip install 'jointdit[lowmem]'"))
         for n in O.OPTIMIZERS]


def problem(seed: int = 0):
    """Least squares y = X·W* with a [96, 64] weight (6144 elements: above bnb's 8-bit threshold) and a
    small 1-D bias (below it: 32-bit state)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(64, 96)
    with torch.no_grad():
        model.weight.copy_(torch.randn(96, 64, generator=g) * 0.1)
        model.bias.zero_()
    x = torch.randn(256, 64, generator=g)
    y = x @ torch.randn(64, 96, generator=g) * 0.2
    return model, x, y


def step(model, opt, x, y) -> float:
    loss = (model(x) - y).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


@pytest.mark.parametrize("name", NAMES)
def test_each_optimizer_trains_and_resumes_exactly(name):
    model, x, y = problem()
    opt = O.build_optimizer(name, model.parameters(), lr=1e-2, betas=(0.9, 0.99))
    losses = [step(model, opt, x, y) for _ in range(40)]
    assert losses[-1] < 0.5 * losses[0], losses[::10]

    # resume: a fresh model + optimizer loaded from state dicts continue bit-identically
    twin = copy.deepcopy(model)
    twin_opt = O.build_optimizer(name, twin.parameters(), lr=1e-2, betas=(0.9, 0.99))
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(3):
        step(model, opt, x, y)
        step(twin, twin_opt, x, y)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


@pytest.mark.parametrize("name", NAMES)
def test_state_bytes_formula_matches_the_real_state(name):
    model, x, y = problem()
    extra = nn.Parameter(torch.zeros(2, 3, 40, 50))  # a 4-D tensor: Adafactor factors its last two dims
    opt = O.build_optimizer(name, [*model.parameters(), extra], lr=1e-3)
    ((model(x) - y).pow(2).mean() + extra.sum()).backward()
    opt.step()
    seen, measured = set(), 0
    for state in opt.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and value.numel() > 1 and not key.startswith("qmap"):  # qmaps are shared tables
                if value.data_ptr() not in seen:
                    seen.add(value.data_ptr())
                    measured += value.numel() * value.element_size()
    shapes = [p.shape for p in (*model.parameters(), extra)]
    assert O.state_bytes(name, shapes) == measured
    full = 8 * sum(p.numel() for p in (*model.parameters(), extra))
    assert {"adamw": measured == full, "adamw8bit": measured < full / 3, "adafactor": measured < full / 10}[name]


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(O.OptimizerUnavailable, match=r"pip install 'jointdit\[lowmem\]'"):
        O.build_optimizer("adamw8bit", [nn.Parameter(torch.zeros(3))], lr=1e-3)
    with pytest.raises(ValueError, match="must be one of adamw, adamw8bit, adafactor"):
        O.build_optimizer("sgd", [nn.Parameter(torch.zeros(3))], lr=1e-3)


def test_config_chooses_the_optimizer(compose_cfg):
    from transformers.optimization import Adafactor

    params = [{"params": [nn.Parameter(torch.zeros(4, 4))], "lr": 1e-3}]
    assert type(O.from_config(compose_cfg("train"), params)) is torch.optim.AdamW
    opt = O.from_config(compose_cfg("train", ["vram.optimizer=adamw", "vram.optimizer_foreach=true"]), params)
    assert opt.defaults["foreach"] is True
    if HAS_BNB:
        from bitsandbytes.optim import AdamW8bit

        assert isinstance(O.from_config(compose_cfg("train", ["vram.optimizer=adamw8bit"]), params), AdamW8bit)
    else:
        with pytest.raises(O.OptimizerUnavailable, match="adamw8bit needs bitsandbytes"):
            O.from_config(compose_cfg("train", ["vram.optimizer=adamw8bit"]), params)
    assert isinstance(O.from_config(compose_cfg("train", ["vram=48gb", "vram.optimizer=adafactor"]), params), Adafactor)
