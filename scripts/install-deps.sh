#!/usr/bin/env bash
# Installs every build and test dependency of phishard from Debian packages. Idempotent: packages
# already present are skipped by apt. The CUDA toolkit (nvcc, cuBLASLt, NCCL) is expected under
# /usr/local/cuda when the CUDA backend is wanted; without it the CPU backend alone is built.
set -euo pipefail

PKGS=(
  build-essential cmake ninja-build pkg-config git
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev nlohmann-json3-dev libcli11-dev libpcre2-dev libopenblas-dev
  libgtest-dev libgmock-dev libgloo-dev
  python3
  yamllint python3-yaml  # tests/deploy: manifest lint and checks (kubectl is optional there)
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  echo "install-deps: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "install-deps: all Debian packages present"
fi
if [[ -x /usr/local/cuda/bin/nvcc ]]; then
  echo "install-deps: CUDA toolkit found: $(/usr/local/cuda/bin/nvcc --version | tail -1)"
else
  echo "install-deps: no CUDA toolkit at /usr/local/cuda; building the CPU backend only"
fi
