#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages mkc needs, skipping apt when they are
# all present already.
#
#   scripts/setup.sh build   to build mkc and run `mkc demo`: a C toolchain,
#                            make, pkg-config, zlib headers (librdkafka is
#                            built from source by the rdkafka crate), perl,
#                            python3, curl
#   scripts/setup.sh test    the above, plus what the tests use:
#                            systemd-analyze (unit check), chromium and
#                            chromedriver (status page test), redis-server
#                            and MariaDB (scripts/services.sh starts them),
#                            logrotate and adduser (the Debian package test),
#                            promtool and python3-jsonschema (monitoring/)
#   scripts/setup.sh bench   the build packages, plus valgrind (`make
#                            bench-instructions` counts mkc's instructions
#                            per message with it: this VM has no hardware
#                            counters for `perf stat`)
#
# Rust itself (cargo, rustc) must be installed (https://rustup.rs).
set -euo pipefail

what="${1:-build}"
packages=()
need() { # need COMMAND-OR-FILE PACKAGE...
    local probe="$1"
    shift
    if [[ "$probe" == /* ]]; then
        [[ -e "$probe" ]] && return 0
    else
        command -v "$probe" >/dev/null 2>&1 && return 0
    fi
    packages+=("$@")
}

need cc build-essential
need c++ build-essential
need make build-essential
need pkg-config pkg-config
need perl perl
need python3 python3
need curl curl ca-certificates
need flock util-linux
need /usr/include/zlib.h zlib1g-dev
if [[ "$what" == test ]]; then
    need systemd-analyze systemd
    need chromium chromium
    need chromedriver chromium-driver
    # The services the tests use (scripts/services.sh starts them).
    need redis-server redis-server
    need /usr/sbin/mariadbd mariadb-server
    need mysql mariadb-client
    # tests/package.rs installs the package (its postinst runs adduser) and
    # checks its logrotate file.
    need logrotate logrotate
    need adduser adduser
    # tests/monitoring.rs: promtool, and the dashboard's JSON schema check.
    need promtool prometheus
    need /usr/lib/python3/dist-packages/jsonschema/__init__.py python3-jsonschema
fi

if [[ "$what" == bench ]]; then
    need valgrind valgrind
fi

if [[ ${#packages[@]} -eq 0 ]]; then
    echo "setup.sh: everything for '$what' is installed"
    exit 0
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "setup.sh: cargo is missing: install Rust first (rustup)" >&2
fi
# Deduplicate.
mapfile -t packages < <(printf '%s\n' "${packages[@]}" | sort -u)
echo "setup.sh: installing ${packages[*]}"
SUDO=""
[[ $(id -u) -eq 0 ]] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends "${packages[@]}"
