#!/usr/bin/env bash
# Black-box tests of the `mvsnap` binary on image files in a temporary directory.
#
# Every expectation is computed independently of mvsnap, on plain copies of the files (dd), and
# compared by sha256. Each check prints `ok - ...` or `not ok - ...`; the last line is
# `N passed, M failed`, and the exit status is non-zero if any check failed.
#
# MVSNAP_BIN=path/to/mvsnap selects the binary (default: build and use target/release/mvsnap).
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

if [ -z "${MVSNAP_BIN:-}" ]; then
    if ! cargo build --release -p mvsnap-cli >&2; then
        echo "not ok - cargo build --release -p mvsnap-cli"
        echo "0 passed, 1 failed"
        exit 1
    fi
    MVSNAP_BIN=$ROOT/target/release/mvsnap
fi
unset MVSNAP_STORE RUST_LOG

T=$(mktemp -d "${TMPDIR:-/tmp}/mvsnap-cli-test.XXXXXX")
trap 'rm -rf "$T"' EXIT
STORE=$T/store.img
MIB=$((1024 * 1024))
SIZE=$((64 * MIB))

passed=0
failed=0
ok() {
    passed=$((passed + 1))
    echo "ok - $*"
}
not_ok() {
    failed=$((failed + 1))
    echo "not ok - $*"
}
# Show a captured file as indented diagnostics (at most a few lines).
diag() {
    local f
    for f in "$@"; do
        [ -s "$f" ] && head -n 5 "$f" | sed 's/^/#   /'
    done
    return 0
}

mvsnap() { "$MVSNAP_BIN" "$@"; }
ms() { "$MVSNAP_BIN" --store "$STORE" "$@"; }

# run CMD...: run with stdout/stderr captured in $T/out, $T/err; status in RC.
run() {
    "$@" >"$T/out" 2>"$T/err"
    RC=$?
}

# expect_ok DESC CMD...: exit status 0.
expect_ok() {
    local desc=$1
    shift
    run "$@"
    if [ "$RC" -eq 0 ]; then
        ok "$desc"
    else
        not_ok "$desc (exit status $RC)"
        diag "$T/err"
    fi
}

# expect_error DESC REGEX CMD...: exit status 1 and exactly one line on stderr,
# `mvsnap: error: ...`, matching REGEX (grep -E, case-insensitive).
expect_error() {
    local desc=$1 regex=$2
    shift 2
    run "$@"
    local lines first
    lines=$(wc -l <"$T/err")
    first=$(head -n 1 "$T/err")
    if [ "$RC" -eq 1 ] && [ "$lines" -eq 1 ] && [[ $first == "mvsnap: error: "* ]] &&
        grep -qiE -- "$regex" "$T/err"; then
        ok "$desc"
        echo "#   $first"
    else
        not_ok "$desc (exit status $RC, $lines stderr lines, want 1 line matching /$regex/)"
        diag "$T/err"
    fi
}

# expect_usage_error DESC CMD...: clap's usage error, exit status 2.
expect_usage_error() {
    local desc=$1
    shift
    run "$@"
    if [ "$RC" -eq 2 ] && [ -s "$T/err" ]; then
        ok "$desc"
        echo "#   $(head -n 1 "$T/err")"
    else
        not_ok "$desc (exit status $RC, want 2)"
        diag "$T/err"
    fi
}

# expect_eq DESC GOT WANT
expect_eq() {
    if [ "$2" == "$3" ]; then
        ok "$1"
    else
        not_ok "$1 (got '$2', want '$3')"
    fi
}

sum() { sha256sum "$1" | cut -d' ' -f1; }

# expect_volume NAME MODEL: `mvsnap cat NAME` equals the file MODEL.
expect_volume() {
    local name=$1 model=$2 got status
    got=$(ms cat "$name" 2>"$T/cat.err" | sha256sum | cut -d' ' -f1)
    status=${PIPESTATUS[0]}
    if [ "$status" -eq 0 ] && [ "$got" == "$(sum "$model")" ]; then
        ok "cat $name matches the expected bytes"
    else
        not_ok "cat $name matches the expected bytes (exit status $status)"
        diag "$T/cat.err"
    fi
}

# gen FILE BYTES SEED: reproducible data, each 4 KiB block labelled with the seed and its number.
gen() {
    python3 - "$1" "$2" "$3" <<'PY'
import random, sys
path, size, seed = sys.argv[1], int(sys.argv[2]), sys.argv[3]
data = bytearray(random.Random(seed).randbytes(size))
for off in range(0, size, 4096):
    label = f"[{seed} block {off // 4096}]".encode()[: min(4096, size - off)]
    data[off : off + len(label)] = label
with open(path, "wb") as f:
    f.write(data)
PY
}

# patch MODEL OFFSET DATA: what a write of DATA at OFFSET does to a plain file.
patch() {
    dd if="$3" of="$1" bs=1M conv=notrunc oflag=seek_bytes seek="$2" status=none
}

