#!/usr/bin/env bash
# Replays cached edits against a server whose every template step is on disk only (one byte
# of memory per cache tier, no prefetch), with and without the load-or-recompute plan,
# alternating, and summarises each run's trace (docs/replay.md, "Misses").
# Usage: tools/replay-misses.sh [RUNS]   (from the repository root, after a release build)
set -euo pipefail
bin="${RETOUCH:-target/release/retouch}"
runs="${1:-2}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
run() { # $1 tag, $2 port, $3 extra serve flag
    "$bin" serve --port "$2" --cache-dir "$work/cache-$1" --cache-host-bytes 1 \
        --cache-device-bytes 1 --prefetch-steps 0 --trace "$work/$1.jsonl" $3 \
        >"$work/serve-$1.log" 2>&1 &
    local pid=$!
    for _ in $(seq 1 60); do
        python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$2/healthz')" \
            2>/dev/null && break
        sleep 0.5
    done
    echo "$1: $("$bin" replay --url "http://127.0.0.1:$2" --rates 2 --requests 40 \
        --templates 2 --seed 3 2>&1 | tail -1)"
    kill -INT "$pid"
    wait "$pid" || true
}
for r in $(seq 1 "$runs"); do
    run "plan$r" 8941 "--recompute-plan"
    run "wait$r" 8942 ""
done
python3 - "$work" <<'PY'
import json, statistics as st, sys, glob, os
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.jsonl"))):
    recs = [json.loads(l) for l in open(path)]
    steps = [r["end_us"] - r["start_us"] for r in recs if r["kind"] == "step"
             and any(b.get("kind") == "edit" for b in r.get("batch", []))]
    reads = [r["end_us"] - r["start_us"] for r in recs
             if r["kind"] == "cache_load" and r["actor"].startswith("worker")]
    plans = [r.get("recompute_units") for r in recs if r["kind"] == "recompute_plan"]
    print(os.path.basename(path)[:-6], "edit steps", len(steps),
          "mean step ms %.1f" % (st.mean(steps) / 1e3), "reads", len(reads),
          "mean read ms %.2f" % (st.mean(reads) / 1e3 if reads else 0),
          "plans", {u: plans.count(u) for u in sorted(set(plans))})
PY
