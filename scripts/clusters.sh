# shellcheck shell=bash
# Multi-member test clusters for distlock on 127.0.0.1 only, run as
#
#   bash scripts/services.sh cluster [start|stop|restart|status]   (default: start)
#
# This file is sourced by scripts/services.sh and uses its helpers (spawn,
# our_pid, spawned_pid, port_open, redis_up, cmd_install, ...) and settings
# (HOST, DIR, PACKAGES). It never touches the single-node services.
#
#   etcd       3 members        clients 23791-23793, peers 23801-23803
#   zookeeper  3-server         clients 21811-21813, quorum 21821-21823,
#              ensemble         leader election 21831-21833
#   sentinel   Redis primary 6390, replicas 6391 6392; Sentinels 26379-26381
#              watching master name "mymaster" (quorum 2)
#   redis-cluster  Redis Cluster on 7000-7005 (bus 17000-17005): 3 primaries
#              with one replica each
#
#   start    start what is not running and wait until every group is ready:
#            already running groups are left alone; a group with members down
#            gets them back (they rejoin from their own data); a group that
#            cannot be completed (no state to rejoin, no primary) is restarted
#            from nothing. A SIGSTOPped member is resumed with SIGCONT.
#   stop     stop every member this script started, remove their data (the
#            logs stay), wait until the ports are free.
#   status   every member with its role; exit 0 iff every group is ready.
#
# State (data, config, logs, pid files) in $DISTLOCK_SERVICES_DIR/cluster
# (default /tmp/distlock-services/cluster). DISTLOCK_CLUSTER_TIMEOUT: seconds
# `start` waits for everything to be ready (default 180). See docs/clusters.md.

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  printf 'clusters.sh: run it as: bash scripts/services.sh cluster start|stop|status\n' >&2
  exit 2
fi

# shellcheck disable=SC2153 # DIR, HOST, PACKAGES...: set by services.sh
CDIR="$DIR/cluster"
# etcd's and ZooKeeper's data (their logs fsync on every write) live in
# memory where there is /dev/shm: a disk busy with a build stalls an fsync
# for seconds, and the fault suite would measure the disk, not the fault.
# A custom DISTLOCK_SERVICES_DIR keeps them there, so that two sets of
# services never share one directory in /dev/shm.
if [[ -d /dev/shm && -w /dev/shm && -z "${DISTLOCK_SERVICES_DIR:-}" ]]; then
  CDATA=/dev/shm/distlock-cluster
else
  CDATA="$CDIR/data"
fi
CLUSTER_TIMEOUT="${DISTLOCK_CLUSTER_TIMEOUT:-180}"
ETCD_CLIENT_PORTS=(23791 23792 23793)
ETCD_PEER_PORTS=(23801 23802 23803)
ZKC_CLIENT_PORTS=(21811 21812 21813)
ZKC_QUORUM_PORTS=(21821 21822 21823)
ZKC_ELECTION_PORTS=(21831 21832 21833)
SENTINEL_DATA_PORTS=(6390 6391 6392) # the first one starts as the primary
SENTINEL_PORTS=(26379 26380 26381)
SENTINEL_MASTER=mymaster
RCLUSTER_PORTS=(7000 7001 7002 7003 7004 7005)
CLUSTER_GROUPS=(etcd zookeeper sentinel redis-cluster)

LAUNCHED=()          # members started by this run
ACTIONS=()           # what else it did: resumed members, created the Redis Cluster
CL_NEED_CREATE=0     # the Redis Cluster nodes run but form no cluster yet
SENTINEL_PRIMARY=""  # port of the primary new Sentinel-group members follow
NR_MEMBER=""         # set by the *_ready checks: which member is not ready
NR_WHY=""            # ... and why
M_STATE="" M_PID="" M_TAKEN="" # set by member_state

cnote() { printf 'cluster: %s\n' "$*"; }

# not ready: remember who and why, fail the check
nr() {
  NR_MEMBER=$1
  NR_WHY=$2
  return 1
}

# ------------------------------------------------------------- members ----

# one line per member of group $1: name executable client-port other-ports...
group_members() {
  local i p
  case "$1" in
    etcd)
      for i in 0 1 2; do
        echo "etcd-$((i + 1)) etcd ${ETCD_CLIENT_PORTS[i]} ${ETCD_PEER_PORTS[i]}"
      done
      ;;
    zookeeper)
      for i in 0 1 2; do
        echo "zk-$((i + 1)) java ${ZKC_CLIENT_PORTS[i]} ${ZKC_QUORUM_PORTS[i]} ${ZKC_ELECTION_PORTS[i]}"
      done
      ;;
    sentinel)
      for p in "${SENTINEL_DATA_PORTS[@]}"; do echo "redis-$p redis-server $p"; done
      for p in "${SENTINEL_PORTS[@]}"; do echo "sentinel-$p redis-server $p"; done
      ;;
    redis-cluster)
      for p in "${RCLUSTER_PORTS[@]}"; do echo "node-$p redis-server $p $((p + 10000))"; done
      ;;
    *) die "unknown cluster group $1" ;;
  esac
}

member_group() {
  case "$1" in
    etcd-*) echo etcd ;;
    zk-*) echo zookeeper ;;
    redis-* | sentinel-*) echo sentinel ;;
    node-*) echo redis-cluster ;;
  esac
}

member_exe() {
  case "$1" in
    etcd-*) echo etcd ;;
    zk-*) echo java ;;
    *) echo redis-server ;;
  esac
}

# the port clients use
member_port() {
  case "$1" in
    etcd-*) echo "${ETCD_CLIENT_PORTS[${1#etcd-} - 1]}" ;;
    zk-*) echo "${ZKC_CLIENT_PORTS[${1#zk-} - 1]}" ;;
    *) echo "${1##*-}" ;;
  esac
}

