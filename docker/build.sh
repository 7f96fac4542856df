#!/usr/bin/env bash
# Build the megaspan image, and optionally turn it into an enroot squashfs for pyxis.
#
#   docker/build.sh                                  # -> megaspan:<git describe>
#   docker/build.sh --sqsh /shared/images/megaspan.sqsh
#   docker/build.sh --base nvcr.io/nvidia/pytorch:26.06-py3@sha256:<digest> --tag 0.1.0
#   docker/build.sh --dry-run                        # print the commands only
#
# --base IMAGE   base NGC PyTorch image (default: the Dockerfile's BASE_IMAGE)
# --tag TAG      image tag (default: `git describe --tags --always --dirty`)
# --name NAME    image name (default: megaspan)
# --sqsh FILE    also run `enroot import dockerd://NAME:TAG` into FILE
#                (ENROOT_SQUASH_OPTIONS default: -comp zstd -Xcompression-level 3 -b 1M)
# --no-cache     pass --no-cache to docker build
# Extra arguments after -- go to `docker build`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NAME=megaspan
TAG=""
BASE=""
SQSH=""
DRY=0
EXTRA=()
die() {
    echo "build.sh: $*" >&2
    exit 2
}
while (($#)); do
    case $1 in
        --base) BASE=${2:?--base needs a value}; shift 2 ;;
        --tag) TAG=${2:?--tag needs a value}; shift 2 ;;
        --name) NAME=${2:?--name needs a value}; shift 2 ;;
        --sqsh) SQSH=${2:?--sqsh needs a value}; shift 2 ;;
        --no-cache) EXTRA+=(--no-cache); shift ;;
        --dry-run) DRY=1; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        --) shift; EXTRA+=("$@"); break ;;
        *) die "unknown argument $1" ;;
    esac
done

if [[ -z $TAG ]]; then
    TAG=$(git -C "$ROOT" describe --tags --always --dirty 2>/dev/null || echo dev)
fi
# Docker tags: [A-Za-z0-9_.-], at most 128 characters, not starting with '.' or '-'.
TAG=$(printf '%s' "$TAG" | tr -c 'A-Za-z0-9_.-' '_' | sed 's/^[.-]/_/' | cut -c1-128)
[[ $TAG == *dirty* ]] && echo "build.sh: warning: uncommitted changes; the tag says so ($TAG)" >&2
IMAGE=$NAME:$TAG

BUILD=(docker build -f "$ROOT/docker/Dockerfile" -t "$IMAGE" --build-arg "MEGASPAN_VERSION=$TAG")
[[ -n $BASE ]] && BUILD+=(--build-arg "BASE_IMAGE=$BASE")
BUILD+=("${EXTRA[@]}" "$ROOT")

run() {
    printf '+'
    printf ' %q' "$@"
    echo
    ((DRY)) || "$@"
}

run "${BUILD[@]}"
run docker run --rm "$IMAGE" cat /opt/megaspan/versions.txt

if [[ -n $SQSH ]]; then
    ((DRY)) || command -v enroot >/dev/null || die "enroot not found (needed for --sqsh)"
    export ENROOT_SQUASH_OPTIONS=${ENROOT_SQUASH_OPTIONS:-"-comp zstd -Xcompression-level 3 -b 1M"}
    ((DRY)) || mkdir -p "$(dirname "$SQSH")"
    ((DRY)) || rm -f "$SQSH"
    run enroot import --output "$SQSH" "dockerd://$IMAGE"
    echo "build.sh: $SQSH  (use: MEGASPAN_CONTAINER_IMAGE=$SQSH launch/submit ...)"
fi
echo "build.sh: built $IMAGE"
