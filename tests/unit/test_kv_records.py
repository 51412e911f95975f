"""The KV records at their boundaries: the dicts vLLM carries between its processes (the
connector's `kv_transfer_params`, both ways) and the Redis hash of a request's transfers.

The connector runs only inside vLLM's engine (tests/integration), so the dict shapes it reads
and returns are pinned here, exactly."""

from __future__ import annotations

import pickle
import uuid

import pytest
import redis

from bus.messages import KvHandle
from kv_store.block_store import BlockStore
from kv_store.config import KvConfig
from kv_store.keys import kv_request, transfer_stats_key
from kv_store.records import (KvReport, KvRequest, TransferRecord, TransferStats, record_from_hash,
                              report_from_params, report_to_params, request_from_params, request_to_params)
from kv_store.transfers import TransferRecords

HANDLE = KvHandle(model_id="m", layout="lay", block_size=16, keys=["p:blk:lay:aa", "p:blk:lay:bb"],
                  num_tokens=32, content_hash="bb")
HANDLE_DICT = {"model_id": "m", "layout": "lay", "block_size": 16, "keys": ["p:blk:lay:aa", "p:blk:lay:bb"],
               "num_tokens": 32, "content_hash": "bb"}


def test_a_request_tells_the_connector_its_id_and_namespace():
    assert request_to_params(kv_request("r1", "gold")) == {"request_id": "r1", "namespace": "gold"}
    assert request_to_params(kv_request("r1", None)) == {"request_id": "r1", "namespace": ""}


def test_a_decode_request_carries_the_handle_as_a_plain_dict():
    params = request_to_params(kv_request("r1", "gold", HANDLE))
    assert params == {"request_id": "r1", "namespace": "gold", "handle": HANDLE_DICT}
    assert type(params["handle"]) is dict  # vLLM's processes get builtins only
    assert request_from_params(params, "vllm-7") == KvRequest("r1", "gold", HANDLE)


def test_a_request_without_params_goes_by_vllms_id_in_no_namespace():
    assert request_from_params(None, "vllm-7") == KvRequest("vllm-7", "")
    assert request_from_params({}, "vllm-7") == KvRequest("vllm-7", "")


def test_the_connectors_report_as_a_producer_and_as_a_consumer():
    produced = {"loaded_tokens": 64, "load_reason": "", "handle": HANDLE_DICT}
    consumed = {"loaded_tokens": 0, "load_reason": "handle keys do not match the request's tokens"}
    assert report_from_params(produced) == KvReport(64, "", HANDLE)
    assert report_from_params(consumed) == KvReport(0, "handle keys do not match the request's tokens")
    # and what the connector returns is exactly those dicts
    assert report_to_params(KvReport(64, "", HANDLE)) == produced
    assert report_to_params(KvReport(0, "handle keys do not match the request's tokens")) == consumed


def test_no_report_without_a_connector():
    assert report_from_params(None) is None


def test_both_dicts_survive_vllms_serialization_between_its_processes():
    pytest.importorskip("vllm")
    from vllm import SamplingParams
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    encoder = MsgpackEncoder()
    kv = kv_request("r1", "gold", HANDLE)
    sent = SamplingParams(max_tokens=4, extra_args={"kv_transfer_params": request_to_params(kv)})
    received = MsgpackDecoder(SamplingParams).decode(encoder.encode(sent))
    assert request_from_params(received.extra_args["kv_transfer_params"], "vllm-7") == kv
    report = KvReport(48, "1 of 4 blocks missing from the store", HANDLE)
    out = EngineCoreOutputs(outputs=[EngineCoreOutput(request_id="vllm-7", new_token_ids=[1],
                                                      kv_transfer_params=report_to_params(report))])
    back = MsgpackDecoder(EngineCoreOutputs).decode(encoder.encode(out)).outputs[0]
    assert report_from_params(back.kv_transfer_params) == report
    assert report_from_params(pickle.loads(pickle.dumps(report_to_params(report)))) == report


def test_the_transfer_record_as_redis_returns_its_hash():
    fields = {b"save_blocks": b"2", b"save_bytes": b"8192", b"save_ms": b"1.25", b"save_failed": b"0",
              b"load_blocks": b"1", b"load_bytes": b"4096", b"load_ms": b"0.5", b"load_failed": b"3"}
    assert record_from_hash(fields) == TransferRecord(save=TransferStats(2, 8192, 1.25, 0),
                                                      load=TransferStats(1, 4096, 0.5, 3))
    only_saved = record_from_hash({b"save_bytes": b"8192", b"save_ms": b"2"})
    assert only_saved == TransferRecord(save=TransferStats(bytes=8192, ms=2.0))
    assert isinstance(only_saved.save.ms, float) and isinstance(only_saved.save.bytes, int)
    assert record_from_hash({}) == TransferRecord()


def fresh_prefix() -> str:
    """A prefix of this test's own under the stack's (the only keys the server's user may touch)."""
    return f"{KvConfig().kv_key_prefix}:t{uuid.uuid4().hex[:10]}"


async def test_what_the_block_store_records_the_worker_reads_back(redis_url):
    prefix = fresh_prefix()
    store, records = BlockStore(redis_url, 60), TransferRecords(redis_url, prefix)
    key = transfer_stats_key(prefix, "r1")
    store.record(key, "save", TransferStats(blocks=2, bytes=8192, ms=1.5))
    store.record(key, "load", TransferStats(blocks=1, bytes=4096, ms=0.25, failed=1))
    store.record(key, "load", TransferStats(blocks=2, bytes=8192, ms=0.5))  # a request's steps add up
    try:
        assert await records.read("r1") == TransferRecord(save=TransferStats(2, 8192, 1.5, 0),
                                                           load=TransferStats(3, 12288, 0.75, 1))
        assert await records.read("never-seen") == TransferRecord()
    finally:
        await records.close()


async def test_an_unreadable_transfer_record_reads_as_empty(redis_url, redis_server):
    prefix = fresh_prefix()
    records = TransferRecords(redis_url, prefix)
    with redis.Redis.from_url(redis_server.ops_url) as raw:  # HSET: not a command the stack's user has
        raw.hset(transfer_stats_key(prefix, "r1"), mapping={"save_blocks": "1", "save_bytes": "lots"})
    try:
        assert await records.read("r1") == TransferRecord()  # accounting never fails a request
    finally:
        await records.close()