# ------------------------------------------------------------- probes ----

rcli() {
  local port=$1
  shift
  timeout 3 redis-cli -h "$HOST" -p "$port" "$@" 2>/dev/null </dev/null | tr -d '\r' || true
}

# field $3 of INFO section $2 on port $1
rinfo() { rcli "$1" info "$2" | sed -n "s/^$3://p"; }

redis_role() { rinfo "$1" replication role; }

# host:port of the primary Sentinel on port $1 names, or nothing
sentinel_primary() {
  local addr
  addr="$(rcli "$1" sentinel get-master-addr-by-name "$SENTINEL_MASTER" | paste -sd: -)"
  if [[ "$addr" =~ ^[0-9.]+:[0-9]+$ ]]; then echo "$addr"; fi
}

# send ZooKeeper four-letter word $2 to port $1, print the answer
zk4() {
  # shellcheck disable=SC2016 # the snippet expands its own positional parameters
  timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1" || exit 1; printf %s "$2" >&3; cat <&3' \
    "$HOST" "$1" "$2" 2>/dev/null || true
}

zk_mode() { zk4 "$1" srvr | sed -n 's/^Mode: //p'; }

etcd_health() { curl -sS --max-time 3 "http://$HOST:$1/health" 2>/dev/null || true; }

etcdctl_c() {
  ETCDCTL_API=3 timeout 10 etcdctl --dial-timeout=2s --command-timeout=4s "$@" 2>&1 </dev/null
}

etcd_endpoints() {
  local p urls=()
  for p in "${ETCD_CLIENT_PORTS[@]}"; do urls+=("http://$HOST:$p"); done
  (
    IFS=,
    echo "${urls[*]}"
  )
}

# does member $1 answer its protocol on port $2 at all (healthy or not)?
member_probe() {
  case "$1" in
    etcd-*) [[ "$(etcd_health "$2")" == *'"health"'* ]] ;;
    zk-*) [[ "$(zk4 "$2" ruok)" == imok ]] ;;
    *) redis_up "$2" ;;
  esac
}

proc_state() { sed -E 's/^.*\) ([A-Za-z]).*$/\1/' "/proc/$1/stat" 2>/dev/null || true; }

# member_state NAME EXE PORT OTHER-PORTS...: sets M_STATE to up (answers),
# running (our process, not answering yet), stopped (our process, SIGSTOPped),
# taken (a port is held by something else: M_TAKEN) or down; M_PID to our pid.
member_state() {
  local name=$1 exe=$2 port=$3 p
  shift 3
  M_PID="$(our_pid "cluster/$name" "$exe")"
  M_TAKEN=""
  if [[ -n "$M_PID" ]]; then
    case "$(proc_state "$M_PID")" in
      T | t) M_STATE=stopped ;;
      *) if member_probe "$name" "$port"; then M_STATE=up; else M_STATE=running; fi ;;
    esac
    return 0
  fi
  if member_probe "$name" "$port"; then
    M_STATE=up
    return 0
  fi
  M_STATE=down
  for p in "$port" "$@"; do
    if port_open "$p"; then
      M_STATE=taken
      M_TAKEN=$p
      return 0
    fi
  done
}

# can member $1, down, rejoin its group from its own saved state?
member_restartable() {
  case "$1" in
    etcd-*) [[ -d "$CDATA/$1/member/wal" ]] ;;
    zk-*) [[ -f "$CDATA/$1/myid" ]] ;;
    node-*) [[ -s "$CDIR/$1/nodes.conf" ]] ;;
    *) return 0 ;; # Sentinel group: started afresh, told the current primary
  esac
}

# ------------------------------------------------------------ readiness ----

etcd_ready() {
  local i port body out n
  for i in 0 1 2; do
    port=${ETCD_CLIENT_PORTS[i]}
    body="$(etcd_health "$port")"
    if [[ "$body" != *'"health":"true"'* ]]; then
      nr "etcd-$((i + 1))" "http://$HOST:$port/health answers '${body:-nothing}'"
      return 1
    fi
  done
  if ! out="$(etcdctl_c --endpoints="$(etcd_endpoints)" endpoint health --cluster)"; then
    nr etcd-1 "etcdctl endpoint health --cluster: $(tail -n 1 <<<"$out")"
    return 1
  fi
  n="$(grep -c 'is healthy' <<<"$out" || true)"
  if ((n != 3)); then
    nr etcd-1 "etcdctl endpoint health --cluster lists $n healthy members, not 3"
    return 1
  fi
}

zk_ready() {
  local i port mode leaders=0
  for i in 0 1 2; do
    port=${ZKC_CLIENT_PORTS[i]}
    mode="$(zk_mode "$port")"
    case "$mode" in
      leader) leaders=$((leaders + 1)) ;;
      follower) ;;
      *)
        nr "zk-$((i + 1))" "srvr on $HOST:$port reports mode '${mode:-none}', not leader/follower"
        return 1
        ;;
    esac
  done
  if ((leaders != 1)); then
    nr zk-1 "$leaders leaders among the three servers"
    return 1
  fi
}

