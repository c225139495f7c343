#!/usr/bin/env bash
# The whole test suite, as `make test` runs it (and CI through .ci/run).
#  1. nbdev-clean and nbdev-export must leave nbs/ and expert_lab/ unchanged: notebooks are the source.
#  2. nbdev-test executes every library notebook in nbs/ (their own quick tests; --flags slow is left to pytest's slow
#     tests). The training runbook is a real run, not a test: pytest executes it through both doors (tests/test_doors.py).
#  3. pytest runs tests/ (Slurm tests against a real single-node Slurm that tools/slurm.sh starts, when we are root).
# TEST_FAST=1 skips the slow pytest tests and the Slurm/browser set-up, for quick local iterations.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export PATH="$PWD/$BIN:$PATH"

snapshot() { git ls-files -co --exclude-standard -- expert_lab nbs | sort | xargs -r sha1sum; }
echo "== notebooks clean and exported"
before=$(snapshot)
nbdev-clean >/dev/null
nbdev-export
after=$(snapshot)
if [[ "$before" != "$after" ]]; then
    echo "FAIL: nbdev-clean/nbdev-export changed these files (export or clean your notebooks, then commit):"
    diff <(echo "$before") <(echo "$after") | grep '^[<>]' | awk '{print "  " $3}' | sort -u
    exit 1
fi
if [[ -d .git ]] && [[ -n "$(git status --porcelain -uall -- expert_lab nbs)" && "${CI:-}" == "true" ]]; then
    echo "FAIL: expert_lab/ or nbs/ differ from the commit:"; git status --porcelain -uall -- expert_lab nbs; exit 1
fi

echo "== nbdev-test (every library notebook in nbs/)"
nbdev-test --n-workers 1 --timing --skip-file-re '^([_.]|train_expert\.ipynb$)'

echo "== pytest"
markers=()
if [[ "${TEST_FAST:-}" == "1" ]]; then
    markers=(-m "not slow and not slurm and not browser")
else
    if [[ $(id -u) == 0 ]] && [[ -x tools/slurm.sh ]]; then
        bash tools/slurm.sh start
        trap 'bash tools/slurm.sh stop' EXIT
        export TEST_REQUIRE_SLURM=1
    fi
    if [[ -x tools/browser-setup.sh ]]; then bash tools/browser-setup.sh && export TEST_REQUIRE_BROWSER=1; fi
fi
set +e
python -m pytest -ra --durations=15 "${markers[@]}" tests
rc=$?
set -e
# pytest exits 5 when nothing was collected: that must fail, never pass silently
if [[ $rc == 5 ]]; then echo "FAIL: pytest collected no tests"; exit 1; fi
exit $rc
