#!/usr/bin/env bash
# Builds the real agent images for the tests without any container registry:
#   1. a minimal Debian bookworm (debootstrap, variant minbase) imported as
#      threadline-test/debian:bookworm;
#   2. threadline/agent-claude:test and threadline/agent-aider:test from the shipped
#      Dockerfiles in docker/, with --build-arg BASE=threadline-test/debian:bookworm.
# Idempotent: what already exists is skipped (FORCE=1 rebuilds everything; NO_CACHE=1
# builds without Docker's layer cache; AGENTS="claude" builds only that image). Each step
# is timed. Needs Docker and root (debootstrap, chroot); installs debootstrap with apt if
# missing. Debian's mirror and PyPI must be reachable (from the host and `docker build`).
# See NOTES.md next to this file for what the images and the real CLIs were found to do.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BASE_IMAGE="${BASE_IMAGE:-threadline-test/debian:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
FORCE="${FORCE:-0}"
# Which agent images to build (names of directories under docker/).
AGENTS="${AGENTS:-claude aider}"

say() { printf '[build.sh] %s\n' "$*" >&2; }
have_image() { [ "$FORCE" != 1 ] && docker image inspect "$1" >/dev/null 2>&1; }
timed() { # timed LABEL COMMAND...
    local label="$1" start end
    shift
    start=$(date +%s)
    "$@"
    end=$(date +%s)
    say "$label: $((end - start))s"
}

base_image() {
    if ! command -v debootstrap >/dev/null 2>&1; then
        say "installing debootstrap"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    fi
    local dir
    dir="$(mktemp -d /tmp/threadline-debootstrap.XXXXXX)"
    debootstrap --variant=minbase \
        --include=ca-certificates,git,python3,python3-venv \
        bookworm "$dir" "$MIRROR" >"$dir.log" 2>&1 || { tail -30 "$dir.log" >&2; rm -rf "$dir" "$dir.log"; return 1; }
    rm -f "$dir.log"
    # Same sources as the official image (the security mirror included), so the Dockerfiles'
    # `apt-get update && apt-get install` behave as on debian:bookworm-slim.
    cat >"$dir/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb ${MIRROR%/debian}/debian-security bookworm-security main
SOURCES
    # Trust the host's local certificate authorities (a TLS-intercepting egress proxy
    # between this machine and PyPI, for instance), for apt, git and pip alike.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$dir/usr/local/share/ca-certificates/"
        chroot "$dir" update-ca-certificates >/dev/null 2>&1
        printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$dir/etc/pip.conf"
    fi
    chroot "$dir" apt-get clean
    rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/tmp/* "$dir"/var/log/*.log
    tar --numeric-owner -C "$dir" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["bash"]' \
        - "$BASE_IMAGE" >/dev/null
    rm -rf "$dir"
}

if have_image "$BASE_IMAGE"; then
    say "$BASE_IMAGE exists: skipped"
else
    timed "debootstrap + docker import $BASE_IMAGE" base_image
fi

for agent in $AGENTS; do
    tag="threadline/agent-$agent:test"
    # Rebuilt whenever its Dockerfile (or anything beside it) changed: the tested image
    # is always the shipped one.
    source_hash="$(cd "$ROOT/docker/agent-$agent" && find . -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)"
    if have_image "$tag" && [ "$(docker image inspect --format '{{index .Config.Labels "org.threadline.source"}}' "$tag")" = "$source_hash" ]; then
        say "$tag is up to date: skipped"
        continue
    fi
    log="$(mktemp /tmp/threadline-build-$agent.XXXXXX.log)"
    start=$(date +%s)
    # DOCKER_BUILDKIT=0: the classic builder, as the test harness uses (no buildx needed).
    if ! DOCKER_BUILDKIT=0 docker build ${NO_CACHE:+--no-cache} \
        --build-arg "BASE=$BASE_IMAGE" \
        --label "org.threadline.source=$source_hash" \
        -t "$tag" "$ROOT/docker/agent-$agent" >"$log" 2>&1; then
        tail -40 "$log" >&2
        say "docker build $tag failed (full log: $log)"
        exit 1
    fi
    say "docker build $tag: $(($(date +%s) - start))s"
    rm -f "$log"
    # The classic builder keeps a multi-stage build's earlier stages as untagged images.
    docker image prune -f --filter label=org.threadline.build-stage >/dev/null
done

for image in "$BASE_IMAGE" $(for a in $AGENTS; do echo "threadline/agent-$a:test"; done); do
    say "$(docker image inspect --format '{{index .RepoTags 0}} {{.Size}}' "$image" | awk '{printf "%s %.0f MB", $1, $2/1000000}')"
done
