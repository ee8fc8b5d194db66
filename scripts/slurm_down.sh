#!/bin/sh
# Stop the single-node SLURM cluster of slurm_up.sh: only the daemons it started (listed in
# /run/pisa-slurm.started), by pid; daemons that were already running are left alone.
#   sudo scripts/slurm_down.sh
STATE=/run/pisa-slurm.started
[ -s "$STATE" ] || { echo "slurm_down.sh: nothing started by slurm_up.sh"; exit 0; }
pid_of() { awk -v n="$1" '$1 == n {print $2}' "$STATE" | sort -u; }
waitpid() {   # up to 20 s
  for _ in $(seq 80); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.25; done
  echo "slurm_down.sh: pid $1 still alive" >&2; return 1
}
P_D=$(pid_of slurmd); P_C=$(pid_of slurmctld)
P_DBD=$(pid_of slurmdbd); P_DB=$(pid_of mariadbd); P_M=$(pid_of munged)
# slurmctld and slurmd first: `scontrol shutdown` asks both to exit (state saved)
if [ -n "$P_C" ] && kill -0 "$P_C" 2>/dev/null; then
  scontrol shutdown >/dev/null 2>&1 || kill "$P_C"
fi
[ -n "$P_D" ] && kill -0 "$P_D" 2>/dev/null && [ -z "$P_C" ] && kill "$P_D"
rc=0
for p in $P_D $P_C; do waitpid "$p" || { kill -9 "$p" 2>/dev/null; rc=1; }; done
for p in $P_DBD $P_DB $P_M; do
  kill "$p" 2>/dev/null && { waitpid "$p" || { kill -9 "$p" 2>/dev/null; rc=1; }; }
done
rm -f "$STATE"
exit $rc
