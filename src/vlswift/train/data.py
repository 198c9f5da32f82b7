"""Datasets for ``vlswift sft`` and ``vlswift infer --val_dataset``: files to samples to batches.

Three passes, each with one job:
1. :func:`load_dataset` reads ``.json``/``.jsonl`` files (four row formats) or a builtin name into
   :class:`Sample` objects. Rows that do not parse are *bad rows*: skipped, counted and reported
   (or raised) according to ``check_dataset_strategy``, through a :class:`DatasetReport`.
2. :func:`validate_samples` encodes every sample once with the template, before training starts,
   to find over-long samples and unloadable images (swift 2.1 hit them mid-run).
3. :class:`EncodedDataset` encodes on the fly (DataLoader workers parallelise tokenising and image
   decoding, nothing is cached) and :func:`collate` pads a batch for the model.

Image references are ``<img>PATH_OR_URL</img>`` spans in the text. A relative path is relative
to the dataset file's folder (not the working folder, as in swift), so a dataset can be moved
with its images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..media import ImageLoadError, resolve_source
from ..template import IGNORE_INDEX, SampleTooLongError, Template
from ..tokenizer import IMG_END, IMG_START, QWenTokenizer

STRATEGIES = ("none", "discard", "warning", "error")
# Row role names (swift and sharegpt spellings) -> the chat role they stand for.
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
IMAGE_REF = re.compile(re.escape(IMG_START) + "(.*?)" + re.escape(IMG_END), re.DOTALL)
FILE_SUFFIXES = (".json", ".jsonl")
HUB_CHECK_TIMEOUT_S = 5.0  # the reachability check before downloading a builtin dataset


class DatasetError(ValueError):
    """A bad dataset file or row. The message is one line: ``FILE:LINE: reason (field X: expected ...)``.

    ``kind`` is the short reason counted in summaries ("invalid JSON", "empty reply", ...).
    """

    def __init__(self, message: str, kind: str = "bad dataset"):
        super().__init__(message)
        self.kind = kind


def _bad(source: str, kind: str, reason: str | None = None, field: str | None = None,
         expected: str | None = None) -> DatasetError:
    """The error for one bad row: ``source: reason (field F: expected E)``; ``reason`` defaults to ``kind``."""
    message = f"{source}: {reason or kind}"
    if field is not None:
        message += f" (field {field}: expected {expected})"
    return DatasetError(message, kind)


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__)


# ---------------------------------------------------------------------------------------------
# Samples


@dataclass(frozen=True)
class Sample:
    """One conversation: earlier ``[query, response]`` turns, the last query and its reply.

    ``response`` is None only for inference rows that end with a user turn. ``source`` is
    ``FILE:LINE`` (or ``NAME:row N`` for a builtin dataset); ``base_dir`` is the folder that
    relative image paths in the text are relative to.
    """

    query: str
    response: str | None
    history: list[list[str]]
    system: str | None
    source: str
    base_dir: Path

    def texts(self) -> list[str]:
        """Every user and assistant text, in prompt order."""
        texts = [text for pair in self.history for text in pair] + [self.query]
        return texts if self.response is None else texts + [self.response]

    def image_refs(self) -> list[str]:
        """The image references in prompt order, as written in the dataset."""
        return [m.group(1) for text in self.texts() for m in IMAGE_REF.finditer(text)]

    def images(self) -> list[str]:
        """The image references in prompt order, local paths made absolute (URLs as written)."""
        return [resolve_source(ref, self.base_dir) for ref in self.image_refs()]

    def resolved(self) -> "Sample":
        """This sample with its local image paths made absolute: what the template must see."""

        def fix(text: str) -> str:
            return IMAGE_REF.sub(lambda m: IMG_START + resolve_source(m.group(1), self.base_dir) + IMG_END, text)

        return dataclasses.replace(
            self,
            query=fix(self.query),
            response=None if self.response is None else fix(self.response),
            history=[[fix(q), fix(r)] for q, r in self.history],
        )


# ---------------------------------------------------------------------------------------------
# Row formats


def parse_row(row: Any, source: str, base_dir: Path, require_response: bool = True) -> Sample:
    """Turn one dataset row into a :class:`Sample`, or raise :class:`DatasetError` saying why not.

    Formats, detected in this order: ``{"query", "response", "history", "system"}``; alpaca
    ``{"instruction", "input", "output"}``; ``{"conversations": [{"from", "value"}, ...]}``;
    ``{"messages": [{"role", "content"}, ...]}``. With ``require_response`` false (inference)
    the reply may be missing, i.e. a conversation may end with a user turn.
    """
    if not isinstance(row, dict):
        raise _bad(source, "not an object", field="row", expected=f"a JSON object, got {_type_name(row)}")
    if "query" in row or "response" in row:
        query = _text(row, "query", source)
        response = _reply(row, "response", source, require_response)
        history = _history(row.get("history"), source)
        system = _optional_text(row, "system", source)
    elif "instruction" in row or "output" in row:
        instruction = _text(row, "instruction", source)
        extra = _optional_text(row, "input", source)
        query = f"{instruction}\n{extra}" if extra else instruction
        response = _reply(row, "output", source, require_response)
        history, system = [], _optional_text(row, "system", source)
    elif "conversations" in row:
        query, response, history, system = _conversation(row, "conversations", "from", "value", source,
                                                         require_response)
    elif "messages" in row:
        query, response, history, system = _conversation(row, "messages", "role", "content", source,
                                                         require_response)
    else:
        keys = ", ".join(sorted(map(str, row))) or "none"
        raise _bad(source, "unknown format", f"unknown row format (keys: {keys})", field="row",
                   expected="query/response, instruction/output, conversations or messages")
    return Sample(query, response, history, system, source, base_dir)


def _text(obj: dict, key: str, source: str, where: str | None = None) -> str:
    where = where or key
    if key not in obj or obj[key] is None:
        raise _bad(source, "missing field", field=where, expected="a string")
    value = obj[key]
    if not isinstance(value, str):
        raise _bad(source, "wrong type", field=where, expected=f"a string, got {_type_name(value)}")
    return value


def _optional_text(obj: dict, key: str, source: str) -> str | None:
    return _text(obj, key, source) if obj.get(key) is not None else None


def _check_reply(text: str, source: str, where: str) -> str:
    if not text.strip():
        raise _bad(source, "empty reply", field=where, expected="a non-empty reply")
    return text


def _reply(obj: dict, key: str, source: str, require_response: bool) -> str | None:
    if obj.get(key) is None and not require_response:
        return None
    return _check_reply(_text(obj, key, source), source, key)


def _history(value: Any, source: str) -> list[list[str]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad(source, "wrong type", field="history",
                   expected=f"an array of [query, response] pairs, got {_type_name(value)}")
    pairs = []
    for i, pair in enumerate(value):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise _bad(source, "wrong type", field=f"history[{i}]", expected="a [query, response] pair")
        for j, text in enumerate(pair):
            if not isinstance(text, str):
                raise _bad(source, "wrong type", field=f"history[{i}][{j}]",
                           expected=f"a string, got {_type_name(text)}")
        pairs.append([pair[0], _check_reply(pair[1], source, f"history[{i}][1]")])
    return pairs


def _conversation(row: dict, key: str, role_key: str, text_key: str, source: str, require_response: bool
                  ) -> tuple[str, str | None, list[list[str]], str | None]:
    """A list of turns (optional leading system turn, then user/assistant alternating)."""
    turns = row[key]
    if not isinstance(turns, list) or not turns:
        got = "an empty array" if turns == [] else _type_name(turns)
        raise _bad(source, "wrong type", field=key, expected=f"a non-empty array of turns, got {got}")
    system = None
    texts: list[str] = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise _bad(source, "wrong type", field=where,
                       expected=f"an object with {role_key!r} and {text_key!r}, got {_type_name(turn)}")
        name = turn.get(role_key)
        if name is None:
            raise _bad(source, "missing field", field=f"{where}.{role_key}", expected="a role")
        role = ROLES.get(name) if isinstance(name, str) else None
        if role is None:
            raise _bad(source, "unknown role", f"unknown role {name!r}", field=f"{where}.{role_key}",
                       expected=f"one of {', '.join(ROLES)}")
        text = _text(turn, text_key, source, f"{where}.{text_key}")
        if role == "system" and i == 0:
            system = text
            continue
        wanted = "user" if len(texts) % 2 == 0 else "assistant"
        if role != wanted:
            previous = "the start" if not texts else f"a {'user' if wanted == 'assistant' else 'assistant'} turn"
            raise _bad(source, "wrong role order", f"wrong role order: {name!r} after {previous}",
                       field=f"{where}.{role_key}",
                       expected=f"{wanted} (user and assistant alternate; system only as the first turn)")
        if role == "assistant":
            _check_reply(text, source, f"{where}.{text_key}")
        texts.append(text)
    if not texts:
        raise _bad(source, "missing field", "no user turn", field=key, expected="a user turn after the system turn")
    if len(texts) % 2 == 1 and require_response:
        raise _bad(source, "wrong role order", "the conversation ends with a user turn",
                   field=f"{key}[{len(turns) - 1}]", expected="a final assistant reply to train on")
    response = texts.pop() if len(texts) % 2 == 0 else None  # an inference row may end with its query
    query = texts.pop()
    return query, response, [texts[i:i + 2] for i in range(0, len(texts), 2)], system


# ---------------------------------------------------------------------------------------------
# Files


def read_rows(path: Path, shown: str) -> Iterator[tuple[str, Any]]:
    """``(source, row)`` for each row of a ``.json`` array or ``.jsonl`` file.

    An invalid ``.jsonl`` line comes back as a :class:`DatasetError` in place of the row, so it
    can be skipped like any bad row; an invalid ``.json`` array raises (its rows cannot be told
    apart after the error).
    """
    try:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8-sig") as f:
                for lineno, line in enumerate(f, 1):
                    line = line.rstrip("\r\n")  # else an unclosed row is reported at column 1 of the next line
                    if not line.strip():
                        continue
                    source = f"{shown}:{lineno}"
                    try:
                        yield source, json.loads(line)
                    except json.JSONDecodeError as e:
                        yield source, _bad(source, "invalid JSON", f"invalid JSON: {e.msg} at column {e.colno}")
        else:
            yield from _read_json_array(path.read_text(encoding="utf-8-sig"), shown)
    except UnicodeDecodeError as e:
        raise DatasetError(f"{shown}: not UTF-8 text ({e.reason} at byte {e.start})", "invalid JSON") from e


_SPACE = re.compile(r"\s*")


def _read_json_array(text: str, shown: str) -> Iterator[tuple[str, Any]]:
    """Rows of a JSON array with the line each starts on (decoded element by element to know it)."""
    decoder = json.JSONDecoder()
    line, counted = 1, 0  # newlines are counted incrementally: recounting from 0 per row is quadratic

    def line_at(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    def fail(message: str, pos: int) -> DatasetError:
        return DatasetError(f"{shown}:{line_at(pos)}: {message}", "invalid JSON")

    pos = _SPACE.match(text).end()
    if pos == len(text):
        return
    if text[pos] != "[":
        raise fail("expected a JSON array of rows (for one JSON object per line, name the file .jsonl)", pos)
    pos = _SPACE.match(text, pos + 1).end()
    if text.startswith("]", pos):
        return
    while True:
        try:
            row, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{shown}:{e.lineno}: invalid JSON: {e.msg} at column {e.colno} "
                               "(a .json file must be one valid array; in .jsonl a bad line is skipped)",
                               "invalid JSON") from e
        yield f"{shown}:{line_at(pos)}", row
        pos = _SPACE.match(text, end).end()
        if text.startswith("]", pos):
            if _SPACE.match(text, pos + 1).end() != len(text):
                raise fail("invalid JSON: extra data after the array", pos + 1)
            return
        if not text.startswith(",", pos):
            raise fail("invalid JSON: expected ',' or ']' after a row", pos)
        pos = _SPACE.match(text, pos + 1).end()


# ---------------------------------------------------------------------------------------------
# Bad-row bookkeeping


def check_strategy(strategy: str) -> str:
    """Validate a ``--check_dataset_strategy`` value (``discard`` is swift's synonym of ``none``)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown --check_dataset_strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    return "none" if strategy == "discard" else strategy


@dataclass
class DatasetReport:
    """What happened to the rows: how many were read, which were skipped and why.

    ``strategy`` ``none`` counts bad rows, ``warning`` also keeps one message per bad row in
    ``messages`` (for the caller to print before :meth:`summary`), ``error`` raises the first.
    """

    strategy: str = "warning"
    sources: list[str] = field(default_factory=list)
    total: int = 0
    skipped: Counter = field(default_factory=Counter)
    messages: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.strategy = check_strategy(self.strategy)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, error: DatasetError) -> None:
        """Handle one bad row: raise it (strategy ``error``) or count it (and keep its message)."""
        if self.strategy == "error":
            raise error
        self.skipped[error.kind] += 1
        if self.strategy == "warning":
            self.messages.append(str(error))

    def reasons(self) -> str:
        """``2 invalid JSON, 1 empty reply``: the skipped rows by reason, most frequent first."""
        return ", ".join(f"{n} {kind}" for kind, n in self.skipped.most_common())

    def summary(self) -> str:
        """One line for the log, e.g. ``skipped 3 of 120 rows (2 invalid JSON, 1 empty reply); see warnings above``."""
        if not self.n_skipped:
            return f"read {self.total} rows from {', '.join(self.sources)}; none skipped"
        hint = ("see warnings above" if self.strategy == "warning"
                else "use --check_dataset_strategy warning to list them")
        return f"skipped {self.n_skipped} of {self.total} rows ({self.reasons()}); {hint}"

    def require_rows(self, samples: Sequence[Sample]) -> None:
        """Raise when nothing is left to train or infer on."""
        if samples:
            return
        why = f"{self.n_skipped} skipped ({self.reasons()})" if self.n_skipped else "the file has no rows"
        if self.strategy == "none" and self.n_skipped:
            why += "; use --check_dataset_strategy warning to list them"
        raise DatasetError(f"no usable rows in {', '.join(self.sources) or 'the dataset'}: {why}", "empty dataset")


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class BuiltinDataset:
    """A hub dataset of image captions, turned into one-turn samples."""

    hub_id: str
    split: str
    query: str  # with an {image} placeholder
    image_column: str = "image"
    caption_column: str = "caption"


