"""Where Amazon lives, per region (amazon-api.md), and the operator's overrides.

Only these hosts, or the RELAY_AMAZON_API_URL / RELAY_LWA_* settings that replace
them, are ever contacted: nothing a user posts chooses a URL.
"""

from __future__ import annotations

from dataclasses import dataclass

EVENTS_PATH = "/adsApi/v1/create/events"

EVENTS_HOSTS = {
    "NA": "https://advertising-api.amazon.com",
    "EU": "https://advertising-api-eu.amazon.com",
    "FE": "https://advertising-api-fe.amazon.com",
}
AUTHORIZE_URLS = {
    "NA": "https://www.amazon.com/ap/oa",
    "EU": "https://eu.account.amazon.com/ap/oa",
    "FE": "https://apac.account.amazon.com/ap/oa",
}
TOKEN_URLS = {
    "NA": "https://api.amazon.com/auth/o2/token",
    "EU": "https://api.amazon.co.uk/auth/o2/token",
    "FE": "https://api.amazon.co.jp/auth/o2/token",
}
SCOPE = "advertising::campaign_management"


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Amazon's URLs for a region, with the operator's overrides applied."""

    api_url: str | None = None  # scheme + host (+ port) replacing every region's API host
    authorize_url: str | None = None
    token_url: str | None = None

    def events(self, region: str) -> str:
        base = (self.api_url or EVENTS_HOSTS[region]).rstrip("/")
        return base + EVENTS_PATH

    def authorize(self, region: str) -> str:
        return self.authorize_url or AUTHORIZE_URLS[region]

    def token(self, region: str) -> str:
        return self.token_url or TOKEN_URLS[region]
