"""``relay demo``: the whole path on one machine, in well under a minute.

Starts the bundled Amazon emulator and the relay (embedded SQLite database in a
temporary directory), creates an output, completes the real Login with Amazon
flow against the emulator, creates an mParticle and a Segment connection, posts
the sample batches, and prints what Amazon received, what was dropped and why,
and the relay's key metrics.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from app.config import Settings, isolated_settings
from app.db.migrate import upgrade_to_head
from app.emulator import create_app as create_emulator
from app.localserver import bind_loopback, serve_in_thread, url_of
from app.main import create_app

CLIENT_ID, CLIENT_SECRET = "relay-demo-client", "relay-demo-secret"
METRICS_SHOWN = (
    "relay_events_received_total",
    "relay_events_forwarded_total",
    "relay_events_dropped_total",
    "relay_deliveries_total",
    "relay_amazon_requests_total",
    "relay_token_refreshes_total",
    "relay_queue_depth",
)


def sample(name: str) -> str:
    """A bundled sample batch with its times set to now (and one event 3 days old)."""
    text = resources.files("app.samples").joinpath(name).read_text(encoding="utf-8")
    now_ms = int(time.time() * 1000)
    iso = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(now_ms / 1000))
    return (
        text.replace("{{now_ms}}", str(now_ms))
        .replace("{{old_ms}}", str(now_ms - 3 * 86_400_000))
        .replace("{{now_iso}}", iso)
    )


def _login(client: httpx.Client, output_id: str) -> None:
    """Login with Amazon, as a browser does it: relay → Amazon → relay callback."""
    start = client.get("/oauth/amazon/start", params={"output_id": output_id})
    assert start.status_code == 302, start.text
    amazon = client.get(start.headers["location"])  # the emulator signs in and redirects back
    assert amazon.status_code == 302, amazon.text
    callback = client.get(amazon.headers["location"])
    if callback.status_code != 303:
        raise RuntimeError(
            f"Login with Amazon failed: {callback.status_code} {callback.text[:200]}"
        )


def _post(client: httpx.Client, path: str, body: str, auth: tuple[str, str]) -> dict[str, Any]:
    answer = client.post(
        path,
        params={"wait": 10},
        content=body,
        auth=auth,
        headers={"Content-Type": "application/json"},
    )
    answer.raise_for_status()
    result: dict[str, Any] = answer.json()
    return result


def _show(console: Console, source: str, answer: dict[str, Any]) -> None:
    console.print(
        f"\n[bold]{source}[/]: {answer['accepted']} event(s) queued in "
        f"{len(answer['deliveries'])} Events API request(s)"
    )
    for delivery_id, outcome in (answer.get("outcome") or {}).items():
        console.print(
            f"  delivery {delivery_id}: [green]{outcome['status']}[/] after "
            f"{outcome['attempts']} attempt(s), Amazon answered HTTP {outcome['http_status']}"
        )
    for drop in answer["dropped"]:
        console.print(f"  dropped event #{drop['index']}: [yellow]{drop['reason']}[/]")


def _received(console: Console, amazon: str) -> int:
    received = httpx.get(f"{amazon}/_emulator/received").json()["requests"]
    table = Table(title="What Amazon received")
    for column in ("req", "conversionType", "name", "eventId", "matchKeys", "value"):
        table.add_column(column, overflow="fold")
    accepted = 0
    for number, request in enumerate(received, start=1):
        status = request.get("status")
        for position, event in enumerate(request["body"].get("events", [])):
            table.add_row(
                f"{number}.{position}",
                event["eventDescription"]["conversionType"],
                event["eventDescription"]["name"],
                event.get("eventId", ""),
                ", ".join(k["type"] for k in event.get("matchKeys", [])),
                str(event.get("value", "")),
            )
        if status == 207:
            accepted += len(request["response"].get("success", []))
    console.print(table)
    return accepted


def _metrics(console: Console, relay: str) -> None:
    text = httpx.get(f"{relay}/metrics").text
    console.print("\n[bold]Relay metrics[/] (GET /metrics)")
    for line in text.splitlines():
        if line.startswith(METRICS_SHOWN) and not line.startswith("#"):
            console.print(f"  {line}")


def emulator_settings(
    *, database_url: str, key_file: Path, admin_token: str, amazon: str, relay_url: str
) -> Settings:
    """Settings of a relay at ``relay_url`` whose Amazon is the emulator at ``amazon``:
    its LwA client, its authorize and token URLs, its Events API."""
    return isolated_settings(
        database_url=database_url,
        key_file=key_file,
        admin_token=admin_token,
        lwa_client_id=CLIENT_ID,
        lwa_client_secret=CLIENT_SECRET,
        amazon_api_url=amazon,
        lwa_authorize_url=f"{amazon}/ap/oa",
        lwa_token_url=f"{amazon}/auth/o2/token",
        public_url=relay_url,
        log_format="console",
    )


def run_demo(*, keep: bool = False) -> int:
    console = Console()
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="relay-demo-"))
    admin_token = secrets.token_urlsafe(24)
    try:
        with serve_in_thread(
            create_emulator(client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
        ) as amazon:
            sock = bind_loopback()
            relay_url = url_of(sock)
            settings = emulator_settings(
                database_url=f"sqlite+aiosqlite:///{workdir}/relay.db",
                key_file=workdir / "relay.key",
                admin_token=admin_token,
                amazon=amazon,
                relay_url=relay_url,
            )
            upgrade_to_head(settings.database_url)
            console.print(
                f"[bold]Amazon emulator[/] {amazon}   [bold]relay[/] {relay_url}   "
                f"[dim]database {workdir / 'relay.db'}[/]"
            )
            with (
                serve_in_thread(create_app(settings), sock),
                httpx.Client(
                    base_url=relay_url,
                    headers={"Authorization": f"Bearer {admin_token}"},
                    timeout=30,
                ) as client,
            ):
                output = client.post(
                    "/v1/outputs",
                    json={
                        "name": "Demo store",
                        "advertiser_id": "1234567890",
                        "data_set_name": "demo_purchases",
                        "partner_name": "acme_relay",
                    },
                ).json()
                console.print(f"output {output['id']}: status {output['status']}")
                _login(client, output["id"])
                status = client.get(f"/v1/outputs/{output['id']}").json()["status"]
                console.print(
                    f"Login with Amazon completed against the emulator: status [green]{status}[/]"
                )
                answers = {}
                for source, path, file in (
                    ("mparticle", "/v2/events", "mparticle_batch.json"),
                    ("segment", "/v1/batch", "segment_batch.json"),
                ):
                    created = client.post(
                        f"/v1/outputs/{output['id']}/connections",
                        json={"source": source, "name": f"demo {source}"},
                    ).json()
                    answers[source] = _post(
                        client, path, sample(file), (created["key"], created["secret"])
                    )
                    _show(console, source, answers[source])
                accepted = _received(console, amazon)
                _metrics(console, relay_url)
        forwarded = sum(answer["accepted"] for answer in answers.values())
        took = time.monotonic() - began
        ok = accepted == forwarded
        console.print(
            f"\n{'[green]OK[/]' if ok else '[red]MISMATCH[/]'}: {forwarded} event(s) forwarded, "
            f"{accepted} accepted by Amazon, in {took:.1f} s"
        )
        return 0 if ok else 1
    finally:
        if keep:
            console.print(f"[dim]kept {workdir}[/]")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
