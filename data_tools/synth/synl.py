"""SynL: long synthetic tables with machine-checkable questions (long SFT).

A table has a unique key column ``id`` and typed columns: names (unique),
cities and categories (repeating), integers and dates (unique by
construction, so extremes and reverse look-ups are unique), and ``partner``,
which holds another row's key (for multi-hop). It is rendered as a Markdown
pipe table; the question follows. Answers are computed from the rows.
"""
from __future__ import annotations

import datetime
import random
from dataclasses import dataclass
from typing import Dict, List, Tuple

from .fit import largest_fitting

FIRST = ["Ada", "Bram", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea", "Mio", "Nils",
         "Ola", "Pia", "Quin", "Rui", "Sami", "Tova", "Uma", "Vik", "Wen", "Xia", "Yara", "Zed"]
LAST = ["Abe", "Berg", "Cruz", "Dahl", "Eng", "Frey", "Gill", "Holm", "Ito", "Jovic", "Kaur", "Lund", "Moss",
        "Nagy", "Ortiz", "Park", "Quist", "Rossi", "Sato", "Toth", "Ueda", "Varga", "Wolf", "Young", "Zhou"]
CITIES = ["Oslo", "Lima", "Pune", "Kyiv", "Perth", "Quito", "Riga", "Sofia", "Tunis", "Xi'an", "Bern", "Cork"]
CATEGORIES = ["alpha", "beta", "gamma", "delta", "omega"]
COLUMNS = ["id", "name", "city", "category", "score", "units", "joined", "partner"]
NUMERIC = {"score", "units"}
DATES = {"joined"}
OPS = ["==", "!=", ">", ">=", "<", "<="]
QUESTION_TYPES = ["lookup", "reverse_lookup", "compare", "count", "sum", "argmax", "argmin", "multi_hop", "filter"]


@dataclass
class SynlConfig:
    """How SynL samples are built."""

    target_tokens: int = 32768
    """The prompt (table + question) fills at most this many tokens, as closely as rows allow."""
    question_types: Tuple[str, ...] = tuple(QUESTION_TYPES)
    """Question types to draw from (uniformly, unless ``question_weights``)."""
    question_weights: Tuple[float, ...] = ()
    """Relative weight of each of ``question_types`` (same order); empty: uniform."""
    seed: int = 0
    """Seed of tables and questions."""


def make_rows(n: int, rng: random.Random) -> List[Dict[str, str]]:
    """n rows; integer and date columns hold distinct values, names are unique."""
    width = max(4, len(str(n * 3)))
    keys = [f"K{i:0{width}d}" for i in rng.sample(range(n * 3), n)]
    scores, units = rng.sample(range(10 * n + 100), n), rng.sample(range(100 * n + 1000), n)
    start = datetime.date(1990, 1, 1)
    days = rng.sample(range(365 * 30 + n), n)
    names, rows = set(), []
    for i in range(n):
        name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        while name in names:
            name = f"{rng.choice(FIRST)} {chr(65 + rng.randrange(26))}. {rng.choice(LAST)}"
        names.add(name)
        rows.append({"id": keys[i], "name": name, "city": rng.choice(CITIES), "category": rng.choice(CATEGORIES),
                     "score": str(scores[i]), "units": str(units[i]),
                     "joined": (start + datetime.timedelta(days=days[i])).isoformat(), "partner": ""})
    for i, row in enumerate(rows):  # another row's key (any row's, when there is only one)
        j = rng.randrange(n - 1) if n > 1 else 0
        row["partner"] = rows[j + (j >= i and n > 1)]["id"]
    return rows


def render_table(rows) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r[c] for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def _value(column: str, cell: str):
    return int(cell) if column in NUMERIC else cell  # ISO dates compare as strings


def matches(row, column: str, op: str, value: str) -> bool:
    a, b = _value(column, row[column]), _value(column, value)
    return {"==": a == b, "!=": a != b, ">": a > b, ">=": a >= b, "<": a < b, "<=": a <= b}[op]


def answer(rows, qtype: str, q: dict) -> str:
    """The answer to question ``q`` of type ``qtype``, computed from ``rows``."""
    by_key = {r["id"]: r for r in rows}
    if qtype == "lookup":
        return by_key[q["key"]][q["column"]]
    if qtype == "reverse_lookup":
        (hit,) = [r["id"] for r in rows if r[q["column"]] == q["value"]]
        return hit
    if qtype == "compare":
        a, b = (by_key[k] for k in q["keys"])
        va, vb = _value(q["column"], a[q["column"]]), _value(q["column"], b[q["column"]])
        return a["id"] if (va > vb) == (q["pick"] == "larger") else b["id"]
    if qtype == "count":
        return str(sum(matches(r, q["column"], q["op"], q["value"]) for r in rows))
    if qtype == "sum":
        return str(sum(int(r[q["column"]]) for r in rows))
    if qtype in ("argmax", "argmin"):
        pick = max if qtype == "argmax" else min
        return pick(rows, key=lambda r: _value(q["column"], r[q["column"]]))["id"]
    if qtype == "multi_hop":
        return by_key[by_key[q["key"]][q["via_column"]]][q["column"]]
    if qtype == "filter":
        return ", ".join(r["id"] for r in rows if matches(r, q["column"], q["op"], q["value"]))
    raise ValueError(f"unknown question type {qtype!r}")


