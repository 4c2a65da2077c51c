"""What the OpenAPI checker (sparrow.master.openapi_check) costs the master per request.

    .venv/bin/python bench/openapi_check.py [--volumes 10] [--requests 300] [--rounds 3]

The master's app in this process (aiohttp's test server on loopback, a tmp authority, no node),
with ``--volumes`` volumes; ``GET /v1/volumes`` (the whole list) and ``GET /v1/volumes/{name}``
timed ``--requests`` times each, with the checker off and on, interleaved by round. Reported: the
median milliseconds per request of each, and the difference (the checker's cost). The tests run
every daemon with the checker on; production leaves it off.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from aiohttp.test_utils import TestClient, TestServer

from sparrow.auth import tokens
from sparrow.cluster.authority import AuthorityStore
from sparrow.cluster.lease import LeaseConfig
from sparrow.master.api import MasterApi, MasterMetrics, build_app
from sparrow.master.control import restore
from sparrow.master.openapi_check import VALIDATE_ENV


async def one_round(check: bool, volumes: int, requests: int) -> dict[str, float]:
    os.environ[VALIDATE_ENV] = "1" if check else "0"
    with tempfile.TemporaryDirectory() as data_dir:
        store = AuthorityStore.open_in(Path(data_dir))
        admin = tokens.mint("admin", created_at=1.0)
        store.add_token(admin.record)
        control = restore(store, LeaseConfig(), time.monotonic())
        app = build_app(MasterApi(control=control, metrics=MasterMetrics(), clock=time.monotonic))
        headers = {"Authorization": f"Bearer {admin.plaintext}"}
        client: TestClient[Any, Any]
        async with TestClient(TestServer(app)) as client:
            for i in range(volumes):
                r = await client.post("/v1/volumes", json={"name": f"v{i}", "size": "1MiB"}, headers=headers)
                assert r.status == 201, await r.text()
            out = {}
            for path in ("/v1/volumes", "/v1/volumes/v0"):
                start = time.perf_counter()
                for _ in range(requests):
                    r = await client.get(path, headers=headers)
                    await r.read()
                    assert r.status == 200
                out[path] = (time.perf_counter() - start) / requests * 1000
            return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--volumes", type=int, default=10)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for _ in range(args.rounds):
        for check in (False, True):
            results[check].append(asyncio.run(one_round(check, args.volumes, args.requests)))
    for path in ("/v1/volumes", "/v1/volumes/v0"):
        off = statistics.median(r[path] for r in results[False])
        on = statistics.median(r[path] for r in results[True])
        print(f"GET {path:<16} off {off:6.2f} ms  on {on:6.2f} ms  checker {on - off:+.2f} ms per request")


if __name__ == "__main__":
    main()
