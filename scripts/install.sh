#!/usr/bin/env bash
# Installs Meridian on this machine (or under a staging root): the binaries, the systemd units,
# the example configurations, and the `meridian` system user the units run as.
#
#   scripts/install.sh [--destdir DIR] [--prefix PREFIX] [--bin-dir DIR]
#
#   --destdir DIR   stage everything under DIR (packaging, tests); no user, no systemctl
#   --prefix P      binaries go to P/bin (default /usr/local; the units' ExecStart follows)
#   --bin-dir DIR   where the built binaries are (default target/release)
#
# Then: edit /etc/meridian/*.toml (copied from the examples when absent), and
#   systemctl enable --now meridian-controlplane     # on control-plane machines
#   systemctl enable --now meridian-dataplane        # on data machines
set -euo pipefail
script=$(readlink -f "$0")

destdir=""
prefix=/usr/local
bin_dir=target/release
while (($#)); do
  case "$1" in
    --destdir) destdir=$(realpath -m "${2:?--destdir needs a directory}"); shift 2 ;;
    --prefix) prefix=${2:?--prefix needs a path}; shift 2 ;;
    --bin-dir) bin_dir=$(realpath -m "${2:?--bin-dir needs a directory}"); shift 2 ;;
    -h|--help) sed -n '2,13p' "$script" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$script")/.."
binaries=(dataplane controlplane meridian)
for binary in "${binaries[@]}"; do
  if [[ ! -x $bin_dir/$binary ]]; then
    echo "install.sh: $bin_dir/$binary is missing; build first (make build)" >&2
    exit 1
  fi
done

step() { echo "  $*"; }
echo "installing Meridian into ${destdir:-/} (prefix $prefix)"
for binary in "${binaries[@]}"; do
  install -D -m 0755 "$bin_dir/$binary" "$destdir$prefix/bin/$binary"
  step "$prefix/bin/$binary"
done
for unit in scripts/systemd/*.service; do
  target=$destdir/etc/systemd/system/$(basename "$unit")
  install -D -m 0644 "$unit" "$target"
  sed -i "s#/usr/local/bin/#$prefix/bin/#g" "$target"
  step "/etc/systemd/system/$(basename "$unit")"
done
for process in dataplane controlplane; do
  install -D -m 0644 "scripts/$process.example.toml" "$destdir/etc/meridian/$process.toml.example"
  step "/etc/meridian/$process.toml.example"
  if [[ ! -e $destdir/etc/meridian/$process.toml ]]; then
    install -m 0640 "scripts/$process.example.toml" "$destdir/etc/meridian/$process.toml"
    step "/etc/meridian/$process.toml (from the example: edit it before starting)"
  fi
done

if [[ -n $destdir ]]; then
  echo "staged; the meridian user and systemctl daemon-reload are left to the target machine"
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "install.sh: run as root to create the meridian user and reload systemd" >&2
  exit 1
fi
if ! id meridian >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/meridian --no-create-home --shell /usr/sbin/nologin meridian
  step "user meridian"
fi
chgrp meridian /etc/meridian/dataplane.toml /etc/meridian/controlplane.toml
if [[ -d /run/systemd/system ]]; then
  systemctl daemon-reload
  step "systemctl daemon-reload"
fi
echo "done: systemctl enable --now meridian-controlplane | meridian-dataplane"