# write_vol NAME MODEL OFFSET DATA: `mvsnap write` through the engine, and the same on the model.
write_vol() {
    local name=$1 model=$2 off=$3 data=$4
    expect_ok "write $(stat -c %s "$data") bytes to $name at offset $off" \
        ms write "$name" --offset "$off" <"$data"
    patch "$model" "$off" "$data"
}

# Remember the store's bytes, to show later that a failed command left it untouched.
# A command that opens the store for writing may rewrite its superblocks (the two copies at 0 and
# 4096: a new epoch at every open) before it finds the problem; the rest must not change.
tail_sum() { tail -c +8193 "$1" | sha256sum | cut -d' ' -f1; }
remember_store() {
    STORE_SUM=$(sum "$STORE")
    STORE_TAIL_SUM=$(tail_sum "$STORE")
}
expect_store_intact() {
    if [ "$(sum "$STORE")" == "$STORE_SUM" ]; then
        ok "store file unchanged after: $1"
    else
        not_ok "store file unchanged after: $1"
    fi
}
expect_store_data_intact() {
    if [ "$(tail_sum "$STORE")" == "$STORE_TAIL_SUM" ]; then
        ok "store unchanged past its superblocks after: $1"
    else
        not_ok "store unchanged past its superblocks after: $1"
    fi
}

json() { # json FILE PYTHON-EXPR-ON-d: evaluates to True or prints why not
    python3 - "$1" "$2" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:
    print(f"not JSON: {e}")
    sys.exit(1)
ok = eval("(" + sys.argv[2] + ")")
if not ok:
    print(f"JSON check failed: {sys.argv[2]}")
    sys.exit(1)
PY
}
expect_json() { # expect_json DESC FILE EXPR
    local out
    if out=$(json "$2" "$3"); then
        ok "$1"
    else
        not_ok "$1"
        echo "#   $out"
    fi
}

echo "# mvsnap: $MVSNAP_BIN"
echo "# work dir: $T"

# --- help ---------------------------------------------------------------------------------------
for cmd in "" format origin "origin add" "origin remove" "origin list" snapshot \
    "snapshot create" "snapshot delete" "snapshot list" cat write check info; do
    # shellcheck disable=SC2086 # word splitting of $cmd is wanted
    run mvsnap $cmd --help
    if [ "$RC" -eq 0 ] && grep -q '^Examples:' "$T/out"; then
        ok "mvsnap $cmd --help shows examples"
    else
        not_ok "mvsnap $cmd --help shows examples (exit status $RC)"
    fi
done
expect_usage_error "no store given" mvsnap snapshot list
expect_usage_error "garbage size --size 12Q" mvsnap format "$T/x.img" --size 12Q
expect_usage_error "garbage size --size 1.5X" mvsnap format "$T/x.img" --size 1.5X
expect_usage_error "a negative size" mvsnap format "$T/x.img" --size -1M
if [ ! -e "$T/x.img" ]; then ok "bad sizes create no file"; else not_ok "bad sizes create no file"; fi
expect_usage_error "write without --offset" ms write disk0
expect_usage_error "unknown command" mvsnap frobnicate

# --- format, origins ----------------------------------------------------------------------------
expect_ok "format a 256 MiB store" \
    mvsnap format "$STORE" --size 256M
remember_store
expect_error "format refuses an existing store without --force" "exist|force" \
    mvsnap format "$STORE" --size 256M
expect_store_intact "format without --force"

gen "$T/disk0.img" "$SIZE" disk0
gen "$T/disk1.img" "$SIZE" disk1
cp "$T/disk0.img" "$T/m-disk0"
cp "$T/disk1.img" "$T/m-disk1"

expect_ok "origin add disk0.img --id disk0" ms origin add "$T/disk0.img" --id disk0
expect_eq "origin add prints the id" "$(cat "$T/out")" disk0
expect_ok "origin add disk1.img --id disk1" ms origin add "$T/disk1.img" --id disk1
head -c "$MIB" /dev/zero >"$T/other.img"
expect_ok "origin add other.img (default id)" ms origin add "$T/other.img"
expect_eq "the default origin id is the file name" "$(cat "$T/out")" other.img
# The same file again under another name: refused as bound here, naming the origin (a hard
# link used to fail on this store's own lock, "in use by another mvsnap store or process").
ln "$T/disk0.img" "$T/disk0-link.img"
ln -s "$T/disk0.img" "$T/disk0-sym.img"
expect_error "origin add of a hard link to disk0.img" "as disk0\) already exists" \
    ms origin add "$T/disk0-link.img" --id again
expect_error "origin add of a symlink to disk0.img" "as disk0\) already exists" \
    ms origin add "$T/disk0-sym.img" --id again
