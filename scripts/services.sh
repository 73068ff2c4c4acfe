#!/usr/bin/env bash
# The `bash -c '...'` snippets below expand their own positional parameters:
# shellcheck disable=SC2016
# Native (no Docker) test services for distlock, all bound to 127.0.0.1 only:
#
#   redis      127.0.0.1:6379               redis://127.0.0.1:6379
#   redlock    127.0.0.1:6380,6381,6382     redlock://127.0.0.1:6380,127.0.0.1:6381,127.0.0.1:6382
#   zookeeper  127.0.0.1:2181 (standalone)  zk://127.0.0.1:2181
#   etcd       127.0.0.1:2379 (peer 2380)   etcd://127.0.0.1:2379
#
# Usage: scripts/services.sh [start|stop|restart|status|install]   (default: start)
#        scripts/services.sh cluster [start|stop|restart|status]    (default: start)
#
#   install  installs the Debian packages if missing (needs root or passwordless
#            sudo) and makes sure the packages' own system services do not hold
#            the ports.
#   start    install, then start every service that is not already answering on
#            its port (idempotent), wait until all answer, print the URLs.
#   stop     stop what `start` started (by pid file) and wait until the ports are
#            free. Services started by someone else (e.g. docker compose) are left.
#   status   one line per service: up/down with its port. Exit 0 iff all are up.
#   cluster  3-member etcd and ZooKeeper ensembles, a Redis primary with two
#            replicas and three Sentinels, a 6-node Redis Cluster, on ports of
#            their own (scripts/clusters.sh, docs/clusters.md). The commands
#            above neither start nor stop them.
#
# Environment:
#   DISTLOCK_SERVICES_DIR      state dir: data, logs, pid files (default /tmp/distlock-services)
#   DISTLOCK_SERVICES_TIMEOUT  seconds to wait for each service to answer (default 60)
#   DISTLOCK_CLUSTER_TIMEOUT   seconds `cluster start` waits for all to be ready (default 180)
#
# The same services for Docker users: compose/docker-compose.yml.
set -euo pipefail
set +m # background jobs must not be process-group leaders (setsid must not fork)

DIR="${DISTLOCK_SERVICES_DIR:-/tmp/distlock-services}"
TIMEOUT="${DISTLOCK_SERVICES_TIMEOUT:-60}"
HOST=127.0.0.1
REDIS_PORT=6379
REDLOCK_PORTS=(6380 6381 6382)
ZK_PORT=2181
ETCD_PORT=2379
ETCD_PEER_PORT=2380

# etcd-client (etcdctl) and libcurator-recipes-java (with javac) are for the
# interoperability tests against the ecosystem's own lock recipes.
PACKAGES=(redis-server zookeeper etcd-server etcd-client libcurator-recipes-java protobuf-compiler libprotobuf-dev)
CURATOR_JAR=/usr/share/java/curator-recipes.jar
ZK_JAR=/usr/share/java/zookeeper.jar

# name:port:exe, in start order
SERVICES=(
  "redis-$REDIS_PORT:$REDIS_PORT:redis-server"
  "redis-${REDLOCK_PORTS[0]}:${REDLOCK_PORTS[0]}:redis-server"
  "redis-${REDLOCK_PORTS[1]}:${REDLOCK_PORTS[1]}:redis-server"
  "redis-${REDLOCK_PORTS[2]}:${REDLOCK_PORTS[2]}:redis-server"
  "zookeeper:$ZK_PORT:java"
  "etcd:$ETCD_PORT:etcd"
)

