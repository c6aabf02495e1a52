#!/usr/bin/env bash
# Start a real SLURM cluster on this machine, for the tests and for trying dslm's SLURM scripts:
# slurmctld plus two slurmd "nodes" (dslm-n1, dslm-n2), each in its own network namespace on a
# private bridge, munge for auth. Needs root and Debian's slurmd slurmctld slurm-client munge.
#
#   sudo slurm/testcluster/start.sh        then: export SLURM_CONF=/var/tmp/dslm-testcluster/slurm.conf
#   sudo slurm/testcluster/stop.sh
#
# Settings (environment): DSLM_CLUSTER_DIR (state, logs, slurm.conf; default
# /var/tmp/dslm-testcluster), DSLM_CLUSTER_SUBNET (a /24 used only on the bridge; default 10.231.7).
set -euo pipefail

DIR=${DSLM_CLUSTER_DIR:-/var/tmp/dslm-testcluster}
SUBNET=${DSLM_CLUSTER_SUBNET:-10.231.7}
BRIDGE=dslmbr0
NODES=(dslm-n1 dslm-n2)
CPUS=$(nproc)
HOSTS_MARK="# dslm-testcluster"

die() { echo "testcluster: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (network namespaces, munge, slurmd)"
for tool in slurmctld slurmd munged sbatch ip nsenter; do
    command -v "$tool" >/dev/null || die "$tool not found: apt-get install slurmd slurmctld slurm-client munge iproute2"
done
if [ -e "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
    die "already running (state in $DIR); stop it with $(dirname "$0")/stop.sh"
fi

# a cluster that was never stopped (its container or test session killed) left its jobs in the saved
# state: they would come back as running and hold both nodes. Every start is a fresh cluster.
for pidfile in "$DIR"/slurmd-*.pid; do
    pid=$(cat "$pidfile" 2>/dev/null) || continue
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = slurmd ] && kill "$pid"
done
rm -rf "$DIR/ctld" "$DIR/spool"
mkdir -p "$DIR/ctld" "$DIR/spool"
cat > "$DIR/slurm.conf" <<CONF
ClusterName=dslmtest
SlurmctldHost=$(hostname)($SUBNET.1)
SlurmUser=root
AuthType=auth/munge
# a requeued job may start again once its credential expires (default 120 s): short, for the tests
AuthInfo=cred_expire=20
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
KillWait=10
$(for i in "${!NODES[@]}"; do echo "NodeName=${NODES[$i]} NodeAddr=$SUBNET.$((11 + i)) CPUs=$CPUS RealMemory=4000 State=UNKNOWN"; done)
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

# munge: the Debian package ships a key; the daemon runs as its own user
mkdir -p /run/munge && chown munge:munge /run/munge
pgrep -x munged >/dev/null || runuser -u munge -- munged

# a private bridge with one veth per node; each node's end lives in its own network namespace
ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
ip addr replace "$SUBNET.1/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
sed -i "/$HOSTS_MARK/d" /etc/hosts
for i in "${!NODES[@]}"; do
    node=${NODES[$i]} addr=$SUBNET.$((11 + i))
    ip netns list | grep -qw "$node" || ip netns add "$node"
    if ! ip link show "v$node" >/dev/null 2>&1; then
        ip link add "v$node" type veth peer name eth0 netns "$node"
    fi
    ip link set "v$node" master "$BRIDGE" up
    ip -n "$node" addr replace "$addr/24" dev eth0
    ip -n "$node" link set eth0 up
    ip -n "$node" link set lo up
    echo "$addr $node $HOSTS_MARK" >> /etc/hosts
done
echo "$SUBNET.1 $(hostname)-ctld $HOSTS_MARK" >> /etc/hosts

slurmctld -f "$DIR/slurm.conf"
for node in "${NODES[@]}"; do
    # nsenter, not `ip netns exec`: that remounts /sys, and slurmd then fails on cgroups
    SLURM_CONF=$DIR/slurm.conf nsenter --net="/var/run/netns/$node" slurmd -f "$DIR/slurm.conf" -N "$node"
done

export SLURM_CONF=$DIR/slurm.conf
for _ in $(seq 60); do
    idle=$(sinfo -h -o '%T %D' 2>/dev/null | awk '$1 == "idle" {n += $2} END {print n + 0}')
    [ "$idle" = "${#NODES[@]}" ] && { echo "testcluster: ${#NODES[@]} nodes idle; export SLURM_CONF=$SLURM_CONF"; exit 0; }
    sleep 1
done
sinfo >&2 || true
die "nodes did not come up: see $DIR/*.log"
