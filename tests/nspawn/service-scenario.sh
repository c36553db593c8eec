#!/bin/bash
# The boot test's scenario, run inside the booted container by the oneshot
# unit spicegate-boottest.service (see tests/tests/service.rs), once per
# boot: /out/stage says which. `install` installs the previous release
# (tests/nspawn/previous-release), sets a policy, and upgrades it to the
# package of the tree under test while probe loops run; the harness then
# boots the container again (with a fresh bpffs, as a real reboot has) and
# `reboot` checks that enforcement is there from boot on, then restarts,
# kills, upgrades to a rebuilt package, removes and purges: everything
# after the release upgrade runs the package under test. Every check
# appends `PASS name` or `FAIL name: why` to /out/results; each stage ends
# with `END stage`.
# Whatever happens, the journal is saved and the container powers off.
set -u

OUT=/out
RESULTS=$OUT/results
PORT=47123
OK_UID=1001   # granted by the test policy
NO_UID=1002   # never granted
PREV_VERSION=$(cat $OUT/prev-version)  # spicegate-prev.deb, the previous release
A_VERSION=$(cat $OUT/a-version)        # spicegate-a.deb, the tree under test
B_VERSION=$(cat $OUT/b-version)        # spicegate-b.deb, the same rebuilt, higher
# The pin directory: the unit's ExecStart= passes no --pin-dir, so the
# daemon's default (DEFAULT_PIN_DIR in spicegate/src/cli/mod.rs).
PINS=/sys/fs/bpf/spicegate
# The pinned layout's suffix in the previous release and in the tree under
# test: move them along with tests/nspawn/previous-release. KEPT lists the
# pins the new layout took over from the old one unchanged (layout 3 keeps
# layout 2's rate limit, drops, marks and counters: KEPT_LAYOUT_VERSION),
# which an upgrade adopts instead of retiring.
OLD_LAYOUT=_v2
NEW_LAYOUT=_v3
KEPT="rate_v2 rate_named_v2 drops_v2 marks_v2 granted_v2 mark_slots_v2 counters_v2"
STAGE=$(cat $OUT/stage)
trap 'journalctl -b --no-pager > $OUT/journal-$STAGE.txt 2>&1; echo "END $STAGE" >> "$RESULTS"; systemctl poweroff --no-block' EXIT

pass() { echo "PASS $1" >> "$RESULTS"; }
fail() { echo "FAIL $1: $2" >> "$RESULTS"; echo "FAIL $1: $2" >&2; }
# check NAME COMMAND...: passes when the command succeeds.
check() {
    local name=$1 out
    shift
    if out=$("$@" 2>&1); then pass "$name"; else fail "$name" "$(echo "$out" | tail -n 3 | tr '\n' ' ')"; fi
}
# expect NAME WANT GOT
expect() {
    if [ "$2" = "$3" ]; then pass "$1"; else fail "$1" "want '$2', got '$3'"; fi
}
# The outcome of one connect to the test port as a uid.
connect_as() {
    setpriv --reuid="$1" --regid="$1" --clear-groups \
        bash -c "exec 3<>/dev/tcp/127.0.0.1/$PORT" 2>/dev/null && echo allow || echo deny
}
mainpid() { systemctl show -p MainPID --value spicegate.service; }
# The names of the pins under PINS that match a glob, on one line.
pins_named() { find "$PINS" -mindepth 1 -name "$1" -printf '%P ' 2>/dev/null; }
# check_pinned NAME PIN: passes when PIN is pinned under PINS.
check_pinned() {
    if [ -e "$PINS/$2" ]; then pass "$1"; else fail "$1" "no $2 in $PINS: $(pins_named '*')"; fi
}
# Waits up to 15 s for the unit to be active with a main PID other than $1.
wait_new_daemon() {
    local i pid
    for i in $(seq 150); do
        pid=$(mainpid)
        if [ "$(systemctl is-active spicegate.service)" = active ] && [ "$pid" != 0 ] && [ "$pid" != "$1" ]; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}
