#!/usr/bin/env bash
# redis-server for a GPU host without apt or network (the gateway's workers share their limits in
# Redis): this machine's redis-server and every shared library it loads beyond the C library, in one
# archive, with a launcher that points the loader at them.
#
#   bash pipelines/gpu/redis-bundle.sh [OUT=.gpu/redis.tar.gz]
#   there: tar xzf redis.tar.gz -C DIR && DIR/redis/run.sh --port 6379 --save '' --daemonize yes
#
# The binary needs the host's C library to be at least as new as this machine's (Debian 12 builds
# need glibc 2.34; Ubuntu 24.04 has 2.39). pipelines/gpu/repro.sh starts it with REDIS=DIR/redis.
set -euo pipefail
out=${1:-.gpu/redis.tar.gz}
exe=$(command -v redis-server) || { echo "redis-bundle.sh: no redis-server here (apt-get install redis-server)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/redis/bin" "$tmp/redis/lib"
cp -L "$exe" "$tmp/redis/bin/redis-server"  # the name decides the mode: Debian links it to redis-check-rdb
ldd "$exe" | awk '$2 == "=>" && $3 ~ /^\// {print $3}' | while read -r lib; do
  case $(basename "$lib") in
    libc.so.*|libm.so.*|libpthread.so.*|libdl.so.*|librt.so.*|ld-linux*) ;;  # the host's own
    *) cp -L "$lib" "$tmp/redis/lib/" ;;
  esac
done
cat > "$tmp/redis/run.sh" <<'RUN'
#!/bin/sh
# redis-server with the libraries beside it (arguments as redis-server's).
here=$(cd "$(dirname "$0")" && pwd)
LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/bin/redis-server" "$@"
RUN
chmod +x "$tmp/redis/run.sh"
mkdir -p "$(dirname "$out")"
tar czf "$out" -C "$tmp" redis
echo "redis-bundle.sh: $out ($(du -k "$out" | cut -f1) KiB): $("$exe" --version | cut -d' ' -f1-3), $(ls "$tmp/redis/lib" | wc -l) libraries" >&2
