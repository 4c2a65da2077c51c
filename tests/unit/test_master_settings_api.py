"""PATCH /v1/cluster (sparrow.master.settings_api) with bad bodies: each is a 400 naming the field
as the caller sent it, and the setting is unchanged. Driven through the real app, no nodes."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.test_master_api import Master


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"discovery_chap_user": "u"}, "CHAP needs both discovery_chap_user and discovery_chap_secret"),
        (
            {"discovery_chap_user": "u", "discovery_chap_secret": "s", "discovery_chap_mutual_user": "t"},
            "mutual CHAP needs both discovery_chap_mutual_user and discovery_chap_mutual_secret",
        ),
        ({"discovery_chap_user": 5, "discovery_chap_secret": "s"}, "discovery_chap_user must be"),
        ({"discovery_chap_user": "u\x00Key=1", "discovery_chap_secret": "s"}, "discovery_chap_user: no"),
        ({"discovery_chap": 1}, "discovery_chap: only null"),
        ({"chap_user": "u"}, "unknown field 'chap_user'"),
    ],
)
async def test_a_bad_cluster_update_names_the_field_sent_and_changes_nothing(
    master: Master, body: dict[str, Any], error: str
) -> None:
    answer = await master.json("PATCH", "/v1/cluster", body, status=400)
    assert answer["error"].startswith(error), answer
    assert await master.json("GET", "/v1/cluster") == {"discovery_chap": None}
