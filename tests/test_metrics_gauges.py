"""The state gauges of /metrics: read from the database at scrape time, so the alerts
on dead deliveries and outputs needing a new login fire exactly while the state lasts."""

from __future__ import annotations

from pathlib import Path

from e2e_helpers import Stack, relay_stack, run_sql, sdk_batch


def gauges(stack: Stack) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in stack.client.get("/metrics").text.splitlines():
        if line.startswith(("relay_outputs{", "relay_deliveries_dead ", "relay_queue_depth ")):
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


def test_outputs_by_status_and_dead_deliveries(database_url: str, tmp_path: Path) -> None:
    with relay_stack(database_url, tmp_path) as stack:
        waiting = stack.create_output(name="Not logged in")
        ready, conn = stack.ready_output()
        assert gauges(stack) == {
            'relay_outputs{status="needs_login"}': 1.0,
            'relay_outputs{status="configured"}': 1.0,
            'relay_outputs{status="needs_reauth"}': 0.0,  # present at zero: alerts see 0
            "relay_deliveries_dead": 0.0,
            "relay_queue_depth": 0.0,
        }

        stack.post_events(conn, sdk_batch([1, 2]))
        (delivery,) = stack.wait_settled()
        run_sql(stack.database_url, "UPDATE deliveries SET status = 'dead'")
        run_sql(
            stack.database_url,
            "UPDATE outputs SET status = 'needs_reauth' WHERE id = :id",
            id=ready["id"],
        )
        after = gauges(stack)
        assert after["relay_deliveries_dead"] == 1.0
        assert after['relay_outputs{status="needs_reauth"}'] == 1.0
        assert after['relay_outputs{status="configured"}'] == 0.0
        assert after['relay_outputs{status="needs_login"}'] == 1.0

        # The admin's retry takes it out of the dead state, and the gauge follows.
        assert stack.admin.post(f"/v1/deliveries/{delivery['id']}/retry").status_code == 200
        assert gauges(stack)["relay_deliveries_dead"] == 0.0
        assert waiting["status"] == "needs_login"
