"""Dynamic batching: concurrent requests are batched, and batching never changes an answer."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from onnx import TensorProto, helper

from conftest import Server, mlp_model, save_model
from modelserve.errors import InvalidInput, QueueFull
from modelserve.runtime import RuntimeOptions
from modelserve.runtime.onnx import OnnxRuntime
from modelserve.server.batcher import DynamicBatcher
from modelserve.server.stats import ModelStats


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """An MLP with a 131072-wide hidden layer: ~10 MB of weights read per call, so that requests
    sent together pile up while one runs (a tiny model finishes before the next one arrives)."""
    repo = tmp_path_factory.mktemp("wide")
    mlp_model(repo / "mlp" / "1" / "model.onnx", features=16, hidden=131072)
    (repo / "mlp" / "config.pbtxt").write_text(
        "max_batch_size: 16\ndynamic_batching { max_queue_delay_microseconds: 2000 }\n")
    with Server(repo) as srv:
        yield srv


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_64_concurrent_requests_match_direct_onnxruntime(wide, protocol):
    server = wide
    rng = np.random.default_rng(42)
    batches = [rng.standard_normal((int(rng.integers(1, 9)), 16)).astype(np.float32) for _ in range(64)]
    session = ort.InferenceSession(str(server.repository / "mlp" / "1" / "model.onnx"))
    expected = [dict(zip(["probs", "logits"], session.run(["probs", "logits"], {"x": x}))) for x in batches]
    url = server.http_url if protocol == "http" else server.grpc_url
    stats_client = httpclient.InferenceServerClient(server.http_url)
    before = stats_client.get_inference_statistics("mlp")["model_stats"][0]

    # all 64 in flight at once
    if protocol == "http":
        async def send_all():
            async with aioclient.InferenceServerClient(url, conn_limit=64) as client:
                async def one(x):
                    inp = aioclient.InferInput("x", list(x.shape), "FP32")
                    inp.set_data_from_numpy(x)
                    return await client.infer("mlp", [inp])
                return await asyncio.gather(*(one(x) for x in batches))
        answers = asyncio.run(send_all())
    else:
        client = grpcclient.InferenceServerClient(url)
        pending = []
        for x in batches:
            inp = grpcclient.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            done = Future()
            client.async_infer("mlp", [inp], callback=lambda result, error, done=done: done.set_result((result, error)))
            pending.append(done)
        answers = []
        for done in pending:
            result, error = done.result(timeout=60)
            assert error is None, error
            answers.append(result)
    results = [{name: a.as_numpy(name) for name in ("probs", "logits")} for a in answers]
    for got, want in zip(results, expected):
        for name in ("probs", "logits"):
            assert got[name].shape == want[name].shape
            # a GEMM over a bigger batch may round the last bit differently; nothing more may change
            np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7)
    after = stats_client.get_inference_statistics("mlp")["model_stats"][0]
    executions = after["execution_count"] - before["execution_count"]
    rows = after["inference_count"] - before["inference_count"]
    assert rows == sum(len(x) for x in batches)
    assert executions < 64, "concurrent requests should have been batched together"
    assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == 64


# -- the batcher on its own, in-process with a real ONNX Runtime session ---------------------


def _gather_model(path):
    """y = table[idx]: an index past the table makes ONNX Runtime fail for that request only."""
    table = helper.make_tensor("table", TensorProto.FLOAT, [10, 2], np.arange(20, dtype=np.float32))
    return save_model(
        [helper.make_node("Gather", ["table", "idx"], ["y"], axis=0)],
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1, 2])],
        path, [table],
    )


def _runtime(path) -> OnnxRuntime:
    runtime = OnnxRuntime(path, RuntimeOptions(intra_op_threads=1))
    runtime.load()
    return runtime


def test_one_bad_request_fails_alone(tmp_path):
    runtime = _runtime(_gather_model(tmp_path / "g.onnx"))

    async def main():
        batcher = DynamicBatcher("g", [runtime], ModelStats(), max_batch_size=8, max_queue_delay_us=200_000)
        batcher._recent.append((time.perf_counter_ns(), 4))  # as after a batch of four: wait for the others
        idx = [np.array([[i]], dtype=np.int64) for i in (1, 2, 99, 3)]
        results = await asyncio.gather(*(batcher.infer({"idx": x}, None, 1) for x in idx), return_exceptions=True)
        await batcher.close()
        return results

    results = asyncio.run(main())
    assert isinstance(results[2], InvalidInput)
    for i, r in zip((1, 2, 3), (results[0], results[1], results[3])):
        np.testing.assert_array_equal(r["y"], [[[2 * i, 2 * i + 1]]])


def test_preferred_size_and_max_batch_size(tmp_path):
    runtime = _runtime(mlp_model(tmp_path / "m.onnx"))
    stats = ModelStats()

    async def main():
        batcher = DynamicBatcher("m", [runtime], stats, max_batch_size=8, preferred_batch_sizes=[4],
                                 max_queue_delay_us=100_000)
        xs = [np.full((1, 16), i, dtype=np.float32) for i in range(10)]
        # queue everything before the worker looks: it must cut at the preferred size 4
        tasks = [asyncio.ensure_future(batcher.infer({"x": x}, None, 1)) for x in xs]
        results = await asyncio.gather(*tasks)
        await batcher.close()
        return xs, results

    xs, results = asyncio.run(main())
    direct = ort.InferenceSession(str(tmp_path / "m.onnx"))
    for x, r in zip(xs, results):
        np.testing.assert_allclose(r["probs"], direct.run(["probs"], {"x": x})[0], rtol=1e-6)
    assert max(stats.batches) <= 4
    assert 4 in stats.batches


def test_queue_full_is_a_clear_error(tmp_path):
    runtime = _runtime(mlp_model(tmp_path / "m.onnx"))

    async def main():
        batcher = DynamicBatcher("m", [runtime], ModelStats(), max_batch_size=0, max_queue_size=2)
        x = np.zeros((1, 16), dtype=np.float32)
        results = await asyncio.gather(*(batcher.infer({"x": x}, None, 1) for _ in range(6)), return_exceptions=True)
        await batcher.close()
        return results

    results = asyncio.run(main())
    full = [r for r in results if isinstance(r, QueueFull)]
    assert full and "queue full" in full[0].message
    assert sum(isinstance(r, dict) for r in results) >= 2  # the accepted ones were served


def test_lone_request_does_not_wait_for_the_window(tmp_path):
    runtime = _runtime(mlp_model(tmp_path / "m.onnx"))
    stats = ModelStats()

    async def main():
        # a 5 s window: a lone request that waited for it would show seconds of queue time
        batcher = DynamicBatcher("m", [runtime], stats, max_batch_size=8, max_queue_delay_us=5_000_000)
        for _ in range(3):
            await batcher.infer({"x": np.zeros((1, 16), dtype=np.float32)}, None, 1)
        await batcher.close()

    asyncio.run(main())
    assert stats.durations["queue"].count == 3
    assert stats.durations["queue"].ns < 2_500_000_000 * 3 / 3  # far below one window


def test_batches_come_back_to_the_client_count_after_a_straggler(tmp_path):
    """8 clients in a closed loop; one of them is late once (longer than the window). The batches must
    settle at 8 again: waiting only for as many as the last batch held, the late one split the clients
    into two groups that kept each other apart for good (two batches per round, each a model call)."""
    runtime = _runtime(mlp_model(tmp_path / "m.onnx"))
    sizes: list[int] = []
    infer = runtime.infer
    runtime.infer = lambda inputs, outputs: sizes.append(len(inputs["x"])) or infer(inputs, outputs)

    async def main():
        batcher = DynamicBatcher("m", [runtime], ModelStats(), max_batch_size=32, preferred_batch_sizes=[8, 16, 32],
                                 max_queue_delay_us=2000)
        x = np.zeros((1, 16), dtype=np.float32)

        async def client(i: int) -> None:
            for n in range(60):
                await batcher.infer({"x": x}, None, 1)
                if i == 0 and n == 10:
                    await asyncio.sleep(0.006)  # a straggler: three windows late

        await asyncio.gather(*(client(i) for i in range(8)))
        await batcher.close()

    asyncio.run(main())
    assert sum(sizes) == 8 * 60
    # 60 rounds of 8, less what the late one missed (twice 7, then its own two at the end)
    assert len(sizes) <= 62, sizes


def test_lone_request_after_a_quiet_spell_does_not_wait(tmp_path):
    """A batch of four long ago (older than the batches the batcher goes by) says nothing about now."""
    runtime = _runtime(mlp_model(tmp_path / "m.onnx"))
    stats = ModelStats()

    async def main():
        batcher = DynamicBatcher("m", [runtime], stats, max_batch_size=8, max_queue_delay_us=5_000_000)
        batcher._recent.append((time.perf_counter_ns() - 60 * 10**9, 4))  # a minute ago
        await batcher.infer({"x": np.zeros((1, 16), dtype=np.float32)}, None, 1)
        await batcher.close()

    asyncio.run(main())
    assert stats.durations["queue"].ns < 1_000_000_000  # not the 5 s window


def test_close_finishes_queued_requests(tmp_path):
    runtime = _runtime(mlp_model(tmp_path / "m.onnx"))

    async def main():
        batcher = DynamicBatcher("m", [runtime], ModelStats(), max_batch_size=4)
        tasks = [asyncio.ensure_future(batcher.infer({"x": np.zeros((1, 16), np.float32)}, None, 1)) for _ in range(12)]
        await asyncio.sleep(0)
        await batcher.close()
        return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    assert len(results) == 12 and all(r["probs"].shape == (1, 4) for r in results)
