#!/usr/bin/env bash
# Runs inside a virtme-ng guest started by `cargo xtask vm-test`: the privileged pytest
# subset once per socket backend, against this machine's own root filesystem (read-only
# here; /tmp and /var are overlays that vanish with the guest).
#
#   vm-guest.sh KERNEL RESULTS BACKENDS -- TESTS... [PYTEST ARGS...]
#
# KERNEL names the kernel in every line and file (6.1, 6.12); RESULTS is a directory
# shared with the host; BACKENDS is a comma-separated list of `auto` (which must attach
# kprobes: every kernel vm-test boots has them) and `tracepoint`. For each backend it
# writes RESULTS/KERNEL-BACKEND.log (pytest's output), .xml (JUnit), .rc (pytest's
# exit code) and .seconds (how long it ran), and the agents' logs in RESULTS/agent-logs/;
# with SONDE_VM_ONE_SESSION=1 (vm-test --ci) every backend runs in one pytest session,
# written as RESULTS/KERNEL.*. It exits non-zero when any run failed. The tests of
# tests/test_agent_cli.py run with the first backend only: they choose their own
# backends, so a second pass would prove nothing new. RESULTS/boot.seconds says how long
# the guest took to reach this script.
set -uo pipefail

kernel="$1" results="$2" backends="$3"
shift 3
[ "${1:-}" = "--" ] && shift

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1

# The tree is read-only in the guest.
export PYTHONDONTWRITEBYTECODE=1
# Output reaches the host console line by line, as it happens.
export PYTHONUNBUFFERED=1
# TCG runs several times slower than the host: give readiness and spans more time.
export SONDE_READY_TIMEOUT="${SONDE_READY_TIMEOUT:-300}"
export SONDE_SPAN_TIMEOUT="${SONDE_SPAN_TIMEOUT:-60}"
export SONDE_TLS_ATTACH_TIMEOUT="${SONDE_TLS_ATTACH_TIMEOUT:-120}"
export SONDE_STOP_TIMEOUT="${SONDE_STOP_TIMEOUT:-180}"
export SONDE_RABBITMQ_START_TIMEOUT="${SONDE_RABBITMQ_START_TIMEOUT:-400}"
# pytest-timeout's limit per test, fixtures included (the agent's start, RabbitMQ's).
PYTEST_TIMEOUT="${SONDE_VM_PYTEST_TIMEOUT:-900}"
# Loading the programs takes about a minute here: one agent for all modules.
export SONDE_TEST_ONE_AGENT=1
export HOME=/tmp/vm-home
mkdir -p "$HOME"

# How long the kernel took to boot and reach this script (TCG), for the host's summary.
boot=$(cut -d. -f1 /proc/uptime)
echo "$boot" > "$results/boot.seconds"
# The kernel's and virtme-ng-init's messages up to here: where the boot's time went.
dmesg > "$results/dmesg.log" 2>&1
cp /proc/modules "$results/modules.log"
echo "[vm-guest] Linux $kernel: at the test script $boot s after boot" >&2

[ -e /sys/kernel/tracing/events ] || mount -t tracefs tracefs /sys/kernel/tracing
echo "[vm-guest] kernel $(uname -r): kprobe PMU $( [ -e /sys/bus/event_source/devices/kprobe ] && echo present || echo missing), BTF $( [ -e /sys/kernel/btf/vmlinux ] && echo present || echo missing)" >&2

# Tests with their own choice of backend (the start-up refusals).
once=()
rest=()
for a in "$@"; do
  case "$a" in
    tests/test_agent_cli.py*) once+=("$a") ;;
    *) rest+=("$a") ;;
  esac
done

if [ "$backends" = bench ]; then
  start=$(date +%s)
  tests/.venv/bin/python bench/syscall_cost.py --hooks "$@" 2>&1 | tee "$results/$kernel-bench.log"
  rc=${PIPESTATUS[0]}
  echo "$rc" > "$results/$kernel-bench.rc"
  echo $(( $(date +%s) - start )) > "$results/$kernel-bench.seconds"
  sync
  sleep 1
  exit "$rc"
fi

# One pytest run: its output, JUnit XML, exit code and seconds as RESULTS/NAME.*, and the
# agents' logs (each `agent.stderr` under pytest's temporary directory) in
# RESULTS/agent-logs/, so that a failure shows what the agent said.
run_pytest() {
  local name="$1"; shift
  local base="/tmp/vm-pytest-$name"
  echo "[vm-guest] $name: pytest $*" >&2
  local start rc seconds
  start=$(date +%s)
  tests/.venv/bin/python -m pytest -v -p no:cacheprovider -o timeout="$PYTEST_TIMEOUT" --durations=0 \
    --basetemp="$base" --junitxml="$results/$name.xml" -o junit_suite_name="$name" \
    "$@" 2>&1 | tee "$results/$name.log"
  rc=${PIPESTATUS[0]}
  seconds=$(( $(date +%s) - start ))
  echo "$rc" > "$results/$name.rc"
  echo "$seconds" > "$results/$name.seconds"
  mkdir -p "$results/agent-logs"
  find "$base" -name agent.stderr 2>/dev/null | while read -r f; do
    rel="${f#"$base"/}"
    cp "$f" "$results/agent-logs/$name-${rel//\//_}"
  done
  echo "[vm-guest] $name: pytest exit $rc after $seconds s" >&2
  [ "$rc" = 0 ]
}

expected_backend() {
  case "$1" in
    auto) echo kprobe ;;
    tracepoint) echo tracepoint ;;
    *) echo "[vm-guest] unknown backend $1" >&2; return 1 ;;
  esac
}

status=0
IFS=, read -ra list <<<"$backends"
if [ "${SONDE_VM_ONE_SESSION:-}" = 1 ]; then
  # Every backend in one pytest session (one Python start under emulation): the agent
  # fixture runs each test once per backend (SONDE_TEST_BACKENDS), one agent each.
  matrix=""
  for backend in "${list[@]}"; do
    expect=$(expected_backend "$backend") || exit 2
    matrix="${matrix:+$matrix,}$backend:$expect"
  done
  SONDE_TEST_BACKENDS="$matrix" run_pytest "$kernel" "${once[@]}" "${rest[@]}" || status=1
else
  first=1
  for backend in "${list[@]}"; do
    expect=$(expected_backend "$backend") || exit 2
    args=("${rest[@]}")
    if [ "$first" = 1 ]; then args=("${once[@]}" "${args[@]}"); fi
    first=0
    SONDE_TEST_BACKEND="$backend" SONDE_TEST_EXPECT_BACKEND="$expect" \
      run_pytest "$kernel-$backend" "${args[@]}" || status=1
  done
fi
sync
# Let the console drain before the guest powers off.
sleep 1
exit "$status"
