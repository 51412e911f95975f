"""`grokstack`: start the stack or any one of its processes, chat with it, measure it."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable

from services import logs
from services.settings import ENV, Settings, describe, from_env

COMMON = ["nats_url", "nats_credentials", "redis_url", "subject_prefix", "region", "data_dir",
          "log_level", "log_format"]
ENGINE = ["model", "served_model_name", "engine_profile", "engine_step_lock", "cpu_nice", "max_model_len", "block_size",
          "kv_cache_gib", "kv_ttl_s", "kv_key_prefix"]
SPEC = ["spec_method", "spec_tokens", "spec_ngram_min", "spec_ngram_max", "spec_draft_model",
        "spec_max_batch"]
WORKER = ["worker_id", "ack_wait_s", "max_deliver", "heartbeat_s", "drain_timeout_s", "prefill_token_budget",
          "decode_token_budget", "max_share_standard", "max_share_batch", "min_share_standard", "min_share_batch",
          "gpu_price_per_hour", "gpus_per_worker", "metrics_port"]
EDGE = ["edge_host", "edge_port", "api_port", "api_keys_file", "max_frame_bytes", "max_messages",
        "max_prompt_chars", "max_tokens_limit", "default_max_tokens", "max_inflight_per_connection",
        "max_inflight_per_edge", "resume_grace_s", "resume_retention_s", "request_timeout_s",
        "queue_budget_interactive_s", "queue_budget_standard_s", "queue_budget_batch_s", "degraded_batch_max_tokens",
        "queue_poll_s"]
_TYPES: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "Path": Path, "str": str}


def add_settings(parser: argparse.ArgumentParser, names: list[str]) -> None:
    """One flag per setting (`--edge-port` for edge_port); unset flags keep env/defaults."""
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    defaults = Settings()
    group = parser.add_argument_group("settings (flag overrides environment variable)")
    for name in names:
        group.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None,
                           type=_TYPES[str(fields[name].type)],
                           help=f"{ENV[name]}; default {getattr(defaults, name)!r}")


def settings_from(args: argparse.Namespace) -> Settings:
    names = {f.name for f in dataclasses.fields(Settings)}
    return from_env().replace(**{k: v for k, v in vars(args).items() if k in names})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grokstack", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    def command(name: str, help: str, names: list[str]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        add_settings(p, names)
        return p

    command("up", "run the whole stack on this machine (embedded NATS and Redis unless "
                  "NATS_URL/REDIS_URL are set); Ctrl-C stops it",
            COMMON + ENGINE + SPEC + WORKER + EDGE + ["serving_mode", "prefill_slots", "decode_slots",
                                                      "redis_maxmemory"])
    command("edge", "run an edge node (websocket chat, the chat page, the OpenAI-compatible API)",
            COMMON + WORKER + EDGE)
    command("prefill", "run a prefill worker", COMMON + ENGINE + WORKER + ["prefill_slots"])
    command("decode", "run a decode worker", COMMON + ENGINE + SPEC + WORKER + ["decode_slots"])
    command("aggregated", "run an aggregated worker: one engine prefills and decodes (no KV hand-off)",
            COMMON + ENGINE + SPEC + WORKER + ["decode_slots"])

    chat = sub.add_parser("chat", help="chat with the stack in the terminal",
                          description="chat with the stack in the terminal")
    chat.add_argument("--url", default=None, help="edge websocket URL (default ws://127.0.0.1:<edge port>)")
    chat.add_argument("--priority", default="interactive", choices=["interactive", "standard", "batch"])
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--system", default=None, help="a system message for the conversation")

    bench = command("bench", "run N concurrent websocket chats through the stack and the same "
                             "prompts through one vLLM engine in-process; print both side by side",
                    COMMON + ENGINE + SPEC + ["decode_slots", "prefill_slots"])
    from services.lab.bench import add_bench_arguments
    add_bench_arguments(bench)

    publish = command("publish", "submit a job straight onto the bus and follow its tokens, or a "
                                 "JSONL batch of jobs (--file)", COMMON)
    from services.publish import add_publish_arguments
    add_publish_arguments(publish)
    replay = command("replay", "show captured bus traffic, republish it under a sandbox prefix, "
                               "or re-run captured requests and diff the answers", COMMON)
    from services.replay_command import add_replay_arguments
    add_replay_arguments(replay)
    trace = command("trace", "the timeline of one request across edge, prefill, KV store and "
                             "decode, from captured traffic", COMMON)
    trace.add_argument("request_id")

    asyncapi = sub.add_parser("asyncapi", help="print the bus contract (AsyncAPI 3.0, generated "
                                               "from the code), or --write / --check bus/asyncapi.json")
    asyncapi.add_argument("--write", action="store_true", help="regenerate bus/asyncapi.json")
    asyncapi.add_argument("--check", action="store_true", help="exit 1 if bus/asyncapi.json is stale")

    apikey = command("apikey", "make an API key for a tenant: prints the key once and stores only its "
                               "hash in the keys file (GROKSTACK_API_KEYS_FILE)", ["api_keys_file"])
    apikey.add_argument("--tenant", required=True)
    apikey.add_argument("--priority", action="append", default=[], choices=["interactive", "standard", "batch"],
                        help="a priority the tenant may use (repeat; default: all, or the tenant's current)")
    apikey.add_argument("--max-concurrent", type=int, default=0,
                        help="requests in flight at once per edge (default 64, or the tenant's current)")
    apikey.add_argument("--tokens-per-minute", type=int, default=None,
                        help="prompt plus answer tokens a minute per edge, 0 for no limit (default: the "
                             "tenant's current, or no limit)")
    chaos = command("chaos", "a reliability drill: run chats while killing and restarting workers, "
                             "the nats-server and Redis at random; print what the clients saw",
                    ENGINE + SPEC + ["data_dir", "log_level", "decode_slots", "prefill_slots",
                                     "request_timeout_s"])
    from services.lab.chaos import add_chaos_arguments
    add_chaos_arguments(chaos)
    nats_auth = sub.add_parser("nats-auth", help="print the nats-server authorization block of the "
                                                 "stack's roles and write their logins (production)")
    from services.nats_auth import add_nats_auth_arguments
    add_nats_auth_arguments(nats_auth)
    cost = command("cost", "the $/1M tokens model with the math shown, from given throughput or "
                           "from a running stack's metrics (--metrics URL)",
                   ["gpu_price_per_hour", "gpus_per_worker"])
    from services.lab.cost_command import add_cost_arguments
    add_cost_arguments(cost)
    command("model", "prepare the bundled model (converted once into the data directory)",
            ["data_dir", "log_level", "log_format"])
    sub.add_parser("settings", help="list every setting with its environment variable and default")
    return parser


CLIENT_COMMANDS = ("publish", "replay", "trace")


def run_client_command(settings: Settings, args: argparse.Namespace) -> int:
    from services.publish import run_publish
    from services.replay_command import run_replay, run_trace
    runs = {"publish": lambda: run_publish(settings, args), "replay": lambda: run_replay(settings, args),
            "trace": lambda: run_trace(settings, args.request_id)}
    from bus.credentials import CredentialsError
    from bus.jetstream import BusUnavailable
    try:
        return asyncio.run(runs[args.command]())
    except (BusUnavailable, CredentialsError) as exc:
        print(f"grokstack {args.command}: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `grokstack replay | head`: the reader has what it wanted
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        return 130


def make_api_key(settings: Settings, args: argparse.Namespace) -> int:
    from edge.tenants import add_key
    if not settings.api_keys_file:
        print("set GROKSTACK_API_KEYS_FILE or --api-keys-file: the file the edge reads keys from", file=sys.stderr)
        return 2
    key = add_key(Path(settings.api_keys_file), args.tenant, args.priority, args.max_concurrent,
                  args.tokens_per_minute)
    print(key)
    print(f"(tenant {args.tenant!r}; only its hash is stored in {settings.api_keys_file}; "
          "this is the only time the key is shown)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "settings":
        for var, name, default in describe():
            print(f"{var:<40} {name:<28} {default}")
        return 0
    if args.command == "asyncapi":
        from bus import contract
        if args.check:
            current = contract.is_current()
            print(f"{contract.CHECKED_IN} is {'current' if current else 'STALE: run grokstack asyncapi --write'}")
            return 0 if current else 1
        if args.write:
            contract.write()
            print(f"wrote {contract.CHECKED_IN}")
        else:
            print(contract.render(), end="")
        return 0
    if args.command == "nats-auth":
        from services.nats_auth import run_nats_auth
        return run_nats_auth(args)
    if args.command == "chat":
        from edge.client import chat_repl
        url = args.url or f"ws://127.0.0.1:{from_env().edge_port}"
        asyncio.run(chat_repl(url, args.priority, args.max_tokens, args.temperature, args.system))
        return 0
    settings = settings_from(args)
    if args.command == "cost":
        from services.lab.cost_command import run_cost
        return run_cost(settings, args)
    if args.command == "apikey":
        return make_api_key(settings, args)
    if args.command in CLIENT_COMMANDS and args.log_level is None:
        settings = settings.replace(log_level="warning")  # their stdout/stderr are for the user
    logs.configure(settings.log_level, settings.log_format, process=args.command)
    if args.command == "up":
        from services.up import run_up
        return run_up(settings)
    if args.command == "model":
        from inference.model import ensure_bundled_model
        print(ensure_bundled_model(settings.model_dir))
        return 0
    if args.command == "chaos":
        from services.lab.chaos import run_chaos
        return run_chaos(settings, args)
    if args.command == "bench":
        from services.lab.bench import run_bench
        return asyncio.run(run_bench(settings, args))
    if args.command in CLIENT_COMMANDS:
        return run_client_command(settings, args)
    from services.processes import run_edge, run_worker
    if args.command == "edge":
        asyncio.run(run_edge(settings))
    else:
        asyncio.run(run_worker(settings, args.command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
