#!/bin/bash
# The end-to-end test's probe, run inside the booted container by stanchion-e2e-probe.service once
# the agent's start job is over (READY=1 under Type=notify). It writes to /out:
#   ready.env      the agent's state at that moment (systemctl show: KEY=VALUE lines)
#   steady.env     the same two watchdog periods later: still the same process, no restart
#   hung.env       the main PID that got SIGSTOP and its /proc state (T: stopped)
#   timeline.log   one line of state every 0.2 s from the hang until the restarted agent runs again
#   restarted.env  the state after that
#   journal.txt    journalctl -u stanchion-agent for this boot
#   probe.log      what the probe did, and why it gave up if it did
# A SIGSTOPped process cannot send WATCHDOG=1, so this is a hang as systemd sees one.
set -u
OUT=/out
UNIT=stanchion-agent.service
PROPS=(-p ActiveState -p SubState -p Result -p NRestarts -p MainPID -p ExecMainCode -p ExecMainStatus -p WatchdogUSec -p StatusText)

log() { echo "$(date +%T.%N | cut -c1-12) $*" >>"$OUT/probe.log"; }
state() { systemctl show "$UNIT" "${PROPS[@]}"; }
prop() { systemctl show "$UNIT" -P "$1"; }
get() { echo "$now" | sed -n "s/^$1=//p"; }  # a property of the last $(state) in $now
finish() {
    journalctl -b -u "$UNIT" -o short-monotonic --no-pager >"$OUT/journal.txt" 2>&1
    log "probe finished"
}
trap finish EXIT

log "agent start job over"
state >"$OUT/ready.env"
if [ "$(prop ActiveState)" != active ]; then
    log "the agent is not active after its start job: $(prop ActiveState)/$(prop SubState) result=$(prop Result)"
    exit 1
fi
# The watchdog period as the agent was given it (systemctl show formats WatchdogUSec as "5s").
pid=$(prop MainPID)
watchdog_usec=$(tr '\0' '\n' <"/proc/$pid/environ" | sed -n 's/^WATCHDOG_USEC=//p')
echo "AgentEnvWatchdogUsec=$watchdog_usec" >>"$OUT/ready.env"
if [ -z "$watchdog_usec" ]; then
    log "the agent (PID $pid) got no WATCHDOG_USEC from systemd"
    exit 1
fi
watchdog_s=$(( (watchdog_usec + 999999) / 1000000 ))

# Without its pings the agent would be killed one watchdog period after READY=1.
sleep $(( 2 * watchdog_s ))
state >"$OUT/steady.env"

pid=$(prop MainPID)
log "hanging main PID $pid with SIGSTOP"
systemctl kill --kill-who=main -s SIGSTOP "$UNIT"
sleep 0.2
{
    echo "MainPID=$pid"
    echo "ProcState=$(sed -n 's/^State:[[:space:]]*//p' "/proc/$pid/status")"
} >"$OUT/hung.env"

# The watchdog fires within watchdog_s; SIGABRT, the abort, RestartSec and the next start (torch
# import, READY=1) follow. Wait for a running agent with another PID.
deadline=$(( $(date +%s) + watchdog_s + 90 ))
while [ "$(date +%s)" -lt "$deadline" ]; do
    now=$(state)
    echo "$(date +%T.%N | cut -c1-12) $(echo "$now" | tr '\n' ' ')" >>"$OUT/timeline.log"
    if [ "$(get ActiveState)" = active ] && [ "$(get SubState)" = running ] \
        && [ "$(get NRestarts)" -ge 1 ] && [ "$(get MainPID)" != "$pid" ] && [ "$(get MainPID)" != 0 ]; then
        echo "$now" >"$OUT/restarted.env"
        log "restarted as PID $(get MainPID)"
        exit 0
    fi
    sleep 0.2
done
state >"$OUT/restarted.env"
log "no restarted agent within $(( watchdog_s + 90 )) s"
exit 1
