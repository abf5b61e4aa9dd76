"""The `unlearning-audit` command line.

Flows are imported inside the commands that run them, so importing this package never imports
Prefect; run locally, Prefect starts a temporary server in this process (ephemeral mode).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from .config import AuditParams, UnlearnConfig
from .report import SUMMARY_KEYS

PREFECT_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
}


def _prefect_env() -> None:
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)


def format_table(rows: list[dict]) -> str:
    """The demo's table: one line per unlearning run."""
    header = [
        "method",
        "lr",
        "forget acc (orig/unl/rel)",
        "retain acc (orig/unl)",
        "mean CKA",
        "regime",
    ]
    lines = [
        [
            r["method"],
            "-" if r["lr"] is None else f"{r['lr']:g}",
            f"{r['forget_acc_original']:.2f} / {r['forget_acc_unlearned']:.2f} / "
            f"{r['forget_acc_relearned']:.2f}",
            f"{r['retain_acc_original']:.2f} / {r['retain_acc_unlearned']:.2f}",
            f"{r['mean_cka']:.3f}",
            r["regime"],
        ]
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(
        [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        + [fmt.format(*line) for line in lines]
    )


def _finish(result: dict, json_path: str | None, keys: tuple[str, ...] = SUMMARY_KEYS) -> None:
    rows = [{k: row[k] for k in keys} for row in result["rows"]]
    print()
    print(format_table(rows))
    print(f"\nreport: {result['report_file']}")
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=2))
        print(f"rows written to {json_path}")


def _run_audit(params: AuditParams, json_path: str | None) -> None:
    from .preflight import preflight

    preflight(params)  # fail fast, before Prefect starts
    _prefect_env()
    from flows.audit import audit_checkpoint

    _finish(audit_checkpoint(params), json_path)


def cmd_demo(args: argparse.Namespace) -> None:
    """The embedded default audit, end to end."""
    _run_audit(AuditParams(store=args.store, name="demo"), args.json)


def cmd_audit(args: argparse.Namespace) -> None:
    """Audit a checkpoint: run methods on it, or judge an already-unlearned one."""
    base = json.loads(Path(args.config).read_text()) if args.config else {}
    fields = {
        "original": args.original,
        "unlearned": args.unlearned,
        "control": args.control,
        "store": args.store,
        "device": args.device,
        "name": args.name,
    }
    params = {**base, **{k: v for k, v in fields.items() if v is not None}}
    if args.method:
        lrs = args.lr or [UnlearnConfig().lr]
        params["methods"] = [{"method": m, "lr": lr} for m in args.method for lr in lrs]
    data = dict(base.get("data", {}))
    data |= {
        k: v
        for k, v in (
            ("forget", args.forget),
            ("retain", args.retain),
            ("unrelated", args.unrelated),
        )
        if v is not None
    }
    params["data"] = data
    params |= {k: True for k in ("allow_pickle", "trust_remote_code") if getattr(args, k)}
    _run_audit(AuditParams.model_validate(params), args.json)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="unlearning-audit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help=cmd_demo.__doc__)
    demo.add_argument("--store", help="artifact store URL (default ./audit-store)")
    demo.add_argument("--json", metavar="FILE", help="write the table's rows as JSON")
    demo.set_defaults(func=cmd_demo)

    audit = sub.add_parser("audit", help=cmd_audit.__doc__)
    audit.add_argument(
        "--original",
        required=True,
        metavar="CKPT",
        help="embedded, a local folder, s3:// prefix or hub id@revision",
    )
    audit.add_argument("--unlearned", metavar="CKPT", help="audit this unlearned checkpoint")
    audit.add_argument("--control", metavar="CKPT", help="a never-learned control checkpoint")
    audit.add_argument("--method", action="append", help="unlearning method (repeatable)")
    audit.add_argument("--lr", action="append", type=float, help="learning rate (repeatable)")
    for name in ("forget", "retain", "unrelated"):
        audit.add_argument(
            f"--{name}",
            metavar="DATA",
            help="JSON/JSONL/Parquet file or datasets source name[:config]#split",
        )
    audit.add_argument("--config", metavar="FILE", help="JSON file of audit parameters")
    audit.add_argument("--store", help="artifact store URL (default ./audit-store)")
    audit.add_argument("--device", help="auto, cpu, cuda")
    audit.add_argument("--name", help="a label for the audit")
    audit.add_argument("--allow-pickle", action="store_true", help="allow pickle weights (unsafe)")
    audit.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow model code shipped with the checkpoint (unsafe)",
    )
    audit.add_argument("--json", metavar="FILE", help="write the table's rows as JSON")
    audit.set_defaults(func=cmd_audit)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run, and turn bad input into a clear message and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValidationError as exc:
        problems = [
            f"  - {'.'.join(map(str, e['loc'])) or 'input'}: {e['msg']}" for e in exc.errors()
        ]
        print("invalid configuration:\n" + "\n".join(problems), file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
