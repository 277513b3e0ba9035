"""The HTML report: sections, self-containment, escaping, partial runs, and a real browser."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import shutil
import subprocess
import threading
import time
from html.parser import HTMLParser
from importlib.resources import files
from pathlib import Path

import pytest

from qspec.report import Budget, plots, summary_text, write_report

DATA = Path(__file__).parent / "data" / "results-small"
SECTIONS = [
    "verdict",
    "matrix",
    "quality",
    "pareto",
    "acceptance",
    "latency",
    "roofline",
    "breakdown",
    "definitions",
    "metadata",
    "failures",
    "outputs",
]
EVIL_SCRIPT = "<script>alert(1)</script>"
EVIL_IMG = '"><img src=x onerror=alert(1)>'
EVIL = EVIL_SCRIPT + EVIL_IMG


class Page(HTMLParser):
    """Every tag with its attributes, ids, and the text of <style> blocks."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.ids: set[str] = set()
        self.style = ""
        self._in_style = False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if "id" in a:
            self.ids.add(a["id"])
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.style += data


def records(run_dir: Path, small: bool = False) -> list[dict]:
    """The stored records; small: only the fp32 target at gamma 3 (fewer figures, faster)."""
    recs = [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines() if x]
    if small:
        recs = [
            r
            for r in recs
            if r.get("kind") not in ("target_only", "speculative", "hf_assisted")
            or (r.get("target") == "fp32" and r.get("gamma") in (0, 3))
        ]
    return recs


