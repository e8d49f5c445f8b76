#!/usr/bin/env bash
# Usage: broker/make-dev-ca.sh OUTDIR [HOSTNAME] [CLIENT...]
# Makes a throw-away CA (ca.crt, ca.key), a server certificate for HOSTNAME (default localhost;
# SANs: HOSTNAME, localhost, 127.0.0.1, ::1) and optional client certificates CLIENT.crt/.key.
# EC P-256 keys, valid 825 days. For development and tests only: use your own PKI in production.
set -euo pipefail
[[ $# -ge 1 ]] || { echo "usage: $0 OUTDIR [HOSTNAME] [CLIENT...]" >&2; exit 2; }
out="$1"; host="${2:-localhost}"; shift; shift || true
command -v openssl >/dev/null || { echo "error: openssl not found: apt-get install openssl" >&2; exit 3; }
mkdir -p "$out"; cd "$out"

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key ca.key
openssl req -x509 -new -key ca.key -sha256 -days 825 -subj "/CN=SpecECD dev CA" -out ca.crt \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"

sign() {  # sign NAME CN EXTFILE
    key "$1.key"
    openssl req -new -key "$1.key" -subj "/CN=$2" -out "$1.csr"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 -sha256 \
        -extfile "$3" -out "$1.crt" 2>/dev/null
    rm -f "$1.csr"
}

san="DNS:localhost,IP:127.0.0.1,IP:::1"
[[ "$host" == localhost ]] || san="DNS:$host,$san"
printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' "$san" > server.ext
sign server "$host" server.ext
printf 'extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n' > client.ext
for client in "$@"; do sign "$client" "$client" client.ext; done
rm -f server.ext client.ext ca.srl

chmod 0644 ./*.crt; chmod 0640 ./*.key
if [[ $EUID -eq 0 ]] && getent group mosquitto >/dev/null; then chgrp mosquitto server.key; fi
echo "wrote $(pwd): ca.crt (give to clients), server.crt/server.key (broker)${*:+, client certs: $*}"
