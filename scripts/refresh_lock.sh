#!/usr/bin/env bash
# `make lock`: resolve the newest releases inside pyproject.toml's ranges in a scratch environment, run the whole
# test suite there, and only if it passes write that environment's exact versions to constraints.txt (the lock
# `make test` and `make demo` install from). On a failure the lock is left as it was: cap the offending
# package's range in pyproject.toml (with a comment saying when to widen it) and run `make lock` again.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-lock
scripts/setup_venv.sh "$venv" newest
{
    echo "# The environment the test suite last passed in (written by \`make lock\`, $(date -u +%Y-%m-%d))."
    echo "# \`make test\` and \`make demo\` install exactly these versions; edit pyproject.toml's ranges, not this file."
    "$venv/bin/uv" pip freeze --python "$venv/bin/python" --exclude-editable | sed 's/+cpu$//'
} > constraints.txt.candidate
# The suite checks the lock against the environment it runs in: here, the candidate.
PETUNING_LOCK=constraints.txt.candidate HF_HUB_OFFLINE=1 "$venv/bin/python" -m pytest -q -ra
mv constraints.txt.candidate constraints.txt
rm -rf "$venv"
git --no-pager diff --stat -- constraints.txt || true
grep -iE '^(torch|transformers|peft|accelerate|bitsandbytes|datasets|trl)==' constraints.txt