sentinel_ready() {
  local p s addr primary="" first="" pport ck n
  for p in "${SENTINEL_DATA_PORTS[@]}"; do
    if ! redis_up "$p"; then
      nr "redis-$p" "no PONG on $HOST:$p"
      return 1
    fi
  done
  for s in "${SENTINEL_PORTS[@]}"; do
    addr="$(sentinel_primary "$s")"
    if [[ -z "$addr" ]]; then
      nr "sentinel-$s" "no answer to SENTINEL get-master-addr-by-name $SENTINEL_MASTER on $HOST:$s"
      return 1
    fi
    if [[ -n "$primary" && "$addr" != "$primary" ]]; then
      nr "sentinel-$s" "names $addr as primary, sentinel-$first names $primary"
      return 1
    fi
    primary=$addr
    first=${first:-$s}
  done
  pport=${primary##*:}
  if [[ "$(redis_role "$pport")" != master ]]; then
    nr "redis-$pport" "the Sentinels name it primary but it reports role:$(redis_role "$pport")"
    return 1
  fi
  for p in "${SENTINEL_DATA_PORTS[@]}"; do
    [[ "$p" == "$pport" ]] && continue
    if [[ "$(redis_role "$p")" != slave || "$(rinfo "$p" replication master_port)" != "$pport" ||
      "$(rinfo "$p" replication master_link_status)" != up ]]; then
      nr "redis-$p" "not (yet) a replica of $primary with its link up"
      return 1
    fi
  done
  for s in "${SENTINEL_PORTS[@]}"; do
    ck="$(rcli "$s" sentinel ckquorum "$SENTINEL_MASTER")"
    if [[ "$ck" != "OK 3 usable"* ]]; then
      nr "sentinel-$s" "SENTINEL CKQUORUM: ${ck:-no answer}"
      return 1
    fi
    n="$(rcli "$s" sentinel replicas "$SENTINEL_MASTER" |
      awk 'prev == "flags" && $0 == "slave" { n++ } { prev = $0 } END { print n + 0 }')"
    if ((n != ${#SENTINEL_DATA_PORTS[@]} - 1)); then
      nr "sentinel-$s" "knows $n healthy replicas, not $((${#SENTINEL_DATA_PORTS[@]} - 1))"
      return 1
    fi
  done
}

rcluster_create() {
  local p addrs=()
  for p in "${RCLUSTER_PORTS[@]}"; do addrs+=("$HOST:$p"); done
  cnote "redis-cluster: creating it (redis-cli --cluster create ... --cluster-replicas 1)"
  if ! timeout 120 redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes \
    >"$CDIR/cluster-create.log" 2>&1 </dev/null; then
    fail_member redis-cluster "node-${RCLUSTER_PORTS[0]}" "redis-cli --cluster create failed" \
      "$CDIR/cluster-create.log"
  fi
  ACTIONS+=("created the Redis Cluster")
}

rcluster_ready() {
  local p s info state known size nodes bad
  for p in "${RCLUSTER_PORTS[@]}"; do
    if ! redis_up "$p"; then
      nr "node-$p" "no PONG on $HOST:$p"
      return 1
    fi
  done
  if ((CL_NEED_CREATE)); then
    rcluster_create
    CL_NEED_CREATE=0
  fi
  for p in "${RCLUSTER_PORTS[@]}"; do
    info="$(rcli "$p" cluster info)"
    state="$(sed -n 's/^cluster_state://p' <<<"$info")"
    known="$(sed -n 's/^cluster_known_nodes://p' <<<"$info")"
    size="$(sed -n 's/^cluster_size://p' <<<"$info")"
    if [[ "$state" != ok || "$known" != "${#RCLUSTER_PORTS[@]}" || "$size" != 3 ]]; then
      nr "node-$p" "cluster_state:${state:-?} cluster_known_nodes:${known:-?} cluster_size:${size:-?}"
      return 1
    fi
  done
  nodes="$(rcli "${RCLUSTER_PORTS[0]}" cluster nodes)"
  # every node connected, none failing; 3 primaries serving slots, 3 replicas
  bad="$(awk '{ port = $2; sub(/@.*/, "", port); sub(/.*:/, "", port) }
    $3 ~ /fail|noaddr|handshake/ || $8 != "connected" { print port " (" $3 ", " $8 ")"; bad = 1; exit }
    $3 ~ /master/ && NF >= 9 { m++ } $3 ~ /slave/ { s++ }
    END { if (!bad && (m != 3 || s != 3)) print "-" m "-" s }' <<<"$nodes")"
  if [[ "$bad" == -* ]]; then
    IFS=- read -r _ p s <<<"$bad"
    nr "node-${RCLUSTER_PORTS[0]}" "CLUSTER NODES shows ${p:-0} primaries with slots and ${s:-0} replicas, not 3 and 3"
    return 1
  elif [[ -n "$bad" ]]; then
    nr "node-${bad%% *}" "CLUSTER NODES on ${RCLUSTER_PORTS[0]} shows node ${bad}"
    return 1
  fi
  for p in "${RCLUSTER_PORTS[@]}"; do
    if [[ "$(redis_role "$p")" == slave && "$(rinfo "$p" replication master_link_status)" != up ]]; then
      nr "node-$p" "replica whose link to its primary is not up"
      return 1
    fi
  done
}

group_ready() {
  NR_MEMBER=""
  NR_WHY=""
  case "$1" in
    etcd) etcd_ready ;;
    zookeeper) zk_ready ;;
    sentinel) sentinel_ready ;;
    redis-cluster) rcluster_ready ;;
  esac
}

# fail_member GROUP NAME WHY [LOG]: report, show the tail of the log, exit 1
fail_member() {
  local group=$1 name=$2 why=$3 log=${4:-$CDIR/$2.log}
  {
    printf 'cluster: ERROR: %s: %s %s\n' "$group" "$name" "$why"
    if [[ -f "$log" ]]; then
      printf -- '---- last lines of %s ----\n' "$log"
      tail -n 40 "$log"
      printf -- '----\n'
    fi
  } >&2
  exit 1
}

# wait_group GROUP DEADLINE: until the group is ready; fail with the member
# that is not ready (or that exited) and its log
wait_group() {
  local group=$1 deadline=$2 name
  while ! group_ready "$group"; do
    for name in "${LAUNCHED[@]}"; do
      [[ "$(member_group "$name")" == "$group" ]] || continue
      if [[ -z "$(spawned_pid "cluster/$name")" ]] && ! member_probe "$name" "$(member_port "$name")"; then
        fail_member "$group" "$name" "exited without coming up"
      fi
    done
    if ((SECONDS >= deadline)); then
      fail_member "$group" "${NR_MEMBER:-?}" \
        "not ready within ${CLUSTER_TIMEOUT}s: ${NR_WHY:-no reason recorded}"
    fi
    sleep 0.5
  done
}

