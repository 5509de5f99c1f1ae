#!/usr/bin/env bash
# Run any Python script on N simulated CPU devices:  scripts/simulate_mesh.sh 8 scripts/train.py ...
set -euo pipefail
if [[ $# -lt 2 ]]; then echo "usage: $0 NUM_DEVICES script.py [args...]" >&2; exit 2; fi
N="$1"; shift
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${N}"
export JAX_PLATFORMS=cpu
exec "${PYTHON:-python}" "$@"
