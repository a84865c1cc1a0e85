"""Soak with faults: mixed unary and streaming load through the sidecar while Triton is killed and restarted.

What it shows (issue 13): under a bounded loopback load through ``advsentry
serve``, with the upstream Triton SIGKILLed and started again every
``--restart-every`` seconds and one streaming client cancelling its stream
mid-way every ``--disconnect-every`` seconds,

- every call ends: each unary call and each stream is watched by a timer of
  its gRPC deadline plus ``HANG_GRACE_S``; one still open then is a hang;
- every stream message is answered exactly once (its id comes back once, as
  a result or as an ``error_message``) or its stream failed with a status;
  ids answered twice are duplicates, ids never answered on a stream that
  ended OK are lost (messages of a stream the client cancelled itself are
  counted apart, as abandoned);
- errors by status code, for unary calls and stream messages;
- recovery: time from Triton being ready again (``ServerReady`` true, polled
  every 0.25 s) to the first success through the sidecar (goal ≤ 2 s);
- the sidecar's RSS at start, after warm-up and at the end (goal: growth
  after warm-up < 5 %);
- successes without an ``advsentry_*`` response parameter (a request served
  unscored, e.g. if the model's metadata could not be read right after a
  restart): counted, must be 0.

The upstream is a real ``tritonserver`` on the exported bundled model (the
repository ``advsentry export-model`` writes), on a fixed port so the
sidecar's upstream address stays valid across restarts; the sidecar is an
``advsentry serve`` child process (policy annotate, the shipped detector).

    python -m benchmarks.fault_soak                 # 10 minutes, writes results/fault_soak.json and .md
    python -m benchmarks.fault_soak --duration 120 --restart-every 60
    python -m benchmarks.fault_soak --smoke         # 1 minute, one restart; used by the test suite
    python -m benchmarks.fault_soak --model identity --duration 180 --restart-every 40
        # the cheap identity model of benchmarks.fuzz: recovery without seconds of inference in it
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

SERVICE = "/inference.GRPCInferenceService"
MODEL = "efficientnet-lite0"
#: A call still open this long after its own gRPC deadline counts as a hang.
HANG_GRACE_S = 5.0
#: Load goes on at least this long after Triton is ready again (so a late restart's recovery is measured).
TAIL_S = 10.0


def photo_request() -> service_pb2.ModelInferRequest:
    """One bundled photo, FP32 ``[1, 3, 224, 224]``, asking for ``logits`` (no id: ids are appended per message)."""
    from detector.samples import full_photo_samples, to_tensor

    pixels = to_tensor([full_photo_samples()[1].pixels()]).numpy().astype(np.float32)
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="pixels", datatype="FP32", shape=list(pixels.shape))
    request.raw_input_contents.append(np.ascontiguousarray(pixels).tobytes())
    request.outputs.add(name="logits")
    return request


def with_id(serialized: bytes, request_id: str) -> bytes:
    """``serialized`` with field 3 (``id``) appended: protobuf keeps the last value of a field, no re-encode."""
    data = request_id.encode()
    return serialized + b"\x1a" + _varint(len(data)) + data


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def annotated(response: service_pb2.ModelInferResponse) -> bool:
    return any(key.startswith("advsentry") for key in response.parameters)


@dataclass
class Restart:
    killed_at: float
    ready_at: float | None = None
    first_success_at: float | None = None
    #: when the first successful call after ``ready_at`` was sent (tells slow inference from refused calls)
    first_success_sent_at: float | None = None
    #: answers between ``ready_at`` and the first success, by code
    failures_after_ready: Counter = field(default_factory=Counter)

    def to_json(self, t0: float) -> dict[str, Any]:
        def rel(t: float | None) -> float | None:
            return None if t is None else round(t - t0, 3)

        recovery = (None if self.ready_at is None or self.first_success_at is None
                    else round(self.first_success_at - self.ready_at, 3))
        accepted = (None if self.ready_at is None or self.first_success_sent_at is None
                    else round(max(0.0, self.first_success_sent_at - self.ready_at), 3))
        downtime = None if self.ready_at is None else round(self.ready_at - self.killed_at, 2)
        return {"killed_at_s": rel(self.killed_at), "ready_at_s": rel(self.ready_at),
                "first_success_at_s": rel(self.first_success_at),
                "first_success_sent_at_s": rel(self.first_success_sent_at), "triton_down_s": downtime,
                "recovery_s": recovery, "first_success_sent_after_ready_s": accepted,
                "first_success_latency_s": None if recovery is None or self.first_success_sent_at is None
                else round(self.first_success_at - self.first_success_sent_at, 3),
                "failures_after_ready": dict(self.failures_after_ready)}


@dataclass
class SoakState:
    """Everything the load tasks record; only touched from the event loop (plus ``restarts`` appends)."""

    unary_codes: Counter = field(default_factory=Counter)
    message_codes: Counter = field(default_factory=Counter)
    stream_codes: Counter = field(default_factory=Counter)
    unary_calls: int = 0
    streams: int = 0
    messages_sent: int = 0
    messages_answered: int = 0
    messages_failed_with_stream: int = 0
    messages_abandoned: int = 0
    lost: int = 0
    duplicated: int = 0
    unknown_ids: int = 0
    hangs: int = 0
    disconnects: int = 0
    unscored_successes: int = 0
    latencies: list[float] = field(default_factory=list)
    restarts: list[Restart] = field(default_factory=list)
    last_success_at: float = 0.0
    rss: list[dict[str, float]] = field(default_factory=list)
    #: when load stops (monotonic); pushed back so the load outlives a restart in progress by ``TAIL_S``
    stop: float = 0.0
    restarting: bool = False

    def running(self) -> bool:
        return self.restarting or time.monotonic() < self.stop

    def success(self, now: float, sent_at: float) -> None:
        self.last_success_at = now
        for restart in self.restarts:
            if restart.ready_at is not None and restart.first_success_at is None and now >= restart.ready_at:
                restart.first_success_at = now
                restart.first_success_sent_at = sent_at

    def failure(self, code: str, now: float) -> None:
        for restart in self.restarts:
            if restart.ready_at is not None and restart.first_success_at is None and now >= restart.ready_at:
                restart.failures_after_ready[code] += 1


async def unary_worker(channel: grpc.aio.Channel, payload: bytes, state: SoakState, deadline_s: float) -> None:
    call = channel.unary_unary(f"{SERVICE}/ModelInfer", response_deserializer=service_pb2.ModelInferResponse.FromString)
    while state.running():
        start = time.monotonic()
        state.unary_calls += 1
        try:
            reply = await asyncio.wait_for(call(payload, timeout=deadline_s), deadline_s + HANG_GRACE_S)
            state.unary_codes["OK"] += 1
            state.latencies.append(time.monotonic() - start)
            if not annotated(reply):
                state.unscored_successes += 1
            state.success(time.monotonic(), start)
        except asyncio.TimeoutError:
            state.hangs += 1
            state.unary_codes["HANG"] += 1
        except grpc.aio.AioRpcError as error:
            state.unary_codes[error.code().name] += 1
            state.failure(error.code().name, time.monotonic())
            await asyncio.sleep(0.05)  # failing fast while Triton is down: do not spin


async def stream_worker(channel: grpc.aio.Channel, payload: bytes, state: SoakState, deadline_s: float,
                        worker: int, messages_per_stream: int, window: int, disconnect: asyncio.Event) -> None:
    method = channel.stream_stream(f"{SERVICE}/ModelStreamInfer",
                                   response_deserializer=service_pb2.ModelStreamInferResponse.FromString)
    serial = 0
    while state.running():
        state.streams += 1
        call = method(timeout=deadline_s * messages_per_stream)
        outstanding: dict[str, int] = {}  # id -> times answered
        sent_at: dict[str, float] = {}
        answered: set[str] = set()
        credit = asyncio.Semaphore(window)
        cancelled = False

        async def write() -> None:
            nonlocal serial, cancelled
            for index in range(messages_per_stream):
                await credit.acquire()
                if not state.running():
                    break
                serial += 1
                request_id = f"w{worker}-{serial}"
                outstanding[request_id] = 0
                sent_at[request_id] = time.monotonic()
                state.messages_sent += 1
                await call.write(with_id(payload, request_id))
                if index >= 1 and disconnect.is_set():  # disconnect mid-stream, messages in flight
                    disconnect.clear()
                    cancelled = True
                    state.disconnects += 1
                    call.cancel()
                    return
            await call.done_writing()

        async def read() -> None:
            async for answer in call:
                request_id = answer.infer_response.id
                if request_id not in outstanding:
                    state.unknown_ids += 1
                    continue
                outstanding[request_id] += 1
                if outstanding[request_id] > 1:
                    state.duplicated += 1
                    continue
                answered.add(request_id)
                state.messages_answered += 1
                if answer.error_message:
                    code = answer.error_message.split("]", 1)[0].removeprefix("[StatusCode.")
                    state.message_codes[code] += 1
                    state.failure(code, time.monotonic())
                    await asyncio.sleep(0.05)  # failing fast while Triton is down: do not spin
                else:
                    state.message_codes["OK"] += 1
                    if not annotated(answer.infer_response):
                        state.unscored_successes += 1
                    state.success(time.monotonic(), sent_at[request_id])
                credit.release()

        writer = asyncio.ensure_future(write())
        try:
            await asyncio.wait_for(read(), deadline_s * messages_per_stream + HANG_GRACE_S)
            await writer
            state.stream_codes["OK"] += 1
            status_ok = True
        except asyncio.TimeoutError:
            state.hangs += 1
            state.stream_codes["HANG"] += 1
            call.cancel()
            status_ok = False
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as error:
            if cancelled:
                state.stream_codes["CANCELLED_BY_CLIENT"] += 1
            else:
                code = error.code().name if isinstance(error, grpc.aio.AioRpcError) else "CANCELLED"
                state.stream_codes[code] += 1
            status_ok = False
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)  # its error, if any, is the stream's
        unanswered = [i for i in outstanding if i not in answered]
        if cancelled:
            state.messages_abandoned += len(unanswered)
        elif status_ok:
            state.lost += len(unanswered)
        else:
            state.messages_failed_with_stream += len(unanswered)
        if not status_ok and not cancelled:
            await asyncio.sleep(0.05)


async def disconnector(disconnect: asyncio.Event, every_s: float, state: SoakState) -> None:
    while time.monotonic() + every_s < state.stop:
        await asyncio.sleep(every_s)
        disconnect.set()


async def rss_sampler(pid: int, state: SoakState, t0: float, every_s: float = 5.0) -> None:
    from benchmarks.common import process_rss_mib

    while True:
        state.rss.append({"t_s": round(time.monotonic() - t0, 1), "rss_mib": round(process_rss_mib(pid), 2)})
        if not state.running():
            return
        await asyncio.sleep(min(every_s, max(0.0, state.stop - time.monotonic())))


def fault_loop(triton, state: SoakState, every_s: float, end: float, halt: threading.Event, log) -> None:
    """In a thread: SIGKILL Triton every ``every_s`` seconds and start it again at once on the same port.

    Kills are scheduled at ``every_s``, ``2 * every_s``, … from the start, and none later than 5 s
    before ``end`` (the planned end of the load; a restart in progress then prolongs the load).
    """
    from service.triton.server import TritonStartError

    next_kill = time.monotonic() + every_s
    while not halt.is_set():
        if halt.wait(max(0.0, next_kill - time.monotonic())):
            return
        if time.monotonic() >= end - 5:
            return
        restart = Restart(killed_at=time.monotonic())
        state.restarts.append(restart)
        state.restarting = True
        triton.kill()
        triton.stop()  # process gone already: only cleans its temporary directory
        log(f"killed Triton at {restart.killed_at:.1f}")
        try:
            triton.start()
        except TritonStartError as error:
            log(f"Triton did not restart: {error}")
            return
        finally:
            if triton.is_alive():
                restart.ready_at = time.monotonic()
                state.stop = max(state.stop, restart.ready_at + TAIL_S)
            state.restarting = False
        log(f"Triton ready after {restart.ready_at - restart.killed_at:.1f}s")
        next_kill += every_s


async def soak(address: str, sidecar_pid: int, triton, payload: bytes, *, duration_s: float, restart_every_s: float,
               disconnect_every_s: float, unary_workers: int, stream_workers: int, messages_per_stream: int,
               window: int, deadline_s: float, log) -> tuple[SoakState, float]:
    state = SoakState()
    t0 = time.monotonic()
    state.stop = t0 + duration_s
    halt = threading.Event()
    faults = threading.Thread(target=fault_loop, args=(triton, state, restart_every_s, state.stop, halt, log), daemon=True)
    disconnect = asyncio.Event()
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        faults.start()
        tasks = [asyncio.ensure_future(unary_worker(channel, payload, state, deadline_s))
                 for _ in range(unary_workers)]
        tasks += [asyncio.ensure_future(stream_worker(channel, payload, state, deadline_s, w, messages_per_stream,
                                                      window, disconnect)) for w in range(stream_workers)]
        tasks.append(asyncio.ensure_future(disconnector(disconnect, disconnect_every_s, state)))
        tasks.append(asyncio.ensure_future(rss_sampler(sidecar_pid, state, t0)))
        try:
            # every worker ends by itself (its last call is bounded by deadline + grace); a restart in
            # progress at the end pushes ``state.stop`` back, at most by Triton's start-up timeout
            await asyncio.wait_for(asyncio.gather(*tasks), duration_s + triton.start_timeout_s + TAIL_S
                                   + deadline_s * (messages_per_stream + 1) + 4 * HANG_GRACE_S)
        finally:
            halt.set()
            faults.join(timeout=300)
    return state, t0


def summarize(state: SoakState, t0: float, settings: dict[str, Any]) -> dict[str, Any]:
    rss = state.rss
    warm_index = next((i for i, s in enumerate(rss) if s["t_s"] >= settings["warmup_s"]), 0)
    rss_start = rss[0]["rss_mib"] if rss else float("nan")
    rss_warm = rss[warm_index]["rss_mib"] if rss else float("nan")
    rss_end = rss[-1]["rss_mib"] if rss else float("nan")
    restarts = [r.to_json(t0) for r in state.restarts]
    recoveries = [r["recovery_s"] for r in restarts if r["recovery_s"] is not None]
    answered_once = state.messages_answered
    accounted = answered_once + state.messages_failed_with_stream + state.messages_abandoned + state.lost
    return {
        "settings": settings,
        "unary": {"calls": state.unary_calls, "codes": dict(sorted(state.unary_codes.items()))},
        "streams": {"streams": state.streams, "codes": dict(sorted(state.stream_codes.items())),
                    "disconnects": state.disconnects,
                    "messages_sent": state.messages_sent, "answered_exactly_once": answered_once,
                    "failed_with_stream_status": state.messages_failed_with_stream,
                    "abandoned_by_client_disconnect": state.messages_abandoned,
                    "lost": state.lost, "duplicated": state.duplicated, "unknown_ids": state.unknown_ids,
                    "accounted": accounted, "message_codes": dict(sorted(state.message_codes.items()))},
        "hangs": state.hangs,
        "unscored_successes": state.unscored_successes,
        "ok_latency_s": ({"p50": round(statistics.median(state.latencies), 3),
                          "max": round(max(state.latencies), 3), "n": len(state.latencies)}
                         if state.latencies else None),
        "restarts": restarts,
        "recovery_s": {"max": max(recoveries), "median": statistics.median(recoveries), "n": len(recoveries)}
        if recoveries else None,
        "rss_mib": {"start": rss_start, "after_warmup": rss_warm, "end": rss_end,
                    "growth_after_warmup_pct": round((rss_end / rss_warm - 1) * 100, 2) if rss else None,
                    "samples": rss},
        "goals": {
            "no_hang": state.hangs == 0,
            "no_lost_or_duplicated": state.lost == 0 and state.duplicated == 0 and state.unknown_ids == 0
            and accounted == state.messages_sent,
            "recovery_le_2s": bool(recoveries) and max(recoveries) <= 2.0
            and len(recoveries) == len(state.restarts),
            "rss_growth_lt_5pct": bool(rss) and rss_end / rss_warm - 1 < 0.05,
            "no_unscored_success": state.unscored_successes == 0,
        },
    }


def markdown(doc: dict[str, Any]) -> str:
    s = doc["streams"]
    rows = [
        "| measure | value | goal |", "|---|---|---|",
        f"| duration | {doc['settings']['duration_s']:.0f} s, Triton SIGKILLed every {doc['settings']['restart_every_s']:.0f} s, "
        f"a stream cancelled every {doc['settings']['disconnect_every_s']:.0f} s | |",
        f"| unary calls | {doc['unary']['calls']}: {doc['unary']['codes']} | |",
        f"| streams | {s['streams']}: {s['codes']} | |",
        f"| stream messages | {s['messages_sent']} sent, {s['answered_exactly_once']} answered once "
        f"({s['message_codes']}), {s['failed_with_stream_status']} failed with their stream's status, "
        f"{s['abandoned_by_client_disconnect']} abandoned by a client disconnect | all accounted for |",
        f"| lost / duplicated / unknown ids | {s['lost']} / {s['duplicated']} / {s['unknown_ids']} | 0 / 0 / 0 |",
        f"| hung calls (past deadline + {HANG_GRACE_S:.0f} s) | {doc['hangs']} | 0 |",
        f"| successes without advsentry annotation | {doc['unscored_successes']} | 0 |",
    ]
    for index, r in enumerate(doc["restarts"], 1):
        rows.append(f"| restart {index}: Triton down; first success after ready (of which: sent after ready, "
                    f"its own latency) | {r['triton_down_s']} s; {r['recovery_s']} s ({r['first_success_sent_after_ready_s']} s, "
                    f"{r['first_success_latency_s']} s); failures after ready {r['failures_after_ready']} | ≤ 2 s |")
    if doc["ok_latency_s"]:
        rows.append(f"| latency of successful unary calls (p50 / max) | {doc['ok_latency_s']['p50']} / "
                    f"{doc['ok_latency_s']['max']} s over {doc['ok_latency_s']['n']} | |")
    rss = doc["rss_mib"]
    rows.append(f"| sidecar RSS start / after warm-up / end | {rss['start']:.1f} / {rss['after_warmup']:.1f} / "
                f"{rss['end']:.1f} MiB ({rss['growth_after_warmup_pct']:+.2f} %) | < 5 % growth |")
    verdicts = ", ".join(f"{k}: {'pass' if v else 'FAIL'}" for k, v in doc["goals"].items())
    return "# Fault soak\n\n" + "\n".join(rows) + f"\n\nGoals: {verdicts}.\n"


def run(duration_s: float, restart_every_s: float, disconnect_every_s: float, *, unary_workers: int = 1,
        stream_workers: int = 2, messages_per_stream: int = 8, window: int = 2, deadline_s: float = 30.0,
        warmup_s: float = 60.0, model: str = "efficientnet", log=print) -> dict[str, Any]:
    """Start Triton and the sidecar, soak, summarize (see the module docstring)."""
    from benchmarks import fuzz
    from benchmarks.common import SidecarProcess, load_average
    from service.triton.export import export_model_repository
    from service.triton.server import TritonServer, free_port

    settings = {"duration_s": duration_s, "restart_every_s": restart_every_s, "disconnect_every_s": disconnect_every_s,
                "unary_workers": unary_workers, "stream_workers": stream_workers,
                "messages_per_stream": messages_per_stream, "stream_window": window, "deadline_s": deadline_s,
                "warmup_s": warmup_s, "hang_grace_s": HANG_GRACE_S,
                "model": MODEL if model == "efficientnet" else fuzz.PROTECTED}
    load_start = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        if model == "efficientnet":
            export_model_repository(repo)  # returns the model's folder; Triton gets the repository
            payload = photo_request().SerializeToString()
        else:
            fuzz.write_fuzz_repository(repo)
            payload = fuzz.valid_request(fuzz.PROTECTED).SerializeToString()
        triton = TritonServer(repo, grpc_port=free_port())
        triton.start()
        try:
            args = ("--policy", "annotate") if model == "efficientnet" else fuzz.sidecar_args()
            with SidecarProcess(triton.grpc_address, args=args) as sidecar:
                state, t0 = asyncio.run(soak(
                    sidecar.address, sidecar.pid, triton, payload, duration_s=duration_s, restart_every_s=restart_every_s,
                    disconnect_every_s=disconnect_every_s, unary_workers=unary_workers, stream_workers=stream_workers,
                    messages_per_stream=messages_per_stream, window=window, deadline_s=deadline_s, log=log))
                sidecar_alive = sidecar.process.poll() is None
        finally:
            triton.stop()
    doc = summarize(state, t0, settings)
    doc["sidecar_alive_at_end"] = sidecar_alive
    doc["load_average_start"] = load_start
    return doc


def main(argv: list[str] | None = None) -> None:
    from benchmarks.common import RESULTS_DIR, write_result

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--restart-every", type=float, default=120.0, help="seconds between Triton SIGKILLs")
    parser.add_argument("--disconnect-every", type=float, default=4.0, help="seconds between client stream cancels")
    parser.add_argument("--unary-workers", type=int, default=1)
    parser.add_argument("--stream-workers", type=int, default=2)
    parser.add_argument("--messages-per-stream", type=int, default=8)
    parser.add_argument("--window", type=int, default=2, help="stream messages in flight per stream")
    parser.add_argument("--deadline", type=float, default=30.0, help="per-call (per-message) deadline, seconds")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before the RSS baseline")
    parser.add_argument("--model", choices=("efficientnet", "identity"), default="efficientnet",
                        help="upstream model: the exported bundled one, or the cheap identity model")
    parser.add_argument("--smoke", action="store_true", help="1 minute, one restart (30 s in)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.smoke:
        args.duration, args.restart_every, args.warmup = 60.0, 30.0, 10.0
    doc = run(args.duration, args.restart_every, args.disconnect_every, unary_workers=args.unary_workers,
              stream_workers=args.stream_workers, messages_per_stream=args.messages_per_stream,
              window=args.window, deadline_s=args.deadline, warmup_s=args.warmup, model=args.model)
    name = ("fault_soak_smoke" if args.smoke else "fault_soak") + ("" if args.model == "efficientnet" else "_identity")
    path = write_result(name, doc, args.results_dir)
    path.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
