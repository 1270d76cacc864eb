#!/usr/bin/env bash
# Start redis-server for a TreePO run: ops/redis.conf, plus the ACL users of ops/redis-users.acl
# when REDIS_LEARNER_PASSWORD and REDIS_SAMPLER_PASSWORD are set (the rendered file lands in the
# run folder, mode 600, passwords only as sha256). Extra arguments go to redis-server.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${RUN_DIR:-runs/local}
mkdir -p "$dir"
args=("$here/redis.conf" --port "${REDIS_PORT:-6390}" --dir "$dir")
if [ -n "${REDIS_LEARNER_PASSWORD:-}" ] || [ -n "${REDIS_SAMPLER_PASSWORD:-}" ]; then
  : "${REDIS_LEARNER_PASSWORD:?set REDIS_LEARNER_PASSWORD too}" "${REDIS_SAMPLER_PASSWORD:?set REDIS_SAMPLER_PASSWORD too}"
  sha() { printf '%s' "$1" | sha256sum | cut -d' ' -f1; }
  acl="$(cd "$dir" && pwd)/users.acl"
  umask 077
  grep -v '^#' "$here/redis-users.acl" | grep -v '^$' \
    | sed -e "s/@LEARNER_SHA256@/$(sha "$REDIS_LEARNER_PASSWORD")/" \
          -e "s/@SAMPLER_SHA256@/$(sha "$REDIS_SAMPLER_PASSWORD")/" > "$acl"
  args+=(--aclfile "$acl")
fi
exec redis-server "${args[@]}" "$@"
