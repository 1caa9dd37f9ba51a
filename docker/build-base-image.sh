#!/usr/bin/env bash
# Build a Debian bookworm base image from Debian's own packages, without any registry:
#   debootstrap --variant=minbase bookworm <dir>  ->  tar | docker import
# It stands in for debian:bookworm-slim where no registry is reachable. The Dockerfile's
# default base is debian:bookworm-slim; pass this image instead:
#   docker/build-base-image.sh                        # -> bnserve/bookworm-minbase:local
#   docker build --build-arg BASE_IMAGE=bnserve/bookworm-minbase:local ...
#
# Needs root, debootstrap and a reachable Debian mirror. Environment:
#   BASE_IMAGE_TAG   image name to create     (default bnserve/bookworm-minbase:local)
#   DEBIAN_MIRROR    mirror for debootstrap   (default http://deb.debian.org/debian)
#   DOCKER           docker command           (default docker; honours DOCKER_HOST)
#   FORCE=1          rebuild even if the tag already exists
set -euo pipefail

TAG=${BASE_IMAGE_TAG:-bnserve/bookworm-minbase:local}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DOCKER=${DOCKER:-docker}

if [[ ${FORCE:-0} != 1 ]] && $DOCKER image inspect "$TAG" >/dev/null 2>&1; then
    echo "base image $TAG already exists (FORCE=1 rebuilds it)"
    exit 0
fi
if [[ $(id -u) != 0 ]]; then
    echo "error: debootstrap needs root" >&2
    exit 1
fi
command -v debootstrap >/dev/null || { echo "error: debootstrap not installed (apt-get install debootstrap)" >&2; exit 1; }

ROOTFS=$(mktemp -d "${TMPDIR:-/tmp}/bnserve-rootfs.XXXXXX")
cleanup() {
    # debootstrap may leave /proc or /sys mounted inside the target when it fails half-way
    for m in proc sys dev/pts dev; do
        mountpoint -q "$ROOTFS/$m" 2>/dev/null && umount -l "$ROOTFS/$m" || true
    done
    rm -rf --one-file-system "$ROOTFS"
}
trap cleanup EXIT

debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR"

# Same apt sources and slimming as debian:bookworm-slim: updates + security, no caches,
# no docs/man pages/locales (dpkg excludes keep them out of later apt-get installs too).
cat >"$ROOTFS/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
cat >"$ROOTFS/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
cat >"$ROOTFS/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
echo 'APT::Install-Recommends "false";' >"$ROOTFS/etc/apt/apt.conf.d/docker-no-recommends"
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/cache/apt/*.bin \
    "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/log/*.log "$ROOTFS"/tmp/* \
    "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/*
find "$ROOTFS/usr/share/doc" -mindepth 2 ! -name copyright -delete 2>/dev/null || true
find "$ROOTFS/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +

tar --numeric-owner -C "$ROOTFS" -c . | $DOCKER import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' \
    - "$TAG"
$DOCKER image ls "$TAG"
