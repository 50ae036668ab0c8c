#!/usr/bin/env bash
# A real Slurm on this machine, for trying the templates (and for the tests):
# Debian's slurmctld + slurmd + munge, its own config and state in DIR, no
# systemd. Needs root (it installs the packages when missing).
#
#   slurm/local_cluster.sh start DIR   # one node, this machine; prints: export SLURM_CONF=DIR/slurm.conf
#   slurm/local_cluster.sh start DIR --hosts HOSTS_DIR
#                                      # one node per host of slurm/local_hosts.sh (a slurmd in each,
#                                      # slurmctld on the first); run sbatch there:
#                                      # slurm/local_hosts.sh exec HOSTS_DIR node1 -- sbatch ...
#   slurm/local_cluster.sh stop DIR    # stops the daemons it started (by PID)
set -euo pipefail
usage="usage: local_cluster.sh start DIR [--hosts HOSTS_DIR] | stop DIR"
action=${1:?$usage}
dir=$(realpath -m "${2:?$usage}")
hosts_dir=
if [ "${3:-}" = --hosts ]; then
    hosts_dir=$(realpath -m "${4:?$usage}")
fi
here=$(dirname "$(realpath "$0")")

stop() {
    local pid file pids=()
    for file in "$dir"/slurmd*.pid "$dir/slurmctld.pid" "$dir/munged.pid"; do
        if [ -f "$file" ]; then
            pid=$(cat "$file")
            kill "$pid" 2>/dev/null || true
            pids+=("$pid")
            rm -f "$file"
        fi
    done
    for pid in "${pids[@]}"; do  # all asked at once; then up to 5 s for each to go
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    done
    if [ -f "$dir/munge.dir" ]; then
        rm -rf "$(cat "$dir/munge.dir")" "$dir/munge.dir"
    fi
}

if [ "$action" = stop ]; then
    stop
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    echo "local_cluster.sh: needs root (installs Slurm and runs its daemons)" >&2
    exit 1
fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
   || ! command -v sbatch >/dev/null; then
    echo "installing Slurm and munge (Debian packages)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi

mkdir -p "$dir/state"
trap 'stop' ERR

# munge: a key, a private socket, run as user munge (in a directory of its own:
# DIR may sit inside a directory only root can enter).
munge_dir=$(mktemp -d /tmp/cnn-parallel-munge.XXXXXX)
echo "$munge_dir" >"$dir/munge.dir"
chmod 0755 "$munge_dir"
chown munge:munge "$munge_dir"
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
fi
socket="$munge_dir/munge.socket"
runuser -u munge -- /usr/sbin/munged --socket="$socket" --pid-file="$munge_dir/munged.pid" \
    --log-file="$munge_dir/munged.log" --seed-file="$munge_dir/munged.seed" --force
cp "$munge_dir/munged.pid" "$dir/munged.pid"

# On this machine, or on the hosts of slurm/local_hosts.sh (the daemons in their
# namespaces, reached at their cluster-network addresses; munge's socket is a file,
# so the one munged serves them all).
if [ -n "$hosts_dir" ]; then
    nodes=$(cat "$hosts_dir/hostnames")
    on() { local host=$1; shift; bash "$here/local_hosts.sh" exec "$hosts_dir" "$host" -- "$@"; }
    address() { awk -v host="$1" '$2 == host {print $1}' "$hosts_dir/hosts"; }
    node_local=/var/tmp  # each host's own (/tmp is shared: the PMIx plugin's step files would clash)
else
    nodes=$(hostname -s)
    on() { shift; "$@"; }
    address() { echo 127.0.0.1; }
    node_local=/tmp
fi
controller=${nodes%% *}
hardware=$(slurmd -C | head -1 | sed 's/^NodeName=[^ ]* //')
node_lines=""
for node in $nodes; do
    node_lines+="NodeName=$node NodeAddr=$(address "$node") $hardware State=UNKNOWN"$'\n'
done
cat >"$dir/slurm.conf" <<CONF
ClusterName=cnnlocal
SlurmctldHost=$controller($(address "$controller"))
SlurmUser=root
SlurmctldPort=${SLURMCTLD_PORT:-16817}
SlurmdPort=${SLURMD_PORT:-16818}
AuthType=auth/munge
AuthInfo=socket=$socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=pmix
MailProg=/bin/true
ReturnToService=2
SchedulerParameters=sched_interval=1
TmpFS=$node_local
${node_lines}PartitionName=local Nodes=${nodes// /,} Default=YES MaxTime=INFINITE State=UP
CONF

export SLURM_CONF="$dir/slurm.conf"
on "$controller" slurmctld -f "$SLURM_CONF"
for node in $nodes; do
    mkdir -p "$dir/spool-$node"
    on "$node" slurmd -f "$SLURM_CONF"
done
count=$(echo $nodes | wc -w)
idle() { on "$controller" sinfo -h -N -o %T 2>/dev/null | grep -c '^idle$' || true; }
for _ in $(seq 150); do
    [ "$(idle)" = "$count" ] && break
    sleep 0.2
done
if [ "$(idle)" != "$count" ]; then
    echo "local_cluster.sh: $(idle) of $count node(s) idle; see $dir/slurmctld.log and $dir/slurmd-*.log" >&2
    stop
    exit 1
fi
echo "export SLURM_CONF=$SLURM_CONF"
