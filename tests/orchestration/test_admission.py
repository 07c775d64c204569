"""Admission limit, the places threads hold, and cancellation noticed while a wait is quiet."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import pytest

from python_backend_utils.orchestration.admission import (
    Admission,
    AdmissionCounts,
    AdmissionError,
    current_ticket,
    held,
    parse_limit,
)
from python_backend_utils.orchestration.cancellation import ClientCancelled, unless_cancelled


def test_requests_past_the_limit_are_refused_and_counted():
    admission = Admission(2)
    first, second = admission.try_admit(), admission.try_admit()
    assert first is not None and second is not None
    assert admission.try_admit() is None
    assert admission.counts() == AdmissionCounts(in_flight=2, lingering=0, rejected=1)
    first.answered()
    assert admission.try_admit() is not None
    assert admission.counts() == AdmissionCounts(in_flight=2, lingering=0, rejected=1)


def test_an_answered_request_keeps_its_place_until_its_threads_return():
    admission = Admission(1)
    ticket = admission.try_admit()
    ticket.hold()  # a BLS read still blocked in the worker's iterator
    ticket.answered()
    ticket.answered()  # every exit path may call it: counted once
    assert admission.counts() == AdmissionCounts(in_flight=1, lingering=1, rejected=0)
    assert admission.try_admit() is None
    ticket.release()
    assert admission.counts() == AdmissionCounts(in_flight=0, lingering=0, rejected=1)
    assert admission.try_admit() is not None


def test_admission_is_exact_under_concurrent_threads():
    admission = Admission(50)
    admitted = []
    lock = threading.Lock()

    def worker():
        for _ in range(200):
            ticket = admission.try_admit()
            if ticket is not None:
                with lock:
                    admitted.append(ticket)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(admitted) == 50
    assert admission.counts() == AdmissionCounts(in_flight=50, lingering=0, rejected=8 * 200 - 50)
    for ticket in admitted:
        ticket.answered()
    assert admission.counts().in_flight == 0


def test_a_thread_started_under_a_ticket_holds_it_until_it_returns():
    admission = Admission(1)
    gate = threading.Event()

    async def request():
        ticket = admission.try_admit()
        token = current_ticket.set(ticket)
        loop = asyncio.get_running_loop()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            read = held(loop.run_in_executor(pool, gate.wait))
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(read), 0.05)  # the wait gives up, the read does not
            current_ticket.reset(token)
            ticket.answered()
            assert admission.counts() == AdmissionCounts(in_flight=1, lingering=1, rejected=0)
            gate.set()
            await read
        assert admission.counts() == AdmissionCounts(in_flight=0, lingering=0, rejected=0)

    asyncio.run(request())


def test_held_without_a_request_changes_nothing():
    async def main():
        future = asyncio.get_running_loop().create_future()
        assert held(future) is future
        future.set_result(1)
        return await future

    assert asyncio.run(main()) == 1


@pytest.mark.parametrize(("text", "expected"), [("", 128), (" ", 128), ("3", 3)])
def test_the_limit_parameter(text, expected):
    assert parse_limit(text, 128) == expected


@pytest.mark.parametrize("text", ["0", "-1", "many", "1.5"])
def test_a_bad_limit_parameter_is_refused_with_its_name(text):
    with pytest.raises(AdmissionError, match="max_requests_in_flight"):
        parse_limit(text, 128)


class FakeRequest:
    def __init__(self, cancel_after_s: float | None) -> None:
        self._cancel_at = None if cancel_after_s is None else time.monotonic() + cancel_after_s
        self.checks = 0

    def is_cancelled(self) -> bool:
        self.checks += 1
        return self._cancel_at is not None and time.monotonic() >= self._cancel_at


def test_a_cancel_during_a_quiet_wait_is_noticed_within_the_poll_interval():
    abandoned = []

    async def quiet_worker():
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            abandoned.append(True)
            raise

    async def main():
        started = time.monotonic()
        with pytest.raises(ClientCancelled):
            await unless_cancelled(FakeRequest(cancel_after_s=0.1), quiet_worker(), poll_s=0.05)
        await asyncio.sleep(0)
        return time.monotonic() - started

    assert asyncio.run(main()) < 1.0
    assert abandoned == [True]


def test_a_prompt_answer_needs_no_cancel_check_and_errors_pass_through():
    async def answer():
        return 7

    async def failure():
        raise asyncio.TimeoutError

    async def main():
        request = FakeRequest(cancel_after_s=None)
        assert await unless_cancelled(request, answer(), poll_s=0.05) == 7
        assert request.checks == 0
        with pytest.raises(asyncio.TimeoutError):
            await unless_cancelled(request, failure(), poll_s=0.05)

    asyncio.run(main())


def test_remote_worker_connections_ping_and_the_launched_server_accepts_the_pings(tmp_path, monkeypatch):
    from launcher.runtime import TritonRuntime
    from launcher.server import TritonServer
    from python_backend_utils.orchestration import remote

    made = []
    monkeypatch.setattr(remote.grpcaio, "InferenceServerClient", lambda url, **options: made.append(options))

    async def connect():
        remote.RemoteWorkers()._client("ctx-0:8001")

    asyncio.run(connect())
    assert made == [{"keepalive_options": remote.KEEPALIVE}]
    assert remote.KEEPALIVE.keepalive_time_ms > remote.MIN_PING_INTERVAL_MS  # else GOAWAY "too_many_pings"
    assert remote.KEEPALIVE.http2_max_pings_without_data == 0  # a quiet stream (a queued request) keeps being pinged
    command = TritonServer(tmp_path).command(TritonRuntime(tmp_path / "tritonserver", None, ()), "prefix_")
    assert f"--grpc-http2-min-recv-ping-interval-without-data={remote.MIN_PING_INTERVAL_MS}" in command
