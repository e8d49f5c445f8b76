#!/usr/bin/env bash
# Make the kit bench/gpu_check.sh runs from, on a GPU machine with no network (docs/BENCHMARKS.md
# §4.8). Run here, from the repository root, with the demo pair fetched (spececd-models
# fetch-demo); the kit folder (default .gpu) must be ignored by git and carried to the machine:
#
#   echo /.gpu/ >> .git/info/exclude
#   bash bench/gpu_kit.sh                 # then, on the GPU machine: bash bench/gpu_check.sh
#
# It holds:
#   whl/            paho-mqtt and cbor2 wheels for the GPU image's Python ($GPU_PYTHON, 3.12)
#   deb/            Mosquitto's Debian packages; deb-fallback/: libraries the image may lack
#   demo-target/    the demo target's config.json and tokenizer files (no weights)
#   acceptance.json the demo pair's rounds (docs/bench/gpu-h200/acceptance.json unless
#                   ACCEPTANCE names another fleet run's recordings.json)
set -euo pipefail
KIT=${GPU_KIT:-.gpu}
GPU_PYTHON=${GPU_PYTHON:-3.12}
PY=${PYTHON:-.venv/bin/python}
ACCEPTANCE=${ACCEPTANCE:-docs/bench/gpu-h200/acceptance.json}
mkdir -p "$KIT/whl" "$KIT/deb" "$KIT/deb-fallback" "$KIT/demo-target"

python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$KIT/whl" 'paho-mqtt>=2,<3' 'cbor2>=6.1'

# apt-get download writes into the current folder, as the _apt user where it can
(cd "$KIT/deb" && apt-get download -q mosquitto libmosquitto1 libcjson1 libdlt2 libwrap0)
(cd "$KIT/deb-fallback" && apt-get download -q libnsl2 libtirpc3 libgssapi-krb5-2 libkrb5-3 libk5crypto3 \
  libkrb5support0 libcom-err2 libkeyutils1 libssl3 libcap2 libsystemd0 libgcrypt20 libgpg-error0 liblz4-1 \
  liblzma5 libzstd1)

target=$($PY -c "from shared.demo import demo_model_paths as p; t = p(); print(t[1] if t else '')")
if [ -z "$target" ]; then
  echo "the demo pair is not fetched: run spececd-models fetch-demo first" >&2
  exit 2
fi
for f in config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.json merges.txt \
  generation_config.json chat_template.jinja; do
  if [ -f "$target/$f" ]; then cp "$target/$f" "$KIT/demo-target/"; fi
done
cp "$ACCEPTANCE" "$KIT/acceptance.json"
du -sh "$KIT"
echo "kit ready in $KIT: carry it (device tool: carry [\"$KIT\"]) and run bash bench/gpu_check.sh there"
