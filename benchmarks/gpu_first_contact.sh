#!/usr/bin/env bash
# First contact with the lent GPU: what needs a GPU and no DALI, in ONE device call of at most 540 s.
#
#   OUT=DIR RELA_COMMIT=SHA bash benchmarks/gpu_first_contact.sh   # the GPU machine, in the project root
#   OUT=DIR bash benchmarks/gpu_first_contact.sh --tiny            # the same steps on the CPU, small (a rehearsal)
#
# The project is installed in the background (pip install --no-deps --no-build-isolation -e ., which builds
# rela._C) while the steps that need no extension run: the versions, and a first pass of the throughput
# steps (torch.compile of the ResNet-50 steps, fused ops off: it fills Inductor's caches so the measured pass
# compiles from them; its timings ran beside the build and are not for comparison). Then, one after
# another: the Triton ops against their references on the GPU (tests/ops/test_ops_gpu.py), the step
# throughput (compiled ResNet-50 at 224 px, batch 256, bf16, channels_last: supervised, BYOL and RELA
# steps, fused ops on and off, on synthetic batches; the prior's forward as the bank runs it), the fused ops
# against eager and compiled torch (benchmarks/ops.py) and the target bank's build (benchmarks/prior.py).
# DALI's loader rate is left to a second session (benchmarks/prepare_gpu_run.sh).
#
# Time plan, in seconds. Each number is that step's timeout below, cut to what is left of the 540 s when
# less is; tests/benchmarks/test_gpu_first_contact.py checks the two agree and the total. install starts at
# 0 s in the background, versions and throughput_warmup run beside it, and the script waits for it before
# the rest, which run one after another:
#   plan install            150  background: pip install -e ., then `import rela._C, rela.kernels`
#   plan versions            20  beside install
#   plan throughput_warmup  130  beside install
#   plan ops_tests          140
#   plan throughput         120
#   plan ops                 70
#   plan prior               50
#   plan total              530  = max(150, 20 + 130) + 140 + 120 + 70 + 50, under the call's 540
#
# Files under $OUT, none in a folder (a device call brings back at most 8, names of [A-Za-z0-9._-]):
#   first_contact.json       the plan, each step's status (pass, fail, timeout, skipped with the reason),
#                            seconds, timeout and output tail, and the environment (device, versions, commit,
#                            date); rewritten after every step
#   first_contact.log        every step's whole output, in order (the install's when it has been waited for)
#   throughput-warmup.json   the first pass (compile warm-up beside the build)
#   throughput.json          the step rows, with what each ran with and whether the compared ones agree
#   ops_cuda.json            benchmarks/ops.py (ops_cpu.json with --tiny)
#   prior-cuda-quick.json    benchmarks/prior.py (prior-cpu-quick.json with --tiny)
# Each benchmark writes its JSON when it finishes, so a step that times out leaves the earlier files. Every
# JSON names the device, the versions (python, torch, triton, torchvision, cuda), the commit (RELA_COMMIT,
# for a tree copied without .git, else git's HEAD) and the date.
#
# --tiny: the CPU, tiny shapes (small_resnet at 16 px, one timed step of each), torch.compile as the trainer
# decides on the CPU (off), the CUDA-only step skipped with the reason, no reinstall (install only imports
# rela._C and rela.kernels: the venv here is shared), and every timeout and the budget 4 times the plan's (a
# shared 2-core CPU starts Python and torch several times slower than the GPU machine's 16 cores).
# Exit status 1 when a step failed or timed out.
set -uo pipefail

