#!/usr/bin/env bash
# Install the system tools that mvsnap's tests use, with apt-get. Idempotent: packages already
# installed are skipped, and `apt-get update` runs only when something is missing.
# Works as root, or through sudo otherwise.
set -euo pipefail

# Debian packages; the tools they bring are named beside them.
PACKAGES=(
    qemu-utils     # qemu-img, qemu-io, qemu-nbd, qemu-storage-daemon (bench/fuse.sh)
    nbdkit         # a reference NBD server
    libnbd-bin     # nbdinfo, nbdcopy, nbdsh
    fio            # load generator with --ioengine=nbd
    fuse3          # fusermount3 (serve --mount as non-root, clearing a stale mount)
    e2fsprogs      # mkfs.ext4, e2fsck
    xfsprogs       # mkfs.xfs, xfs_repair (tests/fuse.rs: xfs on a volume file)
    util-linux     # losetup, blkid, fsfreeze
    mount          # mount, umount
    openssl        # throwaway CAs and certificates for the NBD-over-TLS tests
)

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    if installed "$pkg"; then
        echo "install-deps: $pkg: already installed"
    else
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-deps: nothing to install"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    echo "install-deps: error: not root and no sudo; install these packages: ${missing[*]}" >&2
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-deps: error: apt-get not found; install these packages: ${missing[*]}" >&2
    exit 1
fi

echo "install-deps: installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${missing[@]}"

for pkg in "${missing[@]}"; do
    if ! installed "$pkg"; then
        echo "install-deps: error: $pkg is still not installed" >&2
        exit 1
    fi
done
echo "install-deps: done"
