#!/bin/sh
# Build dist/plantbus_<version>_<arch>.deb: plantbus and every Python dependency in a private
# venv at /opt/plantbus (nothing is fetched on the plant PC), the systemd unit, the sysusers.d
# file, /etc/plantbus/plantbus.toml and /etc/plantbus/conf.d/ as conffiles.
#
# The venv is built inside the staging tree with Debian's /usr/bin/python3.11 (the package
# depends on python3.11) and then made to live at /opt/plantbus: the scripts' shebangs and
# pyvenv.cfg name that path. Only pure paths are rewritten; compiled extensions do not embed
# the venv path.
set -eu
cd "$(dirname "$0")/.."
PY=${DEB_PYTHON:-/usr/bin/python3.11}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
ARCH=$(dpkg --print-architecture)
WORK=build/deb
ROOT=$WORK/root
VENV=$ROOT/opt/plantbus
rm -rf "$WORK"
mkdir -p "$ROOT/DEBIAN" "$ROOT/usr/bin" "$ROOT/lib/systemd/system" "$ROOT/usr/lib/sysusers.d" \
    "$ROOT/etc/plantbus/conf.d" "$ROOT/usr/share/doc/plantbus/examples" dist

"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --no-warn-script-location ".[all]"
"$VENV/bin/pip" uninstall -q -y pip setuptools wheel 2>/dev/null || true
# the venv lives at /opt/plantbus once installed
STAGED=$(cd "$VENV" && pwd)
grep -rlI --null "$STAGED" "$VENV/bin" "$VENV/pyvenv.cfg" | xargs -0 -r sed -i "s#$STAGED#/opt/plantbus#g"
find "$VENV" -name __pycache__ -prune -exec rm -rf {} +

ln -s /opt/plantbus/bin/plantbus "$ROOT/usr/bin/plantbus"
install -m 0644 systemd/plantbus.service "$ROOT/lib/systemd/system/plantbus.service"
install -m 0644 systemd/plantbus.sysusers "$ROOT/usr/lib/sysusers.d/plantbus.conf"
install -m 0644 systemd/plantbus.service.d/serial.conf.example \
    "$ROOT/usr/share/doc/plantbus/examples/serial.conf"
install -m 0640 config/plantbus.toml "$ROOT/etc/plantbus/plantbus.toml"
touch "$ROOT/etc/plantbus/conf.d/.keep"

INSTALLED_KB=$(du -sk "$ROOT" | cut -f1)
cat > "$ROOT/DEBIAN/control" <<CONTROL
Package: plantbus
Version: $VERSION
Architecture: $ARCH
Maintainer: plantbus developers <plantbus@localhost>
Depends: python3.11, adduser | systemd
Section: net
Priority: optional
Installed-Size: $INSTALLED_KB
Description: industrial connector and data broker
 Reads PLCs and devices (Modbus, OPC UA, S7, MQTT, serial lines) and delivers
 their values to InfluxDB, MQTT, Kafka and AMQP. All Python dependencies are
 inside /opt/plantbus: it installs without network access.
CONTROL
printf '/etc/plantbus/plantbus.toml\n/etc/plantbus/conf.d/.keep\n' > "$ROOT/DEBIAN/conffiles"
install -m 0755 packaging/debian/postinst "$ROOT/DEBIAN/postinst"
install -m 0755 packaging/debian/prerm "$ROOT/DEBIAN/prerm"
install -m 0755 packaging/debian/postrm "$ROOT/DEBIAN/postrm"

OUT=dist/plantbus_${VERSION}_${ARCH}.deb
dpkg-deb --root-owner-group -Zxz --build "$ROOT" "$OUT" >/dev/null
echo "$OUT"
