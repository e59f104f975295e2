#!/usr/bin/env bash
# A one-node Slurm cluster for trying `qlaunch exec --matrix FILE --on slurm`, without systemd.
#
#   examples/slurm/one-node-cluster.sh start DIR    # munged, slurmctld, slurmd; state in DIR
#   export SLURM_CONF=DIR/slurm.conf                # what sbatch, squeue and qlaunch then use
#   qlaunch exec --matrix runs.toml --on slurm --junit out.xml -- ./test.sh
#   examples/slurm/one-node-cluster.sh stop DIR     # cancels what runs, stops all three
#
# Needs root and Debian's slurm-wlm and munge packages. This host (`hostname -s`) is the
# controller and the only node, with CPUS cores (default: all) and MEMORY_MB of RAM (default:
# all but 512 MiB). SLURMCTLD_PORT and SLURMD_PORT (default 6817 and 6818) move the daemons
# off Slurm's usual ports, so that this runs beside a real Slurm. munged runs as the munge
# user on a socket of its own, with the host's /etc/munge/munge.key.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() {
  echo "one-node-cluster: error: $*" >&2
  exit "${code:-1}"
}

usage() {
  echo "usage: $0 start|stop DIR" >&2
  exit 2
}

[ $# -eq 2 ] || usage
action=$1
dir=$2

start() {
  [ "$(id -u)" -eq 0 ] || die "slurmd and munged need root"
  for tool in munged slurmctld slurmd sinfo; do
    command -v "$tool" >/dev/null || code=3 die "$tool is not installed" \
      "(hint: apt-get install -y --no-install-recommends slurm-wlm munge)"
  done
  [ -r /etc/munge/munge.key ] || code=3 die "/etc/munge/munge.key is missing (hint: mungekey -c)"
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  [ -e "$dir/slurm.conf" ] && die "$dir already holds a cluster: stop it first"
  mkdir -p "$dir/ctld" "$dir/spool"

  # munged checks that its directories are the munge user's and that no one else may write
  # them; DIR (a test's temporary directory, say) may not even be reachable for that user.
  munge_dir=$(mktemp -d /tmp/qlaunch-munge.XXXXXX)
  echo "$munge_dir" >"$dir/munge.dir"
  chown munge:munge "$munge_dir"
  chmod 0755 "$munge_dir"
  if ! runuser -u munge -- munged \
    --socket="$munge_dir/munge.socket.2" \
    --pid-file="$munge_dir/munged.pid" \
    --log-file="$munge_dir/munged.log" \
    --seed-file="$munge_dir/munged.seed"; then
    cat "$munge_dir/munged.log" >&2 || true
    stop
    die "munged did not start"
  fi

  local host cpus mem
  host=$(hostname -s)
  cpus=${CPUS:-$(nproc)}
  mem=${MEMORY_MB:-$(($(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo) - 512))}
  sed -e "s|@HOST@|$host|g" \
      -e "s|@DIR@|$dir|g" \
      -e "s|@MUNGE_SOCKET@|$munge_dir/munge.socket.2|g" \
      -e "s|@CTLD_PORT@|${SLURMCTLD_PORT:-6817}|g" \
      -e "s|@SLURMD_PORT@|${SLURMD_PORT:-6818}|g" \
      -e "s|@CPUS@|$cpus|g" \
      -e "s|@MEMORY_MB@|$mem|g" \
      "$here/slurm.conf" >"$dir/slurm.conf"

  export SLURM_CONF=$dir/slurm.conf
  for daemon in slurmctld slurmd; do
    if ! "$daemon" -f "$SLURM_CONF"; then
      stop
      die "$daemon did not start: see $dir/$daemon.log"
    fi
  done
  # Ready once the node has registered with the controller and can take jobs.
  for _ in $(seq 1 150); do
    state=$(sinfo -h -N -o %T 2>/dev/null || true)
    case $state in
      idle* | mixed* | allocated*)
        # Ours that answered, not another cluster's controller on the same port.
        if kill -0 "$(cat "$dir/slurmctld.pid" 2>/dev/null)" 2>/dev/null &&
           kill -0 "$(cat "$dir/slurmd.pid" 2>/dev/null)" 2>/dev/null; then
          echo "export SLURM_CONF=$SLURM_CONF"
          return 0
        fi ;;
    esac
    sleep 0.2
  done
  echo "one-node-cluster: node state: ${state:-no answer}; see $dir/slurmctld.log" >&2
  stop
  exit 1
}

# Ends the daemons named by these pid files, all at once (SIGTERM, then SIGKILL after 10 s).
stop_pidfiles() {
  local pids=() pid f
  for f in "$@"; do
    [ -s "$f" ] && pid=$(cat "$f") && kill "$pid" 2>/dev/null && pids+=("$pid")
  done
  for _ in $(seq 1 100); do
    local alive=()
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
    [ ${#alive[@]} -eq 0 ] && return 0
    pids=("${alive[@]}")
    sleep 0.1
  done
  kill -9 "${pids[@]}" 2>/dev/null || true
}

stop() {
  [ -d "$dir" ] || die "$dir: no such directory"
  local munge_dir=""
  [ -s "$dir/munge.dir" ] && munge_dir=$(cat "$dir/munge.dir")
  if [ -e "$dir/slurm.conf" ]; then
    export SLURM_CONF=$dir/slurm.conf
    # slurmd leaves running jobs' slurmstepd behind when it stops: end the jobs first.
    jobs=$(squeue -h -o %A 2>/dev/null | sort -u || true)
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086 # one job id a word
      scancel --quiet $jobs 2>/dev/null || true
      for _ in $(seq 1 100); do
        [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break
        sleep 0.2
      done
    fi
  fi
  stop_pidfiles "$dir/slurmd.pid" "$dir/slurmctld.pid" ${munge_dir:+"$munge_dir/munged.pid"}
  case $munge_dir in /tmp/qlaunch-munge.*) rm -rf "$munge_dir" ;; esac
  rm -f "$dir/munge.dir" "$dir/slurm.conf"
}

case $action in
  start) start ;;
  stop) stop ;;
  *) usage ;;
esac