# The test policy: guards PORT on this machine, grants the given uids.
policy() {
    local allow="" u
    for u in "$@"; do allow="$allow\"#$u\", "; done
    cat > /etc/spicegate/policy.toml <<EOF
[protect]
ports = [$PORT]

[vms.boottest]
server = "localhost"
ports = [$PORT]
allow = [${allow%, }]
EOF
}

# The journal's event ids (Event in spicegate/src/journal.rs; a unit test
# there checks that these are in this file).
DENY_ID=e34aa00902a24776b817569755f2e74d
RELOAD_ID=b136a710917c4a088f500b963f5f92e1
RELOAD_REFUSED_ID=1d48a8693e2a41d691c9d8f1fe89269a
# has_entry FIELD=VALUE... (FIELD^=PREFIX for a prefix): reads
# `journalctl -o json` and succeeds when one entry has all of them.
cat > /tmp/has_entry.py <<'EOF'
import json, sys
want = [a.split("=", 1) for a in sys.argv[1:]]
seen = []
for line in sys.stdin:
    e = json.loads(line)
    def ok(k, v):
        if k.endswith("^"):
            return isinstance(e.get(k[:-1]), str) and e[k[:-1]].startswith(v)
        return e.get(k) == v
    if all(ok(k, v) for k, v in want):
        sys.exit(0)
    if "SPICEGATE_EVENT" in e or str(e.get("MESSAGE", "")).startswith(("DENY", "reload")):
        seen.append({k: v for k, v in e.items() if not k.startswith("_")})
print("no entry with", sys.argv[1:], "; last candidates:", seen[-2:])
sys.exit(1)
EOF
# journal_has JOURNALCTL-MATCHES... -- FIELD=VALUE...: retries for 3 s
# (journald indexes asynchronously).
journal_has() {
    local m=() i
    while [ "$1" != -- ]; do m+=("$1"); shift; done
    shift
    for i in $(seq 30); do
        journalctl -b -u spicegate.service -o json --no-pager "${m[@]}" | python3 /tmp/has_entry.py "$@" > /dev/null && return 0
        sleep 0.1
    done
    journalctl -b -u spicegate.service -o json --no-pager "${m[@]}" | python3 /tmp/has_entry.py "$@"
}
# only_events NAME PREFIX WANT MATCHES...: the messages journalctl selects
# with MATCHES (besides -u) all start with PREFIX (a grep pattern), and one
# starts with WANT.
only_events() {
    local name=$1 prefix=$2 want=$3 out
    shift 3
    out=$(journalctl -b -u spicegate.service -o cat --no-pager "$@")
    if ! echo "$out" | grep -q "^$want"; then
        fail "$name" "nothing starting with '$want' in: $(echo "$out" | tail -n 3 | tr '\n' ' ')"
    elif echo "$out" | grep -v "^\($prefix\)" | grep -q .; then
        fail "$name" "other entries selected: $(echo "$out" | grep -v "^\($prefix\)" | head -n 3 | tr '\n' ' ')"
    else
        pass "$name"
    fi
}

# Probe loops: one process per uid connecting every 5 ms until /tmp/stop
# exists; it exits 0 only when every attempt had the expected outcome.
cat > /tmp/probe.py <<'EOF'
import os, socket, sys, time
port, stop, want = int(sys.argv[1]), sys.argv[2], sys.argv[3]
n = {"allow": 0, "deny": 0, "other": 0}
while not os.path.exists(stop):
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", port))
        n["allow"] += 1
    except PermissionError:
        n["deny"] += 1
    except OSError as e:
        n["other"] += 1
        print("error:", e, flush=True)
    finally:
        s.close()
    time.sleep(0.005)
