# Shared by add-device.sh and add-worker.sh (sourced, not run).
# SPECECD_BROKER_DIR: where passwd and acl live (default /etc/mosquitto/spececd).
set -euo pipefail
BROKER_DIR="${SPECECD_BROKER_DIR:-/etc/mosquitto/spececd}"
PASSWD="$BROKER_DIR/passwd"
ACL="$BROKER_DIR/acl"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

check_name() {  # the name is an MQTT username and a topic segment (shared/topics.py)
    if [[ ! "$1" =~ ^[A-Za-z0-9_.-]{1,64}$ ]] || [[ "$1" == "workers" ]]; then
        echo "error: invalid name '$1': use 1-64 characters of A-Z a-z 0-9 _ . - (not 'workers')" >&2
        exit 2
    fi
}

# Store NAME's password (a new random one when none is given, printed once) in the password file.
set_password() {
    local name="$1" password="${2:-}"
    command -v mosquitto_passwd >/dev/null || { echo "error: mosquitto_passwd not found: apt-get install mosquitto" >&2; exit 3; }
    mkdir -p "$BROKER_DIR"
    [[ -f "$ACL" ]] || cp "$HERE/acl" "$ACL"
    if [[ -z "$password" ]]; then
        password="$(openssl rand -base64 24 | tr -d '/+=' | cut -c1-24)"
        echo "password for $name: $password   (store it in the client's password file)"
    fi
    [[ -f "$PASSWD" ]] || : > "$PASSWD"
    mosquitto_passwd -b "$PASSWD" "$name" "$password"
}

# Mosquitto started as root drops to the mosquitto user: let it read the files, nobody else.
fix_permissions() {
    chmod 0640 "$PASSWD" "$ACL"
    if [[ $EUID -eq 0 ]] && getent group mosquitto >/dev/null; then
        chgrp mosquitto "$PASSWD" "$ACL"
    fi
    echo "reload the broker to apply: kill -HUP \$(pidof mosquitto)  (or systemctl reload mosquitto)"
}