rm -f "$T/disk0-link.img" "$T/disk0-sym.img"
expect_ok "origin list --json" ms origin list --json
cp "$T/out" "$T/origins.json"
expect_json "origin list --json: three origins with their sizes" "$T/origins.json" \
    "sorted((o['id'], o['size']) for o in d) == [('disk0', $SIZE), ('disk1', $SIZE), ('other.img', $MIB)]"
expect_ok "origin remove other.img" ms origin remove other.img
expect_ok "origin list" ms origin list
if grep -q '^ID ' "$T/out" && grep -q '^disk0 ' "$T/out" && ! grep -q other.img "$T/out"; then
    ok "origin list shows a table without the removed origin"
else
    not_ok "origin list shows a table without the removed origin"
    diag "$T/out"
fi
expect_error "origin add of the same id again" "exist" ms origin add "$T/disk0.img" --id disk0

# --- writes and snapshots -----------------------------------------------------------------------
gen "$T/d-1m" "$MIB" w1
gen "$T/d-5000" 5000 w2
gen "$T/d-3m" $((3 * MIB + 123)) w3
gen "$T/d-4k" 4096 w4
gen "$T/d-200k" $((200 * 1024)) w5
gen "$T/d-2m" $((2 * MIB)) w6
gen "$T/d-1" 1 w7
gen "$T/d-full" "$SIZE" w8
gen "$T/d-8m" $((8 * MIB)) w9

write_vol disk0 "$T/m-disk0" 0 "$T/d-1m"
write_vol disk0 "$T/m-disk0" 65000 "$T/d-5000" # unaligned, across a chunk boundary
expect_volume disk0 "$T/m-disk0"
expect_eq "origin file disk0.img holds what was written" "$(sum "$T/disk0.img")" "$(sum "$T/m-disk0")"

expect_ok "snapshot create disk0 --tag s1 --memo first" \
    ms snapshot create disk0 --tag s1 --memo first
expect_eq "snapshot create prints the new tag" "$(cat "$T/out")" s1
cp "$T/m-disk0" "$T/m-s1"

write_vol disk0 "$T/m-disk0" $((10 * MIB + 7)) "$T/d-3m" # unaligned, several 1 MiB pieces
write_vol disk0 "$T/m-disk0" 0 "$T/d-4k"
write_vol disk0 "$T/m-disk0" $((SIZE - 1)) "$T/d-1" # the last byte
expect_volume disk0 "$T/m-disk0"
expect_volume disk0@s1 "$T/m-s1"

expect_ok "snapshot of a snapshot: create disk0@s1 --tag s1a" ms snapshot create disk0@s1 --tag s1a
expect_eq "snapshot of a snapshot prints its tag" "$(cat "$T/out")" s1a
cp "$T/m-s1" "$T/m-s1a"

expect_ok "writable snapshot: create disk0 --tag w --writable" \
    ms snapshot create disk0 --tag w --writable
cp "$T/m-disk0" "$T/m-w"
write_vol disk0@w "$T/m-w" $((MIB + 512)) "$T/d-200k"
write_vol disk0@w "$T/m-w" $((20 * MIB)) "$T/d-4k"
expect_volume disk0@w "$T/m-w"
expect_volume disk0 "$T/m-disk0"

expect_ok "snapshot of a writable snapshot: create disk0@w --tag w1" \
    ms snapshot create disk0@w --tag w1
cp "$T/m-w" "$T/m-w1"
write_vol disk0@w "$T/m-w" $((MIB + 100)) "$T/d-2m"
expect_volume disk0@w "$T/m-w"
expect_volume disk0@w1 "$T/m-w1"

expect_ok "snapshot set: create disk0 disk1 --tag T" ms snapshot create disk0 disk1 --tag T
expect_eq "snapshot set prints its one tag" "$(cat "$T/out")" T
cp "$T/m-disk0" "$T/m-T0"
cp "$T/m-disk1" "$T/m-T1"

write_vol disk0 "$T/m-disk0" 0 "$T/d-full" # overwrite all of disk0
write_vol disk1 "$T/m-disk1" $((4 * MIB)) "$T/d-8m"

for v in disk0:m-disk0 disk1:m-disk1 disk0@s1:m-s1 disk0@s1a:m-s1a disk0@w:m-w \
    disk0@w1:m-w1 disk0@T:m-T0 disk1@T:m-T1; do
    expect_volume "${v%%:*}" "$T/${v#*:}"
done
expect_eq "origin file disk0.img equals the model" "$(sum "$T/disk0.img")" "$(sum "$T/m-disk0")"
expect_eq "origin file disk1.img equals the model" "$(sum "$T/disk1.img")" "$(sum "$T/m-disk1")"

# Ranges.
got=$(ms cat disk0@s1 --offset 1M --length 100000 | sha256sum | cut -d' ' -f1)
want=$(dd if="$T/m-s1" bs=1M iflag=skip_bytes,count_bytes skip=$MIB count=100000 status=none |
    sha256sum | cut -d' ' -f1)