# ------------------------------------------------------------- launch ----

launch_etcd_member() {
  local name=$1 i=$((${1#etcd-} - 1)) base="$CDIR/$1" envs=() ua initial="" j
  for j in 0 1 2; do
    initial+="${initial:+,}etcd-$((j + 1))=http://$HOST:${ETCD_PEER_PORTS[j]}"
  done
  mkdir -p "$base"
  ua="$(etcd_unsupported_arch)"
  if [[ -n "$ua" ]]; then envs+=(env "ETCD_UNSUPPORTED_ARCH=$ua"); fi
  # with a data dir from an earlier run, etcd ignores the --initial-* flags and
  # rejoins as the member it was
  as_member "$name"
  spawn "cluster/$name" "${envs[@]}" "${AS_MEMBER[@]}" etcd \
    --name "$name" \
    --data-dir "$CDATA/$name" \
    --listen-client-urls "http://$HOST:${ETCD_CLIENT_PORTS[i]}" \
    --advertise-client-urls "http://$HOST:${ETCD_CLIENT_PORTS[i]}" \
    --listen-peer-urls "http://$HOST:${ETCD_PEER_PORTS[i]}" \
    --initial-advertise-peer-urls "http://$HOST:${ETCD_PEER_PORTS[i]}" \
    --initial-cluster "$initial" \
    --initial-cluster-state new \
    --initial-cluster-token distlock-cluster-test \
    --pre-vote \
    --logger zap --log-outputs stderr
}

launch_zk_member() {
  local name=$1 id=${1#zk-} base="$CDIR/$1" java cp j
  mkdir -p "$CDATA/$name" "$base/conf"
  [[ -f "$CDATA/$name/myid" ]] || echo "$id" >"$CDATA/$name/myid"
  {
    cat <<EOF
# generated by distlock scripts/services.sh cluster
tickTime=500
initLimit=20
syncLimit=3
dataDir=$CDATA/$name
clientPort=${ZKC_CLIENT_PORTS[id - 1]}
clientPortAddress=$HOST
maxClientCnxns=0
minSessionTimeout=1000
maxSessionTimeout=300000
4lw.commands.whitelist=*
admin.enableServer=false
reconfigEnabled=false
EOF
    for j in 0 1 2; do
      echo "server.$((j + 1))=$HOST:${ZKC_QUORUM_PORTS[j]}:${ZKC_ELECTION_PORTS[j]}"
    done
  } >"$base/conf/zoo.cfg"
  java="java"
  [[ -n "${JAVA_HOME:-}" && -x "${JAVA_HOME}/bin/java" ]] && java="$JAVA_HOME/bin/java"
  cp="$base/conf:$ZK_JAR"
  if [[ -f /usr/share/java/slf4j-simple.jar ]]; then cp+=":/usr/share/java/slf4j-simple.jar"; fi
  as_member "$name"
  spawn "cluster/$name" "${AS_MEMBER[@]}" "$java" \
    -Xms32m -Xmx256m -XX:+UseSerialGC \
    -Djava.net.preferIPv4Stack=true \
    -Dzookeeper.admin.enableServer=false \
    -Dzookeeper.4lw.commands.whitelist='*' \
    -Dorg.slf4j.simpleLogger.defaultLogLevel=info \
    -Dorg.slf4j.simpleLogger.showDateTime=true \
    -Dorg.slf4j.simpleLogger.dateTimeFormat='yyyy-MM-dd HH:mm:ss.SSS' \
    -cp "$cp" \
    org.apache.zookeeper.server.quorum.QuorumPeerMain "$base/conf/zoo.cfg"
}

# a Redis server of the Sentinel group on port $1, a replica unless $1 is the
# primary's port $2
launch_sentinel_data() {
  local port=$1 primary=$2 base="$CDIR/redis-$1" args
  rm -rf "$base"
  mkdir -p "$base"
  args=(
    --bind "$HOST" --port "$port"
    --save '' --appendonly no --dir "$base"
    --daemonize no --supervised no --pidfile '' --logfile ''
    --protected-mode yes
    --repl-diskless-sync yes --repl-diskless-sync-delay 0
  )
  if [[ "$port" != "$primary" ]]; then args+=(--replicaof "$HOST" "$primary"); fi
  spawn "cluster/redis-$port" redis-server "${args[@]}"
}

# a Sentinel on port $1 watching the primary on port $2; always a fresh
# config: Sentinel rewrites it, and an old one may name an old primary
launch_sentinel() {
  local port=$1 primary=$2 base="$CDIR/sentinel-$1"
  rm -rf "$base"
  mkdir -p "$base"
  cat >"$base/sentinel.conf" <<EOF
# generated by distlock scripts/services.sh cluster; Sentinel rewrites it
bind $HOST
port $port
daemonize no
pidfile ""
logfile ""
dir $base
sentinel resolve-hostnames no
sentinel monitor $SENTINEL_MASTER $HOST $primary 2
sentinel down-after-milliseconds $SENTINEL_MASTER 1000
sentinel failover-timeout $SENTINEL_MASTER 3000
sentinel parallel-syncs $SENTINEL_MASTER 1
EOF
  spawn "cluster/sentinel-$port" redis-server "$base/sentinel.conf" --sentinel
}

# a Redis Cluster node on port $1; with a nodes.conf from an earlier run it
# rejoins as the node it was. Replica validity factor 0: a replica always
# tries to fail over, however long its primary was gone (fault tests).
launch_cluster_node() {
  local port=$1 base="$CDIR/node-$1"
  mkdir -p "$base"
  spawn "cluster/node-$port" redis-server \
    --bind "$HOST" --port "$port" \
    --cluster-enabled yes \
    --cluster-config-file "$base/nodes.conf" \
    --cluster-node-timeout 1000 \
    --cluster-replica-validity-factor 0 \
    --save '' --appendonly no --dir "$base" \
    --daemonize no --supervised no --pidfile '' --logfile '' \
    --protected-mode yes \
    --repl-diskless-sync yes --repl-diskless-sync-delay 0
}

launch_member() {
  local name=$1
  case "$name" in
    etcd-*) launch_etcd_member "$name" ;;
    zk-*) launch_zk_member "$name" ;;
    redis-*) launch_sentinel_data "${name#redis-}" "$SENTINEL_PRIMARY" ;;
    sentinel-*) launch_sentinel "${name#sentinel-}" "$SENTINEL_PRIMARY" ;;
    node-*) launch_cluster_node "${name#node-}" ;;
  esac
  LAUNCHED+=("$name")
}

