"""Schemathesis fuzzes a real ``twistd equalizer``'s admin API from the API's own OpenAPI document.

Every check runs (no 5xx, every status, content type, header and body as
documented, invalid input refused, valid input accepted, deleted resources
gone, the token enforced), in every phase: examples, coverage, fuzzing and
stateful sequences that follow the document's links. The run is bounded in
examples per operation and deterministic (fixed seed, no example database).
"""

from __future__ import annotations

import sys

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

from equalizer.admin.schema import openapi_document
from tests.integration.harness import REPO, equalizer_config, free_port, within

TOKEN = "fuzz-token"
MAX_EXAMPLES = 50
SEED = 20240601
RUN_TIMEOUT = 150.0

SCHEMATHESIS_CONFIG = """\
# Some constraints cannot be said in JSON Schema: tokens <= capacity (one field
# bounded by another) and a URL's port in 1..65535. Schema-valid requests may
# therefore get 400 from these operations, and only from these.
[[operations]]
include-operation-id = ["createBucket", "updateBucket", "addBackend"]
checks.positive_data_acceptance.expected-statuses = ["2XX", "400", "404", "409"]
"""

RUN = "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())"


@pytest_twisted.ensureDeferred
async def test_admin_api_conforms_to_its_openapi_document(http, twistd_process, tmp_path):
    """Schemathesis, with all checks and a bounded number of examples, finds no server error
    and no answer that differs from the OpenAPI document."""
    nowhere = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    balancer = await twistd_process(equalizer_config(
        nowhere,
        admin={"token": TOKEN},
        rate_limit={"enabled": True, "store": "memory",
                    "default": {"capacity": 100, "refill_rate": 10}},
        logging={"access_log": False},
    ), http)
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    args = [
        "-c", RUN, "--config-file", str(config), "--no-color", "run",
        f"{balancer.admin_url}/openapi.json",
        "--header", f"Authorization: Bearer {TOKEN}",
        "--checks", "all",
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", str(SEED),
        "--generation-database", "none",
        "--workers", "1",
        "--request-timeout", "10",
    ]
    output, errors, code = await within(getProcessOutputAndValue(
        sys.executable, args, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": REPO},
        path=str(tmp_path), reactor=reactor), RUN_TIMEOUT)
    report = (output + errors).decode("utf-8", "replace")
    assert code == 0, report
    # Schemathesis leaves out the operation that serves the document it was given.
    operations = sum(len(item) for item in openapi_document()["paths"].values()) - 1
    assert f"Tested: {operations}\n" in report, report
