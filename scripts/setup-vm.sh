#!/usr/bin/env bash
# What `cargo xtask vm-test` needs on top of scripts/setup-tests.sh: QEMU and virtme-ng
# to boot other kernels over this machine's own root filesystem, and Debian's kernels
# to boot. Idempotent, no standard input.
#
# - Debian: qemu-system-x86, busybox-static (virtme-ng's initramfs), kmod (depmod for
#   the unpacked modules), file (virtme-ng reads the kernel version with it), udev
#   (without udevd in the guest, virtme-ng finds no virtio-serial ports for the
#   command's output and exit code).
# - virtme-ng 1.42 from PyPI in a venv at .tools/virtme-ng.
# - Kernels: the newest linux-image-6.1.0-N-amd64 (bookworm) and
#   linux-image-6.12.N+deb12-amd64 (bookworm-backports, added to apt's sources), the
#   .deb kept in $SONDE_TOOLS_CACHE/kernels (default ~/.cache/sonde/kernels) and
#   unpacked into .tools/kernels/<series>. A cached .deb is used as it is (no apt
#   lookup), so a fresh clone on the same machine (CI) boots the same kernels.
#
#   setup-vm.sh [SERIES...]   SERIES: 6.1, 6.12 (default: both)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${SONDE_TOOLS_CACHE:-$HOME/.cache/sonde}"
VNG_VERSION="1.42"
VENV="$ROOT/.tools/virtme-ng"
KERNELS="$ROOT/.tools/kernels"
export DEBIAN_FRONTEND=noninteractive

log() { printf '[setup-vm] %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  log "setup-vm installs Debian packages: run it as root"
  exit 1
fi

apt_updated=0
apt_update() {
  if [ "$apt_updated" = 0 ]; then apt-get update -qq; apt_updated=1; fi
}

install_debian() {
  local missing=()
  for p in qemu-system-x86 busybox-static kmod file udev; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then log "Debian packages: present"; return; fi
  log "Debian packages: installing ${missing[*]}"
  apt_update
  # udev must not start on this machine: only the guests run it.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
}

install_vng() {
  if [ -x "$VENV/bin/vng" ] && [ "$("$VENV/bin/vng" --version 2>/dev/null | awk '{print $NF}')" = "$VNG_VERSION" ]; then
    log "virtme-ng: present ($VENV, $VNG_VERSION)"
    return
  fi
  log "virtme-ng: installing $VNG_VERSION into $VENV"
  rm -rf "$VENV"
  mkdir -p "$ROOT/.tools"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "virtme-ng==$VNG_VERSION"
}

add_backports() {
  if grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then return; fi
  log "apt: adding bookworm-backports (for the 6.12 kernels)"
  cat > /etc/apt/sources.list.d/sonde-bookworm-backports.sources <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  apt_updated=0
}

# The newest package of the archive whose name matches the regex $1.
newest_package() {
  apt-cache search --names-only "$1" | awk '{print $1}' | sort -V | tail -1
}

install_kernel() {
  local series="$1" regex
  case "$series" in
    6.1) regex='^linux-image-6\.1\.0-[0-9]+-amd64$' ;;
    6.12) regex='^linux-image-6\.12\.[0-9]+\+deb12-amd64$' ;;
    *) log "unknown kernel series $series (6.1 or 6.12)"; exit 2 ;;
  esac
  local dest="$KERNELS/$series"
  if compgen -G "$dest/boot/vmlinuz-*" >/dev/null && [ -f "$dest/package" ]; then
    log "kernel $series: present ($(cat "$dest/package"))"
    return
  fi
  mkdir -p "$CACHE/kernels"
  local deb
  deb="$(find "$CACHE/kernels" -maxdepth 1 -name '*.deb' -printf '%f\n' \
    | awk -F_ -v re="$regex" '$1 ~ re' | sort -V | tail -1)"
  if [ -z "$deb" ]; then
    [ "$series" = 6.12 ] && add_backports
    apt_update
    local pkg
    pkg="$(newest_package "$regex")"
    if [ -z "$pkg" ]; then
      log "kernel $series: no package matching $regex in apt's sources"
      exit 1
    fi
    log "kernel $series: downloading $pkg"
    # apt's sandbox user cannot write the cache; the download itself is checked by apt.
    (cd "$CACHE/kernels" && apt-get download -q "$pkg" 2>&1 | grep -v "unsandboxed" >&2 || true)
    deb="$(find "$CACHE/kernels" -maxdepth 1 -name "${pkg}_*.deb" -printf '%f\n' | sort -V | tail -1)"
    [ -n "$deb" ] || { log "kernel $series: download of $pkg failed"; exit 1; }
  fi
  log "kernel $series: unpacking $deb into $dest"
  rm -rf "$dest.tmp" "$dest"
  mkdir -p "$dest.tmp"
  dpkg-deb -x "$CACHE/kernels/$deb" "$dest.tmp"
  echo "${deb%.deb}" > "$dest.tmp/package"
  mv "$dest.tmp" "$dest"
}

install_debian
install_vng
series=("$@")
[ ${#series[@]} -gt 0 ] || series=(6.1 6.12)
for s in "${series[@]}"; do install_kernel "$s"; done
log "done"
