"""The README's measured results are what the committed JSON gives: benchmarks/results_readme.py --check."""
from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.results_readme import BEGIN, END, main  # noqa: E402

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_results_are_the_json_results():
    assert main(["--check"]) == 0


def test_a_number_changed_by_hand_is_caught(tmp_path):
    text = README.read_text()
    head, section = text.split(BEGIN, 1)
    section, tail = section.split(END, 1)
    number = re.search(r"\d+\.\d\d", section)
    assert number is not None, "the results section holds no number"
    edited = section[:number.start()] + f"{float(number.group()) + 0.01:.2f}" + section[number.end():]
    copy = tmp_path / "README.md"
    copy.write_text(head + BEGIN + edited + END + tail)
    assert main(["--check", "--readme", str(copy)]) == 1