note() { printf 'services: %s\n' "$*"; }
warn() { printf 'services: WARNING: %s\n' "$*" >&2; }
die() { printf 'services: ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- checks ----

# true if something accepts TCP connections on $HOST:$1
port_open() {
  timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$HOST" "$1" 2>/dev/null
}

redis_up() {
  [[ "$(timeout 3 redis-cli -h "$HOST" -p "$1" ping 2>/dev/null || true)" == PONG ]]
}

# send a ZooKeeper four-letter word, print the answer
zk_4lw() {
  timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1" || exit 1; printf %s "$2" >&3; cat <&3' \
    "$HOST" "$ZK_PORT" "$1" 2>/dev/null || true
}

# `ruok` says imok as soon as the port is open; `srvr` reports a Mode only once
# the server actually serves requests.
zk_up() { [[ "$(zk_4lw ruok)" == imok && "$(zk_4lw srvr)" == *"Mode: "* ]]; }

etcd_up() {
  local body
  if command -v curl >/dev/null 2>&1; then
    body="$(curl -fsS --max-time 3 "http://$HOST:$ETCD_PORT/health" 2>/dev/null || true)"
  else
    body="$(timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1" || exit 1
      printf "GET /health HTTP/1.0\r\nHost: %s\r\n\r\n" "$0" >&3; cat <&3' \
      "$HOST" "$ETCD_PORT" 2>/dev/null || true)"
  fi
  [[ "$body" == *'"health":"true"'* ]]
}

# is service $1 (name) answering on port $2?
service_up() {
  case "$1" in
    redis-*) redis_up "$2" ;;
    zookeeper) zk_up ;;
    etcd) etcd_up ;;
    *) die "unknown service $1" ;;
  esac
}

# print the pid from $DIR/$1.pid if that process is alive and runs executable $2
our_pid() {
  local name=$1 exe=$2 pidf="$DIR/$1.pid" pid target real
  [[ -f "$pidf" ]] || return 0
  pid="$(cat "$pidf" 2>/dev/null || true)"
  if [[ "$pid" =~ ^[0-9]+$ ]] && [[ -d "/proc/$pid" ]]; then
    target="$(readlink "/proc/$pid/exe" 2>/dev/null || true)"
    target="${target% (deleted)}"
    # Debian's /usr/bin/redis-server is a symlink to redis-check-rdb
    real="$(readlink -f "$(command -v "$exe" 2>/dev/null || echo "$exe")" 2>/dev/null || true)"
    if [[ "${target##*/}" == "$exe" || "${target##*/}" == "${real##*/}" ]]; then
      echo "$pid"
      return 0
    fi
  fi
  rm -f "$pidf" # stale
}

# print the pid from $DIR/$1.pid if that process is alive (not a zombie),
# whatever it runs: right after spawn() it may still be setsid/nohup/env.
spawned_pid() {
  local pid state
  pid="$(cat "$DIR/$1.pid" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 0
  state="$(sed -E 's/^.*\) ([A-Za-z]).*$/\1/' "/proc/$pid/stat" 2>/dev/null || true)"
  if [[ -n "$state" && "$state" != Z && "$state" != X ]]; then
    echo "$pid"
  fi
}

# -------------------------------------------------------------- install ----

