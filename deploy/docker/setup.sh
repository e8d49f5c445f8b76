#!/usr/bin/env bash
# Prepares what deploy/docker/compose.yaml mounts: a CA and the broker's certificate, the
# broker's dynamic-security.json (users and roles), and one password secret per MQTT user.
# Uses broker/*.sh.
#
#   ./setup.sh                 first time: CA + server cert (for "mosquitto" and localhost),
#                              users worker1 worker2 healthcheck, secrets/hf_token (empty)
#   ./setup.sh worker NAME     add a worker (then add a service block for it in compose.yaml)
#   ./setup.sh device NAME     add an edge device; prints where its password is
#   ./setup.sh monitor NAME    add a read-only operator user (mosquitto_sub, spececd-tap)
#
# Needs openssl and python3 on this host.
# Reload the broker afterwards: docker compose up -d broker-init && docker compose restart mosquitto
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
cd "$HERE"
[[ -f .env ]] && set -a && source ./.env && set +a
export SPECECD_BROKER_DIR="$(realpath -m "${SPECECD_BROKER_DIR:-./broker-files}")"
SECRETS="$(realpath -m "${SPECECD_SECRETS_DIR:-./secrets}")"
WORKER_UID=10001  # the user of the worker image (Dockerfile.worker)
mkdir -p "$SPECECD_BROKER_DIR" "$SECRETS"
chmod 0700 "$SECRETS"

new_password() { openssl rand -base64 24 | tr -d '/+=' | cut -c1-24; }

# add_user KIND NAME: broker account + secrets/NAME.password (0640, group = worker image user)
add_user() {
    local kind="$1" name="$2" pw
    pw="$(new_password)"
    "$REPO/broker/add-$kind.sh" "$name" "$pw" >/dev/null
    umask 077
    printf '%s\n' "$pw" > "$SECRETS/$name.password"
    if [[ $EUID -eq 0 ]]; then chgrp "$WORKER_UID" "$SECRETS/$name.password"; chmod 0640 "$SECRETS/$name.password"; fi
    echo "$kind $name: password in $SECRETS/$name.password"
}

case "${1:-init}" in
    init)
        if [[ ! -f "$SPECECD_BROKER_DIR/certs/server.crt" ]]; then
            "$REPO/broker/make-dev-ca.sh" "$SPECECD_BROKER_DIR/certs" mosquitto
        fi
        for name in worker1 worker2; do add_user worker "$name"; done
        add_user device healthcheck
        if [[ ! -f "$SECRETS/hf_token" ]]; then
            : > "$SECRETS/hf_token"
            echo "put a Hugging Face token in $SECRETS/hf_token for gated hub models (or leave it empty)"
        fi
        # compose bind-mounts file secrets with the host's owner and mode (its uid/gid/mode
        # fields do not apply to them): the worker's uid must be able to read the token
        if [[ $EUID -eq 0 ]]; then chgrp "$WORKER_UID" "$SECRETS/hf_token"; chmod 0640 "$SECRETS/hf_token"; fi
        ;;
    worker | device | monitor)
        [[ $# -eq 2 ]] || { echo "usage: $0 $1 NAME" >&2; exit 2; }
        add_user "$1" "$2"
        ;;
    *)
        echo "usage: $0 [init | worker NAME | device NAME | monitor NAME]" >&2
        exit 2
        ;;
esac
