#!/usr/bin/env bash
# mvsnap's main job, end to end, on image files this script makes itself under ./demo-out
# (no devices, no root): an origin, a COW store, writes, snapshots (read-only, writable, a
# snapshot of a snapshot), a full overwrite of the origin, and the proof that every version
# still reads what it held: sha256 sums, `snapshot list`, `info` and `check`.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$ROOT/demo-out
MIB=$((1024 * 1024))

if [ -t 1 ]; then BOLD=$'\033[1m' PLAIN=$'\033[0m'; else BOLD='' PLAIN=''; fi
say() { printf '\n%s== %s%s\n' "$BOLD" "$*" "$PLAIN"; }
# show ARGS...: print a command line as one would type it.
show() {
    local a line='$'
    for a in "$@"; do
        if [[ $a =~ ^[A-Za-z0-9@%+=:,./_-]+$ ]]; then
            line+=" $a"
        else
            line+=" '${a//\'/\'\\\'\'}'"
        fi
    done
    printf '%s\n' "$line"
}
run() {
    show "$@"
    "$@"
}

say "Building mvsnap (release)"
cargo build --release -p mvsnap-cli
MVSNAP=$ROOT/target/release/mvsnap
mvsnap() { "$MVSNAP" "$@"; }

rm -rf "$OUT"
mkdir -p "$OUT"
cd "$OUT"

# pattern OFFSET LENGTH TEXT: print the LENGTH bytes that belong at OFFSET, each 4 KiB block
# filled with "TEXT block N" (N counted from the start of the disk), so a dump shows whose it is.
pattern() {
    python3 - "$@" <<'PY'
import sys
offset, length, text = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
out = bytearray()
for off in range(offset, offset + length, 4096):
    line = f"{text} block {off // 4096:06d}\n".encode()
    block = (line * (4096 // len(line) + 1))[:4096]
    out += block
sys.stdout.buffer.write(out[:length])
PY
}

# write_pattern VOLUME OFFSET LENGTH TEXT: `mvsnap write` of a pattern piped in on stdin.
write_pattern() {
    local off=$2
    if [ "$off" -gt 0 ] && [ $((off % MIB)) -eq 0 ]; then off="$((off / MIB))M"; fi
    show mvsnap write "$1" --offset "$off"
    echo "  (stdin: $(($3 / MIB)) MiB of the '$4' pattern)"
    pattern "$2" "$3" "$4" | mvsnap write "$1" --offset "$off"
}

say "An origin: a 256 MiB disk image (disk.img) with the pattern 'v1'"
pattern 0 $((256 * MIB)) v1 >disk.img
ls -l disk.img
show head -n 1 disk.img
head -n 1 disk.img

say "A COW store: a 1 GiB file (space in 4 KiB blocks), and the origin bound to it"
run mvsnap format store.img --size 1G
export MVSNAP_STORE=$OUT/store.img
echo "\$ export MVSNAP_STORE=$MVSNAP_STORE"
run mvsnap origin add disk.img --id disk
run mvsnap origin list

say "Monday: a few writes through mvsnap, then a snapshot"
write_pattern disk 0 $((1 * MIB)) monday
write_pattern disk $((100 * MIB)) $((4 * MIB)) monday
run mvsnap snapshot create disk --tag monday --memo "after the monday edits"

say "Tuesday: overwrite the first 64 MiB, then another snapshot"
write_pattern disk 0 $((64 * MIB)) tuesday
run mvsnap snapshot create disk --tag tuesday --memo "first 64 MiB rewritten"

say "An experiment: a writable snapshot of monday, and a snapshot of that"
run mvsnap snapshot create disk@monday --tag experiment --writable --memo "a fix tried on the monday data"
write_pattern disk@experiment 0 $((2 * MIB)) experiment
run mvsnap snapshot create disk@experiment --tag experiment-v1 --memo "the fix, frozen"
write_pattern disk@experiment $((200 * MIB)) $((1 * MIB)) experiment2

say "Wednesday: the whole origin is overwritten with 'v3'"
write_pattern disk 0 $((256 * MIB)) v3

say "Every version keeps its own contents"
VERSIONS=(disk disk@monday disk@tuesday disk@experiment disk@experiment-v1)
declare -A SUMS
for v in "${VERSIONS[@]}"; do
    SUMS[$v]=$(mvsnap cat "$v" | sha256sum | cut -c1-16)
    printf '  %-22s sha256 %s...   block 0: %s\n' "$v" "${SUMS[$v]}" \
        "$(mvsnap cat "$v" --length 64 | head -n 1)"
done
echo
echo "  What each block 0 and block 25600 (100 MiB) say, read through mvsnap:"
for v in "${VERSIONS[@]}"; do
    printf '  %-22s %-24s %s\n' "$v" "$(mvsnap cat "$v" --length 64 | head -n 1)" \
        "$(mvsnap cat "$v" --offset 100M --length 64 | head -n 1)"
done

# The expected contents, computed without mvsnap.
expect() { sha256sum | cut -c1-16; }
{ pattern 0 $((1 * MIB)) monday; pattern $((1 * MIB)) $((99 * MIB)) v1
  pattern $((100 * MIB)) $((4 * MIB)) monday; pattern $((104 * MIB)) $((152 * MIB)) v1; } |
    expect >"$OUT/want-monday"
distinct=$(printf '%s\n' "${SUMS[@]}" | sort -u | wc -l)
echo
if [ "$distinct" -eq "${#VERSIONS[@]}" ] && [ "${SUMS[disk@monday]}" == "$(cat "$OUT/want-monday")" ] &&
    [ "${SUMS[disk]}" == "$(sha256sum <disk.img | cut -c1-16)" ]; then
    echo "  all ${#VERSIONS[@]} versions differ from each other;"
    echo "  disk@monday equals monday's contents computed independently;"
    echo "  the origin as read through mvsnap equals disk.img itself."
else
    echo "  UNEXPECTED: $distinct distinct contents for ${#VERSIONS[@]} versions" >&2
    exit 1
fi

say "The snapshots"
run mvsnap snapshot list

say "The store"
run mvsnap info

say "Consistency check"
run mvsnap check

say "Done: files are in $OUT"
