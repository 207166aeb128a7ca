#!/bin/bash
# many_small_tasks.sh [NTASKS] [OUTDIR]: mem_io's workflow with mpiburst channels.
#
# Instead of thousands of tiny output files, NTASKS small tasks append their
# output to the tier's channels; at the end one retrieve writes one file per
# channel (data_<id>_<C>.dat) into OUTDIR. Worker w of the run's N channels runs
# tasks w, w+N, w+2N, ... one after the other, each storing into channel w:
# one writer per channel at a time, as mem_io requires.
#
# Run it inside a tier (MPIBURST_CONF set, e.g. under 'mpiburst run'):
#   mpiburst run --id tasks --channels 4 -- bash many_small_tasks.sh 100 results
# mpiburst is found as $MPIBURST_PYTHON -m mpiburst when that is set, else on PATH.
set -euo pipefail

NTASKS=${1:-100}
OUTDIR=${2:-results}
MPIBURST="${MPIBURST_PYTHON:+$MPIBURST_PYTHON -m }mpiburst"
[[ -n ${MPIBURST_CONF:-} ]] || { echo "many_small_tasks.sh: run me under 'mpiburst run' (MPIBURST_CONF is not set)." >&2; exit 2; }

NCHANNELS=$($MPIBURST channel-status | sed -n 's/.*: \([0-9]*\) channels:.*/\1/p')

# One small task: its output is a few lines (replace with your program).
task() {
    local i=$1
    printf 'task %d: square %d\n' "$i" $((i * i))
}

worker() {
    local w=$1 i
    for ((i = w; i < NTASKS; i += NCHANNELS)); do
        task "$i" | $MPIBURST store --channel "$w"
    done
}

pids=()
for ((w = 0; w < NCHANNELS; w++)); do
    worker "$w" &
    pids+=($!)
done
for pid in "${pids[@]}"; do
    wait "$pid" || { echo "many_small_tasks.sh: a worker failed; its channel holds what it stored." >&2; exit 1; }
done

mkdir -p "$OUTDIR"
$MPIBURST retrieve --split --output-dir "$OUTDIR"
$MPIBURST channel-status
