#!/usr/bin/env bash
# Usage: broker/add-worker.sh NAME [PASSWORD]
# Adds (or re-keys) the cloud worker NAME and appends its ACL block: read every device's opens
# and session requests, write every session's answers, write its own status topic.
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
[[ $# -ge 1 && $# -le 2 ]] || { echo "usage: $0 NAME [PASSWORD]" >&2; exit 2; }
check_name "$1"
set_password "$1" "${2:-}"
if ! grep -qx "user $1" "$ACL"; then
    cat >> "$ACL" <<ACL

user $1
topic read spececd/v1/+/open
topic read spececd/v1/+/+/up
topic write spececd/v1/+/+/down
topic write spececd/v1/workers/$1/status
ACL
fi
fix_permissions
