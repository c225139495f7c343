"""Record the seeded runs (one CPU thread) that tests/test_train.py compares against, for this machine's kind of CPU.

A seeded CPU run is bit-for-bit repeatable on one machine, but another CPU (AVX-512 against AVX2, another vendor) picks
other convolution kernels whose sums round differently, and over a few steps the runs drift apart. So each case keeps
one recorded run per kind of machine seen; the test passes when the run equals one of them exactly.

    .venv/bin/python tools/seeded_runs.py          # check this machine against the records; add its runs if new

Record only from code whose behaviour is known to be unchanged (a clean checkout of the last commit that passed CI).
"""
import json, platform, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT/"tests"))
import torch
torch.set_num_threads(1)  # as tests/test_train.py runs them (conftest one_thread)

from conftest import tiny_config
from expert_lab.train import train

PATH = ROOT/"tests"/"seeded_runs.json"
TIMING = ("seconds", "images_per_sec")


def machine()->str:
    "The kind of machine a run was recorded on: CPU capability, CPU model, torch."
    model = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")),
                 platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return f"{torch.backends.cpu.get_cpu_capability()}, {model}, torch {torch.__version__}"


def seeded_run(config:dict)->dict:
    r = train(tiny_config(**config), progress="none")
    return dict(history=[{k: v for k, v in h.items() if k not in TIMING} for h in r.history], metrics=r.metrics)


def main():
    cases, here, changed = json.loads(PATH.read_text()), machine(), False
    for name, case in cases.items():
        a, b = seeded_run(case["config"]), seeded_run(case["config"])
        if a != b: sys.exit(f"{name}: two runs on this machine differ; not deterministic here, nothing recorded")
        known = next((r["recorded_on"] for r in case["runs"] if (r["history"], r["metrics"]) == (a["history"], a["metrics"])), None)
        if known: print(f"{name}: equals the run recorded on {known}"); continue
        case["runs"].append({"recorded_on": here, **a}); changed = True
        print(f"{name}: new on this machine ({here}): recorded")
    if changed: PATH.write_text(json.dumps(cases, indent=1) + "\n")


if __name__ == "__main__":
    main()