print(" ".join(f"{k}={v}" for k, v in n.items()))
sys.exit(0 if n[want] >= 20 and sum(n.values()) == n[want] else 1)
EOF
PROBES=()
probes_start() {
    rm -f /tmp/stop
    PROBES=()
    setpriv --reuid=$OK_UID --regid=$OK_UID --clear-groups python3 /tmp/probe.py $PORT /tmp/stop allow > /tmp/probe.ok 2>&1 &
    PROBES+=($!)
    setpriv --reuid=$NO_UID --regid=$NO_UID --clear-groups python3 /tmp/probe.py $PORT /tmp/stop deny > /tmp/probe.no 2>&1 &
    PROBES+=($!)
    sleep 0.3
}
# probes_stop PHASE: stops the loops and checks that neither saw a change.
probes_stop() {
    sleep 0.3
    touch /tmp/stop
    if wait "${PROBES[0]}"; then pass "$1-granted-allowed-throughout"; else fail "$1-granted-allowed-throughout" "$(cat /tmp/probe.ok | tr '\n' ' ')"; fi
    if wait "${PROBES[1]}"; then pass "$1-ungranted-denied-throughout"; else fail "$1-ungranted-denied-throughout" "$(cat /tmp/probe.no | tr '\n' ' ')"; fi
    echo "$1: granted $(tail -n 1 /tmp/probe.ok); ungranted $(tail -n 1 /tmp/probe.no)"
}

# A listener that accepts and closes, on this container's own loopback.
cat > /tmp/listen.py <<'EOF'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(512)
while True:
    s.accept()[0].close()
EOF

set -x
python3 /tmp/listen.py $PORT &
sleep 0.3

if [ "$STAGE" = install ]; then
useradd -M -u $OK_UID sg-ok
useradd -M -u $NO_UID sg-no

# --- install of the previous release: enabled, started (Type=notify:
# active only once enforcing), and the shipped policy guards nothing.
check install dpkg -i $OUT/spicegate-prev.deb
expect install-is-previous-release "$PREV_VERSION" "$(dpkg-query -W -f='${Version}' spicegate)"
expect install-enabled enabled "$(systemctl is-enabled spicegate.service)"
expect install-ready "notify active running" \
    "$(systemctl show -p Type --value spicegate.service) $(systemctl is-active spicegate.service) $(systemctl show -p SubState --value spicegate.service)"
check install-status-says-enforcing sh -c "systemctl show -p StatusText --value spicegate.service | grep -q '^enforcing'"
expect install-locks-nobody-out allow "$(connect_as $NO_UID)"
check install-conffile sh -c "dpkg-query -W -f='\${Conffiles}' spicegate | grep -q /etc/spicegate/policy.toml"
check install-man-page test -s /usr/share/man/man8/spicegate-run.8.gz
check install-completions test -s /usr/share/bash-completion/completions/spicegate -a -s /usr/share/zsh/vendor-completions/_spicegate -a -s /usr/share/fish/vendor_completions.d/spicegate.fish
check install-docs test -s /usr/share/doc/spicegate/copyright -a -s /usr/share/doc/spicegate/policy.md
check install-capabilities sh -c "grep -q '^CapEff:.*000000c000001000' /proc/$(mainpid)/status"

# --- a policy, applied with systemctl reload.
policy $OK_UID
check reload systemctl reload spicegate.service
expect granted-allowed allow "$(connect_as $OK_UID)"
expect ungranted-denied deny "$(connect_as $NO_UID)"
check status-cli spicegate status
sleep 0.5
check journal-warning-has-deny sh -c "journalctl -u spicegate.service -p warning --no-pager | grep -q 'DENY uid=$NO_UID user=sg-no'"
check journal-info-is-not-warning sh -c "! journalctl -u spicegate.service -p warning --no-pager | grep -q 'enforcing policy'"

