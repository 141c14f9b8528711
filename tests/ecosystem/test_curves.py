"""curves.png at the end of a run: written, a real picture, and never a reason for a run to fail."""
from __future__ import annotations

import json

import numpy as np

from rela.plots import write_curves, write_curves_logged


def test_curves_png_is_written_at_the_end_of_a_run(finished_run):
    import matplotlib.image

    path = finished_run / "curves.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)[..., :3]
    assert image.shape[:2] == (850, 1600)
    # Non-trivial: plenty of ink, in several colours (the panels' curves), not a blank or single-colour page.
    ink = (image < 0.9).any(axis=-1).mean()
    colours = len(np.unique((image * 255).astype(np.uint8).reshape(-1, 3), axis=0))
    assert 0.03 < ink < 0.6 and colours > 200, (ink, colours)


def test_curves_mark_the_switch_and_survive_a_run_without_rela(tmp_path, finished_run):
    """Drawn from the files alone (python -m rela.plots RUN); a BYOL-only run (no rho, no switch) draws too."""
    rows = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert sum("rela_phase_end_step" in r for r in rows) == 1  # the switch row the plot marks
    byol_only = [r for r in rows if r.get("phase") == "byol" and "rela_phase_end_step" not in r]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in byol_only))
    assert write_curves(tmp_path).stat().st_size > 20_000


def test_a_plotting_error_is_logged_not_raised(tmp_path):
    class Log:
        messages: list[str] = []

        def info(self, message):
            self.messages.append(message)

    (tmp_path / "metrics.jsonl").write_text("not json\n")
    log = Log()
    assert write_curves_logged(tmp_path, log) is None
    assert not (tmp_path / "curves.png").exists()
    assert len(log.messages) == 1 and log.messages[0].startswith("curves.png not written: JSONDecodeError")
