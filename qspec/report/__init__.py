"""The HTML report of one run directory (run.json + results.jsonl), and a terminal verdict.

    write_report(run_dir, budget=None) -> run_dir / "index.html"
    summary_text(run_dir, budget=None) -> one paragraph of plain text

The page is one self-contained file: no scripts, no network requests, figures embedded as
``data:`` URIs, all strings from results escaped by Jinja2's autoescaping. Records are read as
the typed models of qspec.records; optional fields may be null, and a section that cannot be
built says so instead of failing the whole report. Torch-free: rendering never imports it.

    load.py      run.json and results.jsonl -> RunInfo, typed records, notes
    analysis.py  Run: the records grouped and ordered, labels, weights, captions
    budget.py    the quality budget and each variant's verdict against it
    pairings.py  speculative pairings across suites; output that is not lossless
    sections/    one module per section of the page
    render.py    the sections into the template; summary.py: the terminal paragraph
"""

from qspec.report.analysis import Run
from qspec.report.budget import Budget
from qspec.report.load import load_run
from qspec.report.render import build_context, write_report
from qspec.report.summary import summary_text

__all__ = ["Budget", "Run", "build_context", "load_run", "summary_text", "write_report"]
