"""A client for any OpenAI-compatible Batch API (overnight, OpenAI, others): build batch files from
prompts and a request template, submit, wait, cancel, and read results joined to their inputs.

It uses only the official `openai` SDK and the standard library (tqdm for the progress bar, when
one is shown), and only the public Files and Batch API, so it imports and runs without overnight's
server dependencies:

    from openai import OpenAI
    from overnight import client as batch

    api = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="sk-...")
    template = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "{prompt}"}]}
    batch.write_batch_file("batch.jsonl", ["What is 2+2?", "Name a colour."], template)
    done = batch.wait(api, batch.submit(api, "batch.jsonl").id, progress=True)
    print(batch.settle(api, done).summary())
    for record in batch.iter_results(api, done):
        print(record.custom_id, record.answer if record.ok else record.error_code)
"""

from overnight.client.answers import ResultRecord
from overnight.client.build import read_prompts, read_records, request_lines, write_batch_file
from overnight.client.errors import BatchInputError, ClientError, NotFinished, TemplateError, WaitTimeout
from overnight.client.operations import cancel, list_batches, submit, wait
from overnight.client.outcome import Outcome, outcome_of, settle
from overnight.client.results import Downloaded, download, iter_results
from overnight.client.template import RequestTemplate

__all__ = [
    "BatchInputError",
    "ClientError",
    "Downloaded",
    "NotFinished",
    "Outcome",
    "RequestTemplate",
    "ResultRecord",
    "TemplateError",
    "WaitTimeout",
    "cancel",
    "download",
    "iter_results",
    "list_batches",
    "outcome_of",
    "read_prompts",
    "read_records",
    "request_lines",
    "settle",
    "submit",
    "wait",
    "write_batch_file",
]
