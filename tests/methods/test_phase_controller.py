import math

import pytest
import torch

from rela.methods.rela import PhaseController


def transcription(losses, threshold=0.995):
    """The rule as the issue states it, in plain Python floats."""
    fast, slow, crossed_at, rhos = 1.0, 2.0, None, []
    for step, loss in enumerate(losses, start=1):
        fast = 0.999 * fast + 0.001 * loss
        slow = 0.99 * slow + 0.01 * fast
        rho = math.exp(-max(slow - fast, 0.0))
        rhos.append(rho)
        if rho >= threshold and crossed_at is None:
            crossed_at = step
    return rhos, crossed_at


@pytest.mark.parametrize("curve", ["decaying", "flat", "noisy"])
def test_controller_matches_transcription(curve):
    g = torch.Generator().manual_seed(0)
    steps = 8000
    t = torch.arange(steps, dtype=torch.float64)
    losses = {"decaying": 0.3 + 0.7 * torch.exp(-t / 300), "flat": torch.full((steps,), 0.9),
              "noisy": 0.5 + 0.1 * torch.rand(steps, generator=g, dtype=torch.float64)}[curve]
    rhos, crossed_at = transcription(losses.tolist())
    controller = PhaseController(torch.device("cpu"))
    for step, loss in enumerate(losses, start=1):
        controller.update(loss, step)
        assert controller.rho.item() == pytest.approx(rhos[step - 1], rel=1e-12, abs=1e-12)
    assert crossed_at is not None, "every curve here plateaus within 8000 steps"
    assert controller.done.item()
    assert controller.plateau_step.item() == crossed_at


def test_controller_not_done_while_loss_falls_fast():
    controller = PhaseController(torch.device("cpu"))
    for step in range(1, 400):
        controller.update(torch.tensor(1.0 - step / 400), step)
    assert not controller.done.item()
    assert controller.plateau_step.item() == -1


def test_controller_state_round_trip():
    a, b = PhaseController(torch.device("cpu")), PhaseController(torch.device("cpu"))
    for step in range(1, 50):
        a.update(torch.tensor(0.5), step)
    b.load_state_dict(a.state_dict())
    for step in range(50, 60):
        a.update(torch.tensor(0.4), step)
        b.update(torch.tensor(0.4), step)
    assert a.rho.item() == b.rho.item() and a.fast.item() == b.fast.item()


def test_earliest_plateau_step_is_a_true_lower_bound():
    controller = PhaseController(torch.device("cpu"))
    earliest = controller.earliest_plateau_step()
    for losses in ([2.0] * 600, [0.0] * 600, [1.0] * 600, [2.0 if s % 2 else 0.0 for s in range(600)]):
        _, crossed_at = transcription(losses)
        assert crossed_at is None or crossed_at >= earliest
    assert transcription([2.0] * 600)[1] == earliest


def test_flat_loss_hands_over_and_falling_loss_does_not_at_the_default_threshold():
    """Over the same 1,500 steps: a loss that has stopped falling plateaus; one still falling steadily
    (by 2e-4 a step, from the fast average's starting value) does not."""
    steps = 1500
    flat, falling = PhaseController(torch.device("cpu")), PhaseController(torch.device("cpu"))
    for step in range(1, steps + 1):
        flat.update(torch.tensor(0.95), step)
        falling.update(torch.tensor(1.0 - 2e-4 * step), step)
    assert flat.threshold == 0.995
    assert flat.done.item() and 0 < flat.plateau_step.item() < steps
    assert not falling.done.item() and falling.plateau_step.item() == -1
