#!/usr/bin/env bash
# The GPU check in one script: versions and `edgeprune_fast.info`, the CUDA tests, the pruning
# step at the paper's IOI setting against the original's algorithm and the HF floor, edge_mix's
# memory bandwidth, and a Llama-3.1-8B-shaped step against the planner; see bench/gpu_check.py.
#
#   bash bench/gpu_check.sh [--out DIR] [--python PY]   # on a GPU machine: at most 8 minutes
#   bash bench/gpu_check.sh --cpu-smoke [--out DIR]     # the same pipeline on the CPU, tiny shapes,
#                                                       # the kernels under Triton's interpreter (< 3 min)
#
# Writes DIR/gpu-<date>.json and .md (DIR default: bench/results; the smoke: gpu-cpu-smoke-<date>).
# Each part runs in a process of its own under a time limit; a part that fails or runs out of
# time has its error recorded and the script goes on; the JSON is written whatever happened.
# Nothing is installed: the package runs from this checkout (PYTHONPATH), without its compiled
# extension if that is not built (the C++ backend is CPU-only anyway). Without pytest for PY,
# the tests part records that; `make gpu-pytest` writes .gpu-pytest/ (pure-Python wheels), which
# this script puts on PYTHONPATH: carry it to a machine that has none.
# GPU_CHECK_REVISION=<git revision> names the revision where the checkout has no .git.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODE=gpu
OUT="$ROOT/bench/results"
PY="${PYTHON:-}"
while (($#)); do
    case "$1" in
        --cpu-smoke) MODE=cpu-smoke ;;
        --out) OUT="${2:?--out: expected a folder}"; shift ;;
        --python) PY="${2:?--python: expected an interpreter}"; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (expected --cpu-smoke, --out DIR, --python PY)" >&2; exit 2 ;;
    esac
    shift
done
if [[ -z "$PY" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
command -v "$PY" >/dev/null || { echo "gpu_check.sh: --python: '$PY' not found" >&2; exit 2; }
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"

if [[ "$MODE" == gpu ]]; then
    STEM="gpu-$(date +%Y-%m-%d-%H%M)"
    TOTAL=465  # seconds for all parts; the report after them (15 s at most): 8 minutes in all
    # per-part limits: versions, tests, ioi_step, edge_mix_bandwidth, llama_8b
    LIMITS=(30 150 80 60 140)
else
    STEM="gpu-cpu-smoke-$(date +%Y-%m-%d-%H%M)"
    TOTAL=300  # ~70 s alone on 2 cores; room for a loaded machine
    LIMITS=(40 90 90 60 70)
    export TRITON_INTERPRET=1  # before anything imports triton: the kernels run on the CPU
fi
PARTS_DIR="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$PARTS_DIR"' EXIT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [[ -d "$ROOT/.gpu-pytest" ]] && ! "$PY" -c "import pytest" 2>/dev/null; then
    export PYTHONPATH="$PYTHONPATH:$ROOT/.gpu-pytest"  # the carried pytest, only where PY has none
fi
export PYTHONUNBUFFERED=1
if [[ -z "${GPU_CHECK_REVISION:-}" ]] && command -v git >/dev/null; then
    GPU_CHECK_REVISION="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || true)"
fi
export GPU_CHECK_REVISION="${GPU_CHECK_REVISION:-}"
cd "$ROOT" || exit 2

STARTED="$(date +%s)"
DEADLINE=$((STARTED + TOTAL))
HAVE_TIMEOUT=1
command -v timeout >/dev/null || HAVE_TIMEOUT=0

run_part() {  # name, limit in seconds
    local name="$1" limit="$2" left t0 rc
    left=$((DEADLINE - $(date +%s)))
    if ((left < 10)); then
        echo "skipped 0 0" >"$PARTS_DIR/$name.status"
        echo "[gpu_check] $name: skipped, the script's time is spent"
        return
    fi
    ((limit > left)) && limit=$left
    echo "[gpu_check] $name (at most ${limit} s)"
    t0="$(date +%s%N)"
    if ((HAVE_TIMEOUT)); then
        timeout -k 10 "$limit" "$PY" -m bench.gpu_check "$name" --mode "$MODE" --out "$PARTS_DIR" --budget "$limit" \
            >"$PARTS_DIR/$name.log" 2>&1
    else  # no coreutils timeout: the part runs unlimited, the report says so through its limit
        "$PY" -m bench.gpu_check "$name" --mode "$MODE" --out "$PARTS_DIR" --budget "$limit" >"$PARTS_DIR/$name.log" 2>&1
    fi
    rc=$?
    echo "$rc $((($(date +%s%N) - t0) / 1000000)) $limit" >"$PARTS_DIR/$name.status"
    echo "[gpu_check] $name: exit $rc after $((($(date +%s%N) - t0) / 1000000000)) s"
    ((rc == 0)) || tail -n 5 "$PARTS_DIR/$name.log" | sed 's/^/    /'
}

NAMES=(versions tests ioi_step edge_mix_bandwidth llama_8b)
for i in "${!NAMES[@]}"; do
    run_part "${NAMES[$i]}" "${LIMITS[$i]}"
done

JSON="$OUT/$STEM.json"
MD="$OUT/$STEM.md"
COMMAND="bash bench/gpu_check.sh$([[ $MODE == cpu-smoke ]] && echo ' --cpu-smoke')"
$( ((HAVE_TIMEOUT)) && echo timeout 15) "$PY" -m bench.gpu_report --parts "$PARTS_DIR" --mode "$MODE" --json "$JSON" --md "$MD" \
    --command "$COMMAND" --started "$STARTED" || true
if [[ ! -s "$JSON" ]]; then  # the report itself failed: still leave a JSON with every part's ending
    {
        printf '{"benchmark": "gpu_check", "mode": "%s", "report_failed": true, "parts": {' "$MODE"
        sep=""
        for name in "${NAMES[@]}"; do
            printf '%s"%s": "%s"' "$sep" "$name" "$(cat "$PARTS_DIR/$name.status" 2>/dev/null || echo 'not run')"
            sep=", "
        done
        printf '}}\n'
    } >"$JSON"
    echo "# GPU check ($MODE): the report failed; see $STEM.json" >"$MD"
fi
echo "[gpu_check] $((($(date +%s) - STARTED))) s; wrote $JSON and $MD"
