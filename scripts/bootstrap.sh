#!/usr/bin/env bash
# Create (or update) the project's virtual environment at .venv/ and everything the tests need.
# Idempotent: a stamp file records the inputs it was built from; a rerun with unchanged inputs is a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.tritonembed-installed
INPUTS=$(cat pyproject.toml constraints.txt scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)

log() { echo "[bootstrap] $*" >&2; }
# pip's and apt's own output goes to this log; the terminal shows one line per step (and the log's tail on failure).
mkdir -p .cache
LOG=.cache/bootstrap.log
step() {
  local what=$1; shift
  local started=$SECONDS
  log "$what ..."
  if ! "$@" >>"$LOG" 2>&1; then
    log "FAILED: $what; the last lines of $LOG:"
    tail -n 40 "$LOG" >&2
    exit 1
  fi
  log "$what: done in $((SECONDS - started)) s"
}

need_apt=()
# The Triton Python-backend stub links the system libpython3.11; perf_analyzer needs libb64.
[ -e /usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0 ] || need_apt+=(libpython3.11)
[ -e /usr/lib/x86_64-linux-gnu/libb64.so.0d ] || need_apt+=(libb64-0d)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    step "apt-get update" apt-get update -qq
    step "installing Debian packages: ${need_apt[*]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
  else
    log "missing Debian packages (run as root to install): ${need_apt[*]}"
  fi
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$INPUTS" ]; then
  exit 0
fi

[ -x $VENV/bin/python ] || step "creating $VENV" $PY -m venv $VENV
step "upgrading pip" $VENV/bin/python -m pip install -q --upgrade pip
# torch==2.13.0 is the CPU build; never let the resolver pick a CUDA build.
step "installing PyTorch 2.13.0 (CPU build)" $VENV/bin/python -m pip install -q -c constraints.txt torch==2.13.0
step "installing tritonembed and its dependencies (pinned by constraints.txt)" \
  $VENV/bin/python -m pip install -q -c constraints.txt -e ".[export,serve,client,gateway,test,bench,bulk]"

# perf_analyzer: the tritonclient 2.50.0 wheel ships a binary that runs on glibc 2.34+ (newer ones need
# 2.38). Only the binary is unpacked, beside (not instead of) the tritonclient library we use.
PA_DIR=$VENV/opt/perf_analyzer
if [ ! -x $PA_DIR/perf_analyzer ]; then
  tmp=$(mktemp -d)
  step "fetching perf_analyzer (tritonclient==2.50.0) and libcudart" \
    $VENV/bin/python -m pip download -q --no-deps -d "$tmp" tritonclient==2.50.0 nvidia-cuda-runtime-cu12==12.6.77
  mkdir -p $PA_DIR/lib
  $VENV/bin/python - "$tmp" "$PA_DIR" <<'PYEOF'
import sys, zipfile, pathlib, os
tmp, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for whl in tmp.glob("*.whl"):
    with zipfile.ZipFile(whl) as zf:
        for name in zf.namelist():
            if name.endswith("/bin/perf_analyzer"):
                target = dest / "perf_analyzer"
            elif "cuda_runtime/lib/libcudart.so" in name:
                target = dest / "lib" / os.path.basename(name)
            else:
                continue
            target.write_bytes(zf.read(name))
            target.chmod(0o755)
PYEOF
  rm -rf "$tmp"
fi
echo "$INPUTS" > "$STAMP"
log "ready: $VENV"