expect_eq "cat --offset 1M --length 100000 of disk0@s1" "$got" "$want"
got=$(ms cat disk0 --offset $((SIZE - 10)) | sha256sum | cut -d' ' -f1)
want=$(tail -c 10 "$T/m-disk0" | sha256sum | cut -d' ' -f1)
expect_eq "cat --offset SIZE-10 reads the last 10 bytes" "$got" "$want"
expect_error "cat past the end" "beyond|range|end" ms cat disk0 --offset 63M --length 2M
expect_error "cat of an unknown snapshot" "not found|no such|unknown" ms cat disk0@nope
expect_error "cat of an unknown origin" "not found|no such|unknown" ms cat nodisk

# --- list, info, check --------------------------------------------------------------------------
expect_ok "snapshot list --json" ms snapshot list --json
cp "$T/out" "$T/snaps.json"
expect_json "snapshot list --json names every snapshot" "$T/snaps.json" \
    "sorted(s['name'] for s in d) == ['disk0@T', 'disk0@s1', 'disk0@s1a', 'disk0@w', 'disk0@w1', 'disk1@T']"
expect_json "snapshot list --json: parents, writable flags, memo, state" "$T/snaps.json" \
    "(lambda m: m['disk0@s1']['parent'] == 'disk0' and m['disk0@s1a']['parent'] == 'disk0@s1'
      and m['disk0@w1']['parent'] == 'disk0@w' and m['disk1@T']['parent'] == 'disk1'
      and m['disk0@w']['writable'] is True and m['disk0@s1']['writable'] is False
      and m['disk0@s1']['memo'] == 'first' and m['disk0@s1']['tag'] == 's1'
      and m['disk0@s1']['origin'] == 'disk0'
      and all(s['state'] == 'valid' and s['created'] > 1500000000 for s in d))
     ({s['name']: s for s in d})"
expect_ok "snapshot list" ms snapshot list
if head -n 1 "$T/out" | grep -qE '^NAME +PARENT +CREATED +STATE +WRITABLE +EXCLUSIVE +SHARED +MEMO$' &&
    [ "$(wc -l <"$T/out")" -eq 7 ] && grep -qE '^disk0@s1 +disk0 .* first$' "$T/out"; then
    ok "snapshot list prints a table, one row per snapshot"
else
    not_ok "snapshot list prints a table, one row per snapshot"
    diag "$T/out"
fi

# Tables for scripts (-H -p -o -s), filters, aliases.
expect_ok "snapshot ls disk1 -H -o name,parent" ms snapshot ls disk1 -H -o name,parent
expect_eq "snapshot ls ORIGIN -H -o: one tab-separated row per snapshot of that origin" \
    "$(cat "$T/out")" "$(printf 'disk1@T\tdisk1')"
expect_ok "snapshot list -H -p -o name,exclusive,shared -s name" \
    ms snapshot list -H -p -o name,exclusive,shared -s name
if python3 - "$T/out" "$T/snaps.json" <<'PY'; then
import json, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().splitlines()]
want = sorted((s["name"], str(s["exclusive_bytes"]), str(s["shared_bytes"]))
              for s in json.load(open(sys.argv[2])))
sys.exit(0 if [tuple(r) for r in rows] == want else 1)
PY
    ok "snapshot list -H -p matches --json (exact bytes, sorted by name)"
else
    not_ok "snapshot list -H -p matches --json (exact bytes, sorted by name)"
    diag "$T/out"
fi
expect_ok "origin ls -H -p -o id,size -S id" ms origin ls -H -p -o id,size -S id
expect_eq "origin ls -H -p: sizes in bytes, sorted descending" "$(cat "$T/out")" \
    "$(printf 'disk1\t%s\ndisk0\t%s' "$SIZE" "$SIZE")"
expect_usage_error "a bad column name lists the valid ones" ms snapshot list -o name,size
if grep -q 'possible values: name, origin, tag' "$T/err"; then ok "the valid columns are listed"; else
    not_ok "the valid columns are listed"
    diag "$T/err"
fi
expect_error "snapshot list of an unknown origin" "origin nope not found" ms snapshot list nope
# Sizes: 4KB = 4KiB = 4096, 1.5K = 1536.
expect_ok "cat --offset 4KB --length 1.5K" ms cat disk0@s1 --offset 4KB --length 1.5K
expect_eq "cat --offset 4KB --length 1.5K reads bytes 4096..5632" "$(sum "$T/out")" \
    "$(dd if="$T/m-s1" bs=512 skip=8 count=3 status=none | sha256sum | cut -d' ' -f1)"
