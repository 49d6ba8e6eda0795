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

# Candidate paths of one library: as ldd printed it, its symlink target, and the usrmerge twins
# of both (/lib/x.so and /usr/lib/x.so are one file, but dpkg knows only the name it installed).
candidates() {
  local path=$1 real c
  real=$(readlink -f "$path")
  printf '%s\n' "$path" "$real"
  for c in "$path" "$real"; do
    case $c in
      /usr/*) printf '%s\n' "${c#/usr}" ;;
      *) printf '%s\n' "/usr$c" ;;
    esac
  done
}

list_packages() {
  local status=0 bin name arrow path lib c found
  local -a libs=()
  local -A owner=()
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
      libs+=("$path")
    done < <(ldd "$bin")
  done
  ((${#libs[@]})) || return "$status"
  # One dpkg-query for everything (it reads its database once per call).
  while IFS= read -r line; do
    [[ $line == diversion* ]] && continue
    path=${line#*: }
    pkg=${line%%:*}          # "libfoo1:amd64: /usr/lib/..." -> "libfoo1"
    owner[$path]=${pkg%%,*}  # a file shared by several packages: the first is enough
  done < <(for lib in "${libs[@]}"; do candidates "$lib"; done | sort -u |
    xargs dpkg-query -S 2>/dev/null)
  for lib in "${libs[@]}"; do
    found=""
    while IFS= read -r c; do
      if [[ -n ${owner[$c]:-} ]]; then
        found=${owner[$c]}
        break
      fi
    done < <(candidates "$lib")
    if [[ -z $found ]]; then
      echo "runtime-packages: no installed package owns $lib" >&2
      status=1
      continue
    fi
    case $found in
      cuda-* | libcublas* | libnccl* | libcudnn*) ;;
      *) printf '%s\n' "$found" ;;
    esac
  done
  return "$status"
}

list_packages "$@" | sort -u
