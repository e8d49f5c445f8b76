#!/usr/bin/env bash
# Usage: broker/add-monitor.sh NAME [PASSWORD]
# Adds (or re-keys) the operator user NAME: subscribe to and receive spececd/#, publish nothing.
# For mosquitto_sub and spececd-tap on the production broker (never tap as a device or worker).
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
[[ $# -ge 1 && $# -le 2 ]] || { echo "usage: $0 NAME [PASSWORD]" >&2; exit 2; }
check_name "$1"
add_client monitor "$1" "${2:-}"
