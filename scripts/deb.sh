#!/usr/bin/env bash
# Builds the Debian package of mkc from a staged tree with dpkg-deb: no
# packaging tool to install or compile (dpkg-deb and dpkg-shlibdeps come
# with build-essential). `make deb` runs it on the release binary.
#
#   scripts/deb.sh [--bin PATH] [--out DIR] [--version V] [--fast]
#
#   --bin PATH     the mkc binary to package (default target/release/mkc);
#                  its debug information is stripped into the -dbgsym package
#   --out DIR      where the packages go (default target/deb)
#   --version V    package version (default: Cargo.toml's)
#   --fast         gzip -1 instead of xz, debug sections not compressed (for
#                  tests: on a debug build, about 10 s instead of a minute)
#
# Relative paths are taken from the repository's top directory.
#
# Writes DIR/mkc_V_ARCH.deb and DIR/mkc-dbgsym_V_ARCH.deb (the symbols, under
# /usr/lib/debug/.build-id/, where gdb and Rust's backtraces look) and prints
# their paths, one a line. What goes where, and why, is in README.md
# ("Debian package"). The files that differ from `make install`'s layout are
# made here from the same sources (conf/, systemd/), so that a change to
# those reaches the package.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_DIR"

bin=target/release/mkc
out=target/deb
version=""
compress=(-Zxz)
compress_debug=(--compress-debug-sections)
while [[ $# -gt 0 ]]; do
    case "$1" in
        --bin) bin="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --version) version="$2"; shift 2 ;;
        --fast) compress=(-Zgzip -z1) compress_debug=(); shift ;;
        *) echo "deb.sh: unknown argument $1 (see the top of $0)" >&2; exit 2 ;;
    esac
done

die() {
    echo "deb.sh: error: $*" >&2
    exit 1
}

[[ -x "$bin" ]] || die "$bin: no such binary (make build)"
if [[ -z "$version" ]]; then
    version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
fi
[[ -n "$version" ]] || die "Cargo.toml: no version line"
arch="$(dpkg --print-architecture)"
maintainer="${DEB_MAINTAINER:-mkc maintainers <root@localhost>}"

mkdir -p "$out"
work="$(mktemp -d "$out/.stage.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# debian/<package>: where dpkg-shlibdeps expects a package's files.
stage="$work/debian/mkc"
dbg_stage="$work/debian/mkc-dbgsym"

# sub FILE FROM TO: replaces the line FROM with TO in FILE, and fails when
# FROM is not there, so that a changed conf/ or systemd/ file is noticed.
sub() {
    local file="$1" from="$2" to="$3"
    grep -qxF -- "$from" "$file" || die "$file: line not found: $from"
    FROM="$from" TO="$to" perl -i -pe 'chomp; $_ = $ENV{TO} if $_ eq $ENV{FROM}; $_ .= "\n"' "$file"
}