def save(run_dir: Path, recs: list[dict], meta: dict | None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    if meta is not None:
        (run_dir / "run.json").write_text(json.dumps(meta))


def section(html: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', html, re.S)
    assert m, f"section {sid} missing"
    return m.group(1)


def assert_self_contained(html: str) -> Page:
    page = Page(html)
    assert "<script" not in html.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    for tag, attrs in page.tags:
        assert tag not in ("script", "iframe", "object", "embed", "link", "base", "form"), tag
        assert not any(k.startswith("on") for k in attrs), (tag, attrs)
        if "src" in attrs:
            assert attrs["src"].startswith("data:image/"), attrs["src"][:80]
        if "href" in attrs:
            assert attrs["href"].startswith("#") or attrs["href"] in ("results.jsonl", "run.json")
    assert "url(" not in page.style and "@import" not in page.style
    return page


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("report") / "run-small"
    shutil.copytree(DATA, run_dir)
    path = write_report(run_dir)
    return run_dir, path, path.read_text(encoding="utf-8")


def test_template_ships_as_package_data():
    assert files("qspec").joinpath("templates/report.html.j2").is_file()


def test_all_sections_and_self_contained(rendered):
    run_dir, path, html = rendered
    assert path == run_dir / "index.html"
    page = assert_self_contained(html)
    assert set(SECTIONS) <= page.ids
    assert "section-error" not in html  # every section built from the stored results
    # figures are embedded as data URIs, and the tables carry the same numbers
    imgs = [a["src"] for t, a in page.tags if t == "img"]
    assert len(imgs) >= 5 and all(s.startswith("data:image/svg+xml;base64,") for s in imgs)
    for src in imgs:
        assert base64.b64decode(src.split(",", 1)[1]).lstrip().startswith(b"<?xml")
    assert "<details" in section(html, "outputs")


def test_verdict_content(rendered):
    _, _, html = rendered
    v = section(html, "verdict")
    assert "CPU: AMD EPYC (2 threads)" in v
    assert "not representative of GPU serving" in v
    # int8 targets are fast but not lossless under greedy decoding: flagged, never recommended
    assert "NOT LOSSLESS" in v
    assert "Recommended: target fp32 + draft ngram, γ = 3, sample" in v
    assert "distributed as a Q4_1 GGUF" in v  # model provenance is shown
    q = section(html, "quality")
    assert "+17.07%" in q and ">FAILED" in q and ">within budget" in q  # nf4 perplexity over budget
    assert "default_mcq" in q
    m = section(html, "metadata")
    assert "13 min 58 s" in m and "complete" in m
    f = section(html, "failures")
    assert "gptqmodel" in f and "unavailable" in f


def test_summary_text(rendered):
    run_dir, _, _ = rendered
    s = summary_text(run_dir)
    lines = s.splitlines()  # a few lines one can read in a terminal, not one paragraph
    assert 3 <= len(lines) <= 10 and all(len(line) < 400 for line in lines), s
    assert len(s) <= 900, len(s)  # the long form is the report's
    assert "fp32+ngram γ=" in s and "1.52×" in s
    assert "not lossless" in s.lower() and "not GPU serving figures" in s


def test_nothing_meets_the_budget(tmp_path):
    recs = records(DATA, small=True)
    for r in recs:  # every greedy pairing of the reference target now changes the output
        if r.get("kind") == "speculative" and r.get("mode") == "greedy":
            r["lossless"] = False
    save(tmp_path, recs, json.loads((DATA / "run.json").read_text()))
    html = write_report(tmp_path, Budget(max_ppl_increase_pct=1.0)).read_text()
    v = section(html, "verdict")
    # the target alone is always an option: greedy serves it, with no speculative option second
    greedy = v.split("Greedy decoding: serve target fp32 alone", 1)[1].split("Sample decoding")[0]
    assert "Best speculative option" not in greedy
    s = summary_text(tmp_path, Budget(1.0))
    assert "Greedy: serve fp32 alone" in s
    assert "best speculative: fp32" not in s.split("Sample:")[0]


def test_injection_is_escaped(tmp_path):
    recs = records(DATA, small=True)
    evil_model = "$x^{$" + EVIL  # a "$" must not make matplotlib parse mathtext either
    out = []
    for r in recs:
        if r.get("kind") == "variant":
            r["model"] = evil_model
            r["model_note"] = "note \x1b[31m" + EVIL
            if r.get("status") != "ok":
                r["error"] = "error " + EVIL
        if "suite" in r:
            r["suite"] = "suite" + EVIL
        if r.get("kind") in ("target_only", "speculative", "hf_assisted"):
            if r.get("draft") == "ngram":
                r["draft"] = "ngram" + EVIL
            if r.get("status") != "ok":
                r["error"] = EVIL
            for o in r.get("outputs") or []:
                o["id"] = "id" + EVIL
                o["category"] = "cat" + EVIL
                o["text"] = "text " + EVIL + " </pre></details>"
            if r.get("lossless_mismatches"):
                r["lossless_mismatches"] = ["id" + EVIL]
        if r.get("kind") == "task":
            r["task"] = "task" + EVIL
        out.append(r)
    meta = json.loads((DATA / "run.json").read_text())
    meta["hardware_label"] = "GPU " + EVIL
    meta["config"]["target"]["ref"] = evil_model
    meta["versions"]["evil" + EVIL] = EVIL
    meta["status"] = "partial" + EVIL
    save(tmp_path, out, meta)
    html = write_report(tmp_path).read_text()
    assert "<script" not in html.lower()
    assert "<img src=x" not in html
    assert "<script>alert" not in html
    assert_self_contained(html)
    assert "section-error" not in html  # figures with these labels still render
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # shown, as text
    assert "\x1b" not in summary_text(tmp_path)


def test_partial_run_lists_failures(tmp_path):
    meta = json.loads((DATA / "run.json").read_text())
    meta.update(status="interrupted", finished=None, cells_failed=1)
    recs = []
    for r in records(DATA):
        if r.get("target") == "int8" and r.get("mode") == "sample":
            continue  # never ran: the run was interrupted
        if r.get("kind") == "speculative" and r.get("gamma") == 2:
            continue
        if r.get("kind") == "speculative" and r.get("target") == "int8" and r.get("draft") == "nf4":
            r = {k: r[k] for k in ("key", "kind", "suite", "target", "draft", "gamma", "mode")}
            r.update(status="failed", error="out of memory: CUDA out of memory (tried 2.00 GiB)")
        recs.append(r)
    recs.append('{"kind": "speculative", "suite": "default", "torn')  # a crash mid-write
    (tmp_path / "results.jsonl").write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs[:-1]) + recs[-1]
    )
    (tmp_path / "run.json").write_text(json.dumps(meta))
    html = write_report(tmp_path).read_text()
    assert_self_contained(html)
    assert "section-error" not in html
    assert "This run is interrupted" in section(html, "verdict")
    f = section(html, "failures")
    assert "out of memory: CUDA out of memory" in f
    assert "Planned but not recorded" in f
    assert re.search(
        r"target_only</td><td>default</td><td>int8</td><td>—</td><td class=\"num\">0</td><td>sample",
        f,
    )
    assert "gptqmodel" in f
    assert "interrupted" in section(html, "metadata")
    assert "interrupted" in summary_text(tmp_path)


