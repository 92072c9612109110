"""Metric names used by PromQL in the Grafana dashboard (and in the alert rules).

`dashboard_metric_names(path)` is meant to be compared with the metric families of a real scrape of
an agent and a coordinator; until then the tests compare it with the tables in docs/metrics.md
(`documented_metric_names`).

The extraction is a small PromQL tokenizer, not a parser. It drops string literals, label matchers
`{...}`, range and subquery selectors `[...]`, grouping clauses `by (...)`, `without (...)`,
`on (...)`, `ignoring (...)`, `group_left (...)`, `group_right (...)`, function names (an
identifier followed by `(`), aggregation operators, keywords, numbers, durations and Grafana
variables (`$job_id`, `${datasource}`, `$__rate_interval`). What remains are metric names;
histogram and summary series suffixes (`_bucket`, `_sum`, `_count`) are stripped to the family name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}
# Aggregations may be followed by a grouping clause instead of "(": `sum by (le) (...)`.
# fmt: off
_AGGREGATIONS = {
    "sum", "avg", "min", "max", "count", "group", "stddev", "stdvar",
    "topk", "bottomk", "quantile", "count_values", "limitk", "limit_ratio",
}
# fmt: on
_SERIES_SUFFIXES = ("_bucket", "_sum", "_count")
# The first cell of a row in docs/metrics.md: one or more backticked names.
_DOC_ROW = re.compile(r"^\|\s*((?:`[a-z_:][a-z0-9_:]*`(?:\s*,\s*)?)+)\s*\|")


def _skip_string(expr: str, i: int) -> int:
    quote = expr[i]
    i += 1
    while i < len(expr) and expr[i] != quote:
        i += 2 if expr[i] == "\\" and quote != "`" else 1
    return i + 1


def _skip_balanced(expr: str, i: int, open_: str, close: str) -> int:
    """Index just past the bracket that closes the one at expr[i]."""
    depth = 0
    while i < len(expr):
        c = expr[i]
        if c in "\"'`":
            i = _skip_string(expr, i)
            continue
        if c == open_:
            depth += 1
        elif c == close:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError(f"unbalanced {open_!r} in PromQL: {expr!r}")


def _family(name: str) -> str:
    for suffix in _SERIES_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def promql_metric_names(expr: str) -> set[str]:
    """Metric family names that a PromQL expression selects."""
    names: set[str] = set()
    i = 0
    while i < len(expr):
        c = expr[i]
        if c in "\"'`":
            i = _skip_string(expr, i)
        elif c == "{":
            i = _skip_balanced(expr, i, "{", "}")
        elif c == "[":
            i = _skip_balanced(expr, i, "[", "]")
        elif c == "$":  # Grafana variable: $name or ${name}
            i += 1
            if i < len(expr) and expr[i] == "{":
                i = _skip_balanced(expr, i, "{", "}")
            else:
                m = _IDENT.match(expr, i)
                i = m.end() if m else i
        elif c.isdigit() or (c == "." and i + 1 < len(expr) and expr[i + 1].isdigit()):
            # a number or a duration (5m, 1h30m, 0x1f, 1e-3)
            m = re.compile(r"[0-9A-Za-z_.]+(?:[eE][+-]?[0-9]+)?").match(expr, i)
            i = m.end()
        elif _IDENT.match(expr, i):
            m = _IDENT.match(expr, i)
            word = m.group()
            j = m.end()
            while j < len(expr) and expr[j].isspace():
                j += 1
            followed_by_paren = j < len(expr) and expr[j] == "("
            if word.lower() in _GROUPING:
                i = _skip_balanced(expr, j, "(", ")") if followed_by_paren else j
            elif followed_by_paren or word.lower() in _KEYWORDS or word in _AGGREGATIONS:
                i = m.end()  # a function, an aggregation or a keyword
            else:
                names.add(_family(word))
                i = m.end()
        else:
            i += 1
    return names


def _panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # panels inside collapsed rows


def dashboard_panels(path: Path) -> list[dict]:
    """Every panel of a dashboard JSON file, rows and the panels nested in collapsed rows included."""
    return list(_panels(json.loads(Path(path).read_text())["panels"]))


def dashboard_exprs(path: Path) -> list[str]:
    return [t["expr"] for p in dashboard_panels(path) for t in p.get("targets", []) if t.get("expr")]


def dashboard_metric_names(path: Path) -> set[str]:
    """Metric family names used by the PromQL of every panel of a Grafana dashboard JSON file."""
    names: set[str] = set()
    for expr in dashboard_exprs(path):
        names |= promql_metric_names(expr)
    return names


def documented_metric_names(path: Path) -> set[str]:
    """Metric names in the first column of the tables of docs/metrics.md."""
    names: set[str] = set()
    for line in Path(path).read_text().splitlines():
        m = _DOC_ROW.match(line)
        if m:
            names |= set(re.findall(r"`([a-z_:][a-z0-9_:]*)`", m.group(1)))
    return names