# --- upgrade from the previous release to the package under test: the new
# daemon takes over with no gap, even where the pinned layout changed, and
# leaves nothing of the old layout pinned; the admin's policy stays.
OLD_PINS=$(pins_named '*')
echo "pins of the previous release: $OLD_PINS"
check_pinned install-old-layout-pinned "connect4$OLD_LAYOUT"
pid=$(mainpid)
probes_start
# Unattended, as a fleet upgrades: the admin's edited policy.toml is kept
# even if a release changes the shipped one (no conffile prompt).
check release-upgrade dpkg -i --force-confold $OUT/spicegate-a.deb
check release-upgrade-new-daemon wait_new_daemon "$pid"
probes_stop release-upgrade
echo "pins after the upgrade: $(pins_named '*')"
expect release-upgrade-version "$A_VERSION" "$(dpkg-query -W -f='${Version}' spicegate)"
expect release-upgrade-runs-new-binary /usr/sbin/spicegate "$(readlink /proc/$(mainpid)/exe)"
check release-upgrade-status-says-enforcing sh -c "systemctl show -p StatusText --value spicegate.service | grep -q '^enforcing'"
check release-upgrade-capabilities sh -c "grep -q '^CapEff:.*000000c000001000' /proc/$(mainpid)/status"
check release-upgrade-keeps-policy grep -q "#$OK_UID" /etc/spicegate/policy.toml
# Where the layout changed, nothing of the old layout stays pinned but the
# maps the new one kept (the new daemon gets 5 s to remove the rest), and
# those are the same maps (adopted: the same map ids); where it did not,
# every pin of the previous release is still there (adopted, not
# duplicated). Exactly the new layout's two connect links are pinned, and
# the overlays, fast marks and release link of this release too.
retired_left() {
    local p left=""
    for p in $(pins_named "*$OLD_LAYOUT"); do
        case " $KEPT " in *" $p "*) ;; *) left="$left $p" ;; esac
    done
    echo "$left"
}
if [ "$OLD_LAYOUT" != "$NEW_LAYOUT" ]; then
    for i in $(seq 50); do
        [ -z "$(retired_left)" ] && break
        sleep 0.1
    done
    left=$(retired_left)
    if [ -z "$left" ]; then pass upgrade-old-layout-retired-or-adopted; else fail upgrade-old-layout-retired-or-adopted "still pinned in $PINS:$left"; fi
    gone=""
    for p in $KEPT; do
        case " $OLD_PINS " in *" $p "*) [ -e "$PINS/$p" ] || gone="$gone $p" ;; esac
    done
    if [ -z "$gone" ]; then pass upgrade-kept-maps-adopted; else fail upgrade-kept-maps-adopted "kept maps of the previous release gone:$gone"; fi
else
    gone=""
    for p in $OLD_PINS; do [ -e "$PINS/$p" ] || gone="$gone $p"; done
    if [ -z "$gone" ]; then pass upgrade-old-layout-retired-or-adopted; else fail upgrade-old-layout-retired-or-adopted "pins of the previous release gone:$gone"; fi
fi
check_pinned upgrade-overlays-pinned "overlay$NEW_LAYOUT"
# This release's fast socket marks and the program that removes them.
check_pinned upgrade-fast-marks-pinned "granted_v2"
check_pinned upgrade-mark-slots-pinned "mark_slots_v2"
check_pinned upgrade-port-prefilter-pinned "ports$NEW_LAYOUT"
check_pinned upgrade-release-link-pinned "release$NEW_LAYOUT"
n=$(pins_named "connect*$NEW_LAYOUT" | wc -w)
if [ "$n" = 2 ]; then
    pass upgrade-new-links-pinned
else
    fail upgrade-new-links-pinned "want 2 connect*$NEW_LAYOUT pins, found $n in $PINS: $(pins_named '*')"
fi
expect release-upgrade-granted-allowed allow "$(connect_as $OK_UID)"
expect release-upgrade-ungranted-denied deny "$(connect_as $NO_UID)"

# The next boot starts on a policy that also names an account this machine
# does not have (deleted, or in an LDAP that is down): it must enforce the
# rest. Written without a reload (a reload of it is refused).
policy $OK_UID
sed -i 's/^allow = \[\(.*\)\]$/allow = [\1, "nosuch-boottest"]/' /etc/spicegate/policy.toml
check install-unknown-account-in-policy grep -q nosuch-boottest /etc/spicegate/policy.toml
check install-reload-with-unknown-account-refused sh -c "! spicegate reload"