def test_missing_fields_and_files(tmp_path):
    """Records with almost nothing in them, unknown kinds, no run.json: still one readable page."""
    recs = [
        {"kind": "variant", "precision": "fp16"},
        {"kind": "target_only", "target": "fp16", "mode": "greedy", "status": "ok"},
        {
            "kind": "speculative",
            "target": "fp16",
            "draft": "int4",
            "mode": "greedy",
            "status": "ok",
            "gamma": 4,
            "speedup": None,
            "position_acceptance": [None, 0.5],
            "accepted_histogram": [1],
        },
        {"kind": "hf_assisted", "status": "ok", "tokens_per_s": 3.0},
        {"kind": "quality", "variant": "int4", "ppl": None},
        {"kind": "pair_screen", "target": "fp16", "draft": "int4", "predicted": {"4": None}},
        {"kind": "task", "variant": "fp16", "value": "n/a"},
        {"kind": "task_lossless", "equal": None},
        {
            "kind": "speculative",
            "target": "fp16",
            "draft": "int4",
            "mode": "sample",
            "status": "ok",
            "gamma": 10**9,
            "speedup": -1.0,
            "tokens_per_s": "fast",
            "outputs": "not a list",
            "position_acceptance": "nope",
            "lossless_mismatches": 7,
        },
        {"kind": "mystery", "x": 1},
        {"kind": ["not", "a", "string"]},
        {"no_kind": True},
    ]
    save(tmp_path, recs, None)
    html = write_report(tmp_path).read_text()
    page = assert_self_contained(html)
    assert set(SECTIONS) <= page.ids
    assert "section-error" not in html
    assert "run.json is missing" in section(html, "failures")
    assert "qspec run" in summary_text(tmp_path)


def _roofline(kind: str, nbytes: int, step_s: float, bandwidth: float) -> dict:
    achieved = nbytes / step_s / 1e9
    return {
        "kind": kind,
        "bytes_per_step": nbytes,
        "step_s_p50": step_s,
        "step_samples": 57,
        "achieved_gbps": achieved,
        "bandwidth_gbps": bandwidth,
        "fraction": achieved / bandwidth,
    }


def test_roofline_and_compile(tmp_path):
    """A run that measured copy bandwidth, per-step roofline and torch.compile shows them all."""
    meta = json.loads((DATA / "run.json").read_text())
    meta["memory_bandwidth"] = {
        "copy_gbps": 12.5,
        "buffer_bytes": 256 * 1024**2,
        "samples": 9,
        "device": "cpu",
        "method": "median of torch copies of a 256 MiB buffer",
    }
    meta["config"]["compile"] = None
    recs = records(DATA, small=True)
    expected = {}
    for i, r in enumerate(recs):
        if r.get("kind") not in ("target_only", "speculative") or r.get("status") != "ok":
            continue
        step = "decode" if r["kind"] == "target_only" else "verify"
        r["roofline"] = _roofline(step, 540_000_000, 0.1 + 0.01 * i, 12.5)
        r["compile"] = True
        r["compile_s"] = 2.0
        expected[(step, r.get("draft"), r["mode"])] = r["roofline"]
    save(tmp_path, recs, meta)
    html = write_report(tmp_path).read_text()
    assert_self_contained(html)
    assert "section-error" not in html
    assert '<a href="#roofline">Bandwidth roofline</a>' in html  # in the table of contents
    rf = section(html, "roofline")
    assert "12.5 GB/s" in rf and "256.0 MiB buffer" in rf and "9 samples" in rf
    assert "median of torch copies of a 256 MiB buffer" in rf
    assert "CPU: AMD EPYC (2 threads)" in rf
    assert "weights-only memory-read bound" in rf and "compute-bound" in rf
    assert "not measured in this run" not in rf
    assert "<img" in rf  # achieved bandwidth against the copy bandwidth
    rows = re.findall(r"<tr><td>fp32</td>.*?</tr>", rf, re.S)
    assert len(rows) == len(expected) == 6  # 2 decode (greedy, sample) + 4 verify
    for (step, draft, mode), roof in expected.items():
        row = next(x for x in rows if f"<td>{step}</td><td>{draft or '—'}</td>" in x and mode in x)
        assert f"{100 * roof['fraction']:.1f}%" in row
        assert f"{roof['achieved_gbps']:.1f}" in row
        assert "515.0 MiB" in row and "(57)" in row
        assert f"{1000 * roof['step_s_p50']:.0f} ms" in row
    assert "Roofline fraction" in section(html, "definitions")
    lat = section(html, "latency")
    assert "torch.compile (excluded)" in lat
    assert "on for all 6 cells" in lat and "12.00 s in total" in lat
    assert "excluded from every latency and throughput figure" in lat
    assert "auto (on for CUDA, off for CPU)" in lat
    assert "memory_bandwidth" not in section(html, "metadata").split("<h3>Configuration")[0]


