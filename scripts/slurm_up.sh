#!/bin/sh
# Bring up a single-node SLURM cluster on this machine (Debian/Ubuntu, root, no systemd needed):
# munge + slurmctld + slurmd, and (ACCOUNTING=1, the default) MariaDB + slurmdbd so that `sacct`
# works: submitit polls job states with sacct, and without it a job killed before writing its
# result (scancel, OOM, node failure) makes the launcher wait for ever.
#
#   sudo scripts/slurm_up.sh                 # start (packages must be installed)
#   sudo INSTALL=1 scripts/slurm_up.sh       # apt-get install what is missing first
#   sudo scripts/slurm_down.sh               # stop exactly the daemons this script started
#
# Environment: ACCOUNTING=0|1 (default 1), INSTALL=0|1 (default 0), SLURM_CPUS (default nproc;
# more than nproc oversubscribes the node), SLURM_PARTITION (default debug).
# The recipe and its pitfalls: SLURM.md of the project's shared notes; verified on Debian 12
# (Slurm 22.05). The pids of the daemons started here are listed in $STATE for slurm_down.sh.
set -eu
ACCOUNTING=${ACCOUNTING:-1}
INSTALL=${INSTALL:-0}
CPUS=${SLURM_CPUS:-$(nproc)}
PARTITION=${SLURM_PARTITION:-debug}
STATE=/run/pisa-slurm.started
[ "$(id -u)" = 0 ] || { echo "slurm_up.sh: must run as root" >&2; exit 1; }

# --- packages
need=""
for b in slurmctld slurmd munged sinfo; do
  command -v $b >/dev/null 2>&1 || [ -x /usr/sbin/$b ] || need="slurm-wlm munge"
done
if [ "$ACCOUNTING" = 1 ]; then
  [ -x /usr/sbin/slurmdbd ] || need="$need slurmdbd"
  [ -x /usr/sbin/mariadbd ] || need="$need mariadb-server"
fi
if [ -n "$need" ]; then
  if [ "$INSTALL" != 1 ]; then
    echo "slurm_up.sh: missing packages ($need); rerun with INSTALL=1" >&2; exit 1
  fi
  command -v apt-get >/dev/null 2>&1 || { echo "slurm_up.sh: no apt-get to install $need" >&2; exit 1; }
  apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge \
    $( [ "$ACCOUNTING" = 1 ] && echo slurmdbd mariadb-server ) >/dev/null
fi

started() { echo "$1 $2" >> "$STATE"; }   # name pid
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
waitfor() {  # waitfor <what> <command...>: poll up to 30 s
  what=$1; shift; i=0
  until "$@" >/dev/null 2>&1; do
    i=$((i+1)); [ $i -gt 120 ] && { echo "slurm_up.sh: $what not up" >&2; return 1; }; sleep 0.25
  done
}

# --- munge (the package's postinst creates the key; make one if missing)
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
fi
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then   # skip if a munged already answers
  mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
  runuser -u munge -- /usr/sbin/munged                       # forks; pid in /run/munge/munged.pid
  waitfor munged sh -c 'munge -n | unmunge'
  started munged "$(cat /run/munge/munged.pid)"
fi

# --- slurm.conf
MEM=$(( $(free -m | awk '/^Mem:/{print $2}') - 1024 ))
if [ "$ACCOUNTING" = 1 ]; then
  ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux"
else
  ACCT="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi
OVER=""
[ "$CPUS" -gt "$(nproc)" ] && OVER="SlurmdParameters=config_overrides"
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=ci
SlurmctldHost=localhost
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
$ACCT
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
$OVER
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

# --- accounting: MariaDB + slurmdbd
if [ "$ACCOUNTING" = 1 ]; then
  if ! mysqladmin ping >/dev/null 2>&1; then
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    nohup /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid \
      >/var/log/slurm/mariadb.log 2>&1 &
    waitfor mariadb mysqladmin ping
    started mariadbd "$(cat /run/mysqld/mysqld.pid)"
  fi
  mysql -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
  cat > /etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=/run/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
CONF
  chmod 600 /etc/slurm/slurmdbd.conf          # slurmdbd refuses a world-readable conf
  if ! alive "$(cat /run/slurmdbd.pid 2>/dev/null)"; then
    /usr/sbin/slurmdbd
    waitfor slurmdbd sacctmgr -n show cluster
    waitfor "slurmdbd pid file" test -s /run/slurmdbd.pid
    started slurmdbd "$(cat /run/slurmdbd.pid)"
  fi
fi

# --- controller + node daemon (both fork into the background)
if ! alive "$(cat /run/slurmctld.pid 2>/dev/null)"; then
  /usr/sbin/slurmctld
  waitfor "slurmctld pid file" test -s /run/slurmctld.pid
  started slurmctld "$(cat /run/slurmctld.pid)"
fi
if ! alive "$(cat /run/slurmd.pid 2>/dev/null)"; then
  /usr/sbin/slurmd -N localhost                 # -N: node name from slurm.conf, not the hostname
  waitfor "slurmd pid file" test -s /run/slurmd.pid
  started slurmd "$(cat /run/slurmd.pid)"
fi
waitfor "idle node" sh -c '[ "$(sinfo -h -N -o %t)" = idle ]' || { sinfo -N -l >&2; exit 1; }
if [ "$ACCOUNTING" = 1 ]; then   # slurmctld registers cluster 'ci' in the database by itself
  waitfor "cluster registration" sh -c 'sacctmgr -n -P show cluster format=cluster | grep -qx ci'
fi
sinfo
