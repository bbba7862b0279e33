#!/usr/bin/env bash
# Measures failover on a local 3-replica operator: SIGKILL the leader, time until the first
# confirmation from the new leader (a deposit through the cluster-aware CLI, which retries),
# restart the killed replica, repeat. Prints one line per kill and the median and worst.
#
#   cargo build --release --bin tally-server --bin tally
#   bench/scripts/failover.sh [KILLS=10] [BASE_PORT=27400]
#
# The time includes starting the CLI process and its TLS handshake, so it is an upper bound on
# the server's own failover time. Raft timing is the init-cluster default (tick 100 ms, election
# after 10 ticks).
set -euo pipefail
kills=${1:-10}
base=${2:-27400}
bin=$(cd "$(dirname "$0")/../.." && pwd)/target/release
dir=$(mktemp -d)
trap 'pkill -f "tally-server --config $dir" || true; rm -rf "$dir"' EXIT
"$bin/tally-server" init-cluster --nodes 3 --dir "$dir/op" --base-port "$base" > /dev/null
export TALLY_PROFILE="$dir/op/profile.toml"
start() { "$bin/tally-server" --config "$dir/op/node$1.toml" > "$dir/node$1.log" 2>&1 & disown; }
for k in 1 2 3; do start "$k"; done
leader() {
  "$bin/tally" --json status | python3 -c '
import json, sys
for r in json.load(sys.stdin):
    if r.get("reachable", True) and r.get("writable"):
        print(r["id"]); break'
}
account=$("$bin/tally" keygen --out "$dir/a.key")
until [ -n "$(leader)" ]; do sleep 0.2; done
"$bin/tally" deposit --to "$account" --amount 1 > /dev/null
times=()
for i in $(seq 1 "$kills"); do
  l=$(leader)
  while [ -z "$l" ]; do sleep 0.2; l=$(leader); done
  pkill -9 -f "tally-server --config $dir/op/node$l.toml"
  t0=$(date +%s%N)
  "$bin/tally" deposit --to "$account" --amount 1 > /dev/null
  t1=$(date +%s%N)
  ms=$(( (t1 - t0) / 1000000 ))
  times+=("$ms")
  echo "kill $i: leader $l, first confirmation after $ms ms"
  start "$l"
  sleep 3
done
printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "kills %d, median %d ms, worst %d ms\n", NR, m, a[NR]}'
