#!/usr/bin/env bash
# Builds the nid images from already-built binaries, without any registry:
#   nid-base:bookworm   Debian 12 runtime files (libc6, libgcc-s1, libstdc++6, tzdata, netbase,
#                       ca-certificates) unpacked by mmdebstrap --variant=extract and docker-imported;
#                       no shell, no package manager, users root/nid(10001)/nobody(65534)
#   nid-cell:TAG  nid-router:TAG  nidctl:TAG  nid-prometheus:TAG (Debian's prometheus binary)
#
# Usage: deploy/images/build.sh [BIN_DIR]     (default ~/.cache/nid/target/debug)
# Env:   NID_IMAGE_TAG (default dev), NID_REBUILD_BASE=1 to re-create the base image.
# Needs a running docker engine (deploy/scripts/dockerd.sh start) and mmdebstrap (ensure-tools.sh).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
bin_dir="${1:-$HOME/.cache/nid/target/debug}"
tag="${NID_IMAGE_TAG:-dev}"
base="nid-base:bookworm"
# The legacy builder: BuildKit would fetch a frontend image from a registry.
export DOCKER_BUILDKIT=0

log() { echo "build.sh: $*" >&2; }

for b in nid-cell nid-router nidctl; do
  [ -x "$bin_dir/$b" ] || { log "missing $bin_dir/$b (build the workspace first; this script never builds Rust)"; exit 1; }
done
for b in prometheus promtool; do
  command -v "$b" >/dev/null || { log "missing $b (apt-get install prometheus; see deploy/scripts/ensure-tools.sh)"; exit 1; }
done
docker version >/dev/null 2>&1 || { log "no docker engine answers (deploy/scripts/dockerd.sh start)"; exit 1; }

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT

if [ "${NID_REBUILD_BASE:-0}" = 1 ] || ! docker image inspect "$base" >/dev/null 2>&1; then
  log "creating $base with mmdebstrap (Debian 12, extract variant)"
  # The mirror is the one this machine's apt uses.
  sources=/etc/apt/sources.list.d/debian.sources
  [ -f "$sources" ] || sources=/etc/apt/sources.list
  # The hooks run after extraction (the extract variant runs no customize hooks); mmdebstrap passes
  # the root directory as $1.
  # shellcheck disable=SC2016
  mmdebstrap --quiet --variant=extract \
    --include=libc6,libgcc-s1,libstdc++6,tzdata,netbase,ca-certificates \
    --extract-hook='rm -rf "$1"/usr/share/doc "$1"/usr/share/man "$1"/usr/share/locale "$1"/usr/share/lintian "$1"/var/cache/apt "$1"/var/lib/apt/lists' \
    --extract-hook='printf "root:x:0:0:root:/root:/usr/sbin/nologin\nnid:x:10001:10001:nid:/var/lib/nid:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n" > "$1/etc/passwd"' \
    --extract-hook='printf "root:x:0:\nnid:x:10001:\nnogroup:x:65534:\n" > "$1/etc/group"' \
    --extract-hook='mkdir -p "$1/var/lib/nid" "$1/prometheus" "$1/tmp" && chown 10001:10001 "$1/var/lib/nid" && chown 65534:65534 "$1/prometheus" && chmod 0700 "$1/var/lib/nid" && chmod 1777 "$1/tmp"' \
    bookworm "$stage/base.tar" "$sources"
  docker import \
    --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin' \
    --change 'ENV TZ=UTC' \
    "$stage/base.tar" "$base" >/dev/null
  rm -f "$stage/base.tar"
fi

# Debug sections are dropped (symbols stay, for profiles); the images need none of the target dir.
copy_binary() {
  if command -v objcopy >/dev/null; then
    objcopy --strip-debug "$1" "$stage/$(basename "$1")"
  else
    cp "$1" "$stage/"
  fi
}
for b in nid-cell nid-router nidctl; do copy_binary "$bin_dir/$b"; done
cp "$(command -v prometheus)" "$(command -v promtool)" "$stage/"
cp "$here"/Dockerfile.* "$stage/"

build() { # NAME DOCKERFILE
  log "building $1:$tag"
  # The legacy builder warns that it is deprecated on every build; show its output only on failure.
  if ! docker build --quiet --build-arg "BASE=$base" \
    --label "org.opencontainers.image.source=nid" \
    --label "org.opencontainers.image.version=$tag" \
    -f "$stage/$2" -t "$1:$tag" "$stage" >"$stage/build.log" 2>&1; then
    cat "$stage/build.log" >&2
    return 1
  fi
}
build nid-cell Dockerfile.cell
build nid-router Dockerfile.router
build nidctl Dockerfile.nidctl
build nid-prometheus Dockerfile.prometheus

# Smoke test: each binary starts in its image (its shared libraries are all there).
docker run --rm "nid-cell:$tag" --version >/dev/null
docker run --rm "nid-router:$tag" --version >/dev/null
docker run --rm "nidctl:$tag" --version >/dev/null
docker run --rm "nid-prometheus:$tag" --version >/dev/null 2>&1
docker run --rm --entrypoint /usr/local/bin/nidctl "nid-cell:$tag" --version >/dev/null
for image in nid-cell nid-router nidctl nid-prometheus; do
  log "$image:$tag $(docker image inspect -f '{{.Size}}' "$image:$tag" | awk '{printf "%.0f MB", $1/1e6}')"
done