# ---------------------------------------------------------- stop / wipe ----

pid_alive() {
  local state
  state="$(proc_state "$1")"
  [[ -n "$state" && "$state" != Z && "$state" != X ]]
}

# SIGTERM the given members this script started (SIGCONT too, in case one is
# stopped), wait for them, SIGKILL those still there after 30s
stop_members() {
  local name pid i deadline pids=() names=() shown=()
  for name in "$@"; do
    pid="$(our_pid "cluster/$name" "$(member_exe "$name")")"
    [[ -n "$pid" ]] || continue
    kill -TERM "$pid" 2>/dev/null || true
    kill -CONT "$pid" 2>/dev/null || true
    pids+=("$pid")
    names+=("$name")
    shown+=("$name($pid)")
  done
  ((${#pids[@]})) || return 0
  cnote "stopping ${shown[*]}"
  deadline=$((SECONDS + 30))
  for i in "${!pids[@]}"; do
    while pid_alive "${pids[i]}" && ((SECONDS < deadline)); do sleep 0.1; done
    if pid_alive "${pids[i]}"; then
      warn "${names[i]} (pid ${pids[i]}) ignored SIGTERM for 30s, killing it"
      kill -KILL "${pids[i]}" 2>/dev/null || true
    fi
    rm -f "$CDIR/${names[i]}.pid"
  done
}

# print the ports of group $1's members that are still open after up to 15s
busy_ports() {
  local line name exe port extra p deadline=$((SECONDS + 15))
  local lines
  mapfile -t lines < <(group_members "$1")
  for line in "${lines[@]}"; do
    read -r name exe port extra <<<"$line"
    # shellcheck disable=SC2086 # $extra: the member's other ports, split on purpose
    for p in $port $extra; do
      while port_open "$p" && ((SECONDS < deadline)); do sleep 0.2; done
      if port_open "$p"; then echo "$p"; fi
    done
  done
}

# remove the data and config of group $1's members (not their logs)
wipe_group() {
  local line name lines
  mapfile -t lines < <(group_members "$1")
  for line in "${lines[@]}"; do
    name=${line%% *}
    rm -rf "${CDIR:?}/$name" "$CDIR/$name.pid" "${CDATA:?}/$name"
  done
  if [[ "$1" == redis-cluster ]]; then rm -f "$CDIR/cluster-create.log"; fi
}

# ---------------------------------------------------------------- start ----

# start every member of group $1 from nothing
fresh_group() {
  local group=$1 line lines
  wipe_group "$group"
  if [[ "$group" == sentinel ]]; then SENTINEL_PRIMARY=${SENTINEL_DATA_PORTS[0]}; fi
  mapfile -t lines < <(group_members "$group")
  for line in "${lines[@]}"; do launch_member "${line%% *}"; done
  if [[ "$group" == redis-cluster ]]; then CL_NEED_CREATE=1; fi
  cnote "$group: starting ${#lines[@]} members from nothing"
}

# stop what runs of group $1, then start it from nothing
restart_group() {
  local group=$1 line lines names=() busy
  mapfile -t lines < <(group_members "$group")
  for line in "${lines[@]}"; do names+=("${line%% *}"); done
  stop_members "${names[@]}"
  busy="$(busy_ports "$group" | paste -sd' ' -)"
  if [[ -n "$busy" ]]; then
    for line in $busy; do describe_port "$line"; done
    die "cannot restart $group: ports $busy are held by processes this script did not start"
  fi
  fresh_group "$group"
}

# the port of the primary the Sentinel group's restarted members should
# follow, in SENTINEL_PRIMARY: the one the Sentinels name, once it answers as
# a primary (a failover may be under way: wait up to 20s for one), or, with
# no Sentinel answering, the only data node that is a primary
find_sentinel_primary() {
  local deadline=$((SECONDS + 20)) s p addr asked masters
  while :; do
    asked=0
    for s in "${SENTINEL_PORTS[@]}"; do
      addr="$(sentinel_primary "$s")"
      [[ -n "$addr" ]] || continue
      asked=1
      if [[ "$(redis_role "${addr##*:}")" == master ]]; then
        SENTINEL_PRIMARY=${addr##*:}
        return 0
      fi
    done
    if ((asked == 0)); then
      masters=()
      for p in "${SENTINEL_DATA_PORTS[@]}"; do
        if [[ "$(redis_role "$p")" == master ]]; then masters+=("$p"); fi
      done
      if ((${#masters[@]} == 1)); then
        SENTINEL_PRIMARY=${masters[0]}
        return 0
      fi
      return 1
    fi
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
}

# do the Redis Cluster nodes that answer form a cluster? Prints yes (every
# one knows other nodes), no (all six answer, none knows another: they wait
# for `--cluster create`) or mixed (anything else: some know no other node).
rcluster_formed() {
  local p known fresh=0 formed=0
  for p in "${RCLUSTER_PORTS[@]}"; do
    redis_up "$p" || continue
    known="$(rcli "$p" cluster info | sed -n 's/^cluster_known_nodes://p')"
    if [[ "$known" == 1 ]]; then fresh=$((fresh + 1)); else formed=$((formed + 1)); fi
  done
  if ((fresh == 0)); then
    echo yes
  elif ((formed == 0 && fresh == ${#RCLUSTER_PORTS[@]})); then
    echo no
  else
    echo mixed
  fi
}

start_group() {
  local group=$1 line lines name exe port extra alive=0 down=() total=0
  mapfile -t lines < <(group_members "$group")
  for line in "${lines[@]}"; do
    read -r name exe port extra <<<"$line"
    total=$((total + 1))
    # shellcheck disable=SC2086 # $extra: the member's other ports, split on purpose
    member_state "$name" "$exe" "$port" $extra
    case "$M_STATE" in
      up) alive=$((alive + 1)) ;;
      running)
        alive=$((alive + 1))
        cnote "$group: $name (pid $M_PID) runs but does not answer yet, waiting for it"
        ;;
      stopped)
        kill -CONT "$M_PID" 2>/dev/null || true
        alive=$((alive + 1))
        cnote "$group: $name (pid $M_PID) was stopped (SIGSTOP), sent it SIGCONT"
        ACTIONS+=("resumed $name")
        ;;
      taken)
        describe_port "$M_TAKEN"
        die "port $M_TAKEN of $group member $name is taken by something that is not $name"
        ;;
      down) down+=("$name") ;;
    esac
  done

  if ((alive == 0)); then
    fresh_group "$group"
    return 0
  fi
  if [[ "$group" == redis-cluster ]]; then
    case "$(rcluster_formed)" in
      no)
        CL_NEED_CREATE=1
        cnote "$group: all $total nodes run but form no cluster yet"
        return 0
        ;;
      mixed)
        cnote "$group: some running nodes are in no cluster; restarting $group from nothing"
        restart_group "$group"
        return 0
        ;;
    esac
  fi
  if ((${#down[@]} == 0)); then
    if group_ready "$group"; then
      cnote "$group: all $total members already up and ready, left alone"
    else
      cnote "$group: all $total members running, not ready yet ($NR_MEMBER: $NR_WHY); waiting"
    fi
    return 0
  fi
  for name in "${down[@]}"; do
    if ! member_restartable "$name"; then
      cnote "$group: $name is down and has no state to rejoin from; restarting $group from nothing"
      restart_group "$group"
      return 0
    fi
  done
  if [[ "$group" == sentinel ]]; then
    if ! find_sentinel_primary; then
      cnote "$group: no primary to rejoin (none answers as the Sentinels' primary); restarting $group from nothing"
      restart_group "$group"
      return 0
    fi
  fi
  if [[ "$group" == sentinel ]]; then
    cnote "$group: ${#down[@]} of $total members down, starting them to follow primary $HOST:$SENTINEL_PRIMARY: ${down[*]}"
  else
    cnote "$group: ${#down[@]} of $total members down, starting them to rejoin: ${down[*]}"
  fi
  for name in "${down[@]}"; do launch_member "$name"; done
}

cluster_lock() {
  mkdir -p "$CDIR"
  # fd 9, like services.sh's lock: spawn() closes it for the servers
  exec 9>"$DIR/cluster.lock"
  if command -v flock >/dev/null 2>&1; then
    flock -w 300 9 || die "could not lock $DIR/cluster.lock"
  fi
}

cluster_urls() {
  local p primary sentinels=() nodes=()
  for p in "${SENTINEL_PORTS[@]}"; do sentinels+=("$HOST:$p"); done
  for p in "${RCLUSTER_PORTS[@]}"; do nodes+=("$HOST:$p"); done
  primary="$(sentinel_primary "${SENTINEL_PORTS[0]}")"
  cat <<EOF
cluster: all up (state, logs and pid files in $CDIR):
  etcd://$HOST:${ETCD_CLIENT_PORTS[0]},$HOST:${ETCD_CLIENT_PORTS[1]},$HOST:${ETCD_CLIENT_PORTS[2]}
  zk://$HOST:${ZKC_CLIENT_PORTS[0]},$HOST:${ZKC_CLIENT_PORTS[1]},$HOST:${ZKC_CLIENT_PORTS[2]}
  Sentinels $(IFS=,; echo "${sentinels[*]}") (master name $SENTINEL_MASTER, primary now ${primary:-?})
  Redis Cluster $(IFS=,; echo "${nodes[*]}")
EOF
}

cluster_start() {
  local t0=$SECONDS group deadline
  PACKAGES+=(etcd-client) # etcdctl, for the cluster health checks only
  if [[ $EUID -eq 0 ]]; then PACKAGES+=(iptables); fi # cluster partition
  cmd_install
  command -v etcdctl >/dev/null 2>&1 || die "etcdctl not found after install"
  cluster_lock
  cluster_heal
  for group in "${CLUSTER_GROUPS[@]}"; do start_group "$group"; done
  deadline=$((SECONDS + CLUSTER_TIMEOUT))
  # the Redis Cluster first: it must be created as soon as its nodes answer;
  # the JVMs of ZooKeeper, slowest to start, last
  for group in redis-cluster sentinel etcd zookeeper; do
    wait_group "$group" "$deadline"
  done
  if ((${#LAUNCHED[@]})); then ACTIONS=("started ${LAUNCHED[*]}" "${ACTIONS[@]}"); fi
  if ((${#ACTIONS[@]})); then
    cnote "$(printf '%s; ' "${ACTIONS[@]}")everything ready in $((SECONDS - t0))s"
  else
    cnote "everything was already up and ready; nothing started"
  fi
  cluster_urls
}

# ----------------------------------------------------------------- stop ----

cluster_stop() {
  local group line lines names=() busy=() p
  cluster_lock
  cluster_heal
  for group in "${CLUSTER_GROUPS[@]}"; do
    mapfile -t lines < <(group_members "$group")
    for line in "${lines[@]}"; do names+=("${line%% *}"); done
  done
  stop_members "${names[@]}"
  for group in "${CLUSTER_GROUPS[@]}"; do
    mapfile -t -O "${#busy[@]}" busy < <(busy_ports "$group")
    wipe_group "$group"
  done
  if ((${#busy[@]})); then
    warn "ports ${busy[*]} are still in use by processes this script did not start:"
    for p in "${busy[@]}"; do describe_port "$p"; done
  else
    cnote "stopped; data removed (logs kept in $CDIR); every cluster port is free"
  fi
}

# --------------------------------------------------------------- status ----

# the role of member $1 on port $2, as the member itself reports it
member_role() {
  local name=$1 port=$2 out mp line id
  case "$name" in
    etcd-*)
      out="$(etcdctl_c --endpoints="http://$HOST:$port" endpoint status || true)"
      # http://127.0.0.1:23791, <id>, <version>, <db size>, <leader?>, <learner?>, <term>, ...
      awk -F', ' 'NF >= 7 { print ($5 == "true" ? "leader" : ($6 == "true" ? "learner" : "follower")) " (raft term " $7 ")" }' <<<"$out"
      ;;
    zk-*) zk_mode "$port" ;;
    redis-*)
      case "$(redis_role "$port")" in
        master) echo "primary, $(rinfo "$port" replication connected_slaves) replicas connected" ;;
        slave)
          echo "replica of :$(rinfo "$port" replication master_port) (link $(rinfo "$port" replication master_link_status))"
          ;;
      esac
      ;;
    sentinel-*)
      out="$(sentinel_primary "$port")"
      if [[ -n "$out" ]]; then echo "primary is $out"; fi
      ;;
    node-*)
      out="$(rcli "$port" cluster nodes)"
      line="$(grep -m1 ' myself' <<<"$out" || true)"
      case "$line" in
        *master*)
          echo "primary, slots $(awk '{ s = ""; for (i = 9; i <= NF; i++) s = s (s ? "," : "") $i; print s ? s : "none" }' <<<"$line")"
          ;;
        *slave*)
          id="$(awk '{ print $4 }' <<<"$line")"
          mp="$(awk -v id="$id" '$1 == id { p = $2; sub(/@.*/, "", p); sub(/.*:/, "", p); print p }' <<<"$out")"
          echo "replica of :${mp:-?}"
          ;;
      esac
      ;;
  esac
}

cluster_status() {
  local group line lines name exe port extra rc=0 summary role who
  for group in "${CLUSTER_GROUPS[@]}"; do
    if group_ready "$group"; then
      summary=ready
    else
      summary="NOT READY ($NR_MEMBER: $NR_WHY)"
      rc=1
    fi
    case "$group" in
      etcd) printf 'etcd, 3 members: %s\n' "$summary" ;;
      zookeeper) printf 'ZooKeeper ensemble, 3 servers: %s\n' "$summary" ;;
      sentinel) printf 'Redis Sentinel (master name %s): %s\n' "$SENTINEL_MASTER" "$summary" ;;
      redis-cluster) printf 'Redis Cluster, 6 nodes: %s\n' "$summary" ;;
    esac
    mapfile -t lines < <(group_members "$group")
    for line in "${lines[@]}"; do
      read -r name exe port extra <<<"$line"
      # shellcheck disable=SC2086 # $extra: the member's other ports, split on purpose
      member_state "$name" "$exe" "$port" $extra
      role=""
      if [[ "$M_STATE" == up ]]; then role="$(member_role "$name" "$port")"; fi
      who="${M_PID:+pid $M_PID}"
      [[ "$M_STATE" == up && -z "$M_PID" ]] && who="not started by this script"
      [[ "$M_STATE" == taken ]] && who="port $M_TAKEN held by something else"
      printf '  %-15s %-8s %s:%-5s %-40s %s\n' "$name" "$M_STATE" "$HOST" "$port" "${role:--}" "${who:+($who)}" |
        sed 's/ *$//'
    done
  done
  return "$rc"
}

# ------------------------------------------------------------- faults ----

# Partitions. As root, every etcd and ZooKeeper member runs as a system user
# of its own (distlock-etcd-2, ...), so that iptables can tell its packets
# apart on the one loopback interface: `cluster partition` drops everything
# the member sends (owner match) and everything sent to its ports, which
# cuts it off from clients and peers alike; `cluster heal` removes the rules.

PARTITION_TAG=distlock-partition

member_user() { echo "distlock-$1"; }

# Sets AS_MEMBER to the command prefix that runs member $1 as its own user
# (empty when not root: then the member cannot be partitioned).
as_member() {
  local user
  AS_MEMBER=()
  if [[ $EUID -ne 0 ]] || ! command -v setpriv >/dev/null 2>&1; then return 0; fi
  user="$(member_user "$1")"
  if ! id -u "$user" >/dev/null 2>&1; then
    useradd --system --no-create-home --shell /usr/sbin/nologin "$user" >/dev/null ||
      die "cannot create the system user $user for cluster member $1"
  fi
  mkdir -p "$CDATA/$1"
  # etcd creates missing parents 0700: the members' users must get through
  chmod 755 "$CDATA"
  chown -R "$user:" "$CDATA/$1"
  AS_MEMBER=(setpriv "--reuid=$user" "--regid=$(id -g "$user")" --clear-groups)
}

# every port of member $1, comma-separated
member_ports() {
  local name exe port extra
  while read -r name exe port extra; do
    if [[ "$name" == "$1" ]]; then
      echo "$port $extra" | tr -s ' ' ',' | sed 's/,$//'
      return 0
    fi
  done < <(group_members "$(member_group "$1")")
}

cluster_partition() {
  local name=${1:-} pid user
  [[ -n "$name" ]] || die "usage: cluster partition MEMBER (an etcd or ZooKeeper member)"
  case "$name" in
    etcd-[123] | zk-[123]) ;;
    *) die "cluster partition: '$name' is not an etcd or ZooKeeper member (only they run under users of their own)" ;;
  esac
  [[ $EUID -eq 0 ]] || die "cluster partition needs root (iptables)"
  command -v iptables >/dev/null 2>&1 || die "cluster partition needs iptables (bash scripts/services.sh cluster start installs it)"
  user="$(member_user "$name")"
  pid="$(cat "$CDIR/$name.pid" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] && pid_alive "$pid" ||
    die "cluster partition: $name is not running (no live pid in $CDIR/$name.pid)"
  [[ "$(stat -c %U "/proc/$pid")" == "$user" ]] ||
    die "cluster partition: $name runs as $(stat -c %U "/proc/$pid"), not $user: restart the clusters as root (cluster restart)"
  iptables -w -I INPUT -p tcp -m multiport --dports "$(member_ports "$name")" \
    -m comment --comment "$PARTITION_TAG $name" -j DROP
  iptables -w -I OUTPUT -m owner --uid-owner "$user" \
    -m comment --comment "$PARTITION_TAG $name" -j DROP
}

# removes the partition rules of member $1, or of every member
cluster_heal() {
  local name=${1:-} rule
  [[ $EUID -eq 0 ]] && command -v iptables >/dev/null 2>&1 || return 0
  while read -r rule; do
    [[ -n "$rule" ]] || continue
    eval "iptables -w ${rule/#-A/-D}"
  done < <(iptables -w -S | grep -F -- "$PARTITION_TAG ${name}" || true)
}

# The member that leads group $1 now: the etcd or ZooKeeper leader, the
# Sentinel primary, or (redis-cluster) the primary serving the slot of key
# $2. Prints its name; fails, saying why, when there is none.
cluster_leader() {
  local group=${1:-} key=${2:-} name exe port extra addr slot p
  case "$group" in
    etcd | zookeeper)
      while read -r name exe port extra; do
        case "$(member_role "$name" "$port")" in
          leader*) echo "$name" && return 0 ;;
        esac
      done < <(group_members "$group")
      die "cluster leader: no $group member reports itself leader now"
      ;;
    sentinel)
      for p in "${SENTINEL_PORTS[@]}"; do
        addr="$(sentinel_primary "$p")"
        if [[ -n "$addr" ]]; then echo "redis-${addr##*:}" && return 0; fi
      done
      die "cluster leader: no Sentinel names a primary for $SENTINEL_MASTER"
      ;;
    redis-cluster)
      [[ -n "$key" ]] || die "cluster leader redis-cluster needs a key: cluster leader redis-cluster KEY"
      for p in "${RCLUSTER_PORTS[@]}"; do
        slot="$(rcli "$p" cluster keyslot "$key")"
        [[ "$slot" =~ ^[0-9]+$ ]] || continue
        # CLUSTER NODES: id host:port@bus flags primary ping pong epoch link slot-ranges...
        addr="$(rcli "$p" cluster nodes | awk -v slot="$slot" '
          $3 ~ /master/ && $3 !~ /fail/ {
            for (i = 9; i <= NF; i++) {
              n = split($i, r, "-"); lo = r[1] + 0; hi = (n == 2 ? r[2] : r[1]) + 0
              if ($i !~ /^\[/ && lo <= slot && slot <= hi) { a = $2; sub(/@.*/, "", a); sub(/.*:/, "", a); print a; exit }
            }
          }')"
        if [[ "$addr" =~ ^[0-9]+$ ]]; then echo "node-$addr" && return 0; fi
      done
      die "cluster leader: no Redis Cluster node says who serves the slot of '$key'"
      ;;
    *) die "cluster leader: unknown group '$group' (use etcd, zookeeper, sentinel or redis-cluster)" ;;
  esac
}

