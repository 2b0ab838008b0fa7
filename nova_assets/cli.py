"""The `nova-assets` command: the local stack, demo data and the dead-letter queue.

nova-assets services up|down|status          Redis, Kafka (KRaft), Pushgateway on 127.0.0.1
nova-assets seed [--if-empty] [...]          the ClickHouse schema and a deterministic dataset
nova-assets instance --home DIR              the local Dagster instance config in DAGSTER_HOME
nova-assets health [--json]                   each job's health; exit 0 ok, 1 not, 2 unreadable
nova-assets dlq list [--job J] [--limit N] [--scan N]   the dead-letter queue, newest first
nova-assets dlq replay RUN_ID                 run a failed run's assets again, with its run config
nova-assets history size [--json]             the instance's runs, events, files and bytes
nova-assets history prune [--dry-run]         delete the runs past RUN_RETENTION_DAYS, by hand
"""

import argparse
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from clickhouse_connect.driver.exceptions import ClickHouseError
from confluent_kafka import KafkaError, KafkaException

import nova_assets
from nova_assets.cli_errors import USAGE, CommandError, Parser, one_line, port, quiet_library_logs
from nova_assets.core.cache_asset import asset_pool
from nova_assets.core.jobs import job_specs
from nova_assets.core.resources import CLICKHOUSE_POOL, ClickHouseResource, KafkaDLQResource
from nova_assets.core.resources.clickhouse import (
    EmbeddedEngineMissingError,
    require_embedded_engine,
)
from nova_assets.core.settings import Settings, SettingsError
from nova_assets.core.urls import redact_url
from nova_assets.defs.dlq import reading as dlq
from nova_assets.local import seed, stack

ALERT_RULES = Path(nova_assets.__file__).resolve().parents[1] / "ops" / "prometheus" / "alerts.yml"
"""The shipped alert rules, found from the package (a checkout), whatever the working directory."""


def _local_port(url: str, default: int) -> int:
    return urlsplit(url).port or default


def _stack_config(settings: Settings, args: argparse.Namespace) -> stack.StackConfig:
    """Ports follow the configured URLs, so `services up` starts what the code will talk to."""
    kafka_port = int(settings.kafka_brokers[0].rsplit(":", 1)[1])
    redis_url = urlsplit(settings.redis_url)
    return stack.StackConfig(
        state_dir=settings.nova_home,
        redis_port=args.redis_port or _local_port(settings.redis_url, 6379),
        redis_socket=Path(redis_url.path) if redis_url.scheme == "unix" else None,
        kafka_port=args.kafka_port or kafka_port,
        kafka_controller_port=args.kafka_controller_port or kafka_port + 1,
        pushgateway_port=args.pushgateway_port or _local_port(settings.pushgateway_url, 9091),
        dlq_topic=settings.dlq_topic,
        prometheus_port=args.prometheus_port or 9090,
        postgres_port=args.postgres_port or 5432,
        prometheus_rules=ALERT_RULES,
        redis_cluster_port=args.redis_cluster_port or 7000,
        kafka_cluster_port=args.kafka_cluster_port or 9192,
    )


def _services(settings: Settings, args: argparse.Namespace) -> int:
    config = _stack_config(settings, args)
    services = (
        stack.SERVICES
        + (("prometheus",) if args.with_prometheus else ())
        + (("postgres",) if args.with_postgres else ())
        + (("redis-cluster",) if args.with_redis_cluster else ())
        + (("kafka-cluster",) if args.with_kafka_cluster else ())
    )
    if args.action == "up":
        try:
            stack.up(config, services, log=print)
        except stack.StackError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    elif args.action == "down":
        stack.down(config, stack.SERVICES + stack.OPTIONAL_SERVICES, log=print)
    else:
        rows = stack.status(config)
        width = max(len(row.name) for row in rows)
        for name in stack.SERVICES + stack.OPTIONAL_SERVICES:
            own = [row for row in rows if row.service == name]
            if len(own) > 1 and not any(row.answering or row.pid for row in own):
                # A cluster that is not running is one line, not one per node.
                print(f"{name:<{width}} {config.address(name):<16} not answering (not ours)")
                continue
            for row in own:
                state = "answering" if row.answering else "not answering"
                owner = f"started by nova-assets, pid {row.pid}" if row.pid else "not ours"
                print(f"{row.name:<{width}} {row.address:<16} {state} ({owner})")
    return 0


def _seed_spec(args: argparse.Namespace) -> seed.SeedSpec:
    """The options as a `SeedSpec`; a value out of its range is a usage error naming the option."""
    try:
        return seed.SeedSpec(
            seed=args.seed,
            users=args.users,
            posts=args.posts,
            events=args.events,
            days=args.days,
            follows_per_user=args.follows_per_user,
            as_of=args.as_of or datetime.now(UTC).replace(microsecond=0),
        )
    except ValueError as exc:
        option = re.sub(r"SeedSpec\.(\w+)", lambda m: "--" + m[1].replace("_", "-"), str(exc))
        raise CommandError(f"seed: {option}", USAGE) from None