# cat to a regular file is sparse: a snapshot of a 64 MiB sparse origin holding 1 MiB of data.
truncate -s $((64 * MIB)) "$T/sparse0.img"
expect_ok "origin add a sparse 64 MiB origin" ms origin add "$T/sparse0.img" --id sp
expect_ok "write 1 MiB to it" ms write sp --offset 5M <"$T/d-1m"
expect_ok "snapshot of the sparse origin" ms snapshot create sp --tag a
expect_ok "cat sp@a > a regular file" ms cat sp@a
blocks=$(stat -c %b "$T/out")
if [ "$(sum "$T/out")" == "$(sum "$T/sparse0.img")" ] && [ "$blocks" -lt $((4 * 2048)) ]; then
    ok "cat of a mostly empty snapshot to a file: right bytes, sparse ($blocks blocks for 64 MiB)"
else
    not_ok "cat of a mostly empty snapshot to a file: right bytes, sparse ($blocks blocks for 64 MiB)"
fi
got=$(ms cat sp@a --sparse never | sha256sum | cut -d' ' -f1)
expect_eq "cat sp@a --sparse never | sha256sum" "$got" "$(sum "$T/sparse0.img")"
expect_ok "snapshot rm -r -y sp@a (alias, several flags)" ms snapshot rm -r -y sp@a
expect_ok "origin rm sp" ms origin rm sp

expect_ok "info" ms info
if grep -q '^chunk size *4.0 KiB' "$T/out" && grep -q '^snapshots (6)' "$T/out"; then
    ok "info shows the geometry and the snapshots"
else
    not_ok "info shows the geometry and the snapshots"
    diag "$T/out"
fi
# The overwrites' preserved entries wait, sorted, in RAM for the fold into the index; the
# tables of the last commit carried them, so an offline `info` has them too.
if grep -Eq '^buffered index entries +[1-9][0-9]* \(' "$T/out"; then
    ok "info shows the buffered index entries"
else
    not_ok "info shows the buffered index entries"
    diag "$T/out"
fi
expect_ok "info --json" ms info --json
cp "$T/out" "$T/info.json"
expect_json "info --json: geometry, space, origins, snapshots" "$T/info.json" \
    "d['chunk_size'] == 4096 and d['used_bytes'] > 0 and d['free_bytes'] > 0
     and len(d['origins']) == 2 and len(d['snapshots']) == 6 and isinstance(d['events'], list)
     and all('exclusive_bytes' in s and 'shared_bytes' in s for s in d['snapshots'])
     and d['overlay_entries'] > 0 and d['overlay_bytes'] == 48 * d['overlay_entries']"
# One copy: disk0 was wholly overwritten once after its snapshots, disk1 8 MiB; plus a few MiB
# written to disk0@w and preserved for disk0@s1. Far less than one copy per snapshot.
expect_json "one copy: COW space used stays near one overwrite (< 1.05 x 72 MiB + 8 MiB)" \
    "$T/info.json" "d['used_bytes'] <= 1.05 * 72 * 2**20 + 8 * 2**20"
echo "#   used_bytes: $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["used_bytes"])' "$T/info.json")"

expect_ok "check" ms check
if grep -q '^clean' "$T/out"; then ok "check reports clean"; else
    not_ok "check reports clean"
    diag "$T/out"
fi
expect_ok "check --json" ms check --json
cp "$T/out" "$T/check.json"
expect_json "check --json: no errors, snapshots counted" "$T/check.json" \
    "d['errors'] == [] and d['slots_used'] > 0 and d['slots_used'] + d['slots_free'] == d['slots_total']"

# --- delete ------------------------------------------------------------------------------------
expect_ok "snapshot delete disk0@s1a" ms snapshot delete disk0@s1a
expect_error "snapshot delete disk0@w (it has a child) is refused, naming the child and -r" \
    "disk0@w has 1 snapshot taken from it \\(disk0@w1\\).*-r" ms snapshot delete disk0@w
expect_error "snapshot delete -r without -y on a non-terminal is refused" "not a terminal.*-y" \
    ms snapshot delete -r disk0@w </dev/null
expect_ok "snapshot delete -r -n: what it would delete" ms snapshot delete -r -n disk0@w
expect_eq "snapshot delete -r -n lists the subtree, children first" "$(cat "$T/out")" \
    "$(printf 'would delete disk0@w1\nwould delete disk0@w')"
expect_ok "snapshot list --json after deletes" ms snapshot list --json
cp "$T/out" "$T/snaps2.json"
expect_json "deleted snapshots are gone, refused deletes deleted nothing" "$T/snaps2.json" \
    "(lambda m: 'disk0@s1a' not in m and m['disk0@w']['state'] == 'valid'
      and {'disk0@s1', 'disk0@w1', 'disk0@T', 'disk1@T'} <= set(m))({s['name']: s for s in d})"
expect_volume disk0@w "$T/m-w"
expect_volume disk0@s1 "$T/m-s1"
expect_volume disk0@w1 "$T/m-w1"
expect_volume disk0@T "$T/m-T0"
expect_volume disk0 "$T/m-disk0"
expect_ok "check after deletes" ms check
expect_error "delete of an unknown snapshot" "not found|no such|unknown" ms snapshot delete disk0@nope
expect_usage_error "delete of an origin name" ms snapshot delete disk0

