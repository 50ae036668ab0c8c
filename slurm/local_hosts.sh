#!/usr/bin/env bash
# Hosts on this machine for trying multi-node launches (and for the tests):
# each host is a Linux network namespace with its own hostname (a UTS
# namespace), an sshd, a hosts file and an ssh client config, so that
# `horovodrun -H`, `mpirun --hostfile` and Slurm reach it the way they reach a
# real node. Needs root (installs openssh-server when missing).
#
#   slurm/local_hosts.sh start N DIR     # hosts node1..nodeN; state and keys in DIR
#   slurm/local_hosts.sh exec DIR HOST [--] COMMAND...   # run COMMAND on HOST
#   slurm/local_hosts.sh kill DIR HOST   # every process on HOST, at once (a lost node)
#   slurm/local_hosts.sh revive DIR HOST # its sshd again (the node is back)
#   slurm/local_hosts.sh stop DIR        # remove every namespace, link and process it made
#
# Per host: eth1, on a bridge, the cluster network (10.213.0.K/24; the addresses
# exist only inside the namespaces: the bridge has none, so traffic goes only to
# these hosts); eth2, a link that leads nowhere (10.214.0.K/24, its peer is on no
# bridge), for trying interface selection: traffic sent over it never arrives.
# DIR/hostfile lists the hosts for mpirun (`node1 slots=2`); on the hosts, /etc/hosts
# names them all and ssh logs in with DIR's key (files bound over /etc's there only).
set -euo pipefail
usage="usage: local_hosts.sh start N DIR | exec DIR HOST [--] COMMAND... | kill DIR HOST | revive DIR HOST | stop DIR"
action=${1:?$usage}
shift

prefix_for() {  # short, unique per DIR: interface names are at most 15 characters
    echo "cn$(printf %s "$1" | md5sum | cut -c1-4)"
}

netns_of() { echo "$(prefix_for "$dir")-$1"; }

host_processes() {  # PIDs whose network namespace is HOST's
    local netns target pid
    netns=$(netns_of "$1")
    target=$(stat -L -c %i "/run/netns/$netns" 2>/dev/null) || return 0
    for pid in /proc/[0-9]*; do
        pid=${pid#/proc/}
        [ "$pid" = $$ ] && continue
        [ "$(stat -L -c %i "/proc/$pid/ns/net" 2>/dev/null)" = "$target" ] && echo "$pid"
    done
    return 0
}

start_sshd() {  # HOST: sshd in HOST's namespaces; its PID is the handle `exec` enters by
    local host=$1 netns
    netns=$(netns_of "$host")
    # HOST's network; a mount namespace of its own with DIR's hosts file and ssh client
    # config bound over /etc's (nothing in /etc changes) and a /var/tmp of its own (a
    # node-local disk: Slurm's PMIx plugin keeps per-step files there); its hostname
    # (UTS). Each step execs, so $! is sshd's PID; every login (and rank) inherits all.
    setsid nsenter --net="/run/netns/$netns" unshare --mount --uts --propagation private sh -c \
        "mount --bind '$dir/hosts-$host' /etc/hosts && mount --bind '$dir/ssh_config' /etc/ssh/ssh_config \
         && mount --bind '$dir/var-tmp-$host' /var/tmp \
         && hostname $host && exec /usr/sbin/sshd -D -f '$dir/sshd-$host.conf' -E '$dir/sshd-$host.log'" \
        </dev/null >/dev/null 2>&1 &
    echo $! >"$dir/$host.pid"
    local _
    for _ in $(seq 100); do  # listening?
        ip netns exec "$netns" bash -c "exec 3<>/dev/tcp/127.0.0.1/22" 2>/dev/null && return 0
        sleep 0.05
    done
    echo "local_hosts.sh: sshd on $host did not start; see $dir/sshd-$host.log" >&2
    return 1
}

kill_host() {
    local pids
    pids=$(host_processes "$1")
    [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
    rm -f "$dir/$1.pid"
}

stop() {
    local host netns prefix
    [ -f "$dir/hostnames" ] || return 0
    prefix=$(prefix_for "$dir")
    for host in $(cat "$dir/hostnames"); do
        kill_host "$host"
        netns=$(netns_of "$host")
        ip netns del "$netns" 2>/dev/null || true
    done
    for link in $(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | grep "^$prefix-" || true); do
        ip link del "$link" 2>/dev/null || true
    done
    rm -f "$dir/hostnames"
}

case "$action" in
stop)
    dir=$(realpath -m "${1:?$usage}")
    stop
    exit 0
    ;;
exec)
    dir=$(realpath -m "${1:?$usage}")
    host=${2:?$usage}
    shift 2
    [ "${1:-}" = -- ] && shift
    pid=$(cat "$dir/$host.pid" 2>/dev/null) || { echo "local_hosts.sh: no host $host in $dir" >&2; exit 2; }
    exec nsenter -t "$pid" -n -u -m --wd="$PWD" -- "$@"
    ;;
