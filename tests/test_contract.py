"""The server keeps the contract its OpenAPI document states, as schemathesis checks it: for every
route, requests generated from the schema and requests deliberately outside it (a fixed seed, a
bounded number of each), every response's status documented and its body as described, schema-
valid requests accepted and the others refused, and never a server error."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402  (schemathesis brings hypothesis)
from hypothesis.errors import Unsatisfiable  # noqa: E402

from mmret.inference.search import Gallery  # noqa: E402
from mmret.serve.app import create_app  # noqa: E402
from mmret.serve.config import ServeConfig  # noqa: E402
from mmret.serve.service import SearchService  # noqa: E402

EXAMPLES = 25  # per route and kind: every route checked in well under a minute on two cores
# What no schema can state about a request that fits it: whether bytes are a picture (415) and how many pixels
# it has (413). Both statuses are documented for the routes that answer them; schemathesis's defaults besides.
ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx", "413", "415"]


@pytest.fixture(scope="module")
def api(memorised):
    gallery = Gallery.open(memorised["run"], split="all", which="last")
    service = SearchService(gallery, ServeConfig(memorised["run"], which="last", max_k=50,
                                                 allow_host=("testserver",)))  # the name the test client sends
    service.warm_up()
    config = schemathesis.Config.from_dict({"checks": {"positive_data_acceptance": {"expected-statuses": ACCEPTED}}})
    yield schemathesis.openapi.from_asgi("/openapi.json", create_app(service), config=config)
    service.close()


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_every_route_keeps_its_contract(api, mode):
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 8
    checked = []
    for operation in operations:
        @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
        @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def keeps(case):
            case.call_and_validate()

        try:
            keeps()
        except Unsatisfiable:  # negative: no request to it can be outside the schema (no input, or any text fits)
            assert mode == "negative", operation.label
            continue
        checked.append(operation.label)
    assert len(checked) >= (8 if mode == "positive" else 3), checked
