#!/bin/bash
# The end-to-end test's probe (tests/deploy/test_systemd_e2e.py). stanchion-e2e-probe.service runs it
# inside the booted container once the agent's start job is over, which under Type=notify means
# READY=1. It makes the agent hang with SIGSTOP: a stopped process cannot send WATCHDOG=1, so systemd
# sees a hang. Then it waits for systemd's watchdog to kill the agent and restart it. It writes to /out:
#   ready.env      the agent's state when its start job ended (`systemctl show`, KEY=VALUE lines),
#                  plus AgentEnvWatchdogUsec: the WATCHDOG_USEC that systemd gave the agent
#   steady.env     the same, two watchdog periods later (same process, no restart), plus UnitProcs:
#                  the PIDs in the unit's control group (the agent and its standby rank)
#   hung.env       the main PID that got SIGSTOP, and its /proc state (T: stopped)
#   timeline.log   one line of state every 0.2 s, from the hang until the restarted agent runs
#   restarted.env  the state after that, with UnitProcs
#   journal.txt    `journalctl -u stanchion-agent` for this boot
#   probe.log      what the probe did, and why it gave up if it did
# It exits 0 only if it saw the restarted agent running; the unit then powers the container off.
set -u
OUT=/out
UNIT=stanchion-agent.service
PROPS=(-p ActiveState -p SubState -p Result -p NRestarts -p MainPID -p ExecMainCode -p ExecMainStatus)

log() { echo "$(date +%T.%N | cut -c1-12) $*" >>"$OUT/probe.log"; }
state() { systemctl show "$UNIT" "${PROPS[@]}"; }
prop() { systemctl show "$UNIT" -P "$1"; }
get() { echo "$now" | sed -n "s/^$1=//p"; }  # a property from the last `now=$(state)`
unit_procs() {
    # Works with cgroup v1 (name=systemd hierarchy) and v2 alike.
    grep -l "/$UNIT\$" /proc/[0-9]*/cgroup 2>/dev/null | cut -d/ -f3 | sort -n | tr '\n' ' '
}
finish() {
    journalctl -b -u "$UNIT" -o short-monotonic --no-pager >"$OUT/journal.txt" 2>&1
    log "probe finished"
}
trap finish EXIT

log "agent start job over"
state >"$OUT/ready.env"
if [ "$(prop ActiveState)" != active ]; then
    log "the agent is not active after its start job: $(prop ActiveState)/$(prop SubState), result $(prop Result)"
    exit 1
fi
# The watchdog period as the agent got it (systemctl show prints WatchdogUSec as "5s").
pid=$(prop MainPID)
watchdog_usec=$(tr '\0' '\n' <"/proc/$pid/environ" | sed -n 's/^WATCHDOG_USEC=//p')
echo "AgentEnvWatchdogUsec=$watchdog_usec" >>"$OUT/ready.env"
if [ -z "$watchdog_usec" ]; then
    log "systemd gave the agent (PID $pid) no WATCHDOG_USEC"
    exit 1
fi
watchdog_s=$(( (watchdog_usec + 999999) / 1000000 ))

# An agent that did not ping would be killed one watchdog period after READY=1.
sleep $(( 2 * watchdog_s ))
{ state; echo "UnitProcs=$(unit_procs)"; } >"$OUT/steady.env"

pid=$(prop MainPID)
log "hanging main PID $pid with SIGSTOP"
systemctl kill --kill-who=main -s SIGSTOP "$UNIT"
sleep 0.2
{
    echo "MainPID=$pid"
    echo "ProcState=$(sed -n 's/^State:[[:space:]]*//p' "/proc/$pid/status")"
} >"$OUT/hung.env"

# Within watchdog_s the watchdog fires. The SIGABRT, RestartSec and the next start (torch import,
# then READY=1) follow. Wait for a running agent with another PID.
wait_s=$(( watchdog_s + 90 ))
deadline=$(( $(date +%s) + wait_s ))
while [ "$(date +%s)" -lt "$deadline" ]; do
    now=$(state)
    echo "$(date +%T.%N | cut -c1-12) $(echo "$now" | tr '\n' ' ')" >>"$OUT/timeline.log"
    if [ "$(get ActiveState)" = active ] && [ "$(get SubState)" = running ] \
        && [ "$(get NRestarts)" -ge 1 ] && [ "$(get MainPID)" != "$pid" ] && [ "$(get MainPID)" != 0 ]; then
        { echo "$now"; echo "UnitProcs=$(unit_procs)"; } >"$OUT/restarted.env"
        log "restarted as PID $(get MainPID)"
        exit 0
    fi
    sleep 0.2
done
{ state; echo "UnitProcs=$(unit_procs)"; } >"$OUT/restarted.env"
log "no restarted agent running within $wait_s s of the hang"
exit 1
