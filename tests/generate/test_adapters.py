"""Dataset adapters and sources: every format, bad rows counted, clear errors."""

import json
from pathlib import Path

import datasets
import pytest

from qstar_cli.generate.adapters import (
    DatasetError,
    adapt_rows,
    load_source,
    resolve_adapter,
)


def make(rows):
    return datasets.Dataset.from_list(rows)


def run(rows, adapter="auto", **kwargs):
    ds = make(rows)
    prompt_field = kwargs.pop("prompt_field", None)
    return adapt_rows(ds, resolve_adapter(adapter, ds.column_names, prompt_field), **kwargs)


def test_messages_rows_bad_rows_and_trailing_assistant():
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}], "id": 1},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "id": 2},
        {"messages": None, "id": 3},
        {"messages": [{"role": "user", "content": "   "}], "id": 4},
        {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "id": 5},
        {"messages": [{"role": "wizard", "content": "x"}], "id": 6},
    ]
    out = run(rows)
    assert out.adapter == "messages" and out.rows == 6
    assert [p.row_idx for p in out.prompts] == [0, 1]
    assert out.prompts[0].messages == [{"role": "user", "content": "Hi"}]
    assert out.prompts[0].metadata == {"original_id": 1, "original_assistant": None}
    # The reference answer is cut from the prompt and kept.
    assert out.prompts[1].messages == [{"role": "user", "content": "2+2?"}]
    assert out.prompts[1].metadata == {"original_id": 2, "original_assistant": "4"}
    assert out.skipped == {"missing prompt": 1, "empty prompt": 1, "no user turn": 1, "malformed conversation": 1}


def test_sharegpt_roles_mapped_and_system_kept():
    rows = [
        {
            "conversations": [
                {"from": "system", "value": "Be kind."},
                {"from": "human", "value": "Hello"},
                {"from": "gpt", "value": "Hi!"},
                {"from": "human", "value": "How are you?"},
            ]
        },
        {"conversations": [{"from": "gpt", "value": "only me"}]},
    ]
    out = run(rows)
    assert out.adapter == "sharegpt"
    assert out.prompts[0].messages == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "How are you?"},
    ]
    assert out.skipped == {"no user turn": 1}


def test_deepscaler_keeps_answer_and_solution():
    rows = [{"problem": "1+1?", "answer": "2", "solution": "It is 2."}, {"problem": "", "answer": "0", "solution": ""}]
    out = run(rows, "deepscaler")
    assert out.prompts[0].messages == [{"role": "user", "content": "1+1?"}]
    assert out.prompts[0].metadata == {"original_answer": "2", "original_solution": "It is 2."}
    assert out.skipped == {"empty prompt": 1}


def test_auto_field_order_instruction_input_and_prompt_field():
    assert run([{"text": "t", "question": "q"}]).prompts[0].messages[0]["content"] == "q"
    out = run([{"instruction": "Translate.", "input": "chat"}, {"instruction": "Count.", "input": ""}])
    assert [p.messages[0]["content"] for p in out.prompts] == ["Translate.\n\nchat", "Count."]
    out = run([{"body": "b", "question": "q"}], prompt_field="body")
    assert out.prompts[0].messages[0]["content"] == "b" and out.prompts[0].metadata == {"original_question": "q"}


def test_system_prompt_added_only_where_there_is_none():
    rows = [
        {"messages": [{"role": "user", "content": "a"}]},
        {"messages": [{"role": "system", "content": "own"}, {"role": "user", "content": "b"}]},
    ]
    out = run(rows, system_prompt="sys")
    assert out.prompts[0].messages[0] == {"role": "system", "content": "sys"}
    assert out.prompts[1].messages[0] == {"role": "system", "content": "own"} and len(out.prompts[1].messages) == 2


def test_row_range():
    out = run([{"prompt": str(i)} for i in range(10)], start_index=3, num_samples=4)
    assert [p.row_idx for p in out.prompts] == [3, 4, 5, 6] and out.rows == 4
    with pytest.raises(DatasetError, match="past the last row"):
        run([{"prompt": "x"}], start_index=5)


