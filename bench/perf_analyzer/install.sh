#!/usr/bin/env bash
# Installs Triton's perf_analyzer (PyPI package perf-analyzer) into a venv and
# puts a runnable `perf_analyzer` in its bin/. Idempotent.
#
#   bash bench/perf_analyzer/install.sh [VENV]        (default: .venv)
#
# The PyPI wheels of perf-analyzer 2.60 are manylinux_2_38 only: pip refuses
# them on a glibc 2.36 system (Debian 12) and resolves to an empty 0.1.0
# placeholder. So the wheel is fetched for the 2.38 platform into
# VENV/perf_analyzer, and the binary runs under the loader, libc and libstdc++
# of Debian 13, unpacked (dpkg-deb -x, nothing installed system-wide) into
# VENV/perf_analyzer/glibc. On a system with glibc >= 2.38 the binary runs
# directly.
set -euo pipefail
VENV=${1:-.venv}
VERSION=2.60.0
PA=$VENV/perf_analyzer
BIN=$PA/perf_analyzer/bin/perf_analyzer
GLIBC=$PA/glibc

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
if [ ! -f "$BIN" ]; then
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps \
    --platform manylinux_2_38_x86_64 --only-binary=:all: --target "$PA" "perf-analyzer==$VERSION"
fi
chmod +x "$BIN"

# Its --shared-memory modes load libcudart even for system memory: PyPI's CUDA
# runtime package provides it (no GPU needed); the unversioned name it opens
# is a link made here.
if ! "$VENV/bin/python" -c 'import nvidia.cuda_runtime' 2>/dev/null; then
  "$VENV/bin/pip" install --quiet --disable-pip-version-check nvidia-cuda-runtime-cu12
fi
CUDART=$("$VENV/bin/python" -c 'import nvidia.cuda_runtime, os; print(os.path.realpath(os.path.join(list(nvidia.cuda_runtime.__path__)[0], "lib")))')
ln -sf libcudart.so.12 "$CUDART/libcudart.so"

host_glibc=$(getconf GNU_LIBC_VERSION | awk '{print $2}')
if printf '2.38\n%s\n' "$host_glibc" | sort -V -C; then
  launcher="LD_LIBRARY_PATH=\"$CUDART\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\" exec \"$(realpath "$BIN")\" \"\$@\""
else
  if [ ! -x "$GLIBC/usr/lib64/ld-linux-x86-64.so.2" ]; then
    apt_dir=$(mktemp -d)
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/debs"
    # The machine's own Debian mirror, with the next release's suite.
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    [ -n "$mirror" ] || mirror=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list)
    printf 'Types: deb\nURIs: %s\nSuites: trixie\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      "$mirror" > "$apt_dir/trixie.sources"
    apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/trixie.sources" -o "Dir::Etc::SourceParts=/nonexistent"
              -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache")
    apt-get "${apt_opts[@]}" update -qq
    (cd "$apt_dir/debs" && apt-get "${apt_opts[@]}" download libc6 libstdc++6 libgcc-s1 2>&1 | grep -v unsandboxed || true)
    rm -rf "$GLIBC" && mkdir -p "$GLIBC"
    for deb in "$apt_dir"/debs/*.deb; do dpkg-deb -x "$deb" "$GLIBC"; done
    rm -rf "$apt_dir"
  fi
  g=$(realpath "$GLIBC")
  launcher="exec \"$g/usr/lib64/ld-linux-x86-64.so.2\" --library-path \"$CUDART:$g/usr/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu\" \"$(realpath "$BIN")\" \"\$@\""
fi
cat > "$VENV/bin/perf_analyzer" <<WRAPPER
#!/bin/sh
# perf_analyzer $VERSION, installed by bench/perf_analyzer/install.sh
$launcher
WRAPPER
chmod +x "$VENV/bin/perf_analyzer"
"$VENV/bin/perf_analyzer" --version
