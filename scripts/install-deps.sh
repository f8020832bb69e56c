#!/usr/bin/env bash
# Installs what a make target needs on a fresh Debian machine, and nothing it already has.
# Usage: scripts/install-deps.sh test|bench|fuzz
set -euo pipefail

need_apt=()
want() { command -v "$1" >/dev/null 2>&1 || need_apt+=("$2"); }
# The report plots of `bench cluster` (and their test) draw text with DejaVu Sans.
want_font() { [[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]] || need_apt+=(fonts-dejavu-core); }

case "${1:-test}" in
  test)
    # The full-disk test formats and loop-mounts a small ext4 image.
    want mkfs.ext4 e2fsprogs
    want mount mount
    # The unit files are checked with `systemd-analyze verify` (works without systemd running).
    want systemd-analyze systemd
    want_font
    ;;
  bench)
    want fio fio
    # `bench kv` runs Redis (AOF, fsync on every write) under redis-benchmark as its peer.
    want redis-server redis-server
    want redis-benchmark redis-tools  # also holds redis-cli
    # `bench control` runs a 3-member etcd 3.4 cluster (WAL fsynced on every commit) as its peer.
    want etcd etcd-server
    # `bench geo` compares QUIC replication throughput with iperf3 over TCP.
    want iperf3 iperf3
    # `bench snapshot` compares its archive exports with rsync and restic.
    want rsync rsync
    want restic restic
    # `bench engine` runs RocksDB's db_bench beside the store's engine.
    want db_bench rocksdb-tools
    want_font
    ;;
  fuzz)
    ;;
  *)
    echo "usage: $0 test|bench|fuzz" >&2
    exit 2
    ;;
esac

if ((${#need_apt[@]})); then
  echo "installing: ${need_apt[*]}" >&2
  if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

case "${1:-test}" in
  test)
    if ! cargo nextest --version >/dev/null 2>&1; then
      echo "installing cargo-nextest" >&2
      cargo install cargo-nextest --locked
    fi
    ;;
  fuzz)
    if ! rustup toolchain list | grep -q '^nightly'; then
      echo "cargo fuzz needs a nightly toolchain (rustup toolchain install nightly)" >&2
      exit 1
    fi
    if ! cargo fuzz --version >/dev/null 2>&1; then
      echo "installing cargo-fuzz" >&2
      cargo install cargo-fuzz --locked
    fi
    ;;
esac