BUILTIN_DATASETS = {
    "coco-en-mini": BuiltinDataset(
        "modelscope/coco_2014_caption", "validation", "Picture 1:<img>{image}</img>\nplease describe the image."),
}


def load_dataset(
    specs: Sequence[str],
    check_dataset_strategy: str = "warning",
    seed: int = 42,
    require_response: bool = True,
    option: str = "--dataset",
) -> tuple[list[Sample], DatasetReport]:
    """Read dataset files and builtin names into samples, handling bad rows per the strategy.

    A spec is a ``.json``/``.jsonl`` path (``train.jsonl`` works: relative to the current
    folder) or a builtin name (:data:`BUILTIN_DATASETS`), optionally suffixed ``#N`` to sample
    N rows with ``seed`` (see :func:`sample_rows`). ``require_response`` false (inference)
    accepts rows without a reply. ``option`` is the flag named in errors. Raises
    :class:`DatasetError` for a missing file, an unreadable ``.json`` array, the first bad row
    with strategy ``error``, or when no usable row is left.
    """
    report = DatasetReport(check_dataset_strategy)
    if not specs:
        raise DatasetError(f"{option}: no dataset given (a .json/.jsonl file or {', '.join(BUILTIN_DATASETS)})",
                           "empty dataset")
    samples: list[Sample] = []
    for spec in specs:
        target, n = _split_spec(spec, option)
        if isinstance(target, Path):
            rows = _load_file(target, report, require_response)
            samples += rows if n is None else sample_rows(rows, n, seed)
        else:
            samples += _load_builtin(target, n, seed, report)
    report.require_rows(samples)
    return samples, report


