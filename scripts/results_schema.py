"""Regenerate the results.json table in docs/run-folder.md from headstart.RunResults (its one source).

python scripts/results_schema.py        # rewrites the table between the markers
"""

from pathlib import Path

from headstart.training.record import RunResults

DOC = Path(__file__).resolve().parents[1] / "docs" / "run-folder.md"
START, END = "<!-- results-schema:start -->", "<!-- results-schema:end -->"


def table() -> str:
    rows = [f"| `{name}` | {kind.replace('|', 'or')} | {doc} |" for name, kind, doc in RunResults.schema()]
    return "\n".join(["| field | type | meaning |", "|---|---|---|", *rows])


if __name__ == "__main__":
    text = DOC.read_text()
    head, rest = text.split(START)
    _, tail = rest.split(END)
    DOC.write_text(f"{head}{START}\n{table()}\n{END}{tail}")
    print(f"wrote {len(RunResults.schema())} fields to {DOC}")
