#!/bin/sh
# First start of the compose stack: create the secrets that are missing, random, readable only
# by who needs them. Existing secrets are never replaced (InfluxDB and Grafana keep using the
# ones they were initialised with).
#   $1: InfluxDB's secrets (admin password: root, which InfluxDB's init runs as; admin token:
#       also group 10001, the collector image's user, for `collector setup`)
#   $2: Grafana's secrets (admin password: uid 10001, which Grafana runs as here)
set -eu
influx_dir=$1
grafana_dir=$2
umask 077

make() {  # make FILE OWNER MODE
    if [ ! -s "$1" ]; then
        head -c 32 /dev/urandom | base64 | tr -d '/+=\n' | head -c 40 > "$1.tmp"
        mv "$1.tmp" "$1"
        echo "created $1"
    fi
    chown "$2" "$1"
    chmod "$3" "$1"
}

make "$influx_dir/influxdb-admin-password" 0:0 0400
make "$influx_dir/influxdb-admin-token" 0:10001 0440
make "$grafana_dir/grafana-admin-password" 10001:10001 0400
