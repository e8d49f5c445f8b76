#!/usr/bin/env bash
# Usage: broker/add-device.sh NAME [PASSWORD]
# Adds (or re-keys) the edge device NAME in the dynamic-security file, with a role of its own:
# write spececd/v1/NAME/open and .../NAME/+/up, subscribe to and receive .../NAME/+/down and the
# workers' statuses. Nothing else: no shared subscription, no wildcard above its own name.
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
[[ $# -ge 1 && $# -le 2 ]] || { echo "usage: $0 NAME [PASSWORD]" >&2; exit 2; }
check_name "$1"
add_client device "$1" "${2:-}"