def _seed(settings: Settings, args: argparse.Namespace) -> int:
    spec = _seed_spec(args)
    if not settings.embedded_clickhouse and not args.allow_server:
        # Demo data in, or --replace truncating, the tables of a real ClickHouse server would be
        # a disaster: a server is seeded only when asked for by name.
        where = redact_url(settings.clickhouse_url)
        if args.if_empty:
            print(f"CLICKHOUSE_URL points at the server {where}; not seeding a server.")
            return 0
        print(
            f"error: CLICKHOUSE_URL points at the server {where}. Demo data goes into the "
            "embedded engine only; pass --allow-server to seed (or --replace) this server.",
            file=sys.stderr,
        )
        return 1
    try:
        require_embedded_engine(settings.clickhouse_url)
    except EmbeddedEngineMissingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    clickhouse = ClickHouseResource(url=settings.clickhouse_url)
    try:
        seed.create_schema(clickhouse)
        if not seed.is_empty(clickhouse):
            if args.if_empty:
                print(f"ClickHouse at {clickhouse.describe()} already holds data; not seeding.")
                return 0
            if not args.replace:
                print(
                    f"error: ClickHouse at {clickhouse.describe()} already holds data; "
                    "pass --replace to empty the tables and seed again, or --if-empty to skip.",
                    file=sys.stderr,
                )
                return 1
            seed.truncate(clickhouse)
        print(
            f"Seeding {clickhouse.describe()}: {spec.users} users, {spec.posts} posts, "
            f"{spec.events} events over {spec.days} days (seed {spec.seed})…"
        )
        summary = seed.generate(clickhouse, spec)
        print(summary.describe())
    except ClickHouseError as exc:
        raise CommandError(
            f"seed: ClickHouse at {clickhouse.describe()}: {one_line(exc)}"
        ) from None
    finally:
        clickhouse.close()
    return 0


def _instance(settings: Settings, args: argparse.Namespace) -> int:
    """Write DAGSTER_HOME/dagster.yaml from the packaged template and MAX_CONCURRENT_JOBS."""
    from nova_assets.local.instance import initialize_pools, write_instance

    pools = [CLICKHOUSE_POOL, *(asset_pool(s.asset, embedded=False) for s in job_specs(settings))]
    try:
        target = write_instance(args.home, settings.max_concurrent_jobs, args.template)
        initialize_pools(args.home, pools)
    except OSError as exc:
        raise CommandError(
            f"instance: {exc.strerror or exc}: {exc.filename or args.home}"
        ) from None
    print(f"Dagster instance config written to {target}; pools ready: {', '.join(pools)}")
    return 0


def _replay(settings: Settings, run_id: str) -> int:
    """Launch the replay of one failed run (`nova_assets/replay.py`)."""
    from nova_assets.replay import replay

    for line in replay(settings, run_id):
        print(line)
    return 0


def _health(settings: Settings, args: argparse.Namespace) -> int:
    """Print each job's health (`nova_assets/health.py`, which says the exit codes)."""
    from nova_assets import health

    answer = health.answer(settings, as_json_output=args.json)
    if answer.error:
        print(f"error: {answer.error}", file=sys.stderr)
    if answer.out:
        print(answer.out)
    return answer.code


def _history(settings: Settings, args: argparse.Namespace) -> int:
    """The instance's footprint, or the run retention by hand (`nova_assets/history.py`)."""
    from nova_assets import history

    if args.action == "size":
        print(history.size(settings, as_json=args.json))
    else:
        for line in history.prune_by_hand(settings, dry_run=args.dry_run):
            print(line)
    return 0


def _dlq(settings: Settings, args: argparse.Namespace) -> int:
    if args.action == "replay":
        if not args.run_id:
            raise CommandError("dlq replay needs the failed run's id: dlq replay RUN_ID", USAGE)
        return _replay(settings, args.run_id)
    kafka = KafkaDLQResource(
        brokers=",".join(settings.kafka_brokers),
        topic=settings.dlq_topic,
        passthrough_env=list(settings.kafka_passthrough),
    )
    try:
        rows, note = dlq.list_messages(kafka, job=args.job, limit=args.limit, scan=args.scan)
    except KafkaException as exc:
        error = exc.args[0] if exc.args else exc
        reason = error.str() if isinstance(error, KafkaError) else str(error)
        print(
            f"error: cannot read the topic {settings.dlq_topic!r} from "
            f"{','.join(settings.kafka_brokers)}: {reason}",
            file=sys.stderr,
        )
        return 1
    print(dlq.format_table(rows))
    if not rows:
        print(f"(no messages on {settings.dlq_topic}" + (f" for {args.job})" if args.job else ")"))
    if note:
        print(f"({note})")
    return 0