exit 0
fi

# --- after a reboot, on the package under test: enforcing from boot on,
# ready before logins are allowed, and started afresh (the pins did not
# survive the reboot).
expect boot-active active "$(systemctl is-active spicegate.service)"
ready=$(systemctl show -p ActiveEnterTimestampMonotonic --value spicegate.service)
logins=$(systemctl show -p ExecMainStartTimestampMonotonic --value systemd-user-sessions.service)
check boot-ready-before-logins test "$ready" -gt 0 -a "$ready" -le "$logins"
check boot-fresh-start sh -c "! journalctl -b -u spicegate.service --no-pager | grep -q 'took over'"
expect boot-granted-allowed allow "$(connect_as $OK_UID)"
expect boot-ungranted-denied deny "$(connect_as $NO_UID)"
# Started on a policy naming an account that does not exist here: degraded,
# enforcing the rest, and saying which name.
check boot-degraded-names-the-account sh -c "spicegate status --json | python3 -c 'import json,sys; d=json.load(sys.stdin); assert d[\"degraded\"] is True, d; assert any(\"nosuch-boottest\" in u[\"name\"] for u in d[\"unresolved\"]), d'"
check boot-degraded-in-journal sh -c "journalctl -b -u spicegate.service --no-pager | grep -q 'UNRESOLVED user nosuch-boottest'"
check boot-capabilities sh -c "grep -q '^CapEff:.*000000c000001000' /proc/$(mainpid)/status"
check boot-status-cli spicegate status
# The hardened service (no CAP_SYS_ADMIN) still reads its own table back,
# and its watchdog does not cry tampering.
check boot-table-in-force sh -c "spicegate status | grep -q '^rule table in force: true'"
check boot-no-false-tampering sh -c "! journalctl -b -u spicegate.service --no-pager | grep -q TAMPERING"
sleep 0.5
check boot-journal-warning-has-deny sh -c "journalctl -b -u spicegate.service -p warning --no-pager | grep -q 'DENY uid=$NO_UID user=sg-no'"
# The same denial as journal fields (native protocol), selectable by
# MESSAGE_ID and by field; and journald took every message at once.
check journal-deny-fields journal_has -- SPICEGATE_EVENT=deny SPICEGATE_UID=$NO_UID \
    SPICEGATE_USER=sg-no SPICEGATE_VM=boottest SPICEGATE_DST=127.0.0.1:$PORT \
    SPICEGATE_OP=connect PRIORITY=4 MESSAGE_ID=$DENY_ID _TRANSPORT=journal \
    "MESSAGE^=DENY uid=$NO_UID user=sg-no pid="
only_events journal-deny-by-message-id "DENY " "DENY uid=$NO_UID user=sg-no" MESSAGE_ID=$DENY_ID
only_events journal-deny-by-vm "DENY \|AUDIT " "DENY uid=$NO_UID user=sg-no" SPICEGATE_VM=boottest
check journal-no-fallback sh -c "! journalctl -b -u spicegate.service --no-pager | grep -q 'journald did not take\|cannot reach journald'"

# --- reload applies a changed policy, and refuses a broken one.
policy $NO_UID
check reload-changed systemctl reload spicegate.service
expect reload-changed-revokes deny "$(connect_as $OK_UID)"
expect reload-changed-grants allow "$(connect_as $NO_UID)"
check journal-reload-event journal_has SPICEGATE_EVENT=reload -- \
    MESSAGE_ID=$RELOAD_ID PRIORITY=5 "MESSAGE^=reloaded policy /etc/spicegate/policy.toml (spicegate reload)"
echo 'this is [not a policy' > /etc/spicegate/policy.toml
check reload-broken-fails sh -c "! systemctl reload spicegate.service"
check journal-reload-refused-event journal_has SPICEGATE_EVENT=reload_refused -- \
    MESSAGE_ID=$RELOAD_REFUSED_ID PRIORITY=3 "MESSAGE^=reload refused (spicegate reload)"
