#!/bin/sh
# Host discovery for Horovod elastic training (horovodrun --host-discovery-script).
# Prints the hosts that may run workers, one "HOST:SLOTS" per line, from the file
# named by $HOSTS_FILE (default: hosts.txt in the current directory). Edit that
# file while training runs to add or remove workers; horovodrun re-reads it every
# second. Lines starting with # are ignored.
hosts_file="${HOSTS_FILE:-hosts.txt}"
if [ ! -r "$hosts_file" ]; then
    echo "discover_hosts.sh: cannot read $hosts_file; write HOST:SLOTS lines there or set HOSTS_FILE" >&2
    exit 1
fi
grep -v '^[[:space:]]*\(#\|$\)' "$hosts_file"