# Sends signal $2 (KILL, STOP, CONT, TERM) to member $1, by its pid file:
# never by name, which would reach the single-node servers too.
cluster_signal() {
  local name=${1:-} signal=${2:-} pid
  [[ -n "$name" && -n "$signal" ]] || die "usage: cluster signal MEMBER KILL|STOP|CONT|TERM"
  case "$signal" in KILL | STOP | CONT | TERM) ;; *) die "cluster signal: unknown signal '$signal' (use KILL, STOP, CONT or TERM)" ;; esac
  [[ -n "$(member_group "$name")" ]] || die "cluster signal: unknown member '$name' (see cluster status)"
  pid="$(cat "$CDIR/$name.pid" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] && pid_alive "$pid" ||
    die "cluster signal: $name is not running (no live pid in $CDIR/$name.pid)"
  kill "-$signal" "$pid"
}

cmd_cluster() {
  case "${1:-start}" in
    start) cluster_start ;;
    leader) cluster_leader "${@:2}" ;;
    signal) cluster_signal "${@:2}" ;;
    partition) cluster_partition "${@:2}" ;;
    heal) cluster_heal "${@:2}" ;;
    stop) cluster_stop ;;
    restart)
      cluster_stop
      cluster_start
      ;;
    status) cluster_status ;;
    *) die "unknown cluster command '$1' (use cluster start, stop, restart, status, leader, signal, partition or heal)" ;;
  esac
}
