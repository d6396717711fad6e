"""`overnight batch ...`: build, submit, watch, cancel and download batches on any OpenAI-compatible
Batch API. The SDK reads OPENAI_BASE_URL and OPENAI_API_KEY when --base-url / --api-key are not given.

Data a script wants goes to stdout (a new batch's id, `ls`, `status`); progress bars and summaries
go to stderr. Exit codes (outcome.py): 0 every line succeeded, 1 some lines failed, 2 usage error,
3 the batch failed, expired or was cancelled, 4 API error, 5 the batch has not finished."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import openai
from openai import OpenAI
from openai.types import Batch

from overnight.client.build import read_prompts, read_records, write_batch_file
from overnight.client.errors import BatchInputError, NotFinished, TemplateError, WaitTimeout
from overnight.client.operations import DEFAULT_WINDOW, MAX_POLL_SECONDS, cancel, list_batches, submit, wait
from overnight.client.outcome import (
    EXIT_API_ERROR,
    EXIT_NOT_FINISHED,
    EXIT_OK,
    EXIT_USAGE,
    TERMINAL,
    settle,
)
from overnight.client.results import download
from overnight.client.template import RequestTemplate

EPILOG = """exit codes: 0 every line succeeded; 1 the batch completed but some lines failed; 2 usage
error; 3 the batch failed, expired or was cancelled; 4 the API refused a call or was unreachable;
5 the batch has not finished (wait --timeout ran out, or download of a running batch)."""


def _parser() -> argparse.ArgumentParser:
    connection = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's flag overrides the group's only when given.
    connection.add_argument("--base-url", default=argparse.SUPPRESS,
                            help="the API's base URL, e.g. http://127.0.0.1:8000/v1 (default: OPENAI_BASE_URL)")
    connection.add_argument("--api-key", default=argparse.SUPPRESS, help="the API key (default: OPENAI_API_KEY)")
    parser = argparse.ArgumentParser(
        prog="overnight batch", parents=[connection], epilog=EPILOG,
        description="Build, submit, watch, cancel and download batches on any OpenAI-compatible Batch API.",
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="COMMAND")

    build = sub.add_parser("build", parents=[connection], help="write a batch file from prompts and a template")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", type=Path, help="a text file, one prompt per line (empty lines skipped)")
    source.add_argument("--records", type=Path, help="a JSON Lines file of objects; their keys fill the placeholders")
    build.add_argument("--template", type=Path, required=True,
                       help='the request body as JSON, with placeholders: {"model": "gpt-4o-mini", '
                       '"messages": [{"role": "user", "content": "{prompt}"}]}')
    build.add_argument("--endpoint", default=None,
                       help="default: /v1/chat/completions for 'messages', /v1/completions for 'prompt'")
    build.add_argument("--id-field", default="custom_id", help="the record key that holds its custom_id")
    build.add_argument("--id-prefix", default="request-", help="generated custom_ids are PREFIX1, PREFIX2, ...")
    build.add_argument("-o", "--output", type=Path, required=True, help="the batch file to write")

    sub_ = sub.add_parser("submit", parents=[connection], help="upload a batch file and create a batch; prints its id")
    sub_.add_argument("file", type=Path)
    sub_.add_argument("--endpoint", default=None, help="default: the url of the file's first line")
    sub_.add_argument("--window", default=DEFAULT_WINDOW, help="the completion window (default 24h)")
    sub_.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    sub_.add_argument("--wait", action="store_true", help="wait for the batch to finish and summarize it")
    _wait_flags(sub_)

    status = sub.add_parser("status", parents=[connection], help="show a batch's state and counts")
    status.add_argument("batch_id")
    status.add_argument("--json", action="store_true", help="print the batch object as JSON")

    wait_ = sub.add_parser("wait", parents=[connection], help="wait for a batch to finish and summarize it")
    wait_.add_argument("batch_id")
    _wait_flags(wait_)

    ls = sub.add_parser("ls", parents=[connection], help="list batches, newest first")
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("--json", action="store_true", help="one batch object per line, as JSON")

    cancel_ = sub.add_parser("cancel", parents=[connection], help="cancel a batch")
    cancel_.add_argument("batch_id")
    cancel_.add_argument("--wait", action="store_true", help="wait until the batch has stopped")
    _wait_flags(cancel_, output=False)

    get = sub.add_parser("download", parents=[connection],
                         help="write output.jsonl, errors.jsonl and the joined results.jsonl and results.csv")
    get.add_argument("batch_id")
    get.add_argument("-o", "--output-dir", type=Path, required=True)
    get.add_argument("--input", type=Path, default=None,
                     help="the batch file, when the server does not give its input file back")
    return parser


def _wait_flags(parser: argparse.ArgumentParser, output: bool = True) -> None:
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="give up waiting (exit 5)")
    parser.add_argument("--poll-seconds", type=float, default=MAX_POLL_SECONDS, help=argparse.SUPPRESS)
    if output:
        parser.add_argument("-o", "--output-dir", type=Path, default=None,
                            help="once finished, download the results here (as `download` does)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `overnight batch` command and return its exit code."""
    args = _parser().parse_args(argv)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "build": _build, "submit": _submit, "status": _status, "wait": _wait, "ls": _ls,
        "cancel": _cancel, "download": _download,
    }
    try:
        return commands[args.action](args)
    except (TemplateError, BatchInputError) as exc:
        return _fail(EXIT_USAGE, str(exc))
    except (WaitTimeout, NotFinished) as exc:
        return _fail(EXIT_NOT_FINISHED, str(exc))
    except openai.APIStatusError as exc:
        return _fail(EXIT_API_ERROR, _api_message(exc))
    except openai.APIConnectionError as exc:
        return _fail(EXIT_API_ERROR, f"cannot reach the API at {exc.request.url}: {exc}")
    except openai.OpenAIError as exc:  # no API key given, and none in the environment
        return _fail(EXIT_USAGE, str(exc))
    except OSError as exc:
        return _fail(EXIT_USAGE, f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))