as_root() {
  if [[ $EUID -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo -n "$@"
  else
    die "need root (or passwordless sudo) to run: $*"
  fi
}

package_installed() {
  [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" == installed ]]
}

# Debian's redis-server and etcd-server ship init scripts / systemd units that
# the postinst tries to start on the default ports. Stop them (and, for a fresh
# install, disable them) so that only our own instances hold the ports.
stop_package_daemons() {
  local fresh=$1 svc
  for svc in redis-server etcd zookeeper; do
    if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
      if systemctl is-active --quiet "$svc" 2>/dev/null; then
        note "stopping the package's own $svc service (systemd)"
        as_root systemctl stop "$svc" || warn "could not stop $svc"
      fi
      if [[ "$fresh" == *" $svc "* ]]; then
        as_root systemctl disable --quiet "$svc" 2>/dev/null || true
      fi
    elif [[ -x "/etc/init.d/$svc" ]]; then
      if "/etc/init.d/$svc" status >/dev/null 2>&1; then
        note "stopping the package's own $svc service (init.d)"
        as_root "/etc/init.d/$svc" stop >/dev/null 2>&1 || warn "could not stop $svc"
      fi
      if [[ "$fresh" == *" $svc "* ]] && command -v update-rc.d >/dev/null 2>&1; then
        as_root update-rc.d "$svc" disable >/dev/null 2>&1 || true
      fi
    fi
  done
}

cmd_install() {
  local missing=() p fresh=" " log policy=/usr/sbin/policy-rc.d made_policy=0 rc
  for p in "${PACKAGES[@]}"; do
    package_installed "$p" || missing+=("$p")
  done
  command -v curl >/dev/null 2>&1 || package_installed curl || missing+=(curl)
  command -v java >/dev/null 2>&1 || missing+=(default-jre-headless)
  command -v javac >/dev/null 2>&1 || missing+=(default-jdk-headless)
  command -v python3 >/dev/null 2>&1 || missing+=(python3) # the docs' Python client test

  if ((${#missing[@]})); then
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get here"
    mkdir -p "$DIR"
    log="$DIR/install.log"
    note "installing ${missing[*]} (apt log: $log)"
    for p in redis-server etcd-server; do
      [[ " ${missing[*]} " == *" $p "* ]] && fresh+="${p%-server} ${p} "
    done
    # keep the postinst scripts from starting the packages' daemons
    if [[ ! -e "$policy" ]]; then
      printf '#!/bin/sh\n# temporary, from distlock scripts/services.sh\nexit 101\n' |
        as_root tee "$policy" >/dev/null
      as_root chmod 755 "$policy"
      made_policy=1
      trap 'as_root rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    rc=0
    {
      as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q &&
        {
          as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
            -o DPkg::Lock::Timeout=300 --no-install-recommends "${missing[@]}" ||
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
              -o DPkg::Lock::Timeout=300 "${missing[@]}"
        }
    } >"$log" 2>&1 || rc=$?
    if ((made_policy)); then
      as_root rm -f "$policy"
      trap - EXIT
    fi
    if ((rc != 0)); then
      tail -n 30 "$log" >&2 || true
      die "apt-get install ${missing[*]} failed (exit $rc); full log: $log"
    fi
    note "installed ${missing[*]}"
  fi
  stop_package_daemons "$fresh"
  for p in redis-server redis-cli etcd etcdctl java javac; do
    command -v "$p" >/dev/null 2>&1 || die "$p not found after install"
  done
  [[ -f "$ZK_JAR" ]] || die "$ZK_JAR not found after install"
  [[ -f "$CURATOR_JAR" ]] || die "$CURATOR_JAR not found after install"
}

# ---------------------------------------------------------------- start ----

# spawn NAME CMD... : start CMD detached (own session, no tty, no lock fd),
# output to $DIR/NAME.log, pid to $DIR/NAME.pid
spawn() {
  local name=$1
  shift
  {
    printf '==== %s: starting: %s\n' "$(date '+%F %T')" "$*"
  } >"$DIR/$name.log"
  setsid nohup "$@" >>"$DIR/$name.log" 2>&1 </dev/null 9>&- &
  echo $! >"$DIR/$name.pid"
}

launch_redis() {
  local name=$1 port=$2
  mkdir -p "$DIR/$name"
  spawn "$name" redis-server \
    --bind "$HOST" --port "$port" \
    --save '' --appendonly no \
    --dir "$DIR/$name" \
    --daemonize no --supervised no \
    --pidfile "" --logfile "" \
    --protected-mode yes \
    --databases 16
}

# Debian's zookeeper has no daemon wrapper we can use unprivileged, so run the
# server class directly. zookeeper.jar's manifest Class-Path pulls in its
# dependencies from /usr/share/java; add an SLF4J binding so that the server
# logs into $DIR/zookeeper.log instead of nowhere / the terminal.
zk_classpath() {
  local cp="$DIR/zookeeper/conf:$ZK_JAR"
  if [[ -f /usr/share/java/slf4j-simple.jar ]]; then # from libslf4j-java, a dependency
    cp+=":/usr/share/java/slf4j-simple.jar"
  fi
  echo "$cp"
}

launch_zookeeper() {
  local base="$DIR/zookeeper" java
  rm -rf "$base/data"
  mkdir -p "$base/data" "$base/conf"
  cat >"$base/conf/zoo.cfg" <<EOF
# generated by distlock scripts/services.sh
tickTime=500
initLimit=10
syncLimit=5
dataDir=$base/data
clientPort=$ZK_PORT
clientPortAddress=$HOST
maxClientCnxns=0
minSessionTimeout=1000
maxSessionTimeout=300000
4lw.commands.whitelist=*
admin.enableServer=false
standaloneEnabled=true
EOF
  java="java"
  [[ -n "${JAVA_HOME:-}" && -x "${JAVA_HOME}/bin/java" ]] && java="$JAVA_HOME/bin/java"
  spawn zookeeper "$java" \
    -Xms64m -Xmx512m -XX:+UseSerialGC \
    -Djava.net.preferIPv4Stack=true \
    -Dzookeeper.admin.enableServer=false \
    -Dzookeeper.4lw.commands.whitelist='*' \
    -Dorg.slf4j.simpleLogger.defaultLogLevel=info \
    -Dorg.slf4j.simpleLogger.showDateTime=true \
    -Dorg.slf4j.simpleLogger.dateTimeFormat='yyyy-MM-dd HH:mm:ss.SSS' \
    -cp "$(zk_classpath)" \
    org.apache.zookeeper.server.ZooKeeperServerMain "$base/conf/zoo.cfg"
}

# etcd 3.4 refuses to start on architectures other than amd64/ppc64le unless
# ETCD_UNSUPPORTED_ARCH names the (Go) architecture.
etcd_unsupported_arch() {
  local arch
  arch="$(dpkg --print-architecture 2>/dev/null || uname -m)"
  case "$arch" in
    amd64 | x86_64 | ppc64el | ppc64le) return 0 ;;
    arm64 | aarch64) echo arm64 ;;
    armhf | armel | arm*) echo arm ;;
    i386 | i686) echo 386 ;;
    *) echo "$arch" ;;
  esac
}

launch_etcd() {
  local base="$DIR/etcd" envs=() ua
  rm -rf "$base/data"
  mkdir -p "$base"
  ua="$(etcd_unsupported_arch)"
  [[ -n "$ua" ]] && envs+=(env "ETCD_UNSUPPORTED_ARCH=$ua")
  spawn etcd "${envs[@]}" etcd \
    --name distlock \
    --data-dir "$base/data" \
    --listen-client-urls "http://$HOST:$ETCD_PORT" \
    --advertise-client-urls "http://$HOST:$ETCD_PORT" \
    --listen-peer-urls "http://$HOST:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://$HOST:$ETCD_PEER_PORT" \
    --initial-cluster "distlock=http://$HOST:$ETCD_PEER_PORT" \
    --initial-cluster-state new \
    --initial-cluster-token distlock-test \
    --logger zap --log-outputs stderr
}

launch() {
  case "$1" in
    redis-*) launch_redis "$1" "$2" ;;
    zookeeper) launch_zookeeper ;;
    etcd) launch_etcd ;;
  esac
}

