#!/usr/bin/env bash
# FUSE benchmark of issue 9: fio (libaio, O_DIRECT) on a loop device over
#   - the mvsnap FUSE file of an origin (`mvsnap serve --mount DIR`, losetup DIR/disk0),
#   - qemu-storage-daemon's FUSE export of the same raw file (--export type=fuse),
#   - the plain raw file (losetup of the file itself),
# side by side in one run, one contender at a time (all four lines each), in an order rotated
# every repetition.
#
# Usage: bench/fuse.sh [--quick] [--reps N] [--runtime S] [--ramp S] [--size SIZE] [--dir DIR]
#                      [--loop-dio on|off]
#   --quick        smoke run: 256 MiB image, 1 s + 1 s ramp per line, 1 rep
#   --reps N       repeat every measurement N times, report the median (default 3)
#   --runtime S    fio --runtime of each line (default 10); --ramp S: fio --ramp_time (default 2)
#   --size SIZE    raw image size (default 1G); --dir DIR: scratch directory (default target/)
#   --loop-dio X   losetup --direct-io=X for every loop device (default on: no page cache in
#                  the loop layer, so fio's O_DIRECT requests reach the file as they are)
#
# Prints Markdown on stdout (machine, load, commands, table, ratios); progress on stderr. Needs
# root (FUSE mounts, losetup). Installs nothing: scripts/install-deps.sh installs the tools.
# Every server and loop device it starts is stopped or detached (by pid / device name), every
# mount unmounted and the scratch directory removed, even on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=fuse.sh
source bench/lib.sh

reps=3 runtime=10 ramp=2 size=1G dir=target quick=0 dio=on
while [ $# -gt 0 ]; do
    case $1 in
    --quick) quick=1 reps=1 runtime=1 ramp=1 size=256M ;;
    --reps) reps=$2; shift ;;
    --runtime) runtime=$2; shift ;;
    --ramp) ramp=$2; shift ;;
    --size) size=$2; shift ;;
    --dir) dir=$2; shift ;;
    --loop-dio) dio=$2; shift ;;
    -h | --help) usage; exit 0 ;;
    *) bad_argument "$1" ;;
    esac
    shift
done

need_tools "sudo bash scripts/install-deps.sh" \
    cargo fio qemu-storage-daemon losetup findmnt awk sort
[ "$(id -u)" = 0 ] || die "needs root (FUSE mounts and loop devices)"

make_work "$dir"
LOOPS=() MOUNTS=()
stopped="everything stopped"

detach_loops() {
    local l
    for l in "${LOOPS[@]}"; do losetup -d "$l" 2>/dev/null || log "losetup -d $l failed"; done
    LOOPS=()
}
stop_all() {
    local m
    detach_loops
    stop_pids
    for m in "${MOUNTS[@]}"; do
        findmnt "$m" >/dev/null 2>&1 && { umount "$m" 2>/dev/null || umount -l "$m" || true; }
    done
    MOUNTS=()
}
trap_cleanup

build_mvsnap
export MVSNAP_RUNTIME_DIR=$work/run
mkdir -p "$MVSNAP_RUNTIME_DIR"

img=$work/disk0.raw
results=$work/results.tsv
: >"$results"

# name | fio rw | bs | iodepth | unit
LINES=(
    "4k-randread-qd16|randread|4k|16|IOPS"
    "4k-randwrite-qd16|randwrite|4k|16|IOPS"
    "1m-read-qd4|read|1m|4|MiB/s"
    "1m-write-qd4|write|1m|4|MiB/s"
)
CONTENDERS=(plain qsd mvsnap)

fio_cmd() { # fio_cmd DEV RW BS QD OUT
    printf '%q ' fio --name=bench "--filename=$1" --ioengine=libaio --direct=1 "--rw=$2" \
        "--bs=$3" "--iodepth=$4" --time_based "--runtime=$runtime" "--ramp_time=$ramp" \
        --randrepeat=0 --output-format=terse --terse-version=3 "--output=$5"
}

measure() { # measure REP WHO LINE DEV
    local rep=$1 who=$2 l=$3 dev=$4 name rw bs qd unit out
    IFS='|' read -r name rw bs qd unit <<<"$l"
    out=$work/fio.out
    rm -f "$out"
    # No dirty pages of the previous line (the FUSE servers write the image through the page
    # cache; the faster a contender wrote, the more writeback it would inherit).
    sync
    run_fio "$who $name" "$(fio_cmd "$dev" "$rw" "$bs" "$qd" "$out")"
    record "$rep" "$who" "$name" "$unit"
    log "  rep $rep  $who  $name: $V $unit"
}

attach() { # attach FILE: sets DEV to the loop device (no subshell: LOOPS must see it)
    DEV=$(losetup --find --show "--direct-io=$dio" "$1") || die "losetup $1 failed"
    LOOPS+=("$DEV")
}

