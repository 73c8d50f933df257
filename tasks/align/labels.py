"""One natural-language description per label, for zero-shot classification with the text tower.

The default labels are the top-level standard-library packages of the classification task (the clean labeled set's
`label`); a label without a description here (your own labels) gets `GENERIC`, which names the label itself.
"""

from __future__ import annotations

DESCRIPTIONS = {
    "asyncio": "asynchronous I/O with coroutines, an event loop, tasks, futures, streams and subprocesses",
    "email": "parsing, building and encoding email messages, their headers and MIME parts",
    "http": "HTTP clients and servers, requests, responses, status codes and cookies",
    "idlelib": "the IDLE editor and shell: windows, menus, syntax colouring, the debugger and configuration dialogs",
    "importlib": "importing modules: finders, loaders, module specs, package resources and metadata",
    "multiprocessing": "running work in separate processes: process pools, queues, pipes, locks and shared memory",
    "tkinter": "Tk graphical user interfaces: widgets, canvases, fonts, dialogs and event bindings",
    "unittest": "writing and running unit tests: test cases, assertions, suites, runners and mocks",
    "urllib": "opening and parsing URLs: requests, quoting, query strings and robots.txt",
    "xml": "parsing and building XML documents with DOM, SAX and ElementTree",
}
"""Descriptions of the default labels (the standard-library packages of the classification task)."""
GENERIC = "code from the {label} package"
"""The description of a label that DESCRIPTIONS lacks."""


def description(label: str) -> str:
    """The sentence that stands for `label` in zero-shot classification."""
    return DESCRIPTIONS.get(label, GENERIC.format(label=label))
