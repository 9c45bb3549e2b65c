#!/usr/bin/env bash
# The GitHub Action's command step: COMMAND is `plan` (a pull request's plan against the trusted base, as
# Markdown), `drift` (a drift check, as Markdown) or `apply`. Writes `exitcode` (0: no changes, 2: changes) to
# GITHUB_OUTPUT and the Markdown to nimbus-<command>.md; exit code 1 (an error, or a policy's deny) fails the step.
set -uo pipefail
: "${COMMAND:?}" "${FLEET_FILE:?}"
case "$COMMAND" in
  plan)
    : "${BASE_FLEET_FILE:?the trusted base fleet file}"
    nimbus plan -f "$FLEET_FILE" --trusted-base "$BASE_FLEET_FILE" --markdown --detailed-exitcode > nimbus-plan.md
    code=$?
    ;;
  drift)
    nimbus plan -f "$FLEET_FILE" --markdown --detailed-exitcode > nimbus-drift.md
    code=$?
    ;;
  apply)
    nimbus apply -f "$FLEET_FILE" --auto-approve
    code=$?
    ;;
  *)
    echo "nimbus action: command must be plan, drift or apply, not $COMMAND" >&2
    exit 1
    ;;
esac
echo "exitcode=$code" >> "${GITHUB_OUTPUT:-/dev/null}"
[ "$code" != 1 ]