# --- bad input: a clear one-line error, and the store untouched ---------------------------------
remember_store
BASE_TAIL_SUM=$STORE_TAIL_SUM
expect_error "a store path that is a directory" "directory|not an mvsnap|invalid" \
    mvsnap --store "$T" snapshot list

expect_error "duplicate tag" "exist|duplicate" ms snapshot create disk0 --tag s1
expect_store_data_intact "duplicate tag"

head -c 4096 "$T/d-4k" >"$T/d-4k-b"
expect_error "write to a read-only snapshot" "read-only|read only" \
    ms write disk0@s1 --offset 0 <"$T/d-4k-b"
expect_store_data_intact "write to a read-only snapshot"
expect_volume disk0@s1 "$T/m-s1"

expect_error "write past the end of the origin" "beyond|range|end" \
    ms write disk0 --offset $((SIZE - 100)) <"$T/d-4k"
expect_store_data_intact "write past the end"
expect_eq "origin untouched by the refused write" "$(sum "$T/disk0.img")" "$(sum "$T/m-disk0")"

expect_usage_error "--max-size under --size" \
    mvsnap format "$T/new.img" --size 64M --max-size 32M
if [ -e "$T/new.img" ]; then not_ok "invalid sizes create no file"; else
    ok "invalid sizes create no file"
fi
remember_store
expect_usage_error "--max-size under --size on the store with --force" \
    mvsnap format "$STORE" --size 512M --max-size 300M --force
expect_store_intact "format --size 512M --max-size 300M --force"

truncate -s +1M "$T/disk1.img"
remember_store
expect_error "origin whose size changed: cat" "size" ms cat disk1
expect_store_intact "cat of an origin whose size changed"
expect_error "origin whose size changed: snapshot create" "size" ms snapshot create disk1 --tag X
expect_store_data_intact "an origin whose size changed"
truncate -s "$SIZE" "$T/disk1.img"
expect_volume disk1 "$T/m-disk1"

head -c "$MIB" /dev/urandom >"$T/junk.img"
JUNK_SUM=$(sum "$T/junk.img")
expect_error "a file that is not a store" "not an mvsnap store|magic|superblock" \
    mvsnap --store "$T/junk.img" snapshot list
expect_error "a file that is not a store (check)" "not an mvsnap store|magic|superblock" \
    mvsnap --store "$T/junk.img" check
expect_eq "the non-store file is unchanged" "$(sum "$T/junk.img")" "$JUNK_SUM"
# A mistyped command must not destroy a user's file (issue 7, items 7 and 8).
expect_error "format refuses a file that holds data" "holds data|force" \
    mvsnap format "$T/junk.img"
expect_eq "the data file is unchanged by the refused format" "$(sum "$T/junk.img")" "$JUNK_SUM"
head -c $((8 * MIB)) /dev/zero >"$T/fs.img"
if command -v mkfs.ext4 >/dev/null && mkfs.ext4 -q -F "$T/fs.img" 2>/dev/null; then
    FS_SUM=$(sum "$T/fs.img")
    expect_error "format refuses a file with an ext4 file system" "ext4|file system|force" \
        mvsnap format "$T/fs.img"
    expect_eq "the ext4 image is unchanged" "$(sum "$T/fs.img")" "$FS_SUM"
fi
truncate -s $((64 * MIB)) "$T/big.img"
expect_error "format never shrinks a file (--size 16M on 64 MiB)" "shrink|smaller|size" \
    mvsnap format "$T/big.img" --size 16M
expect_eq "the 64 MiB file keeps its size" "$(stat -c %s "$T/big.img")" $((64 * MIB))
remember_store
expect_error "origin add of the store itself" "store" ms origin add "$STORE" --id self
expect_store_data_intact "origin add of the store itself"
expect_ok "format a second store" mvsnap format "$T/store2.img" --size 64M
expect_error "origin add of another mvsnap store" "store" ms origin add "$T/store2.img" --id s2
expect_error "origin add of a file bound to another store" "bound|another store|store" \
    mvsnap --store "$T/store2.img" origin add "$T/disk0.img" --id disk0
expect_volume disk0 "$T/m-disk0"
: >"$T/empty.img"
expect_error "an empty file" "not an mvsnap store|magic|superblock|short|small|truncated" \
    mvsnap --store "$T/empty.img" info
expect_error "a store path that does not exist" "no such file|not found|exist" \
    mvsnap --store "$T/missing.img" info

# Superblock copies at 0 and 4096.
cp --sparse=always "$STORE" "$T/bad.img"
head -c 512 /dev/urandom | dd of="$T/bad.img" bs=512 seek=0 conv=notrunc status=none
run mvsnap --store "$T/bad.img" snapshot list --json
if [ "$RC" -eq 0 ] && json "$T/out" "len(d) >= 4" >/dev/null; then
    ok "a garbage primary superblock: the store opens from the copy at 4096"
