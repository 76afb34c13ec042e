#!/usr/bin/env bash
# Prepare a fresh Debian 12 machine (as root) for lbrestore: the Debian packages it drives,
# a virtual environment on Debian's Python 3.11 (so that python3-libnbd imports), and the
# project itself in editable mode with its development tools. Idempotent; quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(
  qemu-system-x86 qemu-utils qemu-guest-agent   # the hypervisor, qemu-img/qemu-io/qemu-nbd, qemu-ga
  python3-libnbd libnbd-bin                      # libnbd's Python bindings, nbdcopy/nbdinfo
  python3-venv fuse3                             # the virtual environment; fusermount3 + libfuse3
  libvirt-clients libxml2-utils                  # virt-xml-validate (+ its xmllint) for domain XML
  fdisk e2fsprogs                                # sfdisk and mkfs.ext4 for test images
  gnutls-bin openssl                             # certtool for TLS test certificates
  busybox-static extlinux syslinux-common mtools # a real tiny Linux guest (its kernel is fetched
  dosfstools cpio syslinux                       #   with apt-get download into the test cache;
  ovmf syslinux-efi                              #   syslinux installs rootless via mtools; UEFI)
  ntfs-3g xfsprogs lvm2 exfatprogs               # guest filesystems built at test time
  libvirt-daemon-system python3-libvirt          # libvirt's backup API (--libvirt)
  virtnbdbackup                                  # the peer measured side by side in bench/
)

missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

VENV=.venv
SYSTEM_PYTHON=/usr/bin/python3.11
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV on $SYSTEM_PYTHON" >&2
  "$SYSTEM_PYTHON" -m venv "$VENV"
fi

# libnbd's and libvirt's bindings come only from Debian; expose exactly those modules to the venv.
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
dist=/usr/lib/python3/dist-packages
for f in "$dist"/nbd.py "$dist"/libnbdmod.cpython-311-*.so "$dist"/libvirt*.py "$dist"/libvirtmod*.cpython-311-*.so; do
  ln -sf "$f" "$site/$(basename "$f")"
done

stamp="$VENV/.installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing lbrestore and its dependencies into $VENV" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e '.[dev]'
  echo "$want" > "$stamp"
fi
"$VENV/bin/python" -c 'import nbd, libvirt, lbrestore' || { echo "setup: the environment is broken" >&2; exit 1; }