describe_port() {
  if command -v ss >/dev/null 2>&1; then
    ss -Hltnp "sport = :$1" 2>/dev/null | sed 's/^/    /' >&2 || true
  fi
}

fail_service() {
  local name=$1 port=$2 why=$3 log="$DIR/$1.log"
  {
    printf 'services: ERROR: %s on %s:%s %s\n' "$name" "$HOST" "$port" "$why"
    if [[ -f "$log" ]]; then
      printf -- '---- last lines of %s ----\n' "$log"
      tail -n 40 "$log"
      printf -- '----\n'
    fi
  } >&2
  exit 1
}

wait_up() {
  local name=$1 port=$2 exe=$3 deadline=$((SECONDS + TIMEOUT)) pid
  while ! service_up "$name" "$port"; do
    pid="$(spawned_pid "$name")"
    if [[ -z "$pid" ]] && ! port_open "$port"; then
      fail_service "$name" "$port" "exited without coming up"
    fi
    if ((SECONDS >= deadline)); then
      fail_service "$name" "$port" "did not answer within ${TIMEOUT}s${pid:+ (pid $pid still running)}"
    fi
    sleep 0.2
  done
}

lock_dir() {
  mkdir -p "$DIR"
  exec 9>"$DIR/.lock"
  if command -v flock >/dev/null 2>&1; then
    flock -w 300 9 || die "could not lock $DIR/.lock"
  fi
}

print_urls() {
  cat <<EOF
services: all up (state, logs and pid files in $DIR):
  redis://$HOST:$REDIS_PORT
  redlock://$HOST:${REDLOCK_PORTS[0]},$HOST:${REDLOCK_PORTS[1]},$HOST:${REDLOCK_PORTS[2]}
  zk://$HOST:$ZK_PORT
  etcd://$HOST:$ETCD_PORT
EOF
}

