#!/usr/bin/env bash
# Debian packages for the real servers the tests start (idempotent; needs root or sudo).
set -euo pipefail
PKGS="influxdb victoria-metrics mosquitto rabbitmq-server socat curl python3.11-venv"  # python3.11-venv: make deb (tests/integration/test_deb.py)
missing=()
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
((${#missing[@]})) || exit 0
SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO=sudo
echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d in containers keeps the packages' init scripts from starting the servers;
# the tests start their own on free loopback ports.
$SUDO apt-get install -y --no-install-recommends "${missing[@]}" >/tmp/plantbus-apt.log 2>&1 || {
  $SUDO apt-get update >>/tmp/plantbus-apt.log 2>&1
  $SUDO apt-get install -y --no-install-recommends "${missing[@]}" >>/tmp/plantbus-apt.log 2>&1 \
    || { tail -30 /tmp/plantbus-apt.log; exit 1; }
}