def _split_spec(spec: str, option: str) -> tuple[Path | str, int | None]:
    """``(file path or builtin name, rows to sample or None)``; a name must exist as one or the other."""
    name, n = spec, None
    head, sep, tail = spec.rpartition("#")
    if sep and tail.isdigit() and not Path(spec).expanduser().is_file():
        name, n = head, int(tail)
    path = Path(name).expanduser()
    if path.is_dir():
        raise DatasetError(f"{option} {name}: is a folder, expected a .json or .jsonl file", "file")
    if path.is_file():
        if path.suffix not in FILE_SUFFIXES:
            raise DatasetError(f"{option} {name}: unsupported file type {path.suffix or '(none)'!r}: "
                               "expected .json (an array of rows) or .jsonl (one row per line)", "file")
        return path, n
    if name in BUILTIN_DATASETS:
        return name, n
    if path.suffix in FILE_SUFFIXES or "/" in name:
        raise DatasetError(f"{option} {name}: no such file", "file")
    raise DatasetError(f"{option} {name}: no such file, and not a builtin dataset "
                       f"(builtins: {', '.join(BUILTIN_DATASETS)})", "file")


def _load_file(path: Path, report: DatasetReport, require_response: bool) -> list[Sample]:
    shown = str(path)
    report.sources.append(shown)
    base_dir = Path(os.path.abspath(path)).parent
    samples = []
    for source, row in read_rows(path, shown):
        report.total += 1
        try:
            if isinstance(row, DatasetError):
                raise row
            samples.append(parse_row(row, source, base_dir, require_response))
        except DatasetError as e:
            report.skip(e)
    return samples


