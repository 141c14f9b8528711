import math

import pytest
import torch

from rela.methods.rela import PhaseController


def transcription(losses, threshold=0.995):
    """The reference code's update (LINs-lab/ReLA boostor/rela.py, training_step wrapper), in plain Python
    floats: rho from the averages as they stand, then the averages. Returns every step's rho and the
    step whose rho first crossed: the reference's last RELA step."""
    rela_loss, rela_loss_fast, crossed_at, rhos = 2.0, 1.0, None, []
    for step, cur_loss in enumerate(losses, start=1):
        rho = math.exp(-max(rela_loss - rela_loss_fast, 0) * 1)
        rela_loss_fast = rela_loss_fast * 0.999 + cur_loss * 0.001
        rela_loss = rela_loss * 0.99 + rela_loss_fast * 0.01
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


CONTROLLER_FIELDS = ("fast", "slow", "rho", "done", "plateau_step")


def assert_same_controller(a: PhaseController, b: PhaseController) -> None:
    for name in CONTROLLER_FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.ended_before() == b.ended_before()


@pytest.mark.parametrize("saved_at", [1, 50, 800], ids=["after_one_update", "mid_phase", "after_the_plateau"])
def test_controller_state_round_trip(saved_at):
    """Every field survives a save and load, and both controllers then decide alike, step for step, through
    the plateau (a loss that falls, then sits flat)."""
    losses = [1.0 + 0.5 * max(0, 1 - step / 100) for step in range(1, 900)]  # the rule fires at step ~530
    a, b = PhaseController(torch.device("cpu")), PhaseController(torch.device("cpu"))
    for step, loss in enumerate(losses[:saved_at], start=1):
        a.update(torch.tensor(loss), step)
    b.load_state_dict(a.state_dict())
    assert_same_controller(a, b)
    for step, loss in enumerate(losses[saved_at:], start=saved_at + 1):
        a.update(torch.tensor(loss), step)
        b.update(torch.tensor(loss), step)
        assert_same_controller(a, b)
    assert a.done.item() and a.plateau_step.item() > 100  # the sequence does reach the plateau


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


def test_the_host_learns_of_the_plateau_exactly_one_step_after_the_reference_hands_over():
    """A loss curve whose crossing step is known from the transcription: `ended_before`, read after each
    update as the trainer does, first says True one step after that step, never earlier."""
    losses = [1.0] * 700
    _, crossed_at = transcription(losses)
    assert crossed_at is not None and 400 < crossed_at < 700
    controller = PhaseController(torch.device("cpu"))
    handed_over_at = None
    for step, loss in enumerate(losses, start=1):
        controller.update(torch.tensor(loss), step)
        if controller.ended_before():
            handed_over_at = step
            break
    assert controller.plateau_step.item() == crossed_at
    assert handed_over_at == crossed_at + 1


def test_averaging_scale_shortens_the_rule_and_scale_one_is_the_reference():
    reference = PhaseController(torch.device("cpu"))
    assert (reference.fast_decay, reference.slow_decay) == (0.999, 0.99)
    fast = PhaseController(torch.device("cpu"), averaging_scale=10)
    assert fast.fast_decay == pytest.approx(0.99) and fast.slow_decay == pytest.approx(0.9)
    assert fast.earliest_plateau_step() < reference.earliest_plateau_step() / 5