def _fail(code: int, message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _api_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    detail = body.get("message") if isinstance(body, dict) else None
    return f"the API answered {exc.status_code}: {detail or exc.message}"


def _client(args: argparse.Namespace) -> OpenAI:
    return OpenAI(base_url=getattr(args, "base_url", None), api_key=getattr(args, "api_key", None))


def _build(args: argparse.Namespace) -> int:
    try:
        template = json.loads(args.template.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise TemplateError(f"{args.template}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    compiled = RequestTemplate(template)
    items = read_prompts(args.prompts) if args.prompts is not None else read_records(args.records)
    count = write_batch_file(args.output, items, compiled, args.endpoint, id_field=args.id_field,
                             id_prefix=args.id_prefix)
    print(f"wrote {count:,} requests to {args.output}", file=sys.stderr)
    return EXIT_OK


def _submit(args: argparse.Namespace) -> int:
    metadata = dict(_pair(item) for item in args.metadata)
    client = _client(args)
    batch = submit(client, args.file, endpoint=args.endpoint, completion_window=args.window, metadata=metadata)
    print(batch.id, flush=True)
    if not args.wait:
        print(f"submitted {batch.id} ({batch.status})", file=sys.stderr)
        return EXIT_OK
    return _finish(client, args, batch.id)


def _pair(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise BatchInputError(f"--metadata takes KEY=VALUE, not {item!r}")
    return key, value


def _status(args: argparse.Namespace) -> int:
    client = _client(args)
    batch = client.batches.retrieve(args.batch_id)
    if args.json:
        print(batch.model_dump_json())
        return EXIT_OK
    outcome = settle(client, batch)
    print(f"{batch.id}  {batch.endpoint}  created {_when(batch.created_at)}")
    print(outcome.summary())
    return outcome.exit_code if batch.status in TERMINAL else EXIT_OK


def _wait(args: argparse.Namespace) -> int:
    return _finish(_client(args), args, args.batch_id)


def _finish(client: OpenAI, args: argparse.Namespace, batch_id: str) -> int:
    """Wait for the batch, summarize it on stderr, download it if asked; the outcome's exit code."""
    batch = wait(client, batch_id, timeout=args.timeout, poll_seconds=args.poll_seconds)
    outcome = settle(client, batch)
    if getattr(args, "output_dir", None) is not None:
        _write_results(client, batch, args.output_dir, None)
    print(outcome.summary(), file=sys.stderr)
    return outcome.exit_code


def _ls(args: argparse.Namespace) -> int:
    for batch in list_batches(_client(args), args.limit):
        if args.json:
            print(batch.model_dump_json())
            continue
        counts = batch.request_counts
        done = f"{counts.completed:,} ok, {counts.failed:,} failed of {counts.total:,}" if counts else ""
        print(f"{batch.id}  {batch.status:<11}  {_when(batch.created_at)}  {batch.endpoint}  {done}")
    return EXIT_OK


def _cancel(args: argparse.Namespace) -> int:
    client = _client(args)
    batch = cancel(client, args.batch_id)
    if not args.wait:
        print(f"{batch.id}: {batch.status}", file=sys.stderr)
        return EXIT_OK
    batch = wait(client, batch.id, timeout=args.timeout, poll_seconds=args.poll_seconds)
    outcome = settle(client, batch)
    print(outcome.summary(), file=sys.stderr)
    # The cancel was asked for: a batch that stopped is what the caller wanted.
    return EXIT_OK if batch.status == "cancelled" else outcome.exit_code


def _download(args: argparse.Namespace) -> int:
    client = _client(args)
    batch = client.batches.retrieve(args.batch_id)
    if batch.status not in TERMINAL:
        raise NotFinished(f"batch {batch.id} is {batch.status}: its results are not ready (wait for it first)")
    _write_results(client, batch, args.output_dir, args.input)
    outcome = settle(client, batch)
    print(outcome.summary(), file=sys.stderr)
    return outcome.exit_code


def _write_results(client: OpenAI, batch: Batch, directory: Path, input_path: Path | None) -> None:
    done = download(client, batch, directory, input_path=input_path,
                    warn=lambda text: print(f"warning: {text}", file=sys.stderr))
    print(f"wrote {done.output.name}, {done.errors.name}, {done.results_jsonl.name} and "
          f"{done.results_csv.name} to {done.directory}", file=sys.stderr)


def _when(timestamp: int | None) -> str:
    if not timestamp:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