# ─── the binary: debug information into the -dbgsym package ─────────────
# --strip-debug keeps the symbol table, so a panic's backtrace and perf
# name functions without the symbols package.
install -d "$stage/usr/bin"
objcopy --strip-debug "$bin" "$stage/usr/bin/mkc"
chmod 0755 "$stage/usr/bin/mkc"
build_id="$(readelf -n "$bin" | sed -n 's/^ *Build ID: *\([0-9a-f]*\)$/\1/p' | head -n 1)"
[[ ${#build_id} -gt 2 ]] || die "$bin has no GNU build id"
debug_file="$dbg_stage/usr/lib/debug/.build-id/${build_id:0:2}/${build_id:2}.debug"
install -d "$(dirname "$debug_file")"
objcopy --only-keep-debug "${compress_debug[@]}" "$bin" "$debug_file"
chmod 0644 "$debug_file"

# ─── configuration: conf/ with the package's paths ───────────────────────
install -d -m 0755 "$stage/etc/mkc"
conf="$stage/etc/mkc/server.conf"
install -m 0644 conf/server.conf "$conf"
install -m 0644 conf/module-example.conf "$stage/etc/mkc/module-example.conf"
install -m 0644 conf/module-example.lua "$stage/etc/mkc/module-example.lua"
install -m 0644 conf/route.lua "$stage/etc/mkc/route.lua"
sub "$conf" "log-file ../logs/mkc.log" "log-file /var/log/mkc/mkc.log"
sub "$conf" "pid-path ../run" "pid-path /run/mkc"
sub "$conf" "#property offset.store.path offset" "#property offset.store.path /var/lib/mkc/offset"
# The default (an SQLite file next to the pid file) would be in /run.
sub "$conf" "#dispatch-log /var/lib/mkc/dispatch-log.db" "dispatch-log /var/lib/mkc/dispatch-log.db"

# ─── systemd unit: systemd/mkc.service with the package's paths and user ─
unit="$stage/lib/systemd/system/mkc.service"
install -D -m 0644 systemd/mkc.service "$unit"
sub "$unit" "Documentation=file:///usr/local/mkc/README.md" "Documentation=file:///usr/share/doc/mkc/README.md"
sub "$unit" "PIDFile=/usr/local/mkc/run/mkc.pid" "PIDFile=/run/mkc/mkc.pid"
sub "$unit" "ExecStartPre=/usr/local/mkc/bin/mkc -c /usr/local/mkc/conf/server.conf -t" \
    "ExecStartPre=/usr/bin/mkc -c /etc/mkc/server.conf -t"
sub "$unit" "ExecStart=/usr/local/mkc/bin/mkc -c /usr/local/mkc/conf/server.conf" \
    "ExecStart=/usr/bin/mkc -c /etc/mkc/server.conf"
sub "$unit" "ExecReload=/usr/local/mkc/bin/mkc -c /usr/local/mkc/conf/server.conf -s reload" \
    "ExecReload=/usr/bin/mkc -c /etc/mkc/server.conf -s reload"
# RuntimeDirectoryPreserve: /run/mkc also holds the control file (paused
# modules), which must outlive a restart.
sub "$unit" "[Service]" "[Service]
# The Debian package's layout (scripts/deb.sh): the master and its workers
# run as the system user mkc; systemd creates /run/mkc, /var/lib/mkc and
# /var/log/mkc owned by it. Nothing in mkc needs root with these paths and
# an admin-listen port above 1023.
User=mkc
Group=mkc
RuntimeDirectory=mkc
RuntimeDirectoryPreserve=yes
StateDirectory=mkc
StateDirectoryMode=0750
LogsDirectory=mkc
LogsDirectoryMode=0750
# Beyond the unit's own sandboxing: the whole file system read-only but
# the three directories above (add ReadWritePaths= in a drop-in for files
# configured elsewhere), no home directories, no capabilities, no
# other users' processes, only the system calls of a system service,
# files not world-readable.
ProtectSystem=strict
ProtectHome=yes
CapabilityBoundingSet=
ProtectProc=invisible
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM
UMask=0027"
if grep -n /usr/local "$unit"; then die "$unit: a /usr/local path is left"; fi

# ─── logrotate: systemd/mkc.logrotate with the package's paths ───────────
rotate="$stage/etc/logrotate.d/mkc"
install -D -m 0644 systemd/mkc.logrotate "$rotate"
sub "$rotate" "/usr/local/mkc/logs/*.log {" "/var/log/mkc/*.log {
    su mkc mkc"
sub "$rotate" '        [ -f /usr/local/mkc/run/mkc.pid ] && kill -USR1 "$(cat /usr/local/mkc/run/mkc.pid)" || true' \
    '        [ -f /run/mkc/mkc.pid ] && kill -USR1 "$(cat /run/mkc/mkc.pid)" || true'
sub "$rotate" "# logrotate for mkc: install as /etc/logrotate.d/mkc." "# logrotate for mkc (the Debian package's /var/log/mkc)."
if grep -n /usr/local "$rotate"; then die "$rotate: a /usr/local path is left"; fi

# ─── directories the package owns (postinst sets their owners) ───────────
install -d -m 0755 "$stage/var/lib/mkc" "$stage/var/log/mkc"

# ─── documentation ──────────────────────────────────────────────────────
install -d "$stage/usr/share/doc/mkc"
install -m 0644 README.md "$stage/usr/share/doc/mkc/README.md"
cat >"$stage/usr/share/doc/mkc/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: mkc

Files: *
Copyright: the mkc authors
License: MIT
EOF

# ─── extra files ─────────────────────────────────────────────────────────
# One "SOURCE DEST MODE" a line, SOURCE relative to the repository (shell
# completions, the man page, ...). A missing SOURCE fails the build.
extras=(
    # "path/to/mkc.bash /usr/share/bash-completion/completions/mkc 0644"
)
# The man page and shell completions, generated by the packaged binary from
# its own flag definitions (as `make install` does).
"$bin" man >"$work/mkc.1"
"$bin" completions bash >"$work/mkc.bash"
"$bin" completions zsh >"$work/_mkc"
"$bin" completions fish >"$work/mkc.fish"
extras+=(
    "$work/mkc.1 /usr/share/man/man1/mkc.1 0644"
    "$work/mkc.bash /usr/share/bash-completion/completions/mkc 0644"
    "$work/_mkc /usr/share/zsh/vendor-completions/_mkc 0644"
    "$work/mkc.fish /usr/share/fish/vendor_completions.d/mkc.fish 0644"
)
for line in "${extras[@]}"; do
    read -r src dest mode <<<"$line"
    [[ -e "$src" ]] || die "extra file $src: not found"
    install -D -m "$mode" "$src" "$stage$dest"
done

# ─── control files ───────────────────────────────────────────────────────
# dpkg-shlibdeps reads debian/control for the package names, and finds
# the package's root by its DEBIAN directory.
install -d "$stage/DEBIAN"
printf 'Source: mkc\n\nPackage: mkc\nArchitecture: any\n' >"$work/debian/control"
shlibs="$(cd "$work" && dpkg-shlibdeps -O debian/mkc/usr/bin/mkc | sed -n 's/^shlibs:Depends=//p')"
[[ -n "$shlibs" ]] || die "dpkg-shlibdeps found no dependencies"

install -m 0755 packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm "$stage/DEBIAN/"
(cd "$stage" && find etc -type f | sed 's|^|/|' | sort) >"$stage/DEBIAN/conffiles"
description="$(sed -n 's/^description = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
cat >"$stage/DEBIAN/control" <<EOF
Package: mkc
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $(du -sk --exclude=DEBIAN "$stage" | cut -f1)
Depends: $shlibs, adduser
Section: net
Priority: optional
Description: $description
 mkc consumes Kafka topics and Redis lists and delivers every JSON command
 by HTTP to the endpoints of the modules that subscribe to its commandId,
 with delay and retry, committing only after delivery. A master process
 supervises per-source worker processes and an admin process (metrics,
 health, status page).
 .
 The unit mkc.service is enabled but not started on installation: edit
 /etc/mkc/server.conf, check it with mkc -c /etc/mkc/server.conf -t, then
 systemctl start mkc.
EOF

install -d "$dbg_stage/DEBIAN"
cat >"$dbg_stage/DEBIAN/control" <<EOF
Package: mkc-dbgsym
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $(du -sk --exclude=DEBIAN "$dbg_stage" | cut -f1)
Depends: mkc (= $version)
Section: debug
Priority: optional
Auto-Built-Package: debug-symbols
Build-Ids: $build_id
Description: debug symbols for mkc
 Lets gdb and RUST_BACKTRACE show file and line in mkc's backtraces.
EOF

# Files root-owned in the archive; the trees above are the build user's.
deb="$out/mkc_${version}_${arch}.deb"
dbg_deb="$out/mkc-dbgsym_${version}_${arch}.deb"
dpkg-deb --root-owner-group "${compress[@]}" --build "$stage" "$deb" >/dev/null
dpkg-deb --root-owner-group "${compress[@]}" --build "$dbg_stage" "$dbg_deb" >/dev/null
echo "$deb"
echo "$dbg_deb"
