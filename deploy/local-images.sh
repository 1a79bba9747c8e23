#!/usr/bin/env bash
# Base images for a machine that cannot reach the public image registry (CI runs on one):
# Debian bookworm bootstrapped from Debian's own packages, then a Python and a Redis image
# on top of it, all tagged iwae-local/*. Idempotent: an image that exists is kept.
#
#   deploy/local-images.sh [--print-env]
#
# Then build with them (the variables docker-compose.yml and the Dockerfile read):
#   PYTHON_IMAGE=iwae-local/python:3.11-bookworm REDIS_IMAGE=iwae-local/redis:7-bookworm
#   TORCH_FIND_LINKS=wheels   (this script hard-links the CPU torch wheel of pip's
#                              find-links folder into ./wheels, inside the build context)
# with the CPU override (docker-compose.cpu.yml: the wheel is the CPU build).
# --print-env prints those lines as NAME=value, for a .env file or `export`.
#
# Needs root, a running dockerd and `debootstrap` (apt-get install -y docker.io debootstrap).
# The certificates of /usr/local/share/ca-certificates go into every image (this machine
# reaches the package registries through TLS interception whose CA only the host trusts),
# and pip in the Python image uses the system bundle, not its own.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

DEBIAN_IMAGE=iwae-local/debian:bookworm
PYTHON_IMAGE=iwae-local/python:3.11-bookworm
REDIS_IMAGE=iwae-local/redis:7-bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WHEELS=wheels

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

# A Dockerfile on stdin and no context: nothing of the work tree is sent to the daemon.
build_from() {
    local tag=$1
    have_image "$tag" && return 0
    echo "building $tag" >&2
    docker build --network host --tag "$tag" - >&2
}

if ! have_image "$DEBIAN_IMAGE"; then
    echo "bootstrapping $DEBIAN_IMAGE from $MIRROR" >&2
    root="$(mktemp -d "${TMPDIR:-/tmp}/iwae-debootstrap.XXXXXX")"
    trap 'rm -rf "$root"' EXIT
    debootstrap --variant=minbase --include=ca-certificates bookworm "$root" "$MIRROR" >&2
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    fi
    chroot "$root" update-ca-certificates >&2
    chroot "$root" apt-get clean
    rm -rf "$root"/var/lib/apt/lists/*
    tar -C "$root" --numeric-owner -c . \
        | docker import --change 'CMD ["bash"]' - "$DEBIAN_IMAGE" >/dev/null
    rm -rf "$root"
    trap - EXIT
fi

# python3 is what the Dockerfile calls (python:*-slim images have it too); pip reads
# /etc/pip.conf in every virtualenv, so the venv's pip trusts the system bundle.
build_from "$PYTHON_IMAGE" <<EOF
FROM $DEBIAN_IMAGE
RUN apt-get update \\
    && apt-get install -y --no-install-recommends python3 python3-venv \\
    && rm -rf /var/lib/apt/lists/* \\
    && printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > /etc/pip.conf
CMD ["python3"]
EOF

# Like the official redis image: /data is the working folder (the AOF lands there), it runs
# as the redis user, and `redis-server` started without a config file gets
# --protected-mode no (Debian's build otherwise refuses clients from other containers).
build_from "$REDIS_IMAGE" <<'EOF'
FROM iwae-local/debian:bookworm
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir /data && chown redis:redis /data
USER redis
WORKDIR /data
VOLUME /data
EXPOSE 6379
ENTRYPOINT ["sh", "-c", "if [ \"$1\" = redis-server ]; then set -- \"$@\" --protected-mode no; fi; exec \"$@\"", "redis-entrypoint"]
CMD ["redis-server"]
EOF

# The CPU torch wheel pip's configuration finds (pyproject's pin), hard-linked (or copied)
# into the build context for TORCH_FIND_LINKS.
torch_version="$(sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile | head -n 1)"
if ! compgen -G "$WHEELS/torch-${torch_version}+cpu-*.whl" >/dev/null; then
    found=""
    for dir in $(pip config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p") \
        ${PIP_FIND_LINKS:-}; do
        found="$(compgen -G "$dir/torch-${torch_version}+cpu-*.whl" | head -n 1 || true)"
        [ -n "$found" ] && break
    done
    [ -n "$found" ] || { echo "no torch-${torch_version}+cpu wheel in pip's find-links" >&2; exit 1; }
    mkdir -p "$WHEELS"
    ln "$found" "$WHEELS/" 2>/dev/null || cp "$found" "$WHEELS/"
fi

if [ "${1:-}" = "--print-env" ]; then
    printf 'PYTHON_IMAGE=%s\nREDIS_IMAGE=%s\nTORCH_FIND_LINKS=%s\n' \
        "$PYTHON_IMAGE" "$REDIS_IMAGE" "$WHEELS"
fi