def test_roofline_many_verify_rows_shows_one_mode(tmp_path):
    """A γ sweep over drafts and modes keeps the table short: decode rows plus greedy verify."""
    recs = []
    for mode in ("greedy", "sample"):
        base = {"suite": "s", "target": "fp16", "mode": mode, "status": "ok"}
        recs.append(
            {
                **base,
                "kind": "target_only",
                "gamma": 0,
                "roofline": _roofline("decode", 10**9, 0.5, 4.0),
            }
        )
        for draft in ("int8", "int4"):
            for gamma in range(1, 9):
                recs.append(
                    {
                        **base,
                        "kind": "speculative",
                        "draft": draft,
                        "gamma": gamma,
                        "roofline": _roofline("verify", 10**9, 0.5 + 0.01 * gamma, 4.0),
                        "compile": False,
                        "compile_s": None,
                    }
                )
    save(tmp_path, recs, {"memory_bandwidth": {"copy_gbps": 4.0, "device": "cuda"}})
    html = write_report(tmp_path).read_text()
    assert "section-error" not in html
    rf = section(html, "roofline")
    assert rf.count("<td>decode</td>") == 2
    assert rf.count("<td>verify</td>") == 16
    assert "greedy decoding only; 16 rows of other modes" in rf
    assert "50.0%" in rf  # decode: 1 GB / 0.5 s / 4 GB/s
    assert "compute-bound" not in rf  # the CPU caveat is for CPU runs only
    assert "off for 32 cells, not recorded for 2 cells" in section(html, "latency")


def test_roofline_absent_in_older_runs(rendered):
    """The stored run predates bandwidth, roofline and compile fields: one-line notes instead."""
    _, _, html = rendered
    rf = section(html, "roofline")
    assert "Memory bandwidth: not measured in this run." in rf
    assert "Per-step roofline: not measured in this run." in rf
    assert "<table" not in rf
    lat = section(html, "latency")
    assert "torch.compile: not recorded in this run." in lat
    assert "torch.compile (excluded)" not in lat


# ----------------------------------------------------------------------------- headless Chromium


class DevTools:
    """A minimal Chrome DevTools Protocol client over --remote-debugging-pipe (stdlib only):
    Chromium reads commands on fd 3 and writes replies and events on fd 4, NUL-separated."""

    def __init__(self, binary: str, profile: Path):
        to_chrome, self._out = os.pipe()
        self._in, from_chrome = os.pipe()
        # move the child's ends above 3/4 so the dup2 below cannot clobber one with the other
        child_in = fcntl.fcntl(to_chrome, fcntl.F_DUPFD, 64)
        child_out = fcntl.fcntl(from_chrome, fcntl.F_DUPFD, 64)
        os.close(to_chrome)
        os.close(from_chrome)

        def wire():
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        args = [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=wire,
            pass_fds=(3, 4),
        )
        os.close(child_in)
        os.close(child_out)
        self.events: list[dict] = []
        self._replies: dict[int, dict] = {}
        self._closed = False
        self._cv = threading.Condition()
        self._id = 0
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self):
        buf = b""
        while True:
            try:
                chunk = os.read(self._in, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cv:
                    self._closed = True
                    self._cv.notify_all()
                os.close(self._in)
                return
            buf += chunk
            *msgs, buf = buf.split(b"\0")
            with self._cv:
                for raw in msgs:
                    msg = json.loads(raw)
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                self._cv.notify_all()

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout=15):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._id not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise TimeoutError(f"no reply to {method}")
                self._cv.wait(left)
            reply = self._replies.pop(self._id)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_for(self, method: str, session: str, timeout=15) -> dict:
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for e in self.events:
                    if e.get("method") == method and e.get("sessionId") == session:
                        return e
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise TimeoutError(f"no {method} event")
                self._cv.wait(left)

    def close(self):
        try:
            self.call("Browser.close", timeout=5)
        except (TimeoutError, RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._out)