else
    not_ok "a garbage primary superblock: the store opens from the copy at 4096 (exit status $RC)"
    diag "$T/err"
fi
head -c 512 /dev/urandom | dd of="$T/bad.img" bs=512 seek=8 conv=notrunc status=none
BAD_SUM=$(sum "$T/bad.img")
expect_error "garbage in both superblocks" "superblock|corrupt|not an mvsnap store|magic" \
    mvsnap --store "$T/bad.img" info
expect_error "garbage in both superblocks (write command)" \
    "superblock|corrupt|not an mvsnap store|magic" \
    mvsnap --store "$T/bad.img" snapshot create disk0 --tag z
expect_eq "the corrupt store is unchanged" "$(sum "$T/bad.img")" "$BAD_SUM"

# Keep the magic, break the rest: a checksum must catch it.
cp --sparse=always "$STORE" "$T/bad2.img"
for off in 64 $((4096 + 64)); do
    printf 'GARBAGE!GARBAGE!' | dd of="$T/bad2.img" bs=1 seek="$off" conv=notrunc status=none
done
BAD_SUM=$(sum "$T/bad2.img")
expect_error "both superblocks corrupt after the magic" "superblock|corrupt|checksum" \
    mvsnap --store "$T/bad2.img" snapshot list
expect_eq "the corrupt store is unchanged" "$(sum "$T/bad2.img")" "$BAD_SUM"

# Truncated store files: cut into the data in use, and cut into the metadata.
for cut in $((64 * MIB)) $((1 * MIB)); do
    cp --sparse=always "$STORE" "$T/short.img"
    truncate -s "$cut" "$T/short.img"
    BAD_SUM=$(sum "$T/short.img")
    expect_error "a store file truncated to $((cut / MIB)) MiB" "truncat|short|past the end|size|small|corrupt" \
        mvsnap --store "$T/short.img" info
    expect_eq "the truncated store is unchanged" "$(sum "$T/short.img")" "$BAD_SUM"
done

STORE_TAIL_SUM=$BASE_TAIL_SUM
expect_store_data_intact "all the bad input above"
expect_ok "check after the bad input" ms check

# A reader that goes away (`| head`) ends a command quietly with the status of SIGPIPE (141),
# never a panic. The reader has exited before the command writes, so the pipe is closed.
for cmd in check info "snapshot list" "origin list" "cat disk0"; do
    # shellcheck disable=SC2086 # word splitting of $cmd is wanted
    { sleep 0.3; ms $cmd 2>"$T/err"; echo $? >"$T/rc"; } | true
    if [ "$(cat "$T/rc")" = 141 ] && [ ! -s "$T/err" ]; then
        ok "$cmd with its reader gone: exit 141, nothing on stderr"
    else
        not_ok "$cmd with its reader gone: exit $(cat "$T/rc")"
        diag "$T/err"
    fi
done
for v in disk0:m-disk0 disk1:m-disk1 disk0@s1:m-s1 disk0@w1:m-w1 disk0@T:m-T0 disk1@T:m-T1; do
    expect_volume "${v%%:*}" "$T/${v#*:}"
done

# --- a store that fills up ----------------------------------------------------------------------
# Origin writes never fail: the snapshot that loses data is marked invalid, and says why.
FULL=$T/full.img
gen "$T/disk3.img" $((32 * MIB)) disk3
expect_ok "format a 16 MiB store" mvsnap format "$FULL" --size 16M
expect_ok "origin add a 32 MiB origin" mvsnap --store "$FULL" origin add "$T/disk3.img" --id d3
expect_ok "snapshot of it" mvsnap --store "$FULL" snapshot create d3 --tag old --memo before
gen "$T/d-32m" $((32 * MIB)) w10
expect_ok "overwrite all of the origin: the write succeeds though the store fills up" \
    mvsnap --store "$FULL" write d3 --offset 0 <"$T/d-32m"
got=$(mvsnap --store "$FULL" cat d3 | sha256sum | cut -d' ' -f1)
expect_eq "the origin holds the new data" "$got" "$(sum "$T/d-32m")"
expect_ok "snapshot list --json of the full store" mvsnap --store "$FULL" snapshot list --json
expect_json "the snapshot that lost data is invalid, with a reason" "$T/out" \
    "len(d) == 1 and d[0]['state'] == 'invalid' and len(d[0]['reason'] or '') > 0"
expect_ok "snapshot list of the full store" mvsnap --store "$FULL" snapshot list
if grep -qE '^d3@old .* invalid .*\[invalid: .+\] before$' "$T/out"; then
    ok "snapshot list shows the invalid snapshot and why"
else
    not_ok "snapshot list shows the invalid snapshot and why"
    diag "$T/out"
fi
expect_error "reading an invalid snapshot fails" "invalid" mvsnap --store "$FULL" cat d3@old
expect_ok "check of the full store" mvsnap --store "$FULL" check