def _positive_int(value: str) -> int:
    """A whole number ≥ 1 in ASCII digits (`isdigit` would also take `٦٠` and `²`)."""
    if not re.fullmatch(r"[0-9]{1,9}", value) or int(value) < 1:
        raise argparse.ArgumentTypeError(
            f"expected a whole number from 1 to 999999999, got {value!r}"
        )
    return int(value)


def _utc(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if parsed.tzinfo is not None:
            return parsed.astimezone(UTC)
    except (ValueError, OverflowError):  # not a time; or year 1 or 9999 shifted past the range
        pass
    raise argparse.ArgumentTypeError(f"give a UTC time, e.g. 2026-11-28T12:00:00Z, not {value!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="nova-assets", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    services = commands.add_parser("services", help="start, stop or inspect the local stack")
    services.add_argument("action", choices=["up", "down", "status"])
    for name in ("redis", "kafka", "kafka-controller", "pushgateway", "prometheus", "postgres"):
        services.add_argument(f"--{name}-port", type=port, default=None)
    services.add_argument(
        "--with-prometheus",
        action="store_true",
        help="also run Prometheus on 127.0.0.1:9090 with the alert rules of ops/prometheus",
    )
    services.add_argument(
        "--with-postgres",
        action="store_true",
        help="also run PostgreSQL on 127.0.0.1:5432, for deploy/dagster.yaml",
    )
    services.add_argument(
        "--with-redis-cluster",
        action="store_true",
        help="also run a Redis Cluster: three primaries and three replicas on 127.0.0.1:7000-7005",
    )
    services.add_argument(
        "--with-kafka-cluster",
        action="store_true",
        help="also run three Kafka nodes (broker and controller) in one quorum on "
        "127.0.0.1:9192, 9194, 9196, the DLQ topic replicated on all three",
    )
    services.add_argument(
        "--redis-cluster-port",
        type=port,
        default=None,
        help="the first of the Redis Cluster's six consecutive ports (default 7000); each "
        "node's cluster bus listens 10000 above its port",
    )
    services.add_argument(
        "--kafka-cluster-port",
        type=port,
        default=None,
        help="the first of the Kafka cluster's six consecutive ports (default 9192): brokers "
        "on 9192, 9194, 9196, each node's controller on the port after its broker",
    )

    demo = commands.add_parser("seed", help="create the schema and generate demo data")
    defaults = seed.SeedSpec(as_of=datetime.now(UTC))
    demo.add_argument("--seed", type=int, default=defaults.seed)
    demo.add_argument("--users", type=int, default=defaults.users)
    demo.add_argument("--posts", type=int, default=defaults.posts)
    demo.add_argument("--events", type=int, default=defaults.events)
    demo.add_argument("--days", type=int, default=defaults.days)
    demo.add_argument("--follows-per-user", type=int, default=defaults.follows_per_user)
    demo.add_argument("--as-of", type=_utc, default=None, help="end of the data (default: now)")
    existing = demo.add_mutually_exclusive_group()
    existing.add_argument("--if-empty", action="store_true", help="seed only when no data exists")
    existing.add_argument("--replace", action="store_true", help="empty the tables, then seed")
    demo.add_argument(
        "--allow-server",
        action="store_true",
        help="seed (or with --replace, empty) a ClickHouse server, not only the embedded engine",
    )
    instance = commands.add_parser("instance", help="write the local Dagster instance config")
    instance.add_argument("--home", type=Path, required=True, help="DAGSTER_HOME")
    instance.add_argument(
        "--template", type=Path, default=None, help="default: the top-level dagster.yaml"
    )
    probe = commands.add_parser(
        "health", help="each job's health from the Dagster instance; exit 0 when all are ok"
    )
    probe.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    queue = commands.add_parser("dlq", help="inspect the dead-letter queue")
    queue.add_argument("action", choices=["list", "replay"])
    queue.add_argument("run_id", nargs="?", help="replay: the failed run to run again")
    queue.add_argument("--job", help="only this job's messages")
    queue.add_argument(
        "--limit", type=_positive_int, default=20, help="at most this many (default 20)"
    )
    queue.add_argument(
        "--scan",
        type=_positive_int,
        default=dlq.LIST_SCAN,
        help=f"messages read back from the end of each partition (default {dlq.LIST_SCAN})",
    )
    past = commands.add_parser("history", help="the instance's footprint; prune old runs")
    past.add_argument("action", choices=["size", "prune"])
    past.add_argument("--json", action="store_true", help="size: one JSON document")
    past.add_argument("--dry-run", action="store_true", help="prune: say what would go")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; every failure is one `error:` line on stderr and an exit code.

    `nova_assets/cli_errors.py` gives the exit codes; settings errors list each bad variable.
    """
    handlers = {
        "services": _services,
        "seed": _seed,
        "instance": _instance,
        "health": _health,
        "dlq": _dlq,
        "history": _history,
    }
    try:
        args = build_parser().parse_args(argv)
        try:
            settings = Settings.from_env()
        except SettingsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return USAGE
        with quiet_library_logs():
            return handlers[args.command](settings, args)
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the last resort: one line naming the fault, never a traceback
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
