"""The README's benchmark numbers are the results files' numbers: `bench/report.py` renders every
block between `<!-- bench:NAME -->` markers from bench/results/*.json, and this fails when someone
edits a number by hand or reruns a benchmark without rendering the README again."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _report() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_says_what_the_results_files_say() -> None:
    report = _report()
    readme = (ROOT / "README.md").read_text()
    found = set(re.findall(r"<!-- bench:([a-z_]+) -->", readme))
    assert found == set(report.BLOCKS), "every renderer has its block in the README, and only those"
    assert report.render(readme) == readme, "README.md is stale: run `python bench/report.py`"


def test_a_number_changed_by_hand_is_caught() -> None:
    report = _report()
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- bench:orchestration -->(.*?)<!-- /bench:orchestration -->", readme, re.DOTALL)
    assert block is not None and re.search(r"\d", block.group(1))
    # the first digit, changed (to another digit: "9 rounds" edited to "9 rounds" would be no edit)
    edited = readme.replace(block.group(1), re.sub(r"\d", lambda m: str((int(m.group()) + 1) % 10),
                                                   block.group(1), count=1))
    assert report.render(edited) != edited


# A measurement's units: a rate, a speed-up, microseconds. Settings in the README (timeouts in s or
# ms, sizes in MB) are not measurements and may stand anywhere.
_MEASURED = re.compile(r"\d[\d,.]*\s*(?:x\b|lines/s|tokens/s|tok/s|us\b)")


def test_no_measured_number_stands_outside_a_rendered_block() -> None:
    readme = (ROOT / "README.md").read_text()
    outside = re.sub(r"<!-- bench:([a-z_]+) -->.*?<!-- /bench:\1 -->", "", readme, flags=re.DOTALL)
    found = [m.group() for m in _MEASURED.finditer(outside)]
    assert found == [], f"numbers no script rendered (put them in a bench block or drop them): {found}"
    assert _MEASURED.search("the engine ran 2.7x faster at 305 tokens/s, 29.5 us per line")  # the pattern bites