def _load_builtin(name: str, n: int | None, seed: int, report: DatasetReport) -> list[Sample]:
    """Rows of a builtin hub dataset; its images are written to the ``datasets`` cache once."""
    entry = BUILTIN_DATASETS[name]
    report.sources.append(name)
    try:
        import datasets
    except ImportError:
        raise DatasetError(f"builtin dataset {name} needs the `datasets` package: pip install datasets "
                           "(or pip install 'vlswift[datasets]'), or pass your own --dataset FILE", "file") from None
    failed = f"could not download {name} ({entry.hub_id}, split {entry.split})"
    unreachable = _hub_unreachable()
    if unreachable:
        raise DatasetError(f"{failed}: {unreachable}: offline? pass your own --dataset FILE "
                           "(HF_HUB_OFFLINE=1 reads a copy downloaded before)", "file")
    try:
        with _quiet_hub_logs():
            table = _download(entry)
        table = table.cast_column(entry.image_column, datasets.Image(decode=False))
    except Exception as e:  # noqa: BLE001 - hub and network failures come in many types; all mean the same here
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise DatasetError(f"{failed}: {reason}: offline? pass your own --dataset FILE", "file") from None
    image_dir = Path(datasets.config.HF_DATASETS_CACHE) / "vlswift" / name / entry.split
    indices = list(range(len(table)))
    if n is not None:
        indices = sample_rows(indices, n, seed)
    samples = []
    for i in indices:
        report.total += 1
        row, source = table[i], f"{name}:row {i + 1}"
        try:
            caption = _text(row, entry.caption_column, source)
            # Captions hold several alternatives joined by "&&"; the first is the target (as in swift).
            response = _check_reply(caption.split("&&")[0].strip(), source, entry.caption_column)
            image = _image_file(row[entry.image_column], image_dir, i, source)
        except DatasetError as e:
            report.skip(e)
            continue
        samples.append(Sample(entry.query.format(image=image), response, [], None, source, image_dir))
    return samples


