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

from .config import AuditParams, StudyParams, UnlearnConfig
from .report import STUDY_KEYS_EXTRA, SUMMARY_KEYS, advantage_cell, format_p, two_decimals
from .runtime import PREFECT_ENV
from .store import ArtifactRef, CorruptArtifact, Store, check_key, endpoint_url


def _prefect_env() -> None:
    for key, value in PREFECT_ENV.items():
        os.environ.setdefault(key, value)


def format_table(rows: list[dict]) -> str:
    """The summary table: one line per unlearning run (with its domain in a study), scores in
    the verdict's metric, the advantage over the control with its interval on the look the
    regime rests on, and the regime."""
    study = bool(rows) and "domain" in rows[0]
    metric = rows[0]["metric"] if rows else "exact_match"
    header = ["run", f"forget {metric} (orig/unl/rel)", "retain (orig/unl)"]
    header += ["advantage [interval] (look)", "p", "mean CKA", "regime"]
    header = (["domain"] if study else []) + header
    lines = []
    for r in rows:
        line = [
            r["label"],
            " / ".join(
                two_decimals(r[k])
                for k in ("forget_original", "forget_unlearned", "forget_relearned")
            ),
            f"{two_decimals(r['retain_original'])} / {two_decimals(r['retain_unlearned'])}",
            advantage_cell(r),
            format_p(r["p"]),
            f"{r['mean_cka']:.3f}",
            r["regime"],
        ]
        lines.append(([r["domain"]] if study else []) + line)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(
        [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        + [fmt.format(*line).rstrip() for line in lines]
    )


def _finish(result: dict, json_path: str | None, keys: tuple[str, ...] = SUMMARY_KEYS) -> None:
    rows = [{k: row[k] for k in keys} for row in result["rows"]]
    print()
    print(format_table(rows))
    print()
    for row in rows:
        print(f"{row['label']}: {row['headline']}")
    print(f"\nreport: {result['report_file']}")
    print(f"HTML report: {result['html_file']}")
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


def cmd_study(args: argparse.Namespace) -> None:
    """The paper's grid on the embedded model: methods x domains x settings."""
    base = json.loads(Path(args.config).read_text()) if args.config else {}
    if args.store:
        base["store"] = args.store
    if args.domain:
        base["domains"] = args.domain
    if args.method:
        base["methods"] = args.method
    params = StudyParams.model_validate(base)
    from .preflight import preflight

    preflight(params.audit(params.domains[0]))
    _prefect_env()
    from flows.study import study

    _finish(study(params), args.json, SUMMARY_KEYS + STUDY_KEYS_EXTRA)


RESULT_BLOCK = "unlearning-audit-results"


def cmd_setup(args: argparse.Namespace) -> None:
    """Check a store and save Prefect result storage on it as a block (docs/storage.md)."""
    store = Store(args.store)
    store.check_writable()
    _prefect_env()
    basepath = f"{store.url.rstrip('/')}/prefect-results"
    if store.local:
        from prefect.filesystems import LocalFileSystem

        block = LocalFileSystem(basepath=basepath)
    else:  # the endpoint only: credentials stay in the workers' environment, never in a block
        from prefect.filesystems import RemoteFileSystem

        endpoint = endpoint_url()
        block = RemoteFileSystem(
            basepath=basepath, settings={"endpoint_url": endpoint} if endpoint else {}
        )
    block.save(args.block, overwrite=True)
    slug = f"{block.get_block_type_slug()}/{args.block}"
    print(f"store {store.url} is writable; Prefect result storage saved as block {slug}")
    print("persist every flow's results there with:")
    print(
        f"  prefect config set PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK={slug} "
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT=true"
    )


def _columns(header: list[str], lines: list[list[str]]) -> str:
    """A plain text table, columns padded to their widest cell."""
    widths = [max(len(x) for x in col) for col in zip(header, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    rows = [header, ["-" * w for w in widths], *lines]
    return "\n".join(fmt.format(*row).rstrip() for row in rows)


def cmd_ls(args: argparse.Namespace) -> None:
    """List the audits (their reports) and the artifacts in a store."""
    store = Store(args.store)
    manifests = sorted(store.manifests(args.stage), key=lambda m: m["created"])
    audits = [
        [str(m["meta"].get(f) or "") for f in ("name", "original")] + [m["created"][:19], m["key"]]
        for m in manifests
        if m["stage"] == "report"
    ]
    artifacts = [
        [
            m["key"],
            m["created"][:19],
            str(len(m["files"])),
            f"{sum(f['size'] for f in m['files'].values()) / 2**20:.2f}",
            m["hash"][:12],
        ]
        for m in manifests
        if m["stage"] != "report"
    ]
    tables = [
        _columns(header, lines)
        for header, lines in (
            (["audit", "original", "created", "key"], audits),
            (["artifact", "created", "files", "MiB", "hash"], artifacts),
        )
        if lines
    ]
    where = f" for stage {args.stage}" if args.stage else ""
    print("\n\n".join(tables) or f"no artifacts in {store.url}{where}")


def cmd_show(args: argparse.Namespace) -> None:
    """Print an artifact's manifest and its Markdown files (a report's report.md)."""
    store = Store(args.store)
    manifest = store.manifest(args.key)
    if manifest is None:
        raise ValueError(f"no artifact {args.key!r} in {store.url}")
    print(json.dumps(manifest, indent=1))
    ref = ArtifactRef(key=args.key, hash=manifest["hash"])
    for name in sorted(n for n in manifest["files"] if n.endswith(".md")):
        try:
            text = store.read_bytes(ref, name).decode()
        except CorruptArtifact as exc:
            raise ValueError(str(exc)) from exc
        print(f"\n--- {name}\n{text}")


def cmd_report(args: argparse.Namespace) -> None:
    """Rebuild an audit's report.md and report.html from the store alone (no model is loaded)."""
    from .report import REPORT_HTML, rebuild

    paths = rebuild(Store(args.store), check_key(args.key), args.out)
    for path in paths.values():
        print(f"wrote {path.resolve()}")
    if args.open:
        import webbrowser

        webbrowser.open(paths[REPORT_HTML].resolve().as_uri())


def cmd_verify(args: argparse.Namespace) -> int:
    """Check every artifact's files against its manifest's hashes; --repair removes what fails.

    Exit code 1 when something does not verify and was not repaired, so a scheduled check fails.
    """
    store = Store(args.store)
    findings = store.check_integrity(orphan_age=args.orphan_minutes * 60)
    for finding in findings:
        print(f"{finding.kind}: {finding.problem}")
    if not findings:
        print(f"every artifact in {store.url} verifies")
        return 0
    if not args.repair:
        print(f"{len(findings)} problem(s); `unlearning-audit verify --repair` removes them")
        return 1
    for path in store.repair(findings):
        print(f"removed {path}")
    print("repaired: a run that needs a removed artifact computes it again")
    return 0


def cmd_server(args: argparse.Namespace) -> None:
    """Start a local Prefect server, work pools, workers and the deployments; Ctrl-C stops all."""
    from .server import LocalStack, serve

    serve(LocalStack(port=args.port, gpus=args.gpus, home=args.home))


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

    study = sub.add_parser("study", help=cmd_study.__doc__)
    study.add_argument("--domain", action="append", choices=["text", "code", "math"])
    study.add_argument("--method", action="append", help="unlearning method (repeatable)")
    study.add_argument("--config", metavar="FILE", help="JSON file of study parameters")
    study.add_argument("--store", help="artifact store URL (default ./audit-store)")
    study.add_argument("--json", metavar="FILE", help="write the table's rows as JSON")
    study.set_defaults(func=cmd_study)

    setup = sub.add_parser("setup", help=cmd_setup.__doc__)
    setup.add_argument("--store", help="artifact store URL (default ./audit-store)")
    setup.add_argument("--block", default=RESULT_BLOCK, help=f"block name (default {RESULT_BLOCK})")
    setup.set_defaults(func=cmd_setup)

    ls = sub.add_parser("ls", help=cmd_ls.__doc__)
    ls.add_argument("--store", help="artifact store URL (default ./audit-store)")
    ls.add_argument("--stage", help="only this stage's artifacts (report: the audits)")
    ls.set_defaults(func=cmd_ls)

    show = sub.add_parser("show", help=cmd_show.__doc__)
    show.add_argument("key", metavar="KEY", help="an artifact key, e.g. report/3f2a...")
    show.add_argument("--store", help="artifact store URL (default ./audit-store)")
    show.set_defaults(func=cmd_show)

    report = sub.add_parser("report", help=cmd_report.__doc__)
    report.add_argument("key", metavar="AUDIT_KEY", help="report/<digest>, or a digest prefix")
    report.add_argument("--store", help="artifact store URL (default ./audit-store)")
    report.add_argument("--out", type=Path, help="output folder (default ./reports/<digest>)")
    report.add_argument("--open", action="store_true", help="open the HTML report in a browser")
    report.set_defaults(func=cmd_report)

    verify = sub.add_parser("verify", help=cmd_verify.__doc__.splitlines()[0])
    verify.add_argument("--store", help="artifact store URL (default ./audit-store)")
    verify.add_argument("--repair", action="store_true", help="remove what does not verify")
    verify.add_argument(
        "--orphan-minutes",
        type=float,
        default=60.0,
        metavar="M",
        help="report (and remove) writer folders no manifest names, untouched this long "
        "(default 60; younger ones may belong to a write in progress)",
    )
    verify.set_defaults(func=cmd_verify)

    server = sub.add_parser("server", help=cmd_server.__doc__)
    server.add_argument("--port", type=int, default=4200, help="API and UI port (default 4200)")
    server.add_argument("--gpus", type=int, help="GPU workers and GPU-stage limit (default: all)")
    server.add_argument("--home", type=Path, help="PREFECT_HOME (default: Prefect's own)")
    server.set_defaults(func=cmd_server)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run, and turn bad input into a clear message and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except ValidationError as exc:
        problems = [
            f"  - {'.'.join(map(str, e['loc'])) or 'input'}: {e['msg']}" for e in exc.errors()
        ]
        print("invalid configuration:\n" + "\n".join(problems), file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return code or 0  # a command may return its own exit code (verify: 1 on a failed check)


if __name__ == "__main__":
    sys.exit(main())
