#!/usr/bin/env bash
# Stop the cluster that start.sh started: daemons, namespaces, bridge, /etc/hosts lines. Jobs die.
set -uo pipefail

DIR=${DSLM_CLUSTER_DIR:-/var/tmp/dslm-testcluster}
NODES=(dslm-n1 dslm-n2)
[ "$(id -u)" = 0 ] || { echo "testcluster: needs root" >&2; exit 1; }
for pidfile in "$DIR"/slurmd-*.pid "$DIR"/slurmctld.pid; do
    [ -e "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null
done
sleep 1
for node in "${NODES[@]}"; do
    ip link del "v$node" 2>/dev/null
    ip netns del "$node" 2>/dev/null
done
ip link del dslmbr0 2>/dev/null
sed -i "/# dslm-testcluster/d" /etc/hosts
rm -rf "$DIR/ctld" "$DIR/spool"
echo "testcluster: stopped"
