#!/usr/bin/env bash
# Usage: broker/add-worker.sh NAME [PASSWORD]
# Adds (or re-keys) the cloud worker NAME: role spececd-worker (the opens through the workers'
# share group only, every session's up requests, write every session's down answers) and a role
# of its own to write spececd/v1/workers/NAME/status.
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
[[ $# -ge 1 && $# -le 2 ]] || { echo "usage: $0 NAME [PASSWORD]" >&2; exit 2; }
check_name "$1"
add_client worker "$1" "${2:-}"
