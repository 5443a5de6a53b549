#!/usr/bin/env bash
# The services the tests use besides the Kafka broker (scripts/kafka.sh):
#
#   MariaDB  127.0.0.1:3306, user root without a password, database `test`
#   Redis    127.0.0.1:6379 (MKC_TEST_REDIS overrides it)
#
# Machines of this project run both already; a fresh Debian machine has
# neither. For each one that does not answer, this installs the Debian
# package (when missing) and starts it. Redis is started as a process of
# our own when the packaged service cannot be used; data of our own under
# target/services.
#
#   scripts/services.sh start     make sure both answer (what `make test` runs)
#   scripts/services.sh status    exit 0 when both answer
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA_DIR="$REPO_DIR/target/services"
REDIS_PORT=6379
MYSQL_PORT=3306

say() { printf 'services.sh: %s\n' "$*"; }
die() {
    printf 'services.sh: error: %s\n' "$*" >&2
    exit 1
}

SUDO=""
[[ $(id -u) -eq 0 ]] || SUDO="sudo"

port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Waits up to $2 seconds for command $1 to succeed.
wait_for() {
    local check="$1" seconds="$2" i
    for ((i = 0; i < seconds * 10; i++)); do
        if eval "$check" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends "$@"
}

# PING over bash's /dev/tcp: no client needed.
redis_ok() {
    local reply=""
    { exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT"; } 2>/dev/null || return 1
    printf 'PING\r\n' >&3
    read -r -t 2 reply <&3 || true
    exec 3>&- 3<&-
    [[ "$reply" == +PONG* ]]
}

redis() {
    if redis_ok; then
        say "Redis answers on 127.0.0.1:$REDIS_PORT"
        return 0
    fi
    if port_open "$REDIS_PORT"; then
        die "something that is not Redis listens on 127.0.0.1:$REDIS_PORT"
    fi
    command -v redis-server >/dev/null 2>&1 || apt_install redis-server
    # The tests' own server (the packaged service may be masked, or there
    # may be no init system): no persistence needed, loopback only.
    mkdir -p "$DATA_DIR/redis"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --daemonize yes \
        --dir "$DATA_DIR/redis" --save "" --appendonly no \
        --pidfile "$DATA_DIR/redis/redis.pid" --logfile "$DATA_DIR/redis/redis.log"
    wait_for redis_ok 20 || die "Redis did not start (see $DATA_DIR/redis/redis.log)"
    say "started Redis on 127.0.0.1:$REDIS_PORT"
}

mysql_ok() {
    command -v mysql >/dev/null 2>&1 &&
        mysql --protocol=TCP -h 127.0.0.1 -P "$MYSQL_PORT" -u root -e 'SELECT 1' test >/dev/null 2>&1
}

mariadb() {
    if mysql_ok; then
        say "MariaDB answers on 127.0.0.1:$MYSQL_PORT"
        return 0
    fi
    if ! port_open "$MYSQL_PORT"; then
        command -v mariadbd >/dev/null 2>&1 || [[ -x /usr/sbin/mariadbd ]] ||
            apt_install mariadb-server mariadb-client
        $SUDO service mariadb start 2>/dev/null || $SUDO /etc/init.d/mariadb start ||
            die "cannot start MariaDB"
        wait_for "port_open $MYSQL_PORT" 30 || die "MariaDB did not start"
    fi
    # A fresh Debian MariaDB lets root in through the Unix socket only: let
    # the tests in over TCP from 127.0.0.1, without a password, and give
    # them the `test` database.
    $SUDO mysql -u root <<'SQL' || die "cannot set up root@127.0.0.1 (mysql through the socket failed)"
CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY '';
GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;
CREATE DATABASE IF NOT EXISTS test;
FLUSH PRIVILEGES;
SQL
    wait_for mysql_ok 10 || die "MariaDB does not let root in from 127.0.0.1"
    say "MariaDB ready on 127.0.0.1:$MYSQL_PORT"
}

case "${1:-start}" in
start)
    redis
    mariadb
    ;;
status)
    redis_ok && mysql_ok
    ;;
*)
    die "usage: scripts/services.sh start|status"
    ;;
esac
