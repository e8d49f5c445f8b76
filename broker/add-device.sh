#!/usr/bin/env bash
# Usage: broker/add-device.sh NAME [PASSWORD]
# Adds (or re-keys) the edge device NAME. Its rights come from the `pattern` lines of the ACL
# (%u = NAME): write spececd/v1/NAME/open and .../NAME/+/up, read .../NAME/+/down.
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
[[ $# -ge 1 && $# -le 2 ]] || { echo "usage: $0 NAME [PASSWORD]" >&2; exit 2; }
check_name "$1"
set_password "$1" "${2:-}"
fix_permissions
