"""The lab book at scale: `labbook.write_index` over 10,000 generated run folders.

Generates N run folders (default 10,000) with the record files a real run writes, in the shapes of a real tiny digits
run (`write_sample_run` of tests/test_labbook.py: config.json with sweep and point, metrics.json with provenance, a history.csv of
`--epochs` rows, checkpoints/last.pt, report.html), spread over 5 models x 2 partitions x 4 experts x 3 seeds and 10
sweeps, with failed (1 in 17), pruned (1 in 50) and damaged (1 in 100: metrics.json cut short) runs, and a few reports.
report.html and checkpoints are small stand-ins: the index only checks that they exist.

Prints, with the machine and the date:
- cold build: `write_index` with no cache (every folder read);
- warm build: after rewriting the metrics.json of 3 runs (only those 3 folders read);
- page size of index.html;
- time to interactive: Debian's chromium (Playwright, headless) opens index.html from disk, three times in fresh pages;
  from navigation start until all three DataTables have drawn their first page (performance.now() at that moment), median
  and max; and whether any request left file://.

Goals (issue 25): cold <= 10 s, warm <= 2 s, page <= 10 MB, interactive <= 3 s.

    .venv/bin/python benchmarks/index_scale.py               # 10,000 runs: about a minute on 2 cores, most of it generating
    .venv/bin/python benchmarks/index_scale.py --runs 500    # smoke test
"""
import argparse, datetime as dt, json, os, platform, shutil, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]/"tests"))
from expert_lab import labbook
from expert_lab.files import format_table
from test_labbook import write_sample_run

MODELS = ("wideresnet10_1", "resnet18", "densenet_bc100_k12", "wideresnet16_4", "preact_resnet18")


def generate(root: Path, n: int, epochs: int):
    "Write `n` run folders under `root` and a few reports."
    start = dt.datetime(2026, 1, 1)
    for i in range(n):
        status = "failed" if i % 17 == 0 else "pruned" if i % 50 == 1 else "completed"
        d = write_sample_run(root, model=MODELS[i % 5], partition=("iid", "classes")[i//5 % 2], n_experts=4,
                                     expert=i//10 % 4, seed=i//40 % 3, sweep=f"lr-seed-{i*10//n:02d}",
                                     stamp=f"{start + dt.timedelta(minutes=i):%Y%m%d-%H%M%S}-{i:04x}", status=status,
                                     test_acc=0.4 + (i % 97)/250, epochs=epochs,
                                     error="torch.OutOfMemoryError: CUDA out of memory" if status == "failed" else None)
        if i % 100 == 7: (d/"metrics.json").write_text('{"status": "completed", "test_acc": 0.')  # cut short
    for j, kind in enumerate(("ensemble", "compare_runs", "sweep_report", "ensemble")):
        rep = root/"reports"/f"2026010{j + 1}-120000-{kind}-{j:04x}"; rep.mkdir(parents=True)
        params = dict(model=MODELS[j % 5], partition="iid", n_experts=4) if kind == "ensemble" else {}
        (rep/"report.ipynb").write_text(json.dumps({"cells": [], "metadata": {"papermill": {"parameters": params}}}))
        (rep/"report.html").write_text(f"<h1>{kind}</h1>")


def interactive_ms(index: Path, loads: int = 3) -> tuple[list[float], list]:
    "Milliseconds from navigation start until the three tables are drawn in Chromium (each of `loads` fresh pages), and the requests not to file://."
    from playwright.sync_api import sync_playwright
    from test_browser import CHROMIUM_ARGS, _chromium
    outside, times = [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        for _ in range(loads):
            page = browser.new_page()
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(("file://", "blob:", "data:")) else None)
            page.goto(index.as_uri(), wait_until="commit")
            page.wait_for_function("['groups', 'runs', 'reports'].every(id => document.querySelector(`#${id}.dataTable tbody tr td`))",
                                   polling="raf", timeout=60_000)
            times.append(page.evaluate("performance.now()")); page.close()
        browser.close()
    return sorted(times), outside


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10_000, help="run folders to generate")
    ap.add_argument("--epochs", type=int, default=100, help="rows in each history.csv")
    ap.add_argument("--keep", metavar="DIR", help="generate into DIR and keep it (default: a temporary folder)")
    ap.add_argument("--no-browser", action="store_true", help="skip the Chromium measurement")
    a = ap.parse_args()
    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="index-scale-"))
    try:
        t = time.perf_counter(); generate(root, a.runs, a.epochs); gen = time.perf_counter() - t
        t = time.perf_counter(); labbook.write_index(root); cold = time.perf_counter() - t
        done = [d for d in labbook.run_dirs(root) if '"provenance"' in Path(d, "metrics.json").read_text()]
        for d in done[:3]:  # three completed runs get a new test accuracy
            rec = json.loads(Path(d, "metrics.json").read_text()); rec["test_acc"] = 0.99
            Path(d, "metrics.json").write_text(json.dumps(rec, indent=2))
        read = []
        real = labbook.read_folder
        labbook.read_folder = lambda d: read.append(d) or real(d)  # count the folders the warm build reads
        t = time.perf_counter(); labbook.write_index(root); warm = time.perf_counter() - t
        labbook.read_folder = real
        size = (root/"index.html").stat().st_size
        ms, outside = ([], []) if a.no_browser else interactive_ms(root/"index.html")
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
        print(f"lab book at {a.runs:,} run folders ({a.epochs}-row histories); {os.cpu_count()} cores, {cpu}; "
              f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; load average {os.getloadavg()[0]:.1f}; generating took {gen:.1f} s")
        rows = [dict(measure="cold build (no cache)", value=f"{cold:.2f} s", goal="<= 10 s"),
                dict(measure=f"warm build (3 runs changed, {len(read)} folders read)", value=f"{warm:.2f} s", goal="<= 2 s"),
                dict(measure="page size", value=f"{size/1e6:.2f} MB", goal="<= 10 MB"),
                dict(measure=f"interactive in Chromium (median of {len(ms)} loads; max)", goal="<= 3 s",
                     value=f"{ms[len(ms)//2]/1000:.2f} s; {ms[-1]/1000:.2f} s" if ms else "-"),
                dict(measure="requests that left file://", value=str(len(outside)), goal="0")]
        print(format_table(rows, ["measure", "value", "goal"]))
        if outside: print("outside requests:", *outside[:5], sep="\n  ")
    finally:
        if not a.keep: shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
