"""The gateway's admission limits on their own (no Ray): what is refused, with which status, and when."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from earthray.serve.inputs import RequestError
from earthray.serve.limits import Budget, Slots, read_body


def request(headers: dict[str, str], chunks: list[bytes], sent: list[int]) -> Request:
    """A real Starlette request whose body arrives in ``chunks``; ``sent`` counts the chunks handed over."""

    async def receive() -> dict:
        i = len(sent)
        sent.append(i)
        return {"type": "http.request", "body": chunks[i] if i < len(chunks) else b"", "more_body": i + 1 < len(chunks)}

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(k.lower().encode(), v.encode())
                                                                       for k, v in headers.items()]}
    return Request(scope, receive)


def read(req: Request, budget: Budget, limit: int = 10_000) -> tuple[bytes, int]:
    async def go():
        with budget.hold() as reserve:
            body = await read_body(req, limit, 5.0, Slots(4, "uploads", 3), reserve)
            return body, budget.used

    return asyncio.run(go())


def test_a_body_reserves_its_declared_length_before_a_byte_is_read():
    sent: list[int] = []
    budget = Budget(1000, 3)
    body, held = read(request({"content-length": "600"}, [b"x" * 300, b"y" * 300], sent), budget)
    assert body == b"x" * 300 + b"y" * 300 and held == 600 and budget.used == 0  # released on exit

    budget.used = 500  # other requests hold half the budget: this one is shed before its body is read
    sent.clear()
    with pytest.raises(RequestError) as e:
        read(request({"content-length": "600"}, [b"x" * 600], sent), budget)
    assert e.value.status == 503 and "max_inflight_bytes" in str(e.value) and e.value.headers["Retry-After"] == "3"
    assert sent == [] and budget.used == 500


def test_a_request_larger_than_the_whole_budget_is_413_not_a_503_forever():
    sent: list[int] = []
    with pytest.raises(RequestError) as e:
        read(request({"content-length": "2000"}, [b"x" * 2000], sent), Budget(1000, 3))
    assert e.value.status == 413 and "whole" in str(e.value) and sent == []
    with pytest.raises(RequestError) as e:
        with Budget(1000, 3).hold() as reserve:
            reserve(400)
            reserve(700)  # the request's decoded input on top of its body
    assert e.value.status == 413


def test_a_body_longer_than_it_declared_is_cut_at_the_limit():
    sent: list[int] = []
    with pytest.raises(RequestError) as e:
        read(request({"content-length": "100"}, [b"x" * 80] * 10, sent), Budget(10_000, 3), limit=200)
    assert e.value.status == 413 and len(sent) <= 3
