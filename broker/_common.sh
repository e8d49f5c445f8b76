# Shared by add-device.sh, add-worker.sh and add-monitor.sh (sourced, not run).
# SPECECD_BROKER_DIR: where dynamic-security.json lives (default /etc/mosquitto/spececd).
set -euo pipefail
BROKER_DIR="${SPECECD_BROKER_DIR:-/etc/mosquitto/spececd}"
DYNSEC="$BROKER_DIR/dynamic-security.json"
PLUGIN_LINK="$BROKER_DIR/mosquitto_dynamic_security.so"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

check_name() {  # the name is an MQTT username and a topic segment (shared/topics.py)
    if [[ ! "$1" =~ ^[A-Za-z0-9_.-]{1,64}$ ]] || [[ "$1" == "workers" ]]; then
        echo "error: invalid name '$1': use 1-64 characters of A-Z a-z 0-9 _ . - (not 'workers')" >&2
        exit 2
    fi
}

# The config loads the plugin from $BROKER_DIR, so one config serves Debian (multiarch path)
# and the eclipse-mosquitto image (/usr/lib): link the distribution's plugin there.
link_plugin() {
    local so
    [[ -e "$PLUGIN_LINK" ]] && return 0
    for so in /usr/lib/*/mosquitto_dynamic_security.so /usr/lib/mosquitto_dynamic_security.so \
              /usr/local/lib/mosquitto_dynamic_security.so; do
        if [[ -f "$so" ]]; then ln -sfn "$so" "$PLUGIN_LINK"; return 0; fi
    done
    echo "warning: mosquitto_dynamic_security.so not found on this host (apt-get install mosquitto);" \
         "link it as $PLUGIN_LINK on the broker host" >&2
}

# add_client KIND NAME [PASSWORD]: store NAME (a new random password when none is given, printed
# once) with KIND's roles in the dynamic-security file.
add_client() {
    local kind="$1" name="$2" password="${3:-}"
    command -v python3 >/dev/null || { echo "error: python3 not found: apt-get install python3" >&2; exit 3; }
    mkdir -p "$BROKER_DIR"
    link_plugin
    if [[ -z "$password" ]]; then
        password="$(openssl rand -base64 24 | tr -d '/+=' | cut -c1-24)"
        echo "password for $name: $password   (store it in the client's password file)"
    fi
    printf '%s\n' "$password" | python3 "$HERE/dynsec.py" "$DYNSEC" "$kind" "$name"
    fix_permissions
}

# Mosquitto started as root drops to the mosquitto user: let it read the file, nobody else.
fix_permissions() {
    chmod 0640 "$DYNSEC"
    if [[ $EUID -eq 0 ]] && getent group mosquitto >/dev/null; then
        chgrp mosquitto "$DYNSEC"
    fi
    echo "restart the broker to apply: systemctl restart mosquitto  (the dynamic-security plugin" \
         "reads $DYNSEC only at start; clients reconnect by themselves)"
}