expect reload-broken-keeps-old allow "$(connect_as $NO_UID)"
policy $OK_UID
check reload-back systemctl reload spicegate.service

# --- the reload path unit: off by default; once enabled, a change of the
# policy is reloaded, a half-written file is refused (the old policy stays
# in force) and the next change is picked up.
count_in_journal() { journalctl -b -u spicegate.service -o cat --no-pager | grep -c "$1"; }
# wait_more PATTERN N: up to 15 s for more than N journal lines with PATTERN.
wait_more() {
    local i
    for i in $(seq 150); do
        [ "$(count_in_journal "$1")" -gt "$2" ] && return 0
        sleep 0.1
    done
    return 1
}
check reload-path-disabled-by-default sh -c "! systemctl is-enabled --quiet spicegate-reload.path"
check reload-path-enable systemctl enable --now spicegate-reload.path
n=$(count_in_journal '^reloaded policy')
policy $NO_UID
check reload-path-reloads-on-change wait_more '^reloaded policy' "$n"
expect reload-path-change-in-force allow "$(connect_as $NO_UID)"
r=$(count_in_journal '^reload refused')
echo 'this is [not a polic' > /etc/spicegate/policy.toml
check reload-path-refuses-broken wait_more '^reload refused' "$r"
expect reload-path-broken-keeps-old allow "$(connect_as $NO_UID)"
n=$(count_in_journal '^reloaded policy')
policy $OK_UID
check reload-path-picks-up-the-fix wait_more '^reloaded policy' "$n"
expect reload-path-fix-in-force deny "$(connect_as $NO_UID)"
check reload-path-disable systemctl disable --now spicegate-reload.path

# --- restart: no gap.
pid=$(mainpid)
probes_start
check restart systemctl restart spicegate.service
check restart-new-daemon wait_new_daemon "$pid"
probes_stop restart

# --- kill -9: systemd restarts it (Restart=on-failure); no gap meanwhile.
pid=$(mainpid)
probes_start
# Never `kill -9 0`: that would be this script's own process group.
check kill9-sent sh -c "[ '$pid' -gt 0 ] && kill -9 '$pid'"
check kill9-restarted wait_new_daemon "$pid"
probes_stop kill9
check kill9-counted sh -c "[ \$(systemctl show -p NRestarts --value spicegate.service) -ge 1 ]"

# --- upgrade to a rebuilt package with a higher version: the new daemon
# takes over, the admin's policy stays, no gap.
pid=$(mainpid)
probes_start
check upgrade dpkg -i --force-confold $OUT/spicegate-b.deb
check upgrade-new-daemon wait_new_daemon "$pid"
probes_stop upgrade
expect upgrade-version "$B_VERSION" "$(dpkg-query -W -f='${Version}' spicegate)"
check upgrade-keeps-policy grep -q "#$OK_UID" /etc/spicegate/policy.toml
check_pinned upgrade-keeps-pins "policy$NEW_LAYOUT"

# --- remove: stopped and unloaded, configuration and state kept.
check remove dpkg -r spicegate
expect remove-stopped inactive "$(systemctl is-active spicegate.service)"
check remove-unloaded test ! -e "$PINS"
expect remove-enforces-nothing allow "$(connect_as $NO_UID)"
check remove-binary-gone test ! -e /usr/sbin/spicegate
check remove-keeps-config test -f /etc/spicegate/policy.toml
check remove-keeps-state test -d /var/lib/spicegate

# --- purge: configuration, state and the enable link gone.
check purge dpkg -P spicegate
check purge-config-gone test ! -e /etc/spicegate
check purge-state-gone test ! -e /var/lib/spicegate
check purge-enable-link-gone test ! -L /etc/systemd/system/multi-user.target.wants/spicegate.service
check purge-unknown-to-dpkg sh -c "! dpkg-query -W spicegate"
