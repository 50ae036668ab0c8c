#!/usr/bin/env bash
# A real single-node Slurm on this machine, for trying the templates (and for
# the tests): Debian's slurmctld + slurmd + munge, its own config and state in
# DIR, no systemd. Needs root (it installs the packages when missing).
#
#   slurm/local_cluster.sh start DIR   # prints: export SLURM_CONF=DIR/slurm.conf
#   slurm/local_cluster.sh stop DIR    # stops the daemons it started (by PID)
set -euo pipefail
action=${1:?usage: local_cluster.sh start|stop DIR}
dir=$(realpath -m "${2:?usage: local_cluster.sh start|stop DIR}")

stop() {
    local pid
    for name in slurmd slurmctld munged; do
        if [ -f "$dir/$name.pid" ]; then
            pid=$(cat "$dir/$name.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            rm -f "$dir/$name.pid"
        fi
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

mkdir -p "$dir"/{state,spool}
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

host=$(hostname -s)
node=$(slurmd -C | head -1)
cat >"$dir/slurm.conf" <<CONF
ClusterName=cnnlocal
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmctldPort=${SLURMCTLD_PORT:-16817}
SlurmdPort=${SLURMD_PORT:-16818}
AuthType=auth/munge
AuthInfo=socket=$socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
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
$node State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF

export SLURM_CONF="$dir/slurm.conf"
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 100); do
    [ "$(sinfo -h -o %T 2>/dev/null | head -1)" = idle ] && break
    sleep 0.2
done
state=$(sinfo -h -o %T 2>/dev/null | head -1)
if [ "$state" != idle ]; then
    echo "local_cluster.sh: the node is '$state', not idle; see $dir/slurmctld.log and $dir/slurmd.log" >&2
    stop
    exit 1
fi
echo "export SLURM_CONF=$SLURM_CONF"