cmd_start() {
  local t0=$SECONDS entry name port exe pid started=()
  cmd_install
  lock_dir
  for entry in "${SERVICES[@]}"; do
    IFS=: read -r name port exe <<<"$entry"
    if service_up "$name" "$port"; then
      note "$name already answering on $HOST:$port, left alone"
      continue
    fi
    pid="$(our_pid "$name" "$exe")"
    if [[ -n "$pid" ]]; then
      note "$name (pid $pid) is running but not answering yet, waiting for it"
      continue
    fi
    if port_open "$port"; then
      describe_port "$port"
      die "port $port is taken by something that does not answer like $name"
    fi
    if [[ "$name" == etcd ]] && port_open "$ETCD_PEER_PORT"; then
      describe_port "$ETCD_PEER_PORT"
      die "etcd peer port $ETCD_PEER_PORT is taken"
    fi
    launch "$name" "$port"
    started+=("$name")
  done
  for entry in "${SERVICES[@]}"; do
    IFS=: read -r name port exe <<<"$entry"
    wait_up "$name" "$port" "$exe"
  done
  if ((${#started[@]})); then
    note "started ${started[*]} in $((SECONDS - t0))s"
  fi
  print_urls
}

# ----------------------------------------------------------------- stop ----

cmd_stop() {
  local entry name port exe pid deadline busy=()
  lock_dir
  for entry in "${SERVICES[@]}"; do
    IFS=: read -r name port exe <<<"$entry"
    pid="$(our_pid "$name" "$exe")"
    if [[ -z "$pid" ]]; then
      continue
    fi
    note "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
  done
  for entry in "${SERVICES[@]}"; do
    IFS=: read -r name port exe <<<"$entry"
    pid="$(our_pid "$name" "$exe")"
    if [[ -n "$pid" ]]; then
      deadline=$((SECONDS + 30))
      while [[ -d "/proc/$pid" ]] && ((SECONDS < deadline)); do sleep 0.2; done
      if [[ -d "/proc/$pid" ]]; then
        warn "$name (pid $pid) ignored SIGTERM for 30s, killing it"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
      fi
      rm -f "$DIR/$name.pid"
    fi
  done
  for entry in "${SERVICES[@]}"; do
    IFS=: read -r name port exe <<<"$entry"
    deadline=$((SECONDS + 15))
    while port_open "$port" && ((SECONDS < deadline)); do sleep 0.2; done
    if port_open "$port"; then busy+=("$port"); fi
  done
  if ((${#busy[@]})); then
    warn "ports ${busy[*]} are still in use by processes this script did not start:"
    for port in "${busy[@]}"; do describe_port "$port"; done
  else
    note "stopped; ports $REDIS_PORT ${REDLOCK_PORTS[*]} $ZK_PORT $ETCD_PORT are free"
  fi
}

# --------------------------------------------------------------- status ----

cmd_status() {
  local entry name port exe pid state all=0 extra
  for entry in "${SERVICES[@]}"; do
    IFS=: read -r name port exe <<<"$entry"
    pid="$(our_pid "$name" "$exe")"
    if service_up "$name" "$port"; then
      state=up
      extra="${pid:+pid $pid}"
      extra="${extra:-not started by this script}"
    else
      state=down
      all=1
      extra=""
      [[ -n "$pid" ]] && extra="pid $pid running, not answering"
      [[ -z "$pid" ]] && port_open "$port" && extra="port taken by something else"
    fi
    printf '%-11s %-4s %s:%-5s %s\n' "$name" "$state" "$HOST" "$port" "${extra:+($extra)}"
  done
  return "$all"
}

case "${1:-start}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  restart)
    cmd_stop
    cmd_start
    ;;
  status) cmd_status ;;
  install) cmd_install ;;
  cluster)
    # shellcheck source=scripts/clusters.sh
    source "$(dirname "${BASH_SOURCE[0]}")/clusters.sh"
    cmd_cluster "${@:2}"
    ;;
  -h | --help | help) sed -n '4,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0" ;;
  *) die "unknown command '$1' (use start, stop, restart, status, install or cluster)" ;;
esac
