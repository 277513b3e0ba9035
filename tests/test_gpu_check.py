"""benchmarks/gpu_check.py on a CPU with a toy model: every cell of its table runs, so that a
session lent a GPU spends its minutes measuring, not debugging."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_the_gpu_check_runs_every_cell_on_a_cpu(capsys):
    import gpu_check

    args = ["--device", "cpu", "--size", "tiny", "--tokens", "8", "--prompts", "2"]
    rows = gpu_check.main([*args, "--compile", "off"])
    assert all("error" not in r for r in rows), [r.get("error") for r in rows]
    drafts = {(r["target"], r["draft"]) for r in rows}
    assert ("fp32", "self:w8a8") in drafts and ("w8a8 (simulated)", "ngram") in drafts
    assert ("fp32", "eagle3 (random head)") in drafts
    assert all(r["speedup"] > 0 for r in rows if r["draft"] != "alone")
    alone = next(r for r in rows if (r["target"], r["draft"]) == ("fp32", "alone"))
    assert alone["roofline"] > 0 and alone["tau"] == 1.0
    out = capsys.readouterr().out
    assert "batch invariant, fp32: " in out and "whole check:" in out
