#!/usr/bin/env bash
# Build TigerBeetle from a local source checkout with the Zig it pins (installed
# from PyPI, package `ziglang`) and run TigerBeetle's own `benchmark` a few times
# with durability on (Direct I/O + O_DSYNC on a real file system, single replica),
# printing throughput and batch latency for each run plus the medians.
#
# Usage:
#   bench/tigerbeetle/run.sh /path/to/tigerbeetle-checkout
#
# The checkout is not fetched here (github.com is not reachable from CI); see
# README.md next to this script for the commit the recorded figures came from.
#
# Environment (all optional):
#   TB_WORK            work directory for Zig, caches, binary, logs, data file
#                      (default /tmp/tb). Must be on a real disk, not tmpfs.
#   TB_RUNS            number of benchmark runs (default 3)
#   TB_TRANSFER_COUNT  --transfer-count per run (default 2000000). Set to
#                      "default" to use TigerBeetle's own default (10,000,000),
#                      which needs about 18 GB of free disk for the data file.
#   TB_JOBS            zig build -j (default 2)
#   TB_KEEP_CACHE      1 keeps the Zig build caches (default: deleted after build)
#   TB_SKIP_BUILD      1 reuses $TB_WORK/out/bin/tigerbeetle if present
set -euo pipefail

if [ $# -ne 1 ] || [ ! -f "$1/build.zig" ]; then
    echo "usage: $0 /path/to/tigerbeetle-checkout" >&2
    exit 2
fi

src=$(cd "$1" && pwd)
work=${TB_WORK:-/tmp/tb}
runs=${TB_RUNS:-3}
transfer_count=${TB_TRANSFER_COUNT:-2000000}
jobs=${TB_JOBS:-2}
keep_cache=${TB_KEEP_CACHE:-0}
skip_build=${TB_SKIP_BUILD:-0}

mkdir -p "$work"
work=$(cd "$work" && pwd)
rundir="$work/run"
logdir="$work/logs"
mkdir -p "$rundir" "$logdir"

commit=$(git -C "$src" rev-parse HEAD)

# --- 1. The Zig version TigerBeetle pins, from PyPI -------------------------
zig_version=$(sed -n 's/^ZIG_RELEASE="\([^"]*\)"$/\1/p' "$src/zig/download.sh")
if [ -z "$zig_version" ]; then
    echo "could not read ZIG_RELEASE from $src/zig/download.sh" >&2
    exit 1
fi
zig="$work/zig/ziglang/zig"
if [ ! -x "$zig" ] || [ "$("$zig" version)" != "$zig_version" ]; then
    rm -rf "$work/zig"
    python3 -m pip install --quiet --disable-pip-version-check \
        --target "$work/zig" "ziglang==$zig_version"
fi
if [ "$("$zig" version)" != "$zig_version" ]; then
    echo "zig from PyPI reports $("$zig" version), expected $zig_version" >&2
    exit 1
fi

# --- 2. Release build (offline: no -Dmultiversion, so nothing is fetched) ---
tb="$work/out/bin/tigerbeetle"
build_seconds="skipped"
if [ "$skip_build" != 1 ] || [ ! -x "$tb" ]; then
    build_start=$(date +%s)
    (
        cd "$src"
        ZIG_GLOBAL_CACHE_DIR="$work/zig-global-cache" "$zig" build install \
            -Drelease -j"$jobs" \
            --cache-dir "$work/zig-cache" --prefix "$work/out"
    )
    build_seconds=$(( $(date +%s) - build_start ))
    # `zig build install` also copies the binary to "<prefix>/../tigerbeetle".
    if [ "$keep_cache" != 1 ]; then
        rm -rf "$work/zig-cache" "$work/zig-global-cache"
    fi
fi
version=$("$tb" version --verbose 2>/dev/null)
if ! grep -q "process.git_commit=\"$commit\"" <<<"$version" \
    || ! grep -q "build.mode=builtin.OptimizeMode.ReleaseSafe" <<<"$version"; then
    echo "built binary is not a ReleaseSafe build of $commit:" >&2
    echo "$version" >&2
    exit 1
fi

# --- 3. Benchmark -------------------------------------------------------------
# `tigerbeetle benchmark` formats a temporary data file in the current directory,
# starts `tigerbeetle start --addresses=0 <file>` (single replica, no
# --development) and drives it from a client in the same process tree on
# 127.0.0.1. Without --development the replica requires O_DIRECT and always opens
# the file with O_DSYNC. On tmpfs TigerBeetle silently skips O_DIRECT, so refuse.
fs_type=$(findmnt -n -o FSTYPE -T "$rundir" 2>/dev/null || stat -f -c %T "$rundir")
if [ "$fs_type" = tmpfs ] || [ "$fs_type" = ramfs ]; then
    echo "$rundir is on $fs_type: durability would not be real; set TB_WORK" >&2
    exit 1
fi

bench_args=()
if [ "$transfer_count" != default ]; then
    bench_args+=("--transfer-count=$transfer_count")
    count_for_estimate=$transfer_count
else
    count_for_estimate=10000000
fi
# Measured on ext4: the data file peaks at ~1.1 GB + ~1.7 KB per transfer
# (2M transfers: ~3.9 GB; 10M transfers: ~17.6 GB). Keep 1 GB of margin.
need_mb=$(( 1200 + count_for_estimate * 18 / 10000 + 1000 ))
avail_mb=$(df --output=avail -BM "$rundir" | tail -1 | tr -dc 0-9)
if [ "$avail_mb" -lt "$need_mb" ]; then
    echo "need ~${need_mb} MB free in $rundir for the data file, have ${avail_mb} MB" >&2
    exit 1
fi

bench_pid=""
monitor_pid=""
cleanup() {
    if [ -n "$bench_pid" ]; then kill "$bench_pid" 2>/dev/null || true; fi
    if [ -n "$monitor_pid" ]; then kill "$monitor_pid" 2>/dev/null || true; fi
    wait 2>/dev/null || true
    rm -f "$rundir"/*.tigerbeetle.benchmark
}
trap cleanup EXIT

median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

echo "tigerbeetle commit: $commit"
echo "zig: $zig_version (PyPI ziglang==$zig_version)"
echo "build seconds: $build_seconds (zig build install -Drelease -j$jobs)"
echo "cpus: $(nproc)  data dir: $rundir ($fs_type)"
echo "command: (cd $rundir && $tb benchmark ${bench_args[*]:-})"

tps_all=()
p50_all=()
p99_all=()
for i in $(seq 1 "$runs"); do
    log="$logdir/run$i.log"
    load_log="$logdir/run$i.load"
    : >"$load_log"
    (
        while true; do
            uptime >>"$load_log"
            sleep 5
        done
    ) &
    monitor_pid=$!
    (cd "$rundir" && exec "$tb" benchmark "${bench_args[@]}") >"$log" 2>&1 &
    bench_pid=$!
    wait "$bench_pid"
    bench_pid=""
    kill "$monitor_pid" 2>/dev/null || true
    wait "$monitor_pid" 2>/dev/null || true
    monitor_pid=""

    tps=$(sed -n 's/^load accepted = \([0-9]*\) tx\/s$/\1/p' "$log")
    p50=$(sed -n 's/^batch latency p50 *= \([0-9]*\) ms$/\1/p' "$log")
    p99=$(sed -n 's/^batch latency p99 *= \([0-9]*\) ms$/\1/p' "$log")
    batches=$(sed -n 's/^\([0-9]* batches in [0-9.]* s\)$/\1/p' "$log")
    if [ -z "$tps" ] || [ -z "$p50" ] || [ -z "$p99" ]; then
        echo "run $i: could not parse results, see $log" >&2
        exit 1
    fi
    load=$(grep -o 'load average: [0-9.]*' "$load_log" | awk '{ print $3 }' | sort -n \
        | sed -n '1p;$p' | paste -sd- -)
    echo "run $i: $tps tx/s  batch p50 $p50 ms  p99 $p99 ms  ($batches; 1-min load $load)"
    tps_all+=("$tps")
    p50_all+=("$p50")
    p99_all+=("$p99")
    rm -f "$rundir"/*.tigerbeetle.benchmark
done

echo "median: $(printf '%s\n' "${tps_all[@]}" | median) tx/s" \
    " batch p50 $(printf '%s\n' "${p50_all[@]}" | median) ms" \
    " p99 $(printf '%s\n' "${p99_all[@]}" | median) ms  (each column's median separately)"
echo "logs: $logdir"
