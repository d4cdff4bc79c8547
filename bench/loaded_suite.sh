#!/usr/bin/env bash
# Issue #15's loaded-machine check: the README's test command, on a fresh clone of this repository, while another
# process keeps one core busy (a Python busy loop at normal priority). Run it three times in a row:
#   bench/loaded_suite.sh /tmp/loaded-clone > /tmp/loaded-1.log 2>&1
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
clone=${1:-/tmp/kvmesh-loaded}
rm -rf "$clone" && git clone -q "$repo" "$clone" && cd "$clone" || exit 2
python3 -c 'while True: pass' &
busy=$!
trap 'kill $busy' EXIT
cmd=$(awk '/<!-- test-command -->/{f=1; next} /<!-- \/test-command -->/{f=0} f && !/^```/' README.md)
echo "+ $cmd   (busy loop: pid $busy)"; date -u
bash -euo pipefail -c "$cmd"
rc=$?
date -u; echo "exit status $rc"
exit $rc