# Each table whose right edge (or its scrolling box's) passes its section's: "section id: the
# table's first header".
OVERFLOWING_TABLES = """
[...document.querySelectorAll('section table')].filter(t => {
  const card = t.closest('section').getBoundingClientRect();
  const box = (t.closest('.scroll') || t).getBoundingClientRect();
  return box.right > card.right + 1 || box.left < card.left - 1;
}).map(t => t.closest('section').id + ': ' + (t.querySelector('th') || t).textContent.slice(0, 40))
"""


def chromium_binary() -> str:
    for b in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if b and os.path.exists(b):
            return b
    pytest.skip("chromium not installed: apt-get install chromium")


def test_chromium_renders_offline_without_errors(rendered, tmp_path):
    binary = chromium_binary()
    _, path, _ = rendered
    url = path.resolve().as_uri()
    browser = DevTools(binary, tmp_path / "profile")
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Network", "Runtime", "Log"):
            browser.call(f"{domain}.enable", session=session)
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 4000, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        browser.call("Page.navigate", {"url": url}, session=session)
        browser.wait_for("Page.loadEventFired", session)
        shot = browser.call("Page.captureScreenshot", {"format": "png"}, session=session)
        png = tmp_path / "report.png"
        png.write_bytes(base64.b64decode(shot["data"]))
        height = browser.call(
            "Runtime.evaluate",
            {"expression": "document.documentElement.scrollHeight", "returnByValue": True},
            session=session,
        )["result"]["value"]
        # a 1280 x 800 window: no table may reach past its card (one that scrolls inside its
        # own box, first column fixed, is fine)
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        overflow = browser.call(
            "Runtime.evaluate",
            {"expression": OVERFLOWING_TABLES, "returnByValue": True},
            session=session,
        )["result"]["value"]
    finally:
        browser.close()
    assert overflow == [], overflow
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 50_000  # a 1280x4000 page with tables and figures, not blank
    assert height > 4000

    events = [e for e in browser.events if e.get("sessionId") == session]
    urls = [
        e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"
    ]
    assert url in urls
    assert all(u == url or u.startswith("data:image/") for u in urls), [u[:100] for u in urls]
    failed = [e["params"] for e in events if e["method"] == "Network.loadingFailed"]
    assert not failed
    errors = [e["params"] for e in events if e["method"] == "Runtime.exceptionThrown"]
    errors += [
        e["params"]
        for e in events
        if e["method"] == "Runtime.consoleAPICalled"
        and e["params"].get("type") in ("error", "warning")
    ]
    errors += [
        e["params"]["entry"]
        for e in events
        if e["method"] == "Log.entryAdded"
        and e["params"]["entry"].get("level") in ("error", "warning")
    ]
    assert not errors, errors


def test_a_failed_compile_is_shown_next_to_its_cell(tmp_path):
    meta = json.loads((DATA / "run.json").read_text())
    recs = records(DATA, small=True)
    cells = [r for r in recs if r.get("kind") == "target_only" and r.get("status") == "ok"]
    for r in cells:
        r.update(compile=False, compile_s=None, compile_error="Unsupported: <b>bnb</b> kernel")
    save(tmp_path, recs, meta)
    lat = section(write_report(tmp_path).read_text(), "latency")
    assert lat.count("compile failed: Unsupported: &lt;b&gt;bnb&lt;/b&gt; kernel") == len(cells)
    assert "<b>bnb</b>" not in lat


