#!/bin/sh
# Install kvmesh as systemd services on this host.
#
#   sudo deploy/systemd/install.sh [--root DIR] [--no-venv] [--no-systemctl] [ROLE@N ...]
#
# e.g. on host A: install.sh scheduler@0 gateway@0 cache@0 prefill@0    on host B: install.sh decode@0
#
# Creates the `kvmesh` system user, a venv in /opt/kvmesh (torch pinned first, then this checkout), the units in
# /etc/systemd/system, and /etc/kvmesh/ROLE-N.env from env/ROLE-0.env for every instance named (an existing env
# file is never overwritten), a CA and certificates for mTLS in /etc/kvmesh/tls the first time (`kvmesh certs init`
# with this host's names and addresses; on the other hosts of the mesh copy ca.pem and the roles' .pem/.key there
# instead), then enables kvmesh.target and the instances. --root installs into DIR instead of / (for packaging and
# tests); --no-venv and --no-systemctl skip those steps.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "$here/../.." && pwd)
root=""
venv=1
systemctl=1
instances=""
while [ $# -gt 0 ]; do
    case "$1" in
        --root) root=$2; shift 2 ;;
        --no-venv) venv=0; shift ;;
        --no-systemctl) systemctl=0; shift ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *@*) instances="$instances $1"; shift ;;
        *) echo "install.sh: unknown argument $1 (want ROLE@N, e.g. prefill@0)" >&2; exit 2 ;;
    esac
done

for instance in $instances; do
    role=${instance%@*}
    [ -f "$here/kvmesh-$role@.service" ] || { echo "install.sh: no role '$role'" >&2; exit 2; }
done

if [ -z "$root" ] && ! id kvmesh >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/kvmesh --no-create-home --shell /usr/sbin/nologin kvmesh
fi

if [ "$venv" = 1 ]; then
    python3 -m venv "$root/opt/kvmesh"
    "$root/opt/kvmesh/bin/pip" install torch==2.13.0
    "$root/opt/kvmesh/bin/pip" install "$src"
fi

install -d -m 0755 "$root/etc/systemd/system" "$root/etc/kvmesh"
install -m 0644 "$here"/kvmesh-*@.service "$here/kvmesh.target" "$root/etc/systemd/system/"

for instance in $instances; do
    role=${instance%@*}
    n=${instance#*@}
    env="$root/etc/kvmesh/$role-$n.env"
    if [ ! -e "$env" ]; then
        install -m 0640 "$here/env/$role-0.env" "$env"
        [ -z "$root" ] && chgrp kvmesh "$env"
        echo "wrote $env: edit it (ports, addresses) before starting"
    fi
    keys="$root/etc/kvmesh/api-keys"
    if [ "$role" = gateway ] && [ ! -e "$keys" ]; then  # a first key, never one baked into the repository
        (umask 027; printf '%s default\n' "$(head -c 24 /dev/urandom | base64 | tr '+/' '-_')" > "$keys")
        [ -z "$root" ] && chgrp kvmesh "$keys"
        echo "wrote $keys with one random API key (tenant 'default'): hand it to clients, add more as needed"
    fi
done

tls="$root/etc/kvmesh/tls"
if [ -n "$instances" ] && [ ! -e "$tls/ca.pem" ]; then
    if [ -x "$root/opt/kvmesh/bin/kvmesh" ]; then  # root-only files: systemd hands each unit its own (LoadCredential=)
        hosts=""
        for name in $(hostname) $(hostname -I 2>/dev/null || true); do hosts="$hosts --host $name"; done
        # shellcheck disable=SC2086
        (umask 077; "$root/opt/kvmesh/bin/kvmesh" certs init "$tls" $hosts)
    else
        echo "no certificates in $tls: run \`kvmesh certs init $tls --host ADDRESS ...\` (every host's address), or" \
             "copy ca.pem and the roles' .pem and .key from the host that made them"
    fi
fi

if [ "$systemctl" = 1 ] && [ -z "$root" ]; then
    systemctl daemon-reload
    systemctl enable kvmesh.target
    for instance in $instances; do
        role=${instance%@*}
        systemctl enable "kvmesh-$role@${instance#*@}.service"
    done
    echo "start with: systemctl start kvmesh.target"
fi
