"""Secrets stay secret end to end: logs, database, key rotation, headers, brute force.

Relay and emulator run as servers on loopback (e2e_helpers); every test runs on SQLite
and on PostgreSQL. Tokens are learnt the way an attacker with the key could: by
decrypting the relay's rows with the test's key ring, and checked against the emulator
(which issued them) so the test knows it looks for the real thing.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_helpers import (
    CLIENT_SECRET,
    accepted_event_ids,
    assert_exactly_the_accepted_reached_amazon,
    emulator_server,
    query_of,
    relay_stack,
    sdk_batch,
    wait_for,
)

from app.auth import ConnectionAuthCache, Credentials, FailedAuthLimiter
from app.crypto import DecryptError, KeyRing, new_key_entry

RAW_EMAIL = " Private.Person@Example.COM "
RAW_PHONE = "+1 (415) 555-0199"
TOKEN_LIKE = re.compile(r"Atz[ar]\|[A-Za-z0-9_-]")
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
}


def private_batch(*event_ids: int) -> dict[str, Any]:
    batch = sdk_batch(list(event_ids), email=RAW_EMAIL)
    batch["user_identities"]["mobile_number"] = RAW_PHONE
    return batch


def test_no_token_secret_or_raw_identity_in_the_logs_of_a_full_run(
    database_url: str, tmp_path: Path
) -> None:
    secrets: set[str] = {CLIENT_SECRET, RAW_EMAIL.strip(), RAW_EMAIL.strip().lower(), RAW_PHONE}
    with relay_stack(database_url, tmp_path, capture_logs=True) as stack:
        assert stack.logs is not None
        secrets.add(stack.admin_token)
        stack.emulator_config(rotate_refresh_tokens=True)
        output = stack.create_output()
        browser = stack.browser()
        callback_url = stack.authorize(stack.start_login(output["id"], browser), browser)
        secrets.add(query_of(callback_url)["code"])
        ((verifier,),) = stack.sql("SELECT verifier_ciphertext FROM oauth_states")
        secrets.add(stack.keyring.decrypt(verifier, output["id"], purpose="pkce_verifier").reveal())
        assert browser.get(callback_url).status_code == 303
        secrets |= stack.stored_tokens()
        conn = stack.connect(output["id"])
        secrets.add(conn.secret)

        # Deliver; then a 401 → refresh (with a rotated refresh token) → resend.
        accepted = accepted_event_ids(b := private_batch(1, 2), stack.post_events(conn, b))
        stack.wait_settled()
        stack.amazon.post("/_emulator/revoke", json={"access_tokens": True})
        accepted |= accepted_event_ids(b := private_batch(3), stack.post_events(conn, b))
        stack.wait_settled()
        secrets |= stack.stored_tokens()
        # Failures log too: a bad ingest secret, a refused code exchange, invalid_grant.
        assert stack.client.post("/v2/events", json=b, auth=(conn.key, "nope")).status_code == 401
        again = stack.browser()
        late = stack.authorize(stack.start_login(output["id"], again), again)
        secrets.add(query_of(late)["code"])
        stack.amazon.post("/_emulator/clock", json={"advance": 301})
        assert again.get(late).status_code == 400
        stack.amazon.post("/_emulator/revoke", json={"all": True})
        accepted |= accepted_event_ids(b := private_batch(4), stack.post_events(conn, b))
        wait_for(lambda: stack.output(output["id"])["status"] == "needs_reauth")
        assert stack.login(output["id"]).status_code == 303
        stack.wait_settled()
        secrets |= stack.stored_tokens()
        assert_exactly_the_accepted_reached_amazon(stack, accepted)
        log_text = stack.logs.text

    # The run did log what happened (so the tap saw it) ...
    logged = {event["event"] for event in stack.logs.events()}
    assert {
        "lwa_flow_completed",
        "lwa_token_refreshed",
        "lwa_exchange_failed",
        "lwa_invalid_grant",
        "delivery_done",
    } <= logged
    # ... and none of the secrets or identities it handled: three refresh tokens (one
    # rotated), their access tokens, codes, a PKCE verifier, client and admin secrets.
    assert sum(1 for s in secrets if s.startswith("Atzr|")) >= 3
    assert sum(1 for s in secrets if s.startswith("Atza|")) >= 3
    leaked = sorted(secret[:12] + "…" for secret in secrets if secret in log_text)
    assert leaked == []
    assert not TOKEN_LIKE.search(log_text)
    assert hashlib.sha256(RAW_EMAIL.strip().lower().encode()).hexdigest() not in log_text


def test_tokens_and_raw_identities_are_not_in_the_database_in_plaintext(
    database_url: str, tmp_path: Path
) -> None:
    with relay_stack(database_url, tmp_path) as stack:
        stack.emulator_config(rotate_refresh_tokens=True)
        output, conn = stack.ready_output()
        tokens = stack.stored_tokens()
        stack.post_events(conn, private_batch(1))
        stack.wait_settled()
        # A refresh with rotation writes a second refresh token and access token.
        stack.amazon.post("/_emulator/revoke", json={"access_tokens": True})
        stack.post_events(conn, private_batch(2))
        stack.wait_settled()
        tokens |= stack.stored_tokens()
        assert len(tokens) == 4
        refresh = [t for t in tokens if t.startswith("Atzr|")]
        # They are the real tokens: the emulator knows the current refresh token.
        current = stack.keyring.decrypt(
            stack.sql("SELECT refresh_token_ciphertext FROM credentials")[0][0], output["id"]
        ).reveal()
        assert current in refresh

        stored = stack.database_text()
        ((ciphertext,),) = stack.sql("SELECT refresh_token_ciphertext FROM credentials")
        assert ciphertext.encode() in stored  # the right bytes are being searched
        for token in tokens:
            assert token.encode() not in stored
            assert token.split("|", 1)[1].encode() not in stored
        for identity in (RAW_EMAIL.strip(), RAW_EMAIL.strip().lower(), RAW_PHONE):
            assert identity.encode() not in stored
        assert conn.secret.encode() not in stored
        assert stack.amazon.post("/_emulator/revoke", json={"refresh_token": current}).json() == {
            "revoked": 1
        }


def test_a_ciphertext_copied_onto_another_output_does_not_decrypt(
    database_url: str, tmp_path: Path
) -> None:
    with relay_stack(database_url, tmp_path) as stack:
        victim, victim_conn = stack.ready_output(name="Victim", advertiser_id="111111")
        thief, thief_conn = stack.ready_output(name="Thief", advertiser_id="222222")
        # Someone with write access to the rows puts the victim's refresh token on the
        # thief's output and drops the thief's cached access token to force a refresh.
        stack.sql(
            "UPDATE credentials SET refresh_token_ciphertext = (SELECT refresh_token_ciphertext "
            "FROM credentials WHERE output_id = :victim), access_token_ciphertext = NULL "
            "WHERE output_id = :thief",
            victim=victim["id"],
            thief=thief["id"],
        )
        ((copied,),) = stack.sql(
            "SELECT refresh_token_ciphertext FROM credentials WHERE output_id = :o", o=thief["id"]
        )
        with pytest.raises(DecryptError):
            stack.keyring.decrypt(copied, thief["id"])
        assert stack.keyring.decrypt(copied, victim["id"]).reveal().startswith("Atzr|")

        stolen = stack.post_events(thief_conn, sdk_batch([66]))
        honest = stack.post_events(victim_conn, sdk_batch([77]))
        # The thief's output needs a new login; its events wait, nothing is sent for it
        # and the victim's token is never used on its behalf.
        wait_for(lambda: stack.output(thief["id"])["status"] == "needs_reauth")
        stack.wait_settled(output_id=victim["id"])
        assert stack.deliveries(output_id=thief["id"])[0]["status"] == "pending"
        assert stack.deliveries(output_id=thief["id"])[0]["id"] == stolen["deliveries"][0]
        assert {r["account_id"] for r in stack.received()} == {"111111"}
        assert stack.unique_event_ids() == ["77"]
        assert honest["accepted"] == 1
        assert stack.stats()["token_grants"] == {"authorization_code": 2}
        assert stack.output(victim["id"])["status"] == "configured"


def test_key_rotation_end_to_end(database_url: str, tmp_path: Path) -> None:
    old_key, new_key = new_key_entry("k1"), new_key_entry("k2")
    with emulator_server() as amazon:
        with relay_stack(database_url, tmp_path, amazon=amazon, encryption_keys=old_key) as one:
            outputs = [one.ready_output(advertiser_id=str(100 + i)) for i in range(2)]
            signed = one.admin.post(
                f"/v1/outputs/{outputs[0][0]['id']}/connections",
                json={"source": "segment", "name": "signed", "shared_secret": "webhook-secret-1"},
            )
            assert signed.status_code == 201
            tokens = one.stored_tokens()

        # `relay rotate-keys` with the new key first, as the runbook says.
        environment = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        environment |= {
            "RELAY_DATABASE_URL": database_url,
            "RELAY_ENCRYPTION_KEYS": f"{new_key},{old_key}",
        }
        rotated = subprocess.run(
            [str(Path(sys.executable).with_name("relay")), "rotate-keys"],
            env=environment,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert rotated.returncode == 0, rotated.stderr
        # Two refresh tokens, two cached access tokens and one shared secret.
        assert "re-encrypted 5 secret(s)" in rotated.stdout

        # The old key removed: every token still decrypts, and only under the new key.
        with relay_stack(database_url, tmp_path, amazon=amazon, encryption_keys=new_key) as two:
            assert {k for (k,) in two.sql("SELECT key_id FROM credentials")} == {"k2"}
            assert two.stored_tokens() == tokens
            old_only = KeyRing.parse(old_key)
            for output_id, ciphertext in two.sql(
                "SELECT output_id, refresh_token_ciphertext FROM credentials"
            ):
                assert ciphertext.startswith("v1.k2.")
                with pytest.raises(DecryptError):
                    old_only.decrypt(ciphertext, output_id)
            # The relay refreshes with the re-encrypted refresh tokens and delivers.
            two.amazon.post("/_emulator/revoke", json={"access_tokens": True})
            accepted: set[str] = set()
            for number, (_, conn) in enumerate(outputs):
                batch = sdk_batch([900 + number])
                accepted |= accepted_event_ids(batch, two.post_events(conn, batch))
            assert {d["status"] for d in two.wait_settled()} == {"delivered"}
            assert two.stats()["token_grants"]["refresh_token"] == 2
            assert_exactly_the_accepted_reached_amazon(two, accepted)


def test_security_headers_on_every_kind_of_answer(database_url: str, tmp_path: Path) -> None:
    with relay_stack(database_url, tmp_path) as stack:
        output, conn = stack.ready_output()
        browser = stack.browser()
        answers = {
            "health": stack.client.get("/healthz"),
            "ready": stack.client.get("/readyz"),
            "metrics": stack.client.get("/metrics"),
            "docs": stack.client.get("/docs"),
            "admin": stack.admin.get("/v1/outputs"),
            "admin 401": stack.client.get("/v1/outputs"),
            "admin 404": stack.admin.get("/v1/outputs/out_missing"),
            "admin 422": stack.admin.post("/v1/outputs", json={}),
            "ingest": stack.client.post("/v2/events", json=sdk_batch([1]), auth=conn.auth),
            "ingest 401": stack.client.post("/v2/events", json=sdk_batch([1])),
            "ingest 400": stack.client.post("/v2/events", content=b"{", auth=conn.auth),
            "login start": stack.start_login(output["id"], browser),
            "login 400": browser.get(f"{stack.relay_url}/oauth/amazon/callback?state=x"),
            "unknown path": stack.client.get("/nothing-here"),
        }
        expected = {
            "health": 200,
            "ready": 200,
            "metrics": 200,
            "docs": 200,
            "admin": 200,
            "admin 401": 401,
            "admin 404": 404,
            "admin 422": 422,
            "ingest": 202,
            "ingest 401": 401,
            "ingest 400": 400,
            "login start": 302,
            "login 400": 400,
            "unknown path": 404,
        }
        assert {name: a.status_code for name, a in answers.items()} == expected
        for name, answer in answers.items():
            for header, value in SECURITY_HEADERS.items():
                assert answer.headers.get(header) == value, (name, header)
            assert re.fullmatch(r"[0-9a-f]{16}", answer.headers["x-request-id"]), name
            assert "strict-transport-security" not in answer.headers  # plain http here
        assert answers["admin 401"].headers["www-authenticate"].startswith("Bearer")
        assert answers["ingest 401"].headers["www-authenticate"].startswith("Basic")
        ids = {answer.headers["x-request-id"] for answer in answers.values()}
        assert len(ids) == len(answers)


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_metrics_ask_for_the_metrics_token_once_one_is_set(
    database_url: str, tmp_path: Path
) -> None:
    token = "metrics-" + "x" * 32
    with relay_stack(database_url, tmp_path, metrics_token=token) as stack:
        scrape = f"{stack.relay_url}/metrics"
        refused = [
            httpx.get(scrape),
            httpx.get(scrape, headers={"Authorization": f"Bearer {token}x"}),
            httpx.get(scrape, headers={"Authorization": f"Bearer {stack.admin_token}"}),
            httpx.get(scrape, auth=("metrics", token)),  # Basic is not the scheme
        ]
        assert [answer.status_code for answer in refused] == [401] * 4
        assert refused[0].headers["www-authenticate"] == 'Bearer realm="metrics"'
        assert refused[0].json()["error"] == "unauthorized"
        assert "relay_" not in refused[1].text
        scraped = httpx.get(scrape, headers={"Authorization": f"Bearer {token}"})
        assert scraped.status_code == 200
        assert "relay_events_received_total" in scraped.text
        # The probes stay open: an orchestrator has no token.
        assert stack.client.get("/healthz").status_code == 200
        assert stack.client.get("/readyz").status_code == 200


def test_repeated_failed_authentication_is_answered_429(database_url: str, tmp_path: Path) -> None:
    with relay_stack(database_url, tmp_path, capture_logs=True) as stack:
        assert stack.logs is not None
        output = stack.create_output()
        conn = stack.connect(output["id"])
        neighbour = stack.connect(output["id"], name="same address, other connection")
        # A valid client of the guessed connection, seen before the guessing starts.
        assert stack.client.post("/v2/events", json=sdk_batch([1]), auth=conn.auth).status_code == (
            202
        )
        wrong_admin = httpx.Client(
            base_url=stack.relay_url, headers={"Authorization": "Bearer guess-admin"}, timeout=30
        )
        with wrong_admin:
            # 20 failures a minute for one identity from one address are answered 401 ...
            for attempt in range(20):
                admin = wrong_admin.get("/v1/outputs")
                ingest = stack.client.post(
                    "/v2/events", json=sdk_batch([1]), auth=(conn.key, f"guess-secret-{attempt}")
                )
                assert (admin.status_code, ingest.status_code) == (401, 401), attempt
            # ... then that identity gets 429 without its secret being checked: the right
            # admin token too (its strength is the operator's choice, so a guesser must
            # not learn that a guess was right), and a never-seen secret of the key.
            for answer in (
                wrong_admin.get("/v1/outputs"),
                stack.admin.get("/v1/outputs"),
                stack.client.post(
                    "/v2/events", json=sdk_batch([1]), auth=(conn.key, "guess-secret-x")
                ),
            ):
                assert answer.status_code == 429
                assert answer.headers["retry-after"] == "60"
                assert answer.json()["error"] == "too_many_failures"
        # Other identities behind the same address are not locked out: another
        # connection, and the client of the guessed key whose secret was proven before.
        assert stack.client.post(
            "/v2/events", json=sdk_batch([2]), auth=neighbour.auth
        ).status_code == (202)
        assert stack.client.post("/v2/events", json=sdk_batch([3]), auth=conn.auth).status_code == (
            202
        )
        assert stack.sql("SELECT count(*) FROM deliveries") == [(3,)]
        log_text = stack.logs.text
    # The guesses and the admin token are not in the logs.
    for secret in ("guess-secret-", "guess-admin", stack.admin_token, conn.secret):
        assert secret not in log_text


def test_the_limiter_counts_per_identity_and_caps_an_address() -> None:
    limiter = FailedAuthLimiter(allowed=3, window=60, address_allowed=5)
    for _ in range(3):
        limiter.failed("10.0.0.1", "key-a")
    assert limiter.blocked("10.0.0.1", "key-a")
    assert not limiter.blocked("10.0.0.1", "key-b")  # another connection, same address
    assert not limiter.blocked("10.0.0.2", "key-a")  # the same key from elsewhere
    # Cycling through key ids does not buy unlimited checks from one address.
    limiter.failed("10.0.0.1", "key-b")
    limiter.failed("10.0.0.1", "key-c")
    assert limiter.blocked("10.0.0.1", "key-z")
    assert not limiter.blocked("10.0.0.2", "key-z")
    short = FailedAuthLimiter(allowed=1, window=0.05)
    short.failed("10.0.0.1", "admin")
    assert short.blocked("10.0.0.1", "admin")
    time.sleep(0.06)
    assert not short.blocked("10.0.0.1", "admin")  # the window passed


async def test_requests_in_flight_share_one_secret_check() -> None:
    """When the cache's minute is up under load, the requests in flight wait for one
    scrypt check instead of each paying for their own; a wrong secret is checked on its
    own, is not remembered, and never rides on the right secret's check."""
    calls: list[str] = []
    gate = threading.Event()

    def verify(secret: str, secret_hash: str) -> bool:
        calls.append(secret)
        gate.wait(5)  # all callers arrive while the first check runs
        return secret == "right"

    cache = ConnectionAuthCache()
    right, wrong = Credentials("con_a", "right"), Credentials("con_a", "wrong")
    checks = [asyncio.create_task(cache.check(right, "hash-1", verify)) for _ in range(16)]
    checks += [asyncio.create_task(cache.check(wrong, "hash-1", verify)) for _ in range(4)]
    await asyncio.sleep(0.05)
    gate.set()
    outcomes = await asyncio.gather(*checks)
    assert outcomes == [True] * 16 + [False] * 4
    assert sorted(calls) == ["right", "wrong"]
    assert cache.verified(right, "hash-1")
    assert not cache.verified(wrong, "hash-1")
    # A rotated secret's hash is another check, and a failure is tried afresh next time.
    assert not await cache.check(right, "hash-2", lambda s, h: False)
    assert not await cache.check(wrong, "hash-1", verify)
    assert sorted(calls) == ["right", "wrong", "wrong"]


def test_unknown_key_and_wrong_secret_cost_the_same(database_url: str, tmp_path: Path) -> None:
    """Timing-safe checks: an unknown key costs the same scrypt hash as a wrong secret,
    so answer times do not tell which keys exist."""
    with relay_stack(database_url, tmp_path) as stack:
        output = stack.create_output()
        conn = stack.connect(output["id"])

        def seconds(auth: tuple[str, str]) -> float:
            start = time.perf_counter()
            assert stack.client.post("/v2/events", json={}, auth=auth).status_code == 401
            return time.perf_counter() - start

        unknown = sorted(seconds((f"con_unknown{i}", "x" * 43)) for i in range(7))
        wrong = sorted(seconds((conn.key, f"wrong-{i}" + "x" * 36)) for i in range(7))
        median_unknown, median_wrong = unknown[3], wrong[3]
        # Both pay for the hash (milliseconds, not microseconds) and within 2x.
        assert min(median_unknown, median_wrong) > 0.005
        assert max(median_unknown, median_wrong) / min(median_unknown, median_wrong) < 2
