#!/bin/sh
# The README's first command: installs what a fresh Debian/Ubuntu machine lacks to build pgsurge (libclang, for
# pg_query's bindgen) and to run its demo (Postgres' server binaries), then builds and runs `pgsurge demo`.
# Extra arguments go to the demo (e.g. `./quickstart.sh --duration 10s`).
set -eu
cd "$(dirname "$0")"

have_libclang() {
    [ -n "${LIBCLANG_PATH:-}" ] && return 0
    for f in /usr/lib/llvm-*/lib/libclang*.so* /usr/lib/*-linux-gnu/libclang*.so* /usr/lib64/libclang*.so*; do
        [ -e "$f" ] && return 0
    done
    return 1
}
have_postgres() {
    for f in /usr/lib/postgresql/*/bin/initdb; do [ -x "$f" ] && return 0; done
    command -v initdb >/dev/null 2>&1
}

missing=""
have_libclang || missing="$missing libclang-dev"
have_postgres || missing="$missing postgresql"
if [ -n "$missing" ]; then
    if command -v apt-get >/dev/null 2>&1; then
        sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        echo "quickstart: installing$missing (apt-get)" >&2
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        # shellcheck disable=SC2086
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    else
        echo "quickstart: missing$missing; install them with your package manager (libclang is LLVM's C API)" >&2
        exit 1
    fi
fi

exec cargo run --release -- demo "$@"