tiny=0
if [ "${1:-}" = "--tiny" ]; then tiny=1; elif [ $# -gt 0 ]; then echo "usage: OUT=DIR $0 [--tiny]" >&2; exit 2; fi
: "${OUT:?OUT must name the folder whose files come back}"
script=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
cd "$(dirname "$script")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
scale=$((tiny ? 4 : 1))
BUDGET=$((540 * scale))
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log="$OUT/first_contact.log"
: > "$log"
: > "$work/steps.jsonl"
started=$SECONDS

# report NAME STATUS SECONDS TIMEOUT REASON: appends the step's record and rewrites first_contact.json.
report() {
  FC_SCRIPT="$script" FC_OUT="$OUT" FC_WORK="$work" FC_TINY="$tiny" FC_BUDGET="$BUDGET" FC_SCALE="$scale" \
    FC_ELAPSED=$((SECONDS - started)) "$PY" - "$@" <<'PY'
import datetime, json, os, re, subprocess, sys
from pathlib import Path

name, status, seconds, timeout, reason = sys.argv[1:6]
work, out = Path(os.environ["FC_WORK"]), Path(os.environ["FC_OUT"])
record = {"name": name, "status": status, "seconds": int(seconds), "timeout_s": int(timeout)}
if reason:
    record["reason"] = reason
output = work / f"{name}.out"
if output.is_file():
    record["output_tail"] = output.read_text(errors="replace")[-1500:]
with open(work / "steps.jsonl", "a") as steps:
    steps.write(json.dumps(record) + "\n")
plan = {m[1]: int(m[2]) for m in re.finditer(r"^#\s+plan\s+(\w+)\s+(\d+)", Path(os.environ["FC_SCRIPT"]).read_text(), re.M)}
plan_total = plan.pop("total")
environment = work / "environment.json"
if environment.is_file():
    env = json.loads(environment.read_text())
else:  # the versions step has not run or failed: what is known without torch
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        head = ""
    env = {"device": None, "versions": None, "commit": os.environ.get("RELA_COMMIT") or head or "unknown",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
steps = [json.loads(line) for line in (work / "steps.jsonl").read_text().splitlines()]
counts = {s: sum(r["status"] == s for r in steps) for s in ("pass", "fail", "timeout", "skipped")}
payload = {"benchmark": "gpu_first_contact", "mode": "tiny" if os.environ["FC_TINY"] == "1" else "gpu",
           "budget_s": int(os.environ["FC_BUDGET"]), "time_scale": int(os.environ["FC_SCALE"]),
           "plan_timeouts_s": plan, "plan_total_s": plan_total, "elapsed_s": int(os.environ["FC_ELAPSED"]),
           **env, "steps": steps, "counts": counts}
tmp = out / "first_contact.json.tmp"
tmp.write_text(json.dumps(payload, indent=1))
os.replace(tmp, out / "first_contact.json")
PY
}

# finish NAME RC SECONDS TIMEOUT [REASON]: the step's output into the log, its status into the report.
finish() {
  local name=$1 rc=$2 seconds=$3 limit=$4 reason=${5:-} status=pass
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status=timeout; reason=${reason:-"past its ${limit} s"};
  elif [ "$rc" != 0 ]; then status=fail; reason=${reason:-"exit status $rc"}; fi
  { echo "== $name: $status in ${seconds} s${reason:+ ($reason)}"; cat "$work/$name.out"; } >> "$log"
  echo "[first_contact] $name: $status in ${seconds} s${reason:+ ($reason)}"
  report "$name" "$status" "$seconds" "$limit" "$reason"
}

# limit_for SECONDS: the step's timeout (times the scale), cut to what is left of the budget (0: nothing left).
limit_for() {
  local left=$((BUDGET - (SECONDS - started))) limit=$(($1 * scale))
  if [ "$left" -lt 5 ]; then echo 0; elif [ "$left" -lt "$limit" ]; then echo "$left"; else echo "$limit"; fi
}

# run_step NAME TIMEOUT CMD...: CMD under its timeout (its whole process group is stopped past it).
run_step() {
  local name=$1 limit; limit=$(limit_for "$2"); shift 2
  if [ "$limit" = 0 ]; then report "$name" skipped 0 0 "no time left of the $BUDGET s"; return; fi
  echo "[first_contact] $name (timeout $limit s) ..."
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$work/$name.out" 2>&1
  finish "$name" $? $((SECONDS - t0)) "$limit"
}

# cuda_step NAME TIMEOUT CMD...: run_step, or skipped with the reason under --tiny.
cuda_step() {
  if [ "$tiny" = 1 ]; then report "$1" skipped 0 $(($2 * scale)) "needs CUDA: --tiny runs on the CPU"; return; fi
  run_step "$@"
}

# background_step NAME TIMEOUT CMD... / wait_background NAME CHECK...: CMD starts now under its timeout; the
# wait then runs CHECK (a command that must pass as well) and reports both.
background_step() {
  local name=$1 limit=$(($2 * scale)); shift 2
  echo "[first_contact] $name in the background (timeout $limit s) ..."
  bg_started=$SECONDS bg_limit=$limit
  ( timeout --kill-after=10 "$limit" "$@" > "$work/$name.out" 2>&1; echo $? > "$work/$name.rc" ) &
  bg_pid=$!
}
wait_background() {
  local name=$1; shift
  wait "$bg_pid"
  local rc reason=""
  rc=$(cat "$work/$name.rc" 2> /dev/null || echo 1)
  if [ "$rc" = 0 ] && ! "$@" >> "$work/$name.out" 2>&1; then rc=1 reason="installed, but: $(tail -n 1 "$work/$name.out")"; fi
  finish "$name" "$rc" $((SECONDS - bg_started)) "$bg_limit" "$reason"
}

if [ "$tiny" = 1 ]; then
  device=cpu
  # Tiny shapes; the venv here is shared by other work and already holds the package: no reinstall.
  install=("$PY" -c "print('--tiny: not reinstalled (the package is installed here); checking the imports')")
  steps_args=(--device cpu --arch small_resnet --image-size 16 --batch-size 4 --step-warmup 1 --step-rounds 1
              --step-repeats 1)
  warmup_args=()
  ops_args=(--device cpu --quick --batches 256)
  ops_env=(env TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=1)  # the compile column is then eager, for speed
  prior_args=(--device cpu --quick --arch resnet18 --resolution 32 --rows 64 --batch-size 16 --repeats 1)
  xdist=()
else
  device=cuda
  install=("$PY" -m pip install --no-deps --no-build-isolation -e .)
  # ResNet-50 as the imagenet preset trains it, compiled (--compile auto: on for CUDA).
  steps_args=(--device cuda --arch resnet50 --image-size 224 --batch-size 256 --precision bf16
              --step-warmup 3 --step-rounds 3 --step-repeats 5)
  warmup_args=(--step-warmup 1 --step-rounds 1 --step-repeats 1)  # later flags win: compile, one step each
  ops_args=(--device cuda --quick --batches 4096)
  ops_env=()
  prior_args=(--device cuda --quick --repeats 3)
  xdist=()
  if "$PY" -c "import xdist" 2> /dev/null; then xdist=(-n 4); fi  # the tests mostly wait on Triton's compiler
fi
versions=("$PY" -c '
import json, sys, torch
from benchmarks.timing import environment
env = environment(sys.argv[1])
env["cuda_available"], env["gpu_count"] = torch.cuda.is_available(), torch.cuda.device_count()
env["cudnn"] = torch.backends.cudnn.version()
open(sys.argv[2], "w").write(json.dumps(env))
print(json.dumps(env, indent=1))' "$device" "$work/environment.json")

background_step install 150 "${install[@]}"
run_step versions 20 "${versions[@]}"
run_step throughput_warmup 130 "$PY" benchmarks/throughput.py --steps-only "${steps_args[@]}" "${warmup_args[@]}" \
  --name throughput-warmup --out "$OUT"
wait_background install "$PY" -c "import torch, rela._C, rela.kernels; print('rela._C and rela.kernels import')"
cuda_step ops_tests 140 "$PY" -m pytest -q -p no:cacheprovider -rs "${xdist[@]}" tests/ops/test_ops_gpu.py
run_step throughput 120 "$PY" benchmarks/throughput.py --steps-only "${steps_args[@]}" --name throughput --out "$OUT"
run_step ops 70 "${ops_env[@]}" "$PY" benchmarks/ops.py "${ops_args[@]}" --out "$OUT"
run_step prior 50 "$PY" benchmarks/prior.py "${prior_args[@]}" --out "$OUT"

echo "[first_contact] $((SECONDS - started)) s; $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
! grep -q '"status": "\(fail\|timeout\)"' "$work/steps.jsonl"
