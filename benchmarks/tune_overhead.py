"""The tuner's own cost per trial, with a study that already holds many finished trials in its journal.

A study like the README's (lr, weight decay and mixup searched, TPE, ASHA over epochs) is filled with `--finished`
trials (200 by default) straight through Optuna: each reports its validation accuracy per epoch and ends complete or
pruned at an ASHA rung, as real trials would. Then one more trial's tuner work is timed, piece by piece, as `expert-lab
tune` does it (training itself excluded):

* take: the worker, under the study's turn lock, reads the journal, looks for dead workers' trials, seeds the sampler,
  asks TPE for the next recipe (over every finished trial), resolves the trial's config and makes its run folder;
* hook: inside the trial's kernel, `tune.trial_hook` imports Optuna and loads the study from the journal (a fresh
  process, as a kernel is: the import counts);
* epochs: after each epoch the hook is called; it reports the validation accuracy and asks the pruner only at the
  epochs where the pruner can decide (ASHA's rungs: 9, 27, 81, 243 of 250), each a durable journal write;
* tell: the worker tells the study how the trial ended.

The goal: take + hook + epochs + tell at most 1 s per trial on this 2-core machine with 200 finished trials.

    .venv/bin/python benchmarks/tune_overhead.py                    # 200 finished trials, 50 epochs per trial
    .venv/bin/python benchmarks/tune_overhead.py --finished 500 --epochs 250 --repeats 3

The machine may be shared: each piece is the median of `--repeats` measurements.
"""
import argparse, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GOAL_S = 1.0
ARGS = ["--lr", "0.01:0.5:log", "--weight-decay", "1e-5:1e-3:log", "--mixup-alpha", "0:0.4", "--dataset", "digits",
        "--model", "wideresnet10_1", "--study", "bench"]

HOOK = """
import sys, time, json
t0 = time.perf_counter()
from expert_lab.config import TrainConfig
from expert_lab.studies import trial_hook
cfg = TrainConfig(**{**json.loads(sys.argv[1]), "study": "bench", "trial": int(sys.argv[2])})
hook = trial_hook(cfg, None)
t1 = time.perf_counter()
class State: stop_reason = None
st = State()
for e in range(1, int(sys.argv[3]) + 1):
    hook.on_epoch_end({"epoch": e, "val_acc": 0.5 + 0.001*e}, st)
    if st.stop_reason: break
t2 = time.perf_counter()
print(json.dumps(dict(hook=t1 - t0, epochs=t2 - t1, ran=e)))
"""


def fill(path, rec, n, epochs):
    "Add `n` finished trials to the study: ASHA rungs at epochs 1, 3, 9, ...; about two thirds pruned at one of them."
    import optuna
    from expert_lab.studies import load_study
    from expert_lab.tune import distributions
    study = load_study(path, rec)
    study.sampler = optuna.samplers.RandomSampler(seed=0)
    dists, rng = distributions(rec["space"]), __import__("random").Random(0)
    for i in range(n):
        t = study.ask(dists)
        study._storage.set_trial_user_attr(t._trial_id, "run_dir", f"/nonexistent/run-{i}")
        stop = rng.choice([1, 3, 9, 27, epochs, epochs, epochs])
        for e in range(1, min(stop, epochs) + 1): study._storage.set_trial_intermediate_value(t._trial_id, e, rng.random())
        if stop < epochs: study.tell(t, state=optuna.trial.TrialState.PRUNED)
        else: study.tell(t, rng.random())
    return study


def measure(path, rec, epochs):
    "One trial's tuner work, piece by piece (seconds)."
    import json
    from dataclasses import asdict
    from expert_lab.studies import load_study
    from expert_lab.tune import next_trial, tell
    study = load_study(path, rec)
    n = len(study.get_trials(deepcopy=False))
    t0 = time.perf_counter()
    job = next_trial(study, rec, path, n + 1)
    take = time.perf_counter() - t0
    r = subprocess.run([sys.executable, "-c", HOOK, json.dumps(asdict(job["cfg"])), str(job["number"]), str(epochs)],
                       capture_output=True, text=True, env=os.environ, check=True)
    k = json.loads(r.stdout.strip().splitlines()[-1])
    t0 = time.perf_counter()
    tell(study, job["number"], dict(status="completed", best_val_acc=0.6, epochs_done=k["ran"]))
    return dict(take=take, hook=k["hook"], epochs=k["epochs"], per_epoch=k["epochs"]/k["ran"], tell=time.perf_counter() - t0, ran=k["ran"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--finished", type=int, default=200, help="finished trials in the journal before measuring")
    ap.add_argument("--epochs", type=int, default=50, help="epochs per trial (each reports and asks the pruner)")
    ap.add_argument("--repeats", type=int, default=3, help="trials measured; the median is shown")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tune-bench-"))
    os.environ.update(EXPERT_LAB_RUNS_DIR=str(tmp/"runs"), EXPERT_LAB_SETTINGS=os.devnull, EXPERT_LAB_DEVICE="cpu")
    from expert_lab.studies import quiet_optuna
    from expert_lab.tune import build_parser, config_flags, create_study, open_study
    ns = build_parser().parse_args([*ARGS, "--epochs", str(a.epochs), "--trials", str(a.finished + a.repeats)])
    rec, path = open_study(ns, config_flags(ns))
    create_study(rec, path, "benchmark"); quiet_optuna(path)
    t0 = time.perf_counter(); fill(path, rec, a.finished, a.epochs)
    print(f"journal: {a.finished} finished trials written in {time.perf_counter() - t0:.1f} s "
          f"({(path/'journal.log').stat().st_size/1e6:.1f} MB); each measured trial adds one more")
    runs = [measure(path, rec, a.epochs) for _ in range(a.repeats)]
    med = {k: statistics.median(r[k] for r in runs) for k in ("take", "hook", "epochs", "per_epoch", "tell")}
    total = med["take"] + med["hook"] + med["epochs"] + med["tell"]
    rows = [("take (turn lock, journal, TPE ask, config, folder)", med["take"]),
            ("hook (kernel: import optuna, load the study)", med["hook"]),
            (f"epochs ({min(r['ran'] for r in runs)}-{max(r['ran'] for r in runs)} of {a.epochs} before pruning; reports and "
             f"pruner at the rungs; {1000*med['per_epoch']:.2f} ms per epoch)", med["epochs"]),
            ("tell", med["tell"]), ("total per trial", total)]
    w = max(len(r[0]) for r in rows)
    print(f"{'piece':<{w}}  seconds (median of {a.repeats})")
    for name, v in rows: print(f"{name:<{w}}  {v:7.3f}")
    print(f"goal: at most {GOAL_S:.1f} s per trial with {a.finished} finished trials: {'met' if total <= GOAL_S else 'NOT met'}")


if __name__ == "__main__":
    main()
