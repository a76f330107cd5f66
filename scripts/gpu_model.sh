#!/bin/bash
# SmolLM2-135M's whole 8192-token prefill on the GPU through the cupy backend (issue 14), in
# back-to-back calls on one warm machine: the GGUF (98 MB) is more than one call carries with the
# tree (64 MiB), so `python scripts/model_gpu.py split` wrote it in parts under .model_gpu/part<j>
# (31 MiB each; the last part also holds the manifest, the tokens with the CPU's log-probs, the
# passkey prompts, and the gguf / tokenizers / pyyaml wheels the GPU machine lacks). The machine
# keeps files outside the tree between calls, but NOT an earlier call's carried paths inside it
# (carrying part2 removes part0 there), so each call copies its part to $STASH
# (default /tmp/model_gpu_parts), and `forward` joins the parts there:
#
#   call 1, carry .model_gpu/part0:  bash scripts/gpu_model.sh check part0
#   call 2, carry .model_gpu/part1:  bash scripts/gpu_model.sh check part1
#   call 3, carry .model_gpu/part2:  bash scripts/gpu_model.sh forward    (BUDGET_S=140 by default)
#
# `forward` joins the parts (each SHA-256 checked; a missing part stops it with a message),
# installs the wheels into /tmp/msite, runs `scripts/model_gpu.py forward` (dense and UniSparse
# prefills, the attention's share, log-probs against the CPU's; passkey retrieval at 8K tokens at
# five depths, dense and UniSparse P = 0.9, 0.8; then the captured layers' attention timed alone,
# every contender checked against the float64 reference first) and writes
# model_gpu_forward.json, model_gpu_time.json and forward.log to $OUT/model/. The steps run in that
# order of priority; none starts after BUDGET_S seconds (the rest are listed as skipped). Exit
# status non-zero on failure.
# Runs from the repository root of a tree (a clean `git archive` one or the working tree); the
# carried part is looked for in that tree's .model_gpu/, in $PWD/.model_gpu/ and one level up.
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
D=""
for c in "$here/.model_gpu" "$PWD/.model_gpu" "$here/../.model_gpu"; do
    if ls "$c"/part*/model.gguf.part >/dev/null 2>&1; then D=$(cd "$c" && pwd); break; fi
done
if [ -z "$D" ]; then
    echo "no .model_gpu/part*/model.gguf.part next to $here or in $PWD: carry .model_gpu/part<j>" >&2
    exit 1
fi
# the carried part(s) into the stash, which outlives this call
STASH=${STASH:-/tmp/model_gpu_parts}
mkdir -p "$STASH"
for p in "$D"/part*; do
    [ -f "$p/model.gguf.part" ] && rm -rf "$STASH/$(basename "$p")" && cp -r "$p" "$STASH/"
done
echo "parts in $STASH:"
ls -l "$STASH"/part*/model.gguf.part
D=$STASH
case "${1:-}" in
check)
    part=${2:?which part}
    [ -f "$D/$part/model.gguf.part" ] || { echo "$part has not arrived" >&2; exit 1; }
    echo "$part: $(stat -c %s "$D/$part/model.gguf.part") bytes, kept in $STASH for the next call"
    ;;
forward)
    wheels=$(ls "$D"/part*/wheels/*.whl 2>/dev/null)
    if [ -n "$wheels" ]; then
        python3 -m pip install -q --no-index --no-deps --target /tmp/msite $wheels || exit 1
    fi
    export PYTHONPATH=/tmp/msite${PYTHONPATH:+:$PYTHONPATH}:$here
    out=${OUT:-/tmp/out}/model
    mkdir -p "$out"
    # the log goes to $OUT as it is written, the JSON is rewritten after every step: a run
    # stopped from outside keeps what it finished; --budget-s starts no step after that time
    python3 "$here/scripts/model_gpu.py" forward --dir "$D" --out "$out" --budget-s "${BUDGET_S:-140}" \
        > "$out/forward.log" 2>&1
    rc=$?
    grep -v '"layer": ' "$out/forward.log" | tail -n 40
    echo "gpu_model.sh forward: exit $rc"
    exit $rc
    ;;
*)
    echo "usage: bash scripts/gpu_model.sh check part<j> | forward" >&2
    exit 2
    ;;
esac