kill)
    dir=$(realpath -m "${1:?$usage}")
    kill_host "${2:?$usage}"
    exit 0
    ;;
revive)
    dir=$(realpath -m "${1:?$usage}")
    start_sshd "${2:?$usage}"
    exit 0
    ;;
start) ;;
*)
    echo "$usage" >&2
    exit 2
    ;;
esac

count=${1:?$usage}
dir=$(realpath -m "${2:?$usage}")
if [ "$(id -u)" != 0 ]; then
    echo "local_hosts.sh: needs root (network namespaces, sshd)" >&2
    exit 1
fi
if [ ! -x /usr/sbin/sshd ] || ! command -v ssh-keygen >/dev/null || ! command -v ip >/dev/null; then
    echo "installing openssh-server, openssh-client and iproute2 (Debian packages)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        openssh-server openssh-client iproute2 >/dev/null
fi
mkdir -p "$dir" /run/sshd
stop  # a previous cluster in DIR
trap 'stop' ERR
prefix=$(prefix_for "$dir")
hosts=$(seq -f 'node%g' 1 "$count")
echo $hosts >"$dir/hostnames"
echo "$prefix" >"$dir/prefix"  # every namespace and link it makes is named $prefix-...

rm -f "$dir/key" "$dir/key.pub"
ssh-keygen -q -t ed25519 -N '' -C cnn-parallel-local-hosts -f "$dir/key"
cp "$dir/key.pub" "$dir/authorized_keys"
: >"$dir/hosts"
: >"$dir/hostfile"
for k in $(seq 1 "$count"); do
    echo "10.213.0.$k node$k" >>"$dir/hosts"
    echo "node$k slots=2" >>"$dir/hostfile"
done

cat >"$dir/ssh_config" <<CONF
Host *
    IdentityFile $dir/key
    UserKnownHostsFile /dev/null
    StrictHostKeyChecking no
    LogLevel ERROR
    ConnectTimeout 10
CONF

ip link add "$prefix-br" type bridge
ip link set "$prefix-br" up
k=0
for host in $hosts; do
    k=$((k + 1))
    netns=$(netns_of "$host")
    ip netns add "$netns"
    ip -n "$netns" link set lo up
    # eth1: the cluster network, through the bridge.
    ip link add "$prefix-${k}a" type veth peer name "$prefix-${k}x"
    ip link set "$prefix-${k}x" netns "$netns"
    ip -n "$netns" link set "$prefix-${k}x" name eth1
    ip -n "$netns" addr add "10.213.0.$k/24" dev eth1
    ip -n "$netns" link set eth1 up
    ip link set "$prefix-${k}a" master "$prefix-br"
    ip link set "$prefix-${k}a" up
    # eth2: up, addressed, routed, and connected to nothing.
    ip link add "$prefix-${k}b" type veth peer name "$prefix-${k}y"
    ip link set "$prefix-${k}y" netns "$netns"
    ip -n "$netns" link set "$prefix-${k}y" name eth2
    ip -n "$netns" addr add "10.214.0.$k/24" dev eth2
    ip -n "$netns" link set eth2 up
    ip link set "$prefix-${k}b" up

    mkdir -p "$dir/var-tmp-$host"
    chmod 1777 "$dir/var-tmp-$host"
    { echo "127.0.0.1 localhost"; echo "10.213.0.$k $host"; grep -v " $host\$" "$dir/hosts"; } >"$dir/hosts-$host"
    ssh-keygen -q -t ed25519 -N '' -f "$dir/host-key-$host" <<<y >/dev/null
    cat >"$dir/sshd-$host.conf" <<CONF
Port 22
ListenAddress 0.0.0.0
HostKey $dir/host-key-$host
AuthorizedKeysFile $dir/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile none
AcceptEnv *
PermitUserEnvironment no
MaxStartups 100
MaxSessions 100
CONF
    start_sshd "$host"
done
echo "hosts: $(echo $hosts) (run on one: slurm/local_hosts.sh exec $dir node1 -- COMMAND)"