def _hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached, from one short request; None when it can.

    Offline, the hub client would retry for half a minute, warning each time, before failing.
    With ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` set ``datasets`` reads its cache only (and
    fails fast by itself), and ModelScope has its own client: neither is checked.
    """
    from ..models.loading import use_modelscope

    if use_modelscope() or any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")
                               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return None
    import requests

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        requests.head(endpoint, timeout=HUB_CHECK_TIMEOUT_S)  # any answer, even an error status, is a hub
    except requests.RequestException as e:
        return f"cannot reach {endpoint} ({type(e).__name__})"
    return None


@contextlib.contextmanager
def _quiet_hub_logs() -> Iterator[None]:
    """Hide the hub clients' warnings (one per retry): a failure ends in one error line anyway."""
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "datasets")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _download(entry: BuiltinDataset):
    """The split as a ``datasets.Dataset``, from ModelScope when USE_MODELSCOPE_HUB is set (as for models)."""
    from ..models.loading import use_modelscope

    if use_modelscope():
        from modelscope import MsDataset

        return MsDataset.load(entry.hub_id, split=entry.split).to_hf_dataset()
    import datasets

    return datasets.load_dataset(entry.hub_id, split=entry.split)


def _image_file(image: Any, image_dir: Path, index: int, source: str) -> str:
    """A local file for an undecoded ``datasets.Image`` value (``{"path", "bytes"}``)."""
    if not isinstance(image, dict):
        raise _bad(source, "wrong type", field="image", expected="an image")
    path = image.get("path")
    if path and os.path.isfile(path):
        return os.path.abspath(path)
    if not image.get("bytes"):
        raise _bad(source, "missing field", field="image", expected="image bytes or an existing path")
    target = image_dir / (Path(path).name if path else f"{index}.jpg")
    if not target.is_file():
        image_dir.mkdir(parents=True, exist_ok=True)
        # Write then rename: ranks loading the dataset at the same time never see half a file.
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(image["bytes"])
        os.replace(tmp, target)
    return str(target)


# ---------------------------------------------------------------------------------------------
# Validation with the template


def encode_sample(template: Template, sample: Sample, with_response: bool = True) -> dict[str, Any]:
    """``template.encode`` of a sample (image paths resolved); failures name the row.

    Raises :class:`DatasetError` with kind ``too long`` (over ``max_length`` with truncation
    ``delete``), ``unloadable image`` or ``cannot encode`` (e.g. an unclosed ``<img>``).
    """
    s = sample.resolved()
    try:
        return template.encode(s.query, s.history, s.system, s.response if with_response else None)
    except SampleTooLongError as e:
        raise _bad(sample.source, "too long", str(e)) from e
    except ImageLoadError as e:
        shown = dict(zip(sample.images(), sample.image_refs())).get(e.image, e.image)
        raise _bad(sample.source, "unloadable image", f"cannot load image {shown}: {e.reason}") from e
    except ValueError as e:
        raise _bad(sample.source, "cannot encode", str(e)) from e


def validate_samples(samples: Sequence[Sample], template: Template, report: DatasetReport,
                     num_proc: int = 1) -> list[Sample]:
    """The samples that encode: a pass over the data before training, with the real template.

    Finds over-long samples and unloadable images (each reported with its row and reason,
    through ``report`` and its strategy). Each sample is encoded, checked and dropped, so no
    decoded image is kept. ``num_proc`` > 1 uses threads: image decoding releases the GIL.
    The result may be empty: whether that is an error (training) or not (validation) is the
    caller's call (:meth:`DatasetReport.require_rows`).
    """

    def problem(sample: Sample) -> DatasetError | None:
        try:
            encode_sample(template, sample)
        except DatasetError as e:
            return e
        return None

    pool = ThreadPoolExecutor(num_proc) if num_proc > 1 else None
    try:
        problems = pool.map(problem, samples) if pool else map(problem, samples)
        good = []
        for sample, error in zip(samples, problems):
            if error is None:
                good.append(sample)
            else:
                report.skip(error)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    return good


# ---------------------------------------------------------------------------------------------
# Splitting and sampling


def sample_rows(rows: Sequence[Any], n: int, seed: int) -> list[Any]:
    """``n`` rows drawn with ``seed``: without replacement, or whole shuffled copies plus a draw
    for the rest when ``n`` exceeds the rows (so ``#N`` can also upsample, as in swift)."""
    if n < 0:
        raise ValueError(f"cannot sample {n} rows")
    rng = random.Random(seed)
    out: list[Any] = []
    while n - len(out) >= len(rows) > 0:
        out += rng.sample(list(rows), len(rows))
    return out + rng.sample(list(rows), n - len(out)) if rows else out


def split_dataset(samples: Sequence[Sample], test_ratio: float = 0.01, seed: int = 42, train_sample: int = -1
                  ) -> tuple[list[Sample], list[Sample]]:
    """``(train, val)``: a ``seed``-shuffled split with ``round(len * test_ratio)`` (at least 1)
    validation rows; a single row stays in train unless ``test_ratio`` is 1. ``train_sample`` > 0
    then samples that many training rows (:func:`sample_rows`)."""
    if not 0 <= test_ratio <= 1:
        raise ValueError(f"--dataset_test_ratio must be between 0 and 1, got {test_ratio}")
    order = list(samples)
    random.Random(seed).shuffle(order)
    if test_ratio == 1:
        n_val = len(order)
    elif test_ratio == 0 or len(order) < 2:
        n_val = 0
    else:
        n_val = min(max(1, round(len(order) * test_ratio)), len(order) - 1)
    val, train = order[:n_val], order[n_val:]
    if train_sample > 0:
        train = sample_rows(train, train_sample, seed)
    return train, val


# ---------------------------------------------------------------------------------------------
# Batches


class EncodedDataset(torch.utils.data.Dataset):
    """Samples encoded when fetched, so DataLoader workers tokenize and decode images in
    parallel and no decoded image outlives its batch."""

    def __init__(self, samples: Sequence[Sample], template: Template):
        self.samples = list(samples)
        self.template = template

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        enc = encode_sample(self.template, sample)
        return {
            "input_ids": torch.tensor(enc["input_ids"], dtype=torch.long),
            "labels": torch.tensor(enc["labels"], dtype=torch.long),
            "images": enc["images"],
            "source": sample.source,
        }


def collate(batch: Sequence[dict[str, Any]], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor | None]:
    """Right-pad a list of :class:`EncodedDataset` items into model inputs.

    ``input_ids`` pad with ``pad_id``, ``labels`` with -100, ``attention_mask`` 1 on real
    tokens; ``images`` are the items' images concatenated in order (the model matches them to
    the ``<img>`` spans row by row), or None. The width is the longest item's length rounded
    up to ``pad_to_multiple_of`` (fewer distinct shapes for CUDA graphs).
    """
    width = max(len(item["input_ids"]) for item in batch)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item["input_ids"])
        input_ids[row, :n] = item["input_ids"]
        labels[row, :n] = item["labels"]
        attention_mask[row, :n] = 1
    images = [item["images"] for item in batch if item["images"] is not None]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "images": torch.cat(images) if images else None}


def length_of(sample: Sample, tokenizer: QWenTokenizer) -> int:
    """Token count of the sample's texts (image spans included, chatml markup not), without
    loading images: a cheap estimate for length-grouped batching."""
    # The span length does not depend on the path, so an empty one avoids the path length limit.
    texts = [IMAGE_REF.sub(IMG_START + IMG_END, text) for text in sample.texts()]
    return sum(len(tokenizer.encode(text)) for text in texts)