def test_missing_field_lists_columns():
    with pytest.raises(DatasetError, match="needs column 'problem'.*columns present: question, answer"):
        resolve_adapter("deepscaler", ["question", "answer"])
    with pytest.raises(DatasetError, match="columns present: foo, bar"):
        resolve_adapter("auto", ["foo", "bar"])
    with pytest.raises(DatasetError, match="needs column 'body'"):
        resolve_adapter("auto", ["prompt"], prompt_field="body")


def documented_adapter() -> str:
    """The user adapter of docs/generate.md, as a user copies it."""
    docs = (Path(__file__).resolve().parents[2] / "docs" / "generate.md").read_text()
    return "# my_adapter.py" + docs.split("```python\n# my_adapter.py", 1)[1].split("```", 1)[0]


def test_user_adapter_from_file_and_module(tmp_path, monkeypatch):
    path = tmp_path / "my_adapter.py"
    path.write_text(documented_adapter())
    rows = [{"title": "T", "body": "B", "n": 1}, {"title": "U", "body": "", "n": 2}]
    for spec in (f"{path}:TitleAndBody", "my_adapter:TitleAndBody"):
        monkeypatch.syspath_prepend(str(tmp_path))
        out = run(rows, spec)
        assert out.adapter == "title-and-body"
        assert out.prompts[0].messages == [{"role": "user", "content": "T\n\nB"}]
        assert out.prompts[0].metadata == {"original_n": 1}
        assert out.skipped == {"empty body": 1}
    with pytest.raises(DatasetError, match="has no Nope"):
        resolve_adapter(f"{path}:Nope", ["title", "body"])
    with pytest.raises(DatasetError, match="adapter file not found"):
        resolve_adapter(f"{tmp_path}/missing.py:X", ["title"])
    with pytest.raises(DatasetError, match="unknown adapter 'bogus'"):
        resolve_adapter("bogus", ["title"])


def test_an_adapter_importing_the_removed_module_is_told_the_public_path(tmp_path):
    path = tmp_path / "old_adapter.py"
    path.write_text(documented_adapter().replace("from qstar_cli import", "from qstar_cli.adapters import"))
    fix = "No module named 'qstar_cli.adapters'; an adapter imports DatasetAdapter and SkipRow from qstar_cli"
    with pytest.raises(DatasetError, match=fix):
        resolve_adapter(f"{path}:TitleAndBody", ["title", "body"])


ROWS = [{"problem": "p0", "answer": "a0"}, {"problem": "p1", "answer": "a1"}]


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "disk", "dict"])
def test_local_sources(tmp_path, kind):
    ds = make(ROWS)
    path = tmp_path / f"data.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif kind == "json":
        ds.to_json(path, lines=False)
    elif kind == "parquet":
        ds.to_parquet(path)
    elif kind == "csv":
        ds.to_csv(path, index=False)
    elif kind == "disk":
        ds.save_to_disk(path)
    else:
        datasets.DatasetDict({"test": ds}).save_to_disk(path)
    loaded = load_source(str(path), split="test" if kind == "dict" else "train")
    assert loaded.to_list() == ROWS


def test_source_errors(tmp_path):
    with pytest.raises(DatasetError, match="dataset not found: .*nope.jsonl"):
        load_source(str(tmp_path / "nope.jsonl"))
    (tmp_path / "bad.txt").write_text("x")
    with pytest.raises(DatasetError, match="unsupported dataset file"):
        load_source(str(tmp_path / "bad.txt"))
    datasets.DatasetDict({"test": make(ROWS)}).save_to_disk(tmp_path / "dd")
    with pytest.raises(DatasetError, match="no split 'train'; splits: test"):
        load_source(str(tmp_path / "dd"))
    (tmp_path / "broken.jsonl").write_text('{"problem": "ok"}\n{not json\n')
    with pytest.raises(DatasetError, match="broken.jsonl line 2 is not valid JSON"):
        load_source(str(tmp_path / "broken.jsonl"))
