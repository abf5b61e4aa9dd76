"""The `unlearning-audit` command line.

Flows are imported inside the commands that run them, so importing this package never imports
Prefect. Run locally (no Prefect server configured), a command that runs a flow starts a
temporary local Prefect API that cannot outlive it (local_prefect.LocalAPI); a killed run's
temporary folders are removed by the next start (scratch.clean_stale).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from . import audit_index, report_links
from .config import (
    DEFAULT_METHODS,
    METHODS,
    AuditParams,
    DataConfig,
    Metric,
    Precision,
    RelearnConfig,
    StudyParams,
    TofuSplit,
    UnlearnConfig,
)
from .interrupts import start_cli
from .local_prefect import LocalAPI, server_configured
from .report import (
    STUDY_HTML,
    STUDY_KEYS_EXTRA,
    STUDY_MD,
    STUDY_TABLE,
    SUMMARY_KEYS,
    summary_cells,
)
from .runtime import PREFECT_ENV
from .store import (
    ArtifactRef,
    CorruptArtifact,
    Store,
    StoreUnavailable,
    check_key,
    check_url,
    default_store_url,
    endpoint_url,
    redact,
)

DEBUG_ENV = "UNLEARNING_AUDIT_DEBUG"


def _prefect_env(*preload: str) -> LocalAPI:
    """Prefect's environment defaults, set now; and, to run a flow in, a context manager that
    starts a temporary local Prefect API that cannot outlive this process when no server is
    configured (local_prefect.LocalAPI), importing ``preload`` (the flow's module) meanwhile."""
    for key, value in PREFECT_ENV.items():
        os.environ.setdefault(key, value)
    return LocalAPI(preload)


def format_table(rows: list[dict]) -> str:
    """The summary table: one line per unlearning run (with its domain in a study), scores in
    the verdict's metric, the advantage over the control with its interval on the look the
    regime rests on, and the regime (report.summary_cells, the regime last)."""
    cells = [summary_cells(r) for r in rows]  # an audit has at least one run
    header = [k for k in cells[0] if k not in ("regime", "headline")] + ["regime"]
    lines = [[c[k] for k in header] for c in cells]
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


def _check_output_file(path: str | None, flag: str) -> None:
    """Refuse an output file that could not be written, before any work is done: its folder
    missing or read-only, or a folder where the file should be. A file that did not exist is
    not left behind."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; give a file name")
    existed = target.exists()
    try:
        with open(target, "a"):
            pass
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot be written: {exc.strerror or exc}") from exc
    if not existed:
        target.unlink()


def _run_audit(params: AuditParams, json_path: str | None) -> None:
    from .preflight import preflight, warnings

    for line in warnings(params):  # before preflight, so they show even when it refuses
        print(f"warning: {line}", file=sys.stderr)
    _check_output_file(json_path, "--json")
    url = preflight(params)  # fail fast, before Prefect starts

    def run() -> dict:
        from flows.audit import audit_checkpoint

        return audit_checkpoint(params)

    result = _indexed(Store(url), lambda: audit_index.identity(params), "flows.audit", run)
    _finish(result, json_path)


def _indexed(
    store: Store, identity: Callable[[], dict], flow: str, run: Callable[[], dict], files=()
) -> dict:
    """The result of ``run`` (a flow of module ``flow``), or, where the store's index holds a
    report of the same ``identity``, that report's rows and locations without starting Prefect
    (``files``: its table, Markdown and HTML file names, an audit's by default). A run through
    a configured server always goes through it, to be recorded there."""
    api = _prefect_env(flow)
    key = None if server_configured() else identity()
    report = audit_index.find(store, key) if key else None
    if report is not None:
        print(f"every input is unchanged: the stored report {report.key} (Prefect not started)")
        return {**report_links.published(store, report, *files), "report_ref": report.model_dump()}
    with api:
        result = run()
    if key is not None:
        audit_index.record(store, key, ArtifactRef.model_validate(result["report_ref"]))
    return result


def cmd_demo(args: argparse.Namespace) -> None:
    """The embedded default audit, end to end."""
    _run_audit(AuditParams(store=args.store, name="demo"), args.json)


def _read_config(path: str | None) -> dict[str, Any]:
    """The --config file's parameters (none without one); a missing or malformed file is a
    ValueError, so the CLI reports it like any other bad input."""
    if path is None:
        return {}
    try:
        config = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"--config {path}: cannot be read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"--config {path}: not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"--config {path}: not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"--config {path}: must hold a JSON object of parameters")
    return config


AUDIT_FLAGS = (
    "original",
    "unlearned",
    "control",
    "no_control",
    "store",
    "device",
    "precision",
    "name",
    "fisher",
    "probes",
    "splice",
    "splice_depths",
    "quantization_bits",
    "quantize_embeddings",
    "allow_pickle",
    "trust_remote_code",
    "gradient_checkpointing",
    "gpus",
    "keep_relearned",
    "fisher_layers",
    "fisher_batch_size",
    "fisher_model_samples",
)
"""The audit flags that set an AuditParams field of their own name."""
SECTION_FLAGS = {
    "data": {
        "forget": "forget",
        "retain": "retain",
        "unrelated": "unrelated",
        "tofu": "tofu",
        "tofu_split": "tofu_split",
        "question_column": "question_column",
        "answer_column": "answer_column",
        "group": "group",
        "prompt_format": "prompt_format",
        "separator": "separator",
        "max_rows": "eval_max_rows",
    },
    "relearn": {"relearn_lr": "lr", "budget": "budget", "seeds": "seeds", "lora": "lora_rank"},
    "thresholds": {"score": "metric"},
}
"""The audit flags that set a field of a nested config: section -> {flag's dest: field}."""
EVERY_METHOD_FLAGS = {"lora": "lora_rank", "requests": "requests", "request_split": "request_split"}
"""The audit flags that set a field of every unlearning method: {flag's dest: field}."""


def _given(args: argparse.Namespace, flags: dict[str, str]) -> dict[str, Any]:
    """The flags given on the command line (unset ones are None), keyed by the field each sets."""
    values = {field: getattr(args, dest) for dest, field in flags.items()}
    return {field: value for field, value in values.items() if value is not None}


def _merge(section: Any, given: dict[str, Any]) -> Any:
    """A nested config section with the flags' values over the config file's, key by key; a
    section that is not an object is left as it is, for validation to report."""
    return {**section, **given} if isinstance(section, dict) else section


def _methods(args: argparse.Namespace, base: dict[str, Any], unlearned: str | None) -> Any:
    """The unlearning runs: the config file's methods, each --method (times each --lr) appended
    with --steps and the rate given or None (auto); --steps alone sets every config method's.
    None where neither the file nor the flags give methods (AuditParams' default then).

    Refuses method flags that would be ignored: with an unlearned checkpoint, --lr without
    --method, and --steps with no method to set.
    """
    configured = base.get("methods")
    if not (args.method or args.lr or args.steps is not None):
        return configured
    if unlearned is not None:
        raise ValueError(
            "an unlearned checkpoint is given (--unlearned), so no unlearning method runs: "
            "--method, --lr and --steps would be ignored; drop them, or drop --unlearned to "
            "unlearn the original with the methods"
        )
    if args.lr and not args.method:
        raise ValueError("--lr sets the learning rates of the --method runs: give --method too")
    steps = {} if args.steps is None else {"steps": args.steps}
    if not args.method:
        if configured is None:
            raise ValueError(
                "--steps without --method sets the steps of the methods in --config, and it "
                "gives none: give the methods to run with --method"
            )
        return [{**m, **steps} if isinstance(m, dict) else m for m in configured]
    added = [{"method": m, "lr": lr, **steps} for m in args.method for lr in args.lr or [None]]
    return [*(configured or []), *added]


def audit_params(args: argparse.Namespace) -> AuditParams:
    """The audit the `audit` command's flags describe: the --config file's parameters, each
    flag given overriding its field (data, relearn and thresholds merged key by key), and the
    --method runs added to the file's methods. Only the --config file is read: whether
    checkpoints and data exist is preflight's to check.
    """
    base = _read_config(args.config)
    params = base | _given(args, {name: name for name in AUDIT_FLAGS})
    for section, flags in SECTION_FLAGS.items():
        given = _given(args, flags)
        if given:
            params[section] = _merge(base.get(section, {}), given)
    methods = _methods(args, base, params.get("unlearned"))
    every = _given(args, EVERY_METHOD_FLAGS)
    if params.get("unlearned") is not None and every.keys() - {"lora_rank"}:
        raise ValueError(
            "an unlearned checkpoint is given (--unlearned), so no unlearning method runs: "
            "--requests and --request-split would be ignored; drop them"
        )
    if every and params.get("unlearned") is None:
        methods = [
            {**m, **every} if isinstance(m, dict) else m
            for m in (methods or [m.model_dump() for m in DEFAULT_METHODS])
        ]
    if methods is not None:
        params["methods"] = methods
    return AuditParams.model_validate(params)


def cmd_audit(args: argparse.Namespace) -> None:
    """Audit a checkpoint: run methods on it, or judge an already-unlearned one."""
    params = audit_params(args)
    if args.plan:
        _print_plan(params)
        return
    _run_audit(params, args.json)


def _print_plan(params: AuditParams) -> None:
    """Print the audit's memory and store estimate (plan.py): the original's config.json and
    the data (for the rows' length) are read, no model is loaded and nothing runs."""
    from . import data, plan

    sets = data.external_sets(params.data) if params.data.external else None
    print(plan.plan_audit(params, sets).table())


def cmd_study(args: argparse.Namespace) -> None:
    """The paper's grid on the embedded model: methods x domains x settings x repeated
    requests, relearned from every source; --findings writes the findings page."""
    base = StudyParams.quick().model_dump() if args.quick else {}
    base |= _read_config(args.config)
    flags = {
        "store": args.store,
        "domains": args.domain,
        "methods": args.method,
        "requests": args.requests,
        "confirm_seeds": args.confirm_seeds,
    }
    base |= {key: value for key, value in flags.items() if value is not None}
    if args.source:
        base["relearn"] = {**base.get("relearn", {}), "sources": args.source}
    params = StudyParams.model_validate(base)
    _check_output_file(args.json, "--json")
    _check_output_file(args.findings, "--findings")
    from .preflight import preflight

    url = preflight(params.audit(params.domains[0]))

    def run() -> dict:
        from flows.study import study

        return study(params)

    files = (STUDY_TABLE, STUDY_MD, STUDY_HTML)
    identity = lambda: audit_index.study_identity(params)  # noqa: E731
    result = _indexed(Store(url), identity, "flows.study", run, files)
    _finish(result, args.json, SUMMARY_KEYS + STUDY_KEYS_EXTRA)
    if args.findings:
        from .findings import study_page

        command = shlex.join(["unlearning-audit", *sys.argv[1:]])
        page = study_page(result["rows"], params, command, result["report_ref"]["key"])
        Path(args.findings).write_text(page)
        print(f"findings written to {args.findings}")


RESULT_BLOCK = "unlearning-audit-results"


def cmd_setup(args: argparse.Namespace) -> None:
    """Check a store and save Prefect result storage on it as a block (docs/storage.md)."""
    store = Store(args.store)
    store.check_writable()
    api = _prefect_env()  # before Prefect is imported: its settings read the environment
    basepath = f"{store.url.rstrip('/')}/prefect-results"
    if store.local:
        from prefect.filesystems import LocalFileSystem

        block = LocalFileSystem(basepath=basepath)
    else:  # the endpoint only: credentials stay in the workers' environment, never in a block
        from prefect.filesystems import RemoteFileSystem

        endpoint = endpoint_url()
        if endpoint:
            check_url(endpoint, "the S3 endpoint ($AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL)")
        block = RemoteFileSystem(
            basepath=basepath, settings={"endpoint_url": endpoint} if endpoint else {}
        )
    with api:
        block.save(args.block, overwrite=True)
    slug = f"{block.get_block_type_slug()}/{args.block}"
    print(f"store {store.url} is writable; Prefect result storage saved as block {slug}")
    print("persist every flow's results there with:")
    print(
        f"  prefect config set PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK={slug} "
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT=true"
    )


def _readable_store(url: str | None) -> Store:
    """The store at ``url`` (default: the environment's), refused unless it exists and lists:
    a mistyped path must not read as an empty store that verifies."""
    store = Store(url)
    store.check_readable()
    return store


def _columns(header: list[str], lines: list[list[str]]) -> str:
    """A plain text table, columns padded to their widest cell."""
    widths = [max(len(x) for x in col) for col in zip(header, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    rows = [header, ["-" * w for w in widths], *lines]
    return "\n".join(fmt.format(*row).rstrip() for row in rows)


def cmd_ls(args: argparse.Namespace) -> None:
    """List the audits (their reports) and the artifacts in a store."""
    store = _readable_store(args.store)
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
    key = check_key(args.key)
    store = _readable_store(args.store)
    manifest = store.manifest(key)
    if manifest is None:
        raise ValueError(f"no artifact {key!r} in {store.url}")
    print(json.dumps(manifest, indent=1))
    ref = ArtifactRef(key=key, hash=manifest["hash"])
    for name in sorted(n for n in manifest["files"] if n.endswith(".md")):
        print(f"\n--- {name}\n{store.read_bytes(ref, name).decode()}")


def cmd_report(args: argparse.Namespace) -> None:
    """Rebuild an audit's report.md and report.html from the store alone (no model is loaded)."""
    from .report import REPORT_HTML, rebuild

    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out}: is a file; give the folder to write the report into")
    key = check_key(args.key)
    paths = rebuild(_readable_store(args.store), key, args.out)
    for path in paths.values():
        print(f"wrote {path.resolve()}")
    if args.open:
        import webbrowser

        webbrowser.open(paths[REPORT_HTML].resolve().as_uri())


def cmd_verify(args: argparse.Namespace) -> int:
    """Check every artifact's files against its manifest's hashes; --repair removes what fails.

    Exit code 1 when something does not verify and was not repaired, so a scheduled check fails.
    """
    store = _readable_store(args.store)
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

    if args.store:
        Store(args.store).check_readable()  # a mistyped store would serve nothing
    stack = LocalStack(
        port=args.port,
        gpus=args.gpus,
        gpus_per_worker=args.gpus_per_worker,
        home=args.home,
        store=args.store,
        reports_port=args.reports_port,
        notify_url=args.notify_url,
        audit_limit=args.audit_limit,
    )
    serve(stack)


def _unescape(text: str) -> str:
    """A flag's text with \\n, \\t and \\\\ read as a newline, a tab and a backslash: a shell
    passes them literally, and a prompt format needs real newlines."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m[1]], text)


def _default(model: type[BaseModel], field: str) -> Any:
    """A config field's default, for help texts that stay true to the config."""
    return model.model_fields[field].get_default(call_default_factory=True)


AUDIT_DESCRIPTION = """\
Audit an LLM's unlearning: (a) run unlearning methods on an original checkpoint (--method), or
(b) judge an already-unlearned checkpoint against its original (--unlearned); then attack each
unlearned model (relearning, probes, quantization) and give a verdict. --config reads a JSON
file of audit parameters (AuditParams); each flag given overrides its value there and leaves the
rest in place, and --method runs are added to the file's methods. Warnings (no control, no
groups) are printed first; every problem with the inputs is reported at once, exit code 2,
before any model is loaded."""


def _add_audit_parser(sub: argparse._SubParsersAction) -> None:
    """The `audit` subcommand's flags, grouped as its help shows them."""
    audit = _command(sub, "audit", help=cmd_audit.__doc__, description=AUDIT_DESCRIPTION)
    ckpt = audit.add_argument_group("checkpoints (embedded, a local folder, s3:// or id@revision)")
    ckpt.add_argument("--original", required=True, metavar="CKPT", help="the original model")
    ckpt.add_argument(
        "--unlearned", metavar="CKPT", help="mode (b): audit this unlearned checkpoint"
    )
    ckpt.add_argument(
        "--control",
        metavar="CKPT",
        help="a never-learned control: the original's training without the forget facts "
        "(built for the embedded original)",
    )
    ckpt.add_argument(
        "--no-control",
        action="store_const",
        const=True,
        help="skip the control: only the held-out half is judged",
    )

    facts = audit.add_argument_group("facts (an original other than embedded needs them)")
    for name in ("forget", "retain", "unrelated"):
        facts.add_argument(
            f"--{name}",
            metavar="DATA",
            help=f"{name} set: a JSON/JSONL/Parquet file or a datasets source "
            "name[:config][@revision]#split",
        )
    facts.add_argument(
        "--tofu",
        metavar="DIR_OR_HUB",
        help="TOFU preset instead of --forget/--retain: a folder of TOFU's files or "
        "locuslab/TOFU@<revision>; groups rows by author",
    )
    facts.add_argument(
        "--tofu-split",
        metavar="{" + ",".join(get_args(TofuSplit)) + "}",
        help=f"TOFU's forget split (default {_default(DataConfig, 'tofu_split')})",
    )
    facts.add_argument(
        "--question-column", metavar="COLUMN", help="the questions' column (default question)"
    )
    facts.add_argument(
        "--answer-column", metavar="COLUMN", help="the answers' column (default answer)"
    )
    facts.add_argument(
        "--group",
        metavar="COLUMN|position:N",
        help="the column grouping facts (an author), or every N consecutive rows; without "
        "groups the held-out half is unavailable",
    )
    facts.add_argument(
        "--prompt-format",
        metavar="FMT",
        type=_unescape,
        help="auto (default: chat where the tokenizer has a chat template, else "
        "'Q: {question}\\nA: {answer}'), chat, raw, or a template with {question} and "
        "{answer}; \\n and \\t stand for a newline and a tab",
    )
    facts.add_argument(
        "--separator",
        metavar="S",
        type=_unescape,
        help="between question and answer in the raw format (default \\n)",
    )
    facts.add_argument(
        "--max-rows",
        type=int,
        metavar="N",
        help=f"evaluate at most N rows per set (default {_default(DataConfig, 'eval_max_rows')})",
    )

    unlearn = audit.add_argument_group("unlearning, mode (a); refused with --unlearned")
    unlearn.add_argument(
        "--method",
        action="append",
        metavar="M",
        help="an unlearning method to run, added to --config's methods (repeatable): "
        + ", ".join(METHODS),
    )
    unlearn.add_argument(
        "--lr",
        action="append",
        type=float,
        help="learning rate of the --method runs (repeatable: each method runs at each); "
        "default auto: 1e-3 on the embedded model, else scaled to the model's size",
    )
    unlearn.add_argument(
        "--steps",
        type=int,
        metavar="N",
        help=f"optimiser steps of the --method runs (default "
        f"{_default(UnlearnConfig, 'steps')}); without --method, of every --config method",
    )

    unlearn.add_argument(
        "--requests",
        type=int,
        metavar="K",
        help="unlearn in K successive requests, each from the model the previous one left, "
        "each up to --steps steps (every method; default 1)",
    )
    unlearn.add_argument(
        "--request-split",
        choices=get_args(UnlearnConfig.model_fields["request_split"].annotation),
        help="what each request unlearns: disjoint, one of K parts of the forget set "
        "(default); repeat, the whole forget set every time",
    )

    verdict = audit.add_argument_group("relearning attack and verdict")
    verdict.add_argument(
        "--relearn-lr",
        type=float,
        metavar="LR",
        help="relearning learning rate (default auto, as --lr)",
    )
    verdict.add_argument(
        "--budget",
        type=float,
        metavar="X",
        help="relearning examples as a multiple of the forget set's size "
        f"(default {_default(RelearnConfig, 'budget')})",
    )
    verdict.add_argument(
        "--seeds",
        type=int,
        metavar="N",
        help=f"relearning runs per source (default {_default(RelearnConfig, 'seeds')})",
    )
    verdict.add_argument(
        "--score",
        metavar="{" + ",".join(get_args(Metric)) + "}",
        help="the per-fact score the verdict tests (default auto: exact_match for short "
        "answers, else token_accuracy)",
    )

    attacks = audit.add_argument_group("other analyses and recovery attacks")
    attacks.add_argument(
        "--no-fisher",
        dest="fisher",
        action="store_const",
        const=False,
        help="skip the diagonal Fisher",
    )
    attacks.add_argument(
        "--no-probes",
        dest="probes",
        action="store_const",
        const=False,
        help="skip the linear probes",
    )
    attacks.add_argument(
        "--no-splice",
        dest="splice",
        action="store_const",
        const=False,
        help="skip the causal layer test (splicing top blocks between the two models)",
    )
    bits = attacks.add_mutually_exclusive_group()
    bits.add_argument(
        "--quantization",
        dest="quantization_bits",
        nargs="+",
        type=int,
        metavar="BITS",
        help="quantize the unlearned model, and as references the original and the control, "
        "to these bit widths (default "
        + " ".join(map(str, _default(AuditParams, "quantization_bits")))
        + ")",
    )
    bits.add_argument(
        "--no-quantization",
        dest="quantization_bits",
        action="store_const",
        const=[],
        help="skip the quantization attack",
    )
    attacks.add_argument(
        "--quantize-embeddings",
        action="store_const",
        const=True,
        help="quantize the embeddings and the LM head too",
    )

    scale = audit.add_argument_group("large models (README, 'Large models')")
    scale.add_argument(
        "--lora",
        type=int,
        metavar="RANK",
        help="train LoRA adapters of this rank in every unlearning and relearning run",
    )
    checkpointing = scale.add_mutually_exclusive_group()
    checkpointing.add_argument(
        "--gradient-checkpointing",
        action="store_const",
        const=True,
        help="recompute activations in the backward pass (less memory, more compute) in every "
        "training stage (default: auto, where a stage's peak without it passes 90%% of its device "
        "and checkpointing lowers it)",
    )
    checkpointing.add_argument(
        "--no-gradient-checkpointing",
        dest="gradient_checkpointing",
        action="store_const",
        const=False,
        help="never recompute activations, even where a stage would not fit without it",
    )
    scale.add_argument("--gpus", type=int, metavar="N", help="GPUs each stage uses (default 1)")
    scale.add_argument(
        "--fisher-layers",
        type=int,
        nargs="+",
        metavar="L",
        help="compute the Fisher of these layers only (0: embeddings, i: block i, L+1: final "
        "norm and head; default all)",
    )
    scale.add_argument(
        "--splice-depths",
        type=int,
        nargs="+",
        metavar="K",
        help="splice only these depths (top blocks; default every depth 1..L)",
    )
    scale.add_argument(
        "--fisher-batch-size",
        type=int,
        metavar="N",
        help="the most samples per per-sample-gradient pass of the Fisher; fewer where the "
        f"device's memory needs (default {_default(AuditParams, 'fisher_batch_size')})",
    )
    scale.add_argument(
        "--fisher-model-samples",
        type=int,
        metavar="N",
        help="label draws per row for the model's Fisher, beside the empirical one (0: off; "
        f"default {_default(AuditParams, 'fisher_model_samples')})",
    )
    scale.add_argument(
        "--keep-relearned",
        action="store_const",
        const=True,
        help="store the relearned checkpoints too (default: only what the report reads)",
    )

    run = audit.add_argument_group("run")
    run.add_argument("--config", metavar="FILE", help="JSON file of audit parameters")
    run.add_argument("--store", help="artifact store URL (default ./audit-store)")
    run.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    run.add_argument(
        "--precision",
        metavar="{" + ",".join(get_args(Precision)) + "}",
        help="how unlearning and relearning train: fp32, bf16-mixed (fp32 master weights, bf16 "
        "autocast), bf16 (pure, lossy); default auto: bf16-mixed on a GPU with bf16, else fp32",
    )
    run.add_argument("--name", help="a label for the audit")
    run.add_argument(
        "--allow-pickle", action="store_const", const=True, help="allow pickle weights (unsafe)"
    )
    run.add_argument(
        "--trust-remote-code",
        action="store_const",
        const=True,
        help="allow model code shipped with the checkpoint (unsafe)",
    )
    run.add_argument("--json", metavar="FILE", help="write the table's rows as JSON")
    run.add_argument(
        "--plan",
        action="store_true",
        help="print each stage's estimated peak memory per device and the store's footprint, "
        "then exit without running anything",
    )
    audit.set_defaults(func=cmd_audit)


def _command(sub: argparse._SubParsersAction, name: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand's parser; flags are never abbreviated (--seed must not mean --seeds)."""
    return sub.add_parser(name, allow_abbrev=False, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="unlearning-audit", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show the traceback of an internal error (or set {DEBUG_ENV}=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = _command(sub, "demo", help=cmd_demo.__doc__)
    demo.add_argument("--store", help="artifact store URL (default ./audit-store)")
    demo.add_argument("--json", metavar="FILE", help="write the table's rows as JSON")
    demo.set_defaults(func=cmd_demo)

    _add_audit_parser(sub)

    study = _command(sub, "study", help=cmd_study.__doc__)
    study.add_argument("--domain", action="append", choices=["text", "code", "math"])
    study.add_argument("--method", action="append", help="unlearning method (repeatable)")
    study.add_argument("--config", metavar="FILE", help="JSON file of study parameters")
    study.add_argument("--store", help="artifact store URL (default ./audit-store)")
    study.add_argument("--json", metavar="FILE", help="write the table's rows as JSON")
    study.add_argument(
        "--quick", action="store_true", help="a small grid with every axis (StudyParams.quick)"
    )
    study.add_argument(
        "--requests", type=int, action="append", metavar="K", help="request count (repeatable)"
    )
    study.add_argument(
        "--source",
        action="append",
        choices=["forget", "forget-half", "retain", "unrelated"],
        help="relearning source (repeatable; must include forget)",
    )
    study.add_argument(
        "--confirm-seeds", type=int, metavar="N", help="seeds to recheck irreversible runs with"
    )
    study.add_argument("--findings", metavar="FILE", help="write the findings page (Markdown)")
    study.set_defaults(func=cmd_study)

    setup = _command(sub, "setup", help=cmd_setup.__doc__)
    setup.add_argument("--store", help="artifact store URL (default ./audit-store)")
    setup.add_argument("--block", default=RESULT_BLOCK, help=f"block name (default {RESULT_BLOCK})")
    setup.set_defaults(func=cmd_setup)

    ls = _command(sub, "ls", help=cmd_ls.__doc__)
    ls.add_argument("--store", help="artifact store URL (default ./audit-store)")
    ls.add_argument("--stage", help="only this stage's artifacts (report: the audits)")
    ls.set_defaults(func=cmd_ls)

    show = _command(sub, "show", help=cmd_show.__doc__)
    show.add_argument("key", metavar="KEY", help="an artifact key, e.g. report/3f2a...")
    show.add_argument("--store", help="artifact store URL (default ./audit-store)")
    show.set_defaults(func=cmd_show)

    report = _command(sub, "report", help=cmd_report.__doc__)
    report.add_argument("key", metavar="AUDIT_KEY", help="report/<digest>, or a digest prefix")
    report.add_argument("--store", help="artifact store URL (default ./audit-store)")
    report.add_argument("--out", type=Path, help="output folder (default ./reports/<digest>)")
    report.add_argument("--open", action="store_true", help="open the HTML report in a browser")
    report.set_defaults(func=cmd_report)

    verify = _command(sub, "verify", help=cmd_verify.__doc__.splitlines()[0])
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

    server = _command(sub, "server", help=cmd_server.__doc__)
    server.add_argument("--port", type=int, default=4200, help="API and UI port (default 4200)")
    server.add_argument("--gpus", type=int, help="GPUs the workers use (default: all)")
    server.add_argument(
        "--gpus-per-worker",
        type=int,
        default=1,
        metavar="K",
        help="GPUs each gpu worker holds, for stages that shard across K GPUs (audit --gpus K); "
        "default 1",
    )
    server.add_argument("--home", type=Path, help="PREFECT_HOME (default: Prefect's own)")
    server.add_argument(
        "--store",
        help="the store whose reports are served over HTTP (default: the default store)",
    )
    server.add_argument(
        "--reports-port",
        type=int,
        default=4201,
        help="port of the read-only report server (default 4201; 0: any free port)",
    )
    server.add_argument(
        "--notify-url",
        help="webhook a failed audit is notified to (JSON {'text': ...}: Slack and most chat "
        "tools); default: printed here and logged",
    )
    server.add_argument(
        "--audit-limit",
        type=int,
        help="audits that run at once (default: the gpu pool's limit), set when the audit "
        "deployment is first registered",
    )
    server.set_defaults(func=cmd_server)
    for command in sub.choices.values():  # --debug after the command too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    return parser


def _store_of(args: argparse.Namespace) -> str | None:
    """The store a command works on (its --store, else the default), None for one without."""
    if "store" not in args:
        return None
    return args.store or default_store_url()


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse and run. Bad input (a ValueError or an invalid configuration), an
    unreachable or damaged store and a file that cannot be written end as one ``error:``
    message naming the problem, exit code 2; anything else is an internal error, one line and
    exit code 1. Under --debug (or $UNLEARNING_AUDIT_DEBUG set, to anything but 0 or false) an
    internal error prints its traceback instead, and an OSError its traceback too. Every message
    and traceback is printed through store.redact.
    """
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false")
    try:
        if argv is None:  # run as the program: SIGINT/SIGTERM exit 130/143; stale folders go
            start_cli(_store_of(args))
        code = args.func(args)
    except ValidationError as exc:
        problems = [
            f"  - {'.'.join(map(str, e['loc'])) or 'input'}: {e['msg']}" for e in exc.errors()
        ]
        _complain("invalid configuration:\n" + "\n".join(problems))
        return 2
    except (ValueError, StoreUnavailable, CorruptArtifact) as exc:
        _complain(f"error: {exc}")
        return 2
    except OSError as exc:
        if debug:
            _complain(traceback.format_exc())
        where = f": {exc.filename}" if exc.filename else ""
        _complain(f"error: {exc.strerror or exc}{where}")
        return 2
    except KeyboardInterrupt:
        _complain("interrupted")
        return 130
    except Exception as exc:
        if debug:
            _complain(traceback.format_exc())
        else:
            _complain(
                f"internal error: {type(exc).__name__}: {exc}\n"
                "(rerun with --debug for the traceback, and please report it)"
            )
        return 1
    return code or 0  # a command may return its own exit code (verify: 1 on a failed check)


def _complain(message: str) -> None:
    """Print a message (or a traceback) to stderr with its credentials masked (store.redact)."""
    print(redact(message), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