wait_mount() { # wait_mount PATH
    local i
    for ((i = 0; i < 300; i++)); do
        findmnt "$1" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "nothing mounted at $1"
}

QSD_CMD="qemu-storage-daemon --blockdev driver=file,node-name=file0,filename=IMG --blockdev driver=raw,node-name=disk0,file=file0 --export type=fuse,id=exp0,node-name=disk0,mountpoint=EXPORTFILE,writable=on --pidfile PIDFILE"
MVSNAP_CMD="mvsnap format STORE --size 1G; mvsnap --store STORE origin add IMG --id disk0; mvsnap --store STORE serve --mount DIR --detach"

# start WHO: sets FILE, the file to losetup for this contender (its server started; no
# subshell, so PIDS and MOUNTS see it).
start() {
    case $1 in
    plain) FILE=$img ;;
    qsd)
        local f=$work/qsd-export
        : >"$f"
        qemu-storage-daemon --blockdev "driver=file,node-name=file0,filename=$img" \
            --blockdev driver=raw,node-name=disk0,file=file0 \
            --export "type=fuse,id=exp0,node-name=disk0,mountpoint=$f,writable=on" \
            --pidfile "$work/qsd.pid" >"$work/qsd.log" 2>&1 &
        PIDS+=($!)
        MOUNTS+=("$f")
        wait_mount "$f"
        FILE=$f ;;
    mvsnap)
        local out
        out=$("$MVSNAP" --store "$work/store.img" serve --mount "$work/vols" --detach) ||
            die "mvsnap serve failed"
        PIDS+=("$(echo "$out" | awk '$1 == "pid" { print $2 }')")
        MOUNTS+=("$work/vols")
        FILE=$work/vols/disk0 ;;
    esac
}

log "filling $img ($size)"
fill "$img" "$size"

# One store for every repetition (an origin file is bound to one store).
"$MVSNAP" format "$work/store.img" --size 1G >/dev/null
"$MVSNAP" --store "$work/store.img" origin add "$img" --id disk0 >/dev/null

t0=$(date -u +%Y-%m-%dT%H:%M:%SZ)
load0=$(cut -d' ' -f1-3 /proc/loadavg)
for ((rep = 1; rep <= reps; rep++)); do
    # The order rotates every repetition, so load that comes and goes falls on all alike.
    order=()
    for ((i = 0; i < ${#CONTENDERS[@]}; i++)); do
        order+=("${CONTENDERS[$(((i + rep - 1) % ${#CONTENDERS[@]}))]}")
    done
    for who in "${order[@]}"; do
        start "$who"
        attach "$FILE"
        for l in "${LINES[@]}"; do measure "$rep" "$who" "$l" "$DEV"; done
        stop_all
        sync
    done
done
load1=$(cut -d' ' -f1-3 /proc/loadavg)

med() { # med WHO LINE
    awk -F'\t' -v w="$1" -v l="$2" '$2 == w && $3 == l { print $4 }' "$results" | sort -g |
        awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2];
            else printf "%.1f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }'; }

echo "### Run of $t0 ($( [ $quick = 1 ] && echo quick || echo full ))"
echo
echo "- $(uname -r), $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) RAM;" \
    "load average before $load0, after $load1"
echo "- $(fio --version); $(qemu-storage-daemon --version | head -1); $(rustc --version)"
echo "- image $size on $(findmnt -n -o FSTYPE -T "$work"); loop devices --direct-io=$dio;" \
    "$reps rep(s), ${runtime} s + ${ramp} s ramp per line, median shown"
echo
echo '```'
echo "# contenders (one at a time, same raw image, filled with fio --rw=write --bs=1m):"
echo "plain:  losetup --find --show --direct-io=$dio IMG"
echo "qsd:    $QSD_CMD; losetup --find --show --direct-io=$dio EXPORTFILE"
echo "mvsnap: $MVSNAP_CMD; losetup --find --show --direct-io=$dio DIR/disk0"
echo "# each line:"
echo "$(fio_cmd /dev/loopN RW BS QD OUT)"
echo '```'
echo
echo "Every measurement (rep, contender, line, value, 1-minute load average after it):"
echo
echo '```'
sort -k3,3 -k2,2 -k1,1n "$results"
echo '```'
echo
echo "| line | unit | loop on the plain file | loop on qemu-storage-daemon FUSE | loop on mvsnap FUSE | **mvsnap / qsd** | mvsnap / plain |"
echo "|---|---|---:|---:|---:|---:|---:|"
for l in "${LINES[@]}"; do
    IFS='|' read -r name _ _ _ unit <<<"$l"
    p=$(med plain "$name") q=$(med qsd "$name") m=$(med mvsnap "$name")
    echo "| $name | $unit | $p | $q | $m | **$(ratio "$m" "$q")** | $(ratio "$m" "$p") |"
done
