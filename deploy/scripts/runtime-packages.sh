#!/usr/bin/env bash
# runtime-packages.sh BINARY...: prints, one per line and sorted, the Debian/Ubuntu packages that
# own the shared libraries the binaries load (ldd), so that a runtime image installs exactly what
# the build linked against and nothing from the -dev packages. Used by deploy/Dockerfile.
#
# Left out: the CUDA toolkit's own libraries (packages cuda-*, libcublas*, libnccl*, libcudnn*, or
# anything under /usr/local/cuda*), which the nvidia/cuda runtime image ships in the version
# matching the devel image. The driver library
# libcuda.so.1 is injected by the NVIDIA container runtime at run time, so "not found" is fine
# for it alone; any other unresolved or unowned library is an error (exit 1, named on stderr).
set -euo pipefail

if (($# == 0)); then
  echo "usage: $0 BINARY..." >&2
  exit 2
fi

owner() {  # owner PATH -> package name, trying the usrmerge twins of the path too
  local path=$1 real candidates c out
  real=$(readlink -f "$path")
  candidates=("$path" "$real")
  for c in "$path" "$real"; do
    case $c in
      /usr/*) candidates+=("${c#/usr}") ;;
      *) candidates+=("/usr$c") ;;
    esac
  done
  for c in "${candidates[@]}"; do
    if out=$(dpkg-query -S "$c" 2>/dev/null); then
      out=${out%%:*}          # "libfoo1:amd64: /usr/lib/..." -> "libfoo1"
      printf '%s\n' "${out%%,*}"  # a file shared by several packages: the first is enough
      return 0
    fi
  done
  return 1
}

list_packages() {
  local status=0 bin name arrow path pkg
  for bin in "$@"; do
    if [[ ! -x $bin ]]; then
      echo "runtime-packages: $bin is not an executable file" >&2
      return 1
    fi
    while read -r name arrow path _; do
      [[ $arrow == "=>" ]] || continue
      if [[ $path == "not" ]]; then
        [[ $name == libcuda.so.* ]] && continue
        echo "runtime-packages: $bin needs $name, which is not found" >&2
        status=1
        continue
      fi
      case $(readlink -f "$path") in /usr/local/cuda*) continue ;; esac
      if ! pkg=$(owner "$path"); then
        echo "runtime-packages: no installed package owns $path (needed by $bin)" >&2
        status=1
        continue
      fi
      case $pkg in
        cuda-* | libcublas* | libnccl* | libcudnn*) ;;
        *) printf '%s\n' "$pkg" ;;
      esac
    done < <(ldd "$bin")
  done
  return "$status"
}

list_packages "$@" | sort -u
