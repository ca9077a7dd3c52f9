"""receiver.core.errors: one hierarchy, every error under `ReceiverError`, each code stable,
unique and documented in /openapi.json."""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Iterator

import orjson

import receiver
from receiver.core.errors import ReceiverError
from receiver.web.openapi import SCHEMA


def _subclasses(cls: type[ReceiverError]) -> Iterator[type[ReceiverError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _every_error() -> list[type[ReceiverError]]:
    for module in pkgutil.walk_packages(receiver.__path__, "receiver."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    return list(_subclasses(ReceiverError))


def test_every_error_answers_with_a_unique_documented_code() -> None:
    errors = _every_error()
    leaves = [e for e in errors if not e.__subclasses__()]
    assert len(leaves) > 30
    codes = [e.code for e in leaves]
    assert len(set(codes)) == len(codes), sorted(codes)
    document = orjson.dumps(SCHEMA).decode()
    for error in errors:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", error.code), error
        assert 400 <= error.status_code <= 599, error
    undocumented = sorted(e.code for e in leaves if e.code not in document)
    assert not undocumented, undocumented