# --- an origin that went missing or changed size ------------------------------------------------
# The store still opens (its other origins work); the listing says which origin is unavailable
# and why, and putting the device back brings it and its snapshots back unchanged.
GONE=$T/gone.img
gen "$T/disk4.img" $((1 * MIB)) disk4
cp "$T/disk4.img" "$T/m-disk4"
expect_ok "format a store for the missing origin" mvsnap format "$GONE" --size 32M
expect_ok "origin add d4" mvsnap --store "$GONE" origin add "$T/disk4.img" --id d4
expect_ok "snapshot of d4" mvsnap --store "$GONE" snapshot create d4 --tag keep
mv "$T/disk4.img" "$T/disk4.moved"
expect_ok "origin list with d4's file moved away" mvsnap --store "$GONE" origin ls -H -o id,state
expect_eq "origin list: d4 is unavailable" "$(cat "$T/out")" "$(printf 'd4\tunavailable')"
expect_ok "origin list --json with d4's file moved away" mvsnap --store "$GONE" origin ls --json
expect_json "origin list --json: d4 unavailable, the reason names its path" "$T/out" \
    "d[0]['state'] == 'unavailable' and 'cannot open' in d[0]['reason'] and d[0]['path'] in d[0]['reason']"
expect_ok "info -H with d4's file moved away" mvsnap --store "$GONE" info -H
if grep -qE "^origin	d4	.*	unavailable	origin d4: cannot open " "$T/out"; then
    ok "info -H: d4's line ends with its state and reason"
else
    not_ok "info -H: d4's line ends with its state and reason"
    diag "$T/out"
fi
expect_error "cat of a snapshot of the missing origin" "cannot open" mvsnap --store "$GONE" cat d4@keep
expect_ok "snapshot list with d4's file moved away" mvsnap --store "$GONE" snapshot ls -H -o name,state,reason
expect_eq "snapshot list: d4@keep cannot be read, and says why" "$(cat "$T/out")" \
    "$(printf 'd4@keep\tunavailable\torigin d4 is unavailable (see `mvsnap origin list`); nothing of the snapshot is lost')"
expect_ok "snapshot list --json with d4's file moved away" mvsnap --store "$GONE" snapshot ls --json
expect_json "snapshot list --json: d4@keep valid, its origin unavailable" "$T/out" \
    "d[0]['state'] == 'valid' and d[0]['origin_state'] == 'unavailable' and d[0]['reason'] is None"
truncate -s $((2 * MIB)) "$T/disk4.moved"
mv "$T/disk4.moved" "$T/disk4.img"
expect_ok "origin list with d4 grown" mvsnap --store "$GONE" origin ls -H -o state,reason
expect_eq "origin list: a grown d4 is unavailable, size changed" "$(cat "$T/out")" \
    "$(printf 'unavailable\torigin d4: size changed from %d to %d bytes since it was bound' $MIB $((2 * MIB)))"
truncate -s $MIB "$T/disk4.img"
expect_ok "origin list with d4 back as it was" mvsnap --store "$GONE" origin ls -H -o state,reason
expect_eq "origin list: d4 online again, no reason" "$(cat "$T/out")" "$(printf 'online\t')"
got=$(mvsnap --store "$GONE" cat d4@keep | sha256sum | cut -d' ' -f1)
expect_eq "d4@keep reads as before" "$got" "$(sum "$T/m-disk4")"
expect_ok "snapshot list with d4 back" mvsnap --store "$GONE" snapshot ls -H -o name,state
expect_eq "snapshot list: d4@keep valid again" "$(cat "$T/out")" "$(printf 'd4@keep\tvalid')"

# --- ephemeral mode -----------------------------------------------------------------------------
EPH=$T/eph.img
gen "$T/disk2.img" $((4 * MIB)) disk2
cp "$T/disk2.img" "$T/m-disk2"
expect_ok "format a second store" mvsnap format "$EPH" --size 64M
expect_ok "origin add to the second store" mvsnap --store "$EPH" origin add "$T/disk2.img" --id d2
expect_ok "snapshot create --ephemeral" mvsnap --store "$EPH" snapshot create --ephemeral d2 --tag e
expect_eq "--ephemeral snapshot create prints the tag" "$(cat "$T/out")" e
expect_ok "snapshot list of the second store" mvsnap --store "$EPH" snapshot list --json
expect_json "an ephemeral snapshot is gone after its session" "$T/out" "d == []"
expect_ok "check of the second store" mvsnap --store "$EPH" check
expect_volume_eph() {
    local got
    got=$(mvsnap --store "$EPH" cat d2 | sha256sum | cut -d' ' -f1)
    expect_eq "two stores are independent: d2 reads right" "$got" "$(sum "$T/m-disk2")"
}
expect_volume_eph
expect_error "--ephemeral on a store that holds persistent snapshots" "ephemeral|persistent" \
    ms snapshot create --ephemeral disk0 --tag e2

echo
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