def parse_weights(text: str, types: Tuple[str, ...]) -> Tuple[float, ...]:
    """'lookup=4,reverse_lookup=4' -> one weight per type of ``types`` (unnamed types weigh 1); '' -> ()."""
    if not text:
        return ()
    given = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in types:
            raise ValueError(f"question weight {part!r}: {name!r} is not one of the question types {list(types)}")
        try:
            given[name] = float(value)
        except ValueError:
            raise ValueError(f"question weight {part!r}: expected TYPE=NUMBER") from None
        if given[name] < 0:
            raise ValueError(f"question weight {part!r} must not be negative")
    weights = tuple(given.get(t, 1.0) for t in types)
    if not sum(weights):
        raise ValueError(f"question weights {text!r} give every type weight 0")
    return weights


def make_question(rows, qtype: str, rng: random.Random) -> Tuple[dict, str]:
    """(query, question text) with a unique, well-defined answer."""
    row = rng.choice(rows)
    ordered = [c for c in COLUMNS if c in NUMERIC | DATES]
    if qtype == "lookup":
        col = rng.choice(COLUMNS[1:])
        return {"key": row["id"], "column": col}, f"What is the {col} of the row with id {row['id']}?"
    if qtype == "reverse_lookup":
        col = rng.choice(["name"] + ordered)  # these columns hold distinct values
        return {"column": col, "value": row[col]}, f"Which id has {col} equal to {row[col]}?"
    if qtype == "compare":
        other = rng.choice([r for r in rows if r is not row] or [row])
        col, pick = rng.choice(ordered), rng.choice(["larger", "smaller"])
        word = {"larger": "later" if col in DATES else "larger", "smaller": "earlier" if col in DATES else "smaller"}[pick]
        return ({"keys": [row["id"], other["id"]], "column": col, "pick": pick},
                f"Of ids {row['id']} and {other['id']}, which has the {word} {col}?")
    if qtype in ("count", "filter"):
        col = rng.choice(ordered + (["city", "category"] if qtype == "count" else []))
        op = rng.choice(OPS if col in ordered else ["==", "!="])
        if qtype == "filter":  # keep the list short: a threshold among the 10 most extreme values
            op = rng.choice([">=", "<="])
            values = sorted((r[col] for r in rows), key=lambda v: _value(col, v), reverse=op == ">=")
            value = values[rng.randrange(min(10, len(values)))]
            return ({"column": col, "op": op, "value": value},
                    f"List, in table order and separated by commas, the ids whose {col} {op} {value}.")
        value = row[col]
        return {"column": col, "op": op, "value": value}, f"How many rows have {col} {op} {value}?"
    if qtype == "sum":
        col = rng.choice(sorted(NUMERIC))
        return {"column": col}, f"What is the sum of the {col} column?"
    if qtype in ("argmax", "argmin"):
        col = rng.choice(ordered)
        word = "largest" if qtype == "argmax" else "smallest"
        return {"column": col}, f"Which id has the {word} {col}?"
    if qtype == "multi_hop":
        col = rng.choice(["name", "city", "category"] + ordered)
        return ({"key": row["id"], "via_column": "partner", "column": col},
                f"Row {row['id']} names a partner id. What is the {col} of that partner?")
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")


def prompt_text(table: str, question: str) -> str:
    return (f"Below is a table. Answer the question about it with the value only.\n\n{table}\n\n"
            f"Question: {question}\nAnswer:")


def synl_sample(count_tokens, cfg: SynlConfig, rng: random.Random) -> dict:
    """One sample whose prompt fits ``cfg.target_tokens`` with as many rows as fit."""
    types = list(cfg.question_types)
    qtype = rng.choices(types, weights=cfg.question_weights)[0] if cfg.question_weights else rng.choice(types)
    seed = rng.randrange(2**31)
    per_row = max(1, count_tokens(render_table(make_rows(20, random.Random(seed)))) // 21)
    guess = max(2, cfg.target_tokens // per_row)
    cache = {}

    def build(n: int) -> str:
        r = random.Random(seed)
        rows = make_rows(n, r)
        query, question = make_question(rows, qtype, r)
        cache[n] = (rows, query)
        return prompt_text(render_table(rows), question)

    n, prompt, tokens = largest_fitting(build, count_tokens, 2, 100 * guess, cfg.target_tokens, guess=guess)
    rows, query = cache[n]
    ans = answer(rows, qtype, query)
    return {"prompt": prompt, "response": ans,
            "meta": {"task": "synl", "question_type": qtype, "query": query, "answer": ans, "n_rows": n,
                     "n_columns": len(COLUMNS), "n_tokens": tokens}}
