#!/usr/bin/env bash
# A sysadmin's first hour with mvsnap (issue 10), end to end: install with the README's step,
# start the daemon with the command line the systemd unit runs (systemd is not PID 1 here; its
# readiness protocol is played by a listener on $NOTIFY_SOCKET), snapshot, list scripted
# (-H -o), watch events while the store fills (events --follow and an --on-event hook), stop
# with SIGTERM as systemd does. Every output is parsed and checked; exit 1 on the first
# mismatch.
set -euo pipefail
cd "$(dirname "$0")/.."

T=$(mktemp -d /tmp/mvsnap-sysadmin.XXXXXX)
PIDS=()
cleanup() {
    # Reap each one at once, quietly: a job killed by a signal and reaped later (after the next
    # command) makes bash print "Killed" and its command line.
    for p in "${PIDS[@]}"; do
        kill -9 "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    rm -rf "$T"
}
trap cleanup EXIT
fail() {
    echo "sysadmin-test: FAIL: $*" >&2
    for f in "$T"/*.log; do [ -f "$f" ] && { echo "--- $f" >&2; tail -20 "$f" >&2; }; done
    exit 1
}
ok() { echo "sysadmin-test: ok: $*"; }
wait_for() { # FILE PATTERN SECONDS WHAT
    local i=0
    until grep -q -- "$2" "$1" 2>/dev/null; do
        i=$((i + 1))
        [ "$i" -gt $(($3 * 10)) ] && fail "$4 (no '$2' in $1 after $3 s)"
        sleep 0.1
    done
}

# --- install, as the README says (reusing this checkout's build) -------------------------------
PREFIX=$T/prefix
CARGO_TARGET_DIR=$PWD/target scripts/install.sh "$PREFIX" >"$T/install.log" 2>&1 ||
    fail "scripts/install.sh"
MS=$PREFIX/bin/mvsnap
"$MS" --version | grep -q '^mvsnap ' || fail "the installed binary"
grep -q 'snapshot' "$PREFIX/share/man/man1/mvsnap-snapshot-list.1" || fail "man page"
grep -q 'mvsnap' "$PREFIX/share/bash-completion/completions/mvsnap" || fail "bash completion"
ok "installed under $PREFIX (binary, man pages, completions)"

# --- a store and an origin ---------------------------------------------------------------------
export MVSNAP_STORE=$T/store.img MVSNAP_RUNTIME_DIR=$T/run
head -c 48M /dev/urandom >"$T/disk.img"
OLD=$(sha256sum <"$T/disk.img" | cut -d' ' -f1)
"$MS" format "$MVSNAP_STORE" --size 24M >/dev/null
"$MS" origin add "$T/disk.img" --id disk >/dev/null

# --- the unit's command line, with its readiness protocol -------------------------------------
UNIT=contrib/systemd/mvsnap@.service
grep -q '^Type=notify' "$UNIT" || fail "the unit is not Type=notify"
EXEC=$(sed -n 's/^ExecStart=//p' "$UNIT")
[ -n "$EXEC" ] || fail "no ExecStart in $UNIT"
# %f is the store's path; $MVSNAP_SERVE_ARGS the drop-in's extra options.
read -r -a WORDS <<<"${EXEC//%f/$MVSNAP_STORE}"
ARGV=("$MS")
for w in "${WORDS[@]:1}"; do
    [ "$w" = '$MVSNAP_SERVE_ARGS' ] || ARGV+=("$w")
done
HOOK='printf "%s %s\n" "$MVSNAP_EVENT_KIND" "$MVSNAP_EVENT_MESSAGE" >>'"$T/hook.log"
python3 - "$T/notify.sock" "$T/notify.log" <<'EOF' &
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
with open(sys.argv[2], "a") as f:
    while True:
        f.write(s.recv(4096).decode().replace("\n", " ") + "\n")
        f.flush()
EOF
PIDS+=($!)
for _ in $(seq 50); do [ -S "$T/notify.sock" ] && break; sleep 0.1; done
NOTIFY_SOCKET=$T/notify.sock "${ARGV[@]}" --on-event "$HOOK" >"$T/serve.out" 2>"$T/serve.log" &
DAEMON=$!
PIDS+=($DAEMON)
wait_for "$T/notify.log" 'READY=1' 60 "systemd readiness"
grep -q '^ready nbd=unix:' "$T/serve.out" || fail "readiness line"
ok "the unit's command line is ready (READY=1)"

# --- snapshot, list scripted -------------------------------------------------------------------
[ "$("$MS" snapshot create disk --tag mon)" = mon ] || fail "snapshot create prints the tag"
LINE=$("$MS" snapshot list -H -o name,state,exclusive -p disk)
[ "$LINE" = "$(printf 'disk@mon\tvalid\t0')" ] || fail "snapshot list -H -o: '$LINE'"
ok "snapshot list -H -o name,state,exclusive -p: $LINE"

# --- events while the store fills --------------------------------------------------------------
"$MS" events --follow --json >"$T/follow.log" 2>&1 &
PIDS+=($!)
head -c 40M /dev/urandom >"$T/new.bin"
NEW=$(head -c 48M <(cat "$T/new.bin" <(tail -c 8M "$T/disk.img")) | sha256sum | cut -d' ' -f1)
"$MS" write disk --offset 0 <"$T/new.bin" || fail "origin writes never fail for lack of space"
wait_for "$T/follow.log" '"kind":"snapshot-invalidated"' 30 "events --follow"
python3 -c '
import json, sys
evs = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
inv = [e for e in evs if e["kind"] == "snapshot-invalidated"]
assert inv and "disk@mon" in inv[0]["message"], evs
assert all(isinstance(e["time"], int) and e["time"] > 1.7e9 for e in evs), evs
' "$T/follow.log" || fail "the followed events"
wait_for "$T/hook.log" '^snapshot-invalidated .*disk@mon' 30 "the --on-event hook"
STATE=$("$MS" snapshot list -H -o state disk@mon)
[ "$STATE" = invalid ] || fail "the snapshot's state: '$STATE'"
[ "$("$MS" cat disk | sha256sum | cut -d' ' -f1)" = "$NEW" ] || fail "the origin's bytes"
ok "the store filled: event followed, hook ran, disk@mon invalid, origin exact"

# --- stop as systemd does ----------------------------------------------------------------------
kill -TERM "$DAEMON"
wait "$DAEMON" || fail "the daemon's exit status after SIGTERM"
wait_for "$T/notify.log" 'STOPPING=1' 10 "the stopping notice"
"$MS" check >"$T/check.log" || fail "check after the stop"
[ "$OLD" != "$NEW" ] || fail "the test data"
ok "stopped cleanly (STOPPING=1, exit 0), check clean"
echo "sysadmin-test: all passed"