def test_a_failing_figure_leaves_its_table(tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise ValueError("simulated matplotlib failure")

    monkeypatch.setattr(plots, "heatmaps", broken)
    save(tmp_path, records(DATA, small=True), json.loads((DATA / "run.json").read_text()))
    html = write_report(tmp_path).read_text()
    m = section(html, "matrix")
    assert "section-error" not in html and "<img" not in m
    assert "target ↓ / draft →" in m and "1.52×" in m  # the table still carries the numbers
    assert "matrix figure failed: simulated matplotlib failure" in caplog.text


def test_uncertain_cells_are_marked_with_n():
    from qspec.records import GenerationRecord
    from qspec.report.sections.matrix import _panels, uncertainty

    def cell(draft, tested, ci):
        return GenerationRecord(
            kind="speculative", suite="s", target="fp32", draft=draft, gamma=3, mode="sample",
            tested=tested, drafted=tested + 4, alpha_measured=0.5, acceptance_rate=0.4,
            speedup=1.1, speedup_ci95=ci, tau=1.5,
        )  # fmt: skip

    few = cell("ngram", 5, [0.6, 1.9])
    sure = cell("int8", 400, [1.05, 1.15])
    assert uncertainty(sure) == []
    why = uncertainty(few)
    assert any("5 tested drafts" in w for w in why) and any("interval wider" in w for w in why)
    panels = _panels(
        {("fp32", "ngram"): few, ("fp32", "int8"): sure}, ["fp32"], ["ngram", "int8"], 3
    )
    marks = {p["title"]: p.get("uncertain") for p in panels}
    assert marks["α measured (α predicted)"] == {(0, 0): "n=5"}
    assert marks["acceptance rate"] == {(0, 0): "n=9"}
    assert (0, 0) in marks["measured speedup (×)"] and (0, 1) not in marks["measured speedup (×)"]
    assert plots.heatmaps(panels, ["fp32"], ["ngram", "int8"], "t").startswith("data:image/svg")


def test_a_draft_of_another_model_is_named_and_its_peer_acceptance_shown(tmp_path):
    """Two families: SmolLM2's fp32 drafting for Gemma's fp32 reads as such, not as "fp32 +
    fp32", the target's own copy keeps its self: name, and transformers' peer shows the
    acceptance it was counted at."""
    meta = json.loads((DATA / "run.json").read_text())
    meta["config"]["target"] = {"ref": "gemma3-270m", "precisions": ["fp32"]}
    meta["config"]["draft"] = {
        "ref": "smollm2-135m-instruct",
        "precisions": ["fp32", "self:int8"],
    }
    cell = dict(status="ok", suite="default", target="fp32", mode="greedy", gamma=3, n_prompts=2)
    recs = [
        {**cell, "kind": "target_only", "gamma": 0, "tokens_per_s": 10.0},
        {**cell, "kind": "speculative", "draft": "fp32", "tokens_per_s": 5.0, "speedup": 0.5},
        {**cell, "kind": "speculative", "draft": "self:int8", "tokens_per_s": 6.0, "speedup": 0.6},
        {
            **cell,
            "kind": "hf_assisted",
            "draft": "fp32",
            "tokens_per_s": 4.0,
            "speedup": 0.4,
            "drafted": 40,
            "accepted": 26,
            "acceptance_rate": 0.65,
            "acceptance_rate_ci95": [0.50, 0.78],
            "alpha_measured": 0.7,
            "alpha_measured_ci95": [0.55, 0.82],
        },
    ]
    sampled = {**recs[-1], "mode": "sample", "alpha_measured": 0.88}
    recs += [{**sampled, "peer_alpha_exact": 0.011, "peer_exact_z": 53.0}]
    recs += [{**cell, "kind": "target_only", "mode": "sample", "gamma": 0, "tokens_per_s": 9.0}]
    save(tmp_path, recs, meta)
    html = write_report(tmp_path).read_text()
    assert "sampling was not exact for: fp32 + smollm2-135m-instruct fp32 γ=3 sample (HF" in html
    assert "α 0.88 measured, 0.01 allowed" in html
    save(tmp_path, [r for r in recs if r.get("peer_exact_z") != 53.0], meta)
    assert "was not exact" not in write_report(tmp_path).read_text()
    save(tmp_path, recs[:4], meta)
    html = write_report(tmp_path).read_text()
    matrix = section(html, "matrix")
    assert "<th>smollm2-135m-instruct fp32</th>" in matrix and "<th>self:int8</th>" in matrix
    assert "HF acc. rate 0.65 (95% CI 0.50–0.78, n = 40 drafted)" in matrix
    verdict = section(html, "verdict")
    assert "fp32 + smollm2-135m-instruct fp32 γ=3 greedy" in verdict
    assert "fp32 + self:int8 γ=3 greedy" in verdict and "fp32 + fp32 γ=3" not in html
