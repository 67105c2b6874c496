#!/usr/bin/env bash
# The local compose stack, and a batch sent through it end to end.
#
#   deploy/compose-smoke.sh up      write a local .env if there is none (new encryption
#                                   key and admin token, the emulator as Amazon), build,
#                                   start db + 2 relays + Prometheus + the emulator, and
#                                   wait until both relays are ready
#   deploy/compose-smoke.sh smoke   through relay 1: an output, its Login with Amazon
#                                   against the emulator, a connection, one mParticle
#                                   batch; then wait until relay 2 (same database) shows
#                                   it delivered and the emulator holds its eventIds
#   deploy/compose-smoke.sh down    stop the stack (the database volume is kept)
#
# `smoke` needs only curl and python3 and talks to whatever RELAY_1_URL, RELAY_2_URL and
# EMULATOR_URL point at (defaults: the compose ports on 127.0.0.1), with the admin token
# from RELAY_ADMIN_TOKEN or .env, so it also runs against relays started by hand.
set -euo pipefail

cd "$(dirname "$0")/.."
COMPOSE=${COMPOSE:-"docker compose"}
RELAY_1_URL=${RELAY_1_URL:-http://127.0.0.1:${PORT_RELAY_1:-8000}}
RELAY_2_URL=${RELAY_2_URL:-http://127.0.0.1:${PORT_RELAY_2:-8001}}
EMULATOR_URL=${EMULATOR_URL:-http://127.0.0.1:${PORT_EMULATOR:-9100}}
TIMEOUT=${SMOKE_TIMEOUT:-120}

die() { echo "compose-smoke: $*" >&2; exit 1; }
json() { python3 -c "import json,sys; v=json.load(sys.stdin); print($1)"; }

env_value() {  # a value from .env, for the admin token when it is not in the environment
    [ -f .env ] && sed -n "s/^$1=//p" .env | tail -n 1
}

wait_ready() {  # url: until /readyz answers 200 (database reachable, migrations at head)
    local deadline=$((SECONDS + TIMEOUT))
    until curl -fs -o /dev/null "$1/readyz"; do
        [ $SECONDS -lt $deadline ] || die "$1 not ready after ${TIMEOUT}s"
        sleep 2
    done
}

write_local_env() {
    [ -f .env ] && { echo "compose-smoke: keeping the existing .env"; return; }
    local key token
    key=$(python3 -c 'import base64,os; print("k1:" + base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("="))')
    token=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')
    umask 077
    cat > .env <<EOF
# Written by deploy/compose-smoke.sh up: a local stack with the bundled emulator as
# Amazon. Keep it: the key decrypts the tokens stored in the pgdata volume.
RELAY_ENV=development
RELAY_ENCRYPTION_KEYS=$key
RELAY_ADMIN_TOKEN=$token
RELAY_PUBLIC_URL=http://127.0.0.1:${PORT_RELAY_1:-8000}
RELAY_LWA_CLIENT_ID=relay-demo-client
RELAY_LWA_CLIENT_SECRET=relay-demo-secret
RELAY_AMAZON_API_URL=http://emulator:9100
RELAY_LWA_TOKEN_URL=http://emulator:9100/auth/o2/token
# The browser, not the relay, opens the authorize URL: the emulator's host port.
RELAY_LWA_AUTHORIZE_URL=http://127.0.0.1:${PORT_EMULATOR:-9100}/ap/oa
RELAY_LOG_FORMAT=json
EOF
    echo "compose-smoke: wrote .env (local stack, emulator as Amazon)"
}

cmd_up() {
    write_local_env
    $COMPOSE --profile emulator up -d --build
    wait_ready "$RELAY_1_URL"
    wait_ready "$RELAY_2_URL"
    echo "compose-smoke: relays ready at $RELAY_1_URL and $RELAY_2_URL"
}

cmd_smoke() {
    local token=${RELAY_ADMIN_TOKEN:-$(env_value RELAY_ADMIN_TOKEN)}
    [ -n "$token" ] || die "no RELAY_ADMIN_TOKEN (environment or .env)"
    local auth=(-H "Authorization: Bearer $token")
    wait_ready "$RELAY_1_URL"
    wait_ready "$RELAY_2_URL"

    local output_id
    output_id=$(curl -fsS "${auth[@]}" -H 'Content-Type: application/json' \
        -d '{"name": "compose smoke", "advertiser_id": "1234567890"}' \
        "$RELAY_1_URL/v1/outputs" | json 'v["id"]')
    echo "compose-smoke: output $output_id"

    # Login with Amazon as a browser does it: the relay's redirect to the authorize
    # URL, the emulator's redirect back with a code, the relay's callback (303).
    local jar
    jar=$(mktemp)
    trap 'rm -f "$jar"' RETURN
    local authorize callback status
    authorize=$(curl -fsS -o /dev/null -w '%{redirect_url}' -c "$jar" -b "$jar" "${auth[@]}" \
        "$RELAY_1_URL/oauth/amazon/start?output_id=$output_id")
    callback=$(curl -fsS -o /dev/null -w '%{redirect_url}' "$authorize")
    status=$(curl -sS -o /dev/null -w '%{http_code}' -c "$jar" -b "$jar" "$callback")
    [ "$status" = 303 ] || die "Login with Amazon callback answered $status"
    curl -fsS "${auth[@]}" "$RELAY_1_URL/v1/outputs/$output_id" | json 'v["status"]' \
        | grep -qx configured || die "output not configured after the login"

    local conn key secret
    conn=$(curl -fsS "${auth[@]}" -H 'Content-Type: application/json' \
        -d '{"source": "mparticle", "name": "smoke"}' "$RELAY_1_URL/v1/outputs/$output_id/connections")
    key=$(json 'v["key"]' <<<"$conn")
    secret=$(json 'v["secret"]' <<<"$conn")

    local now_ms event_id batch answer
    now_ms=$(python3 -c 'import time; print(int(time.time() * 1000) - 60000)')
    event_id="smoke-$(date +%s)-$$"
    batch=$(cat <<EOF
{"environment": "production",
 "user_identities": {"email": "smoke@example.com"},
 "device_info": {"platform": "web", "locale_country": "US"},
 "events": [{"event_type": "commerce_event",
             "data": {"event_id": "$event_id", "timestamp_unixtime_ms": $now_ms,
                      "currency_code": "USD",
                      "product_action": {"action": "purchase", "total_amount": 20.0,
                        "products": [{"id": "sku-1", "name": "Sku", "price": 10.0,
                                      "quantity": 2}]}}}]}
EOF
)
    answer=$(curl -fsS -u "$key:$secret" -H 'Content-Type: application/json' -d "$batch" \
        "$RELAY_1_URL/v2/events")
    [ "$(json 'v["accepted"]' <<<"$answer")" = 1 ] || die "batch not accepted: $answer"
    local delivery
    delivery=$(json 'v["deliveries"][0]' <<<"$answer")
    echo "compose-smoke: batch accepted by relay 1, delivery $delivery"

    # Relay 2 reads the same database: it sees the delivery, whichever replica sent it.
    local deadline=$((SECONDS + TIMEOUT)) state=""
    while [ "$state" != delivered ]; do
        [ $SECONDS -lt $deadline ] || die "delivery $delivery is still '$state'"
        sleep 1
        state=$(curl -fsS "${auth[@]}" "$RELAY_2_URL/v1/deliveries/$delivery" | json 'v["status"]')
    done
    curl -fsS "$EMULATOR_URL/_emulator/received/events?unique=true" \
        | json '"yes" if any(e["eventId"] == "'"$event_id"'" for e in v["events"]) else "no"' \
        | grep -qx yes || die "the emulator did not receive event $event_id"
    echo "compose-smoke: ok: delivered (seen from relay 2) and received by Amazon's emulator"
}

case "${1:-}" in
    up) cmd_up ;;
    smoke) cmd_smoke ;;
    down) $COMPOSE --profile emulator down ;;
    *) die "usage: $0 up|smoke|down" ;;
esac
