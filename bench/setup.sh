#!/usr/bin/env bash
# Installs what the benchmark needs beyond the project's venv: nginx (the plain reverse proxy
# tokenrelay is compared with) from Debian's packages. Safe to run again: does nothing when present.
set -euo pipefail

if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
    echo "nginx already installed: $(/usr/sbin/nginx -v 2>&1 || nginx -v 2>&1)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
# nginx-light would do too; plain `nginx` is the package every Debian release has.
$SUDO apt-get install -y --no-install-recommends nginx
# The package's own service is not used: run.py starts nginx itself with a generated config.
# In containers without systemd it never started; elsewhere stop it so it holds no port.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet nginx 2>/dev/null; then
    $SUDO systemctl stop nginx || true
fi
echo "installed: $(/usr/sbin/nginx -v 2>&1)"
