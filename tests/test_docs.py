"""The docs quote what runs: each line of docs/scale-out.md's table of faults is read by the test
that makes the fault happen (test_cluster.py, through helpers.fault_lines)."""

import re

from tests.helpers import ROOT, fault_lines


def test_every_fault_the_docs_quote_is_matched_by_a_test():
    text = (ROOT / "docs" / "scale-out.md").read_text()
    table = text.split("| What | What you get | What to do |\n|---|---|---|\n")[1].split("\n\n")[0]
    faults = [row.strip("|").split("|")[0].strip() for row in table.splitlines()]
    assert len(faults) == 9
    # The tests' source with Python's adjacent strings joined, as the interpreter joins them.
    source = re.sub(r'"\s*\n\s*"', "", (ROOT / "tests" / "test_cluster.py").read_text())
    for fault in faults:
        assert fault_lines(fault), f"{fault}: no line quoted"
        assert f'"{fault}"' in source, f"no test reads the line of {fault!r}"
