"""Misuse as an adversarial new user would try it: every mistake is exit 2 with one line naming the
problem, checked before the models load where it can be, and no existing file changes; --overwrite
destroys nothing it should not; prompts and responses stay inside both models' contexts; resuming
keys on content (prompt ids, model files) and resolved paths, not on spelling."""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest
import torch

from qstar_cli import GenerateConfig, run_generate
from qstar_cli.engine.sampler import DualModelSampler
from qstar_cli.generate.adapters import adapt_rows, resolve_adapter
from qstar_cli.testing.tiny import build_tiny_model
from tests.helpers import invoke, one_line_error, snapshot, swapped_tokenizer, write_jsonl

ROWS = [{"prompt": f"Question {i}: what is {i} plus {i}?", "id": i} for i in range(6)]
LOADING = "loading models"  # what generate prints just before the models load


def edit_json(path, **values):
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


# --- The world the table's commands run in ----------------------------------------------------------


@pytest.fixture(scope="module")
def w(tmp_path_factory, tiny_model_dirs, tiny_tokenizer):
    root = tmp_path_factory.mktemp("world")
    theta, target = tiny_model_dirs
    w = SimpleNamespace(root=root, theta=theta, target=target)
    w.data = write_jsonl(root / "prompts.jsonl", ROWS)
    w.base = ["--model-theta", theta, "--model-t", target, "--theta-format", "plain", "--dataset", w.data,
              "--max-new-tokens", "4", "--batch-size", "4", "--device", "cpu"]  # fmt: skip
    w.prev = root / "prev.jsonl"  # a complete earlier run
    assert invoke("generate", *w.base, "--output", w.prev).exit_code == 0
    w.prev_side = root / "prev.diagnostics.jsonl"
    w.new = root / "new.jsonl"  # an output no run has written

    (root / "a_dir").mkdir()
    w.a_file = root / "a_file.txt"
    w.a_file.write_text("not a directory\n")
    w.foreign = root / "foreign.jsonl"  # not a qstar run
    w.foreign.write_text('{"not": "ours"}\n')
    w.bad_template = root / "bad.jinja"
    w.bad_template.write_text("{% for m in messages %}{{ m.content ")
    w.strict_template = root / "strict.jinja"  # renders no row: there is no message field 'nothing'
    w.strict_template.write_text("{{ messages[0].nothing }}")
    for name, text in {"abc": "max_new_tokens: abc\n", "list": "temperature: [1]\n", "seq": "- a\n", "typo": "temprature: 0.5\n"}.items():
        (root / f"{name}.yaml").write_text(text)
    (root / "empty.jsonl").write_text("")
    (root / "syntax.py").write_text("class Mine(:\n")
    (root / "text.py").write_text(
        "from qstar_cli import DatasetAdapter\n\n"
        "class Mine(DatasetAdapter):\n    fields = ('prompt',)\n\n    def messages(self, row):\n        return 'oops'\n"
    )
    (root / "header.csv").write_text("prompt,id\n")
    (root / "empty.jinja").write_text("")  # renders every prompt to no tokens
    (root / "boom.py").write_text(
        "from qstar_cli import DatasetAdapter\n\n"
        "class Boom(DatasetAdapter):\n    fields = ('prompt',)\n\n    def messages(self, row):\n        return row['boom']\n"
    )
    write_jsonl(root / "blank_prompts.jsonl", [{"prompt": " "}, {"prompt": ""}, {"prompt": "\n"}])
    (root / "m.meta.json").write_text(json.dumps(ROWS))  # a dataset named like run m's manifest
    (root / "garbage.meta.json").write_text("{not json")
    (root / "list.meta.json").write_text("[1, 2]")
    old = json.loads((root / "prev.meta.json").read_text())
    del old["fingerprint_config"]["fingerprint_version"]
    (root / "old.meta.json").write_text(json.dumps(old))

    # A copy of the run whose sidecar's last line is damaged, and whose main file has one line more.
    main = (root / "prev.jsonl").read_bytes()
    (root / "torn.jsonl").write_bytes(main + main.splitlines(keepends=True)[-1])
    side = (root / "prev.diagnostics.jsonl").read_bytes().splitlines(keepends=True)
    (root / "torn.diagnostics.jsonl").write_bytes(b"".join(side[:-1]) + b"{damaged}\n")
    shutil.copy(root / "prev.meta.json", root / "torn.meta.json")

    swapped, _ = swapped_tokenizer(tiny_tokenizer)
    w.swapped = root / "models" / "swapped"
    build_tiny_model(swapped, seed=5).save_pretrained(w.swapped)
    swapped.save_pretrained(w.swapped)
    w.short = root / "models" / "short"  # theta with a context of 8 tokens: no prompt fits
    shutil.copytree(theta, w.short)
    edit_json(w.short / "config.json", max_position_embeddings=8)
    return w


def gen(*extra, out="new"):
    """``generate`` with the world's base flags; later flags override earlier ones."""
    return lambda w: ["generate", *w.base, "--output", getattr(w, out) if isinstance(out, str) else out(w), *extra]


def at(name):
    return lambda w: w.root / name


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def case(name, command, fragments, before_loading, marks=()):
    """A mistake: the command, fragments of its one error line, and whether it is found before the models load."""
    return pytest.param(command, fragments, before_loading, id=name, marks=marks)


CASES = [
    # generate: rows and outputs
    case("start-index at the row count", gen("--start-index", "6"), ["--start-index 6", "past the last row"], True),
    case("output is a directory", gen(out=at("a_dir")), ["a_dir is a directory"], True),
    case("output is empty", gen(out=lambda w: ""), ["--output is empty"], True),
    case("output under a file", gen(out=lambda w: w.a_file / "x.jsonl"), ["a_file.txt is a file"], True),
    case("output is the dataset", gen("--overwrite", out="data"), ["would overwrite the input", "prompts.jsonl"], True),
    case(
        "manifest is the dataset",
        gen("--dataset", at("m.meta.json"), "--overwrite", out=at("m.jsonl")),
        ["m.meta.json would overwrite the input"],
        True,
    ),
    case("output inside a model", gen(out=lambda w: Path(w.theta) / "gen.jsonl"), ["would overwrite the input"], True),
    case("output names a sidecar", gen("--overwrite", out="prev_side"), ["--output must name the main .jsonl"], True),
    case("output not jsonl", gen(out=at("out.csv")), ["--output must name the main .jsonl", "out.csv"], True),
    case("markup in a path is text", gen(out=at("[red]x.csv")), ["[red]x.csv"], True),
    # generate: device, formats, config file
    case("cuda without CUDA", gen("--device", "cuda"), ["--device cuda", "CUDA is not available"], True, marks=NO_CUDA),
    case("unknown device", gen("--device", "gpu"), ["unknown device 'gpu'"], True),
    case("unknown dtype", gen("--dtype", "fp8"), ["unknown dtype 'fp8'"], True),
    case("teacher top-K past 64", gen("--teacher-topk", "65"), ["--teacher-topk must be an integer from 0 (off) to 64, got 65"], True),
    case("teacher top-K not an integer", gen("--teacher-topk", "2.5"), ["Invalid value for '--teacher-topk'", "valid integer"], True),
    case(
        "teacher top-K without per-token arrays", gen("--teacher-topk", "4", "--diagnostics", "summary"), ["add --diagnostics full"], True
    ),
    case("template syntax error", gen("--t-format", at("bad.jinja")), ["bad.jinja line 1", "end of template"], True),
    case("template missing", gen("--t-format", at("none.jinja")), ["not found", "none.jinja"], True),
    case(
        "config value of the wrong type",  # (without the base flags: --max-new-tokens would override the file)
        lambda w: [
            "generate",
            "--config",
            w.root / "abc.yaml",
            "--model-theta",
            w.theta,
            "--model-t",
            w.target,
            "--dataset",
            w.data,
            "--output",
            w.new,
        ],
        ["max_new_tokens must be an integer", "'abc'"],
        True,
    ),
    case("config list for a number", gen("--config", at("list.yaml")), ["temperature must be a number", "[1]"], True),
    case("config not a mapping", gen("--config", at("seq.yaml")), ["must be a mapping"], True),
    case("config unknown key", gen("--config", at("typo.yaml")), ["unknown setting 'temprature'"], True),
    case("config missing", gen("--config", at("none.yaml")), ["cannot read config", "none.yaml"], True),
    # generate: resuming
    case("damaged manifest", gen(out=at("garbage.jsonl")), ["garbage.meta.json is damaged", "--overwrite"], True),
    case("manifest not an object", gen(out=at("list.jsonl")), ["list.meta.json is damaged"], True),
    case("manifest of an older qstar", gen(out=at("old.jsonl")), ["older qstar", "fingerprint_version", "--overwrite"], True),
    case("resume with another temperature", gen("--temperature", "0.7", out="prev"), ["temperature (1.0 -> 0.7)"], True),
    case("foreign file at the output", gen(out="foreign"), ["without a manifest"], True),
    # generate: datasets
    case("empty dataset", gen("--dataset", at("empty.jsonl")), ["empty.jsonl is empty"], True),
    case("dataset with a header only", gen("--dataset", at("header.csv")), ["has no rows"], True),
    case("every prompt empty", gen("--dataset", at("blank_prompts.jsonl")), ["no usable prompt in the 3 rows", "3 empty prompt"], True),
    case("dataset file missing", gen("--dataset", at("missing.jsonl")), ["dataset not found", "missing.jsonl"], True),
    case("dataset path missing", gen("--dataset", at("no/such/dir")), ["dataset not found"], True),
    case("split of a local file", gen("--split", "test"), ["--split", "is one split"], True),
    case("subset of a local file", gen("--subset", "main"), ["--subset", "is one split"], True),
    case("adapter file missing", gen("--adapter", "nowhere.py:Mine"), ["adapter file not found"], True),
    case(
        "adapter with a syntax error",
        gen("--adapter", lambda w: f"{w.root / 'syntax.py'}:Mine"),
        ["syntax error in", "syntax.py line 1"],
        True,
    ),
    case(
        "adapter returning text",
        gen("--adapter", lambda w: f"{w.root / 'text.py'}:Mine"),
        ["adapter Mine: messages(row) must return", "'oops'"],
        True,
    ),
    case("adapter column missing", gen("--adapter", "deepscaler"), ["needs column 'problem'", "prompt, id"], True),
    # generate: models and settings
    case("model path missing", gen("--model-t", at("no_model")), ["model directory not found", "no_model"], True),
    case("model relative path missing", gen("--model-t", "./no_model"), ["model directory not found: ./no_model"], True),
    case("model is a data file", gen("--model-theta", at("prompts.jsonl")), ["not a model directory or .gguf file"], True),
    case("gguf missing", gen("--model-theta", at("m.gguf")), ["model file not found"], True),
    case("num-samples zero", gen("--num-samples", "0"), ["--num-samples must be positive"], True),
    case("negative top-k", gen("--top-k", "-1"), ["top_k must be >= 0"], True),
    case("negative seed", gen("--seed", "-1"), ["--seed must be an integer from 0 to 2^64 - 1"], True),
    case("model directory without config", gen("--model-t", at("a_dir")), ["not a model directory (it has no config.json)"], True),
    case("fixed alpha out of range", gen("--alpha-method", "fixed", "--alpha", "1.5"), ["alpha"], True),
    case("required flag missing", lambda w: ["generate", "--dataset", w.data], ["--model-theta is required"], True),
    case("alpha without fixed", gen("--alpha", "0.3"), ["--alpha 0.3 is for --alpha-method fixed", "drop --alpha"], True),
    case("count past 64 bits", gen("--samples-per-prompt", "99999999999999999999999"), ["--samples-per-prompt must be below 2^63"], True),
    case("tokens past 64 bits", gen("--max-new-tokens", "100000000000000000000000"), ["--max-new-tokens must be below 2^63"], True),
    case(
        "schedule past memory", gen("--samples-per-prompt", "999999999999"), ["5999999999994 samples", "GiB of memory is available"], True
    ),
    case("missing file shaped like a hub id", gen("--dataset", "nodir/problems.txt"), ["dataset not found: nodir/problems.txt"], True),
    case(
        "missing model under a local dir", gen("--model-t", "tests/no_such_model"), ["model directory not found: tests/no_such_model"], True
    ),
    case(
        "adapter that raises",
        gen("--adapter", lambda w: f"{w.root / 'boom.py'}:Boom"),
        ["adapter Boom failed on row 0", "KeyError: 'boom'"],
        True,
    ),
    case("damaged line in a run", gen(out=at("torn.jsonl")), ["torn.diagnostics.jsonl line 6 is damaged"], True),
    # generate: found from a model's config, before any weight loads
    case("hub id not there", gen("--model-t", "no-such-org/no-such-model"), ["cannot load model", "as a hub id"], True),
    # generate: found once the models are loaded
    case("vocabularies differ", gen("--model-t", lambda w: w.swapped), ["do not share a vocabulary"], False),
    case(
        "no prompt fits the context",
        gen("--model-theta", lambda w: w.short),
        ["no usable prompt", "too long for the context of pi_theta (8 tokens)"],
        False,
    ),
    case("template fails on every row", gen("--t-format", at("strict.jinja")), ["no usable prompt", "prompt format error"], False),
    case(
        "template renders nothing",
        gen("--theta-format", at("empty.jinja")),
        ["no usable prompt", "6 prompt renders to no tokens for pi_theta"],
        False,
    ),
    # the command line itself
    case("value of the wrong type", gen("--max-new-tokens", "abc"), ["Invalid value for '--max-new-tokens'", "integer"], True),
    case("unknown flag", gen("--frobnicate"), ["No such option: --frobnicate"], True),
    case("unknown command", lambda w: ["generat"], ["No such command 'generat'"], True),
    case("version with an argument", lambda w: ["version", "now"], ["unexpected extra argument", "(now)"], True),
    # analyze
    case("analyze without a file", lambda w: ["analyze"], ["Missing argument 'SIDECAR'"], True),
    case("analyze a missing file", lambda w: ["analyze", w.root / "none.diagnostics.jsonl"], ["diagnostics file not found"], True),
    case("analyze a directory", lambda w: ["analyze", w.root / "a_dir"], ["a_dir is a directory"], True),
    case(
        "analyze the main file",
        lambda w: ["analyze", w.prev],
        ["holds no readable samples", "its sidecar is", "prev.diagnostics.jsonl"],
        True,
    ),
    case("analyze an empty file", lambda w: ["analyze", w.root / "empty.jsonl"], ["holds no readable samples"], True),
    case(
        "analyze plots into a file",
        lambda w: ["analyze", w.prev_side, "--plots", w.a_file],
        ["--plots", "is a file, not a directory"],
        True,
    ),
    case("analyze plots under a file", lambda w: ["analyze", w.prev_side, "--plots", w.a_file / "p"], ["a_file.txt is a file"], True),
    case(
        "analyze weights into a directory",
        lambda w: ["analyze", w.prev_side, "--export-weights", w.root / "a_dir"],
        ["is a directory"],
        True,
    ),
    case(
        "analyze weights over the sidecar",
        lambda w: ["analyze", w.prev_side, "--export-weights", w.prev_side],
        ["would overwrite the input"],
        True,
    ),
    case("analyze weights under a file", lambda w: ["analyze", w.prev_side, "--export-weights", w.a_file / "w.jsonl"], ["is a file"], True),
    case("analyze ess floor zero", lambda w: ["analyze", w.prev_side, "--ess-floor", "0"], ["--ess-floor must lie in (0, 1]"], True),
    case(
        "report seed negative",
        lambda w: ["report", w.prev, "--seed", "-1", "--tokenizer", w.target],
        ["--seed must be an integer from 0"],
        True,
    ),
    # compare
    case("compare one run", lambda w: ["compare", w.prev_side], ["compare needs two or more runs, got 1"], True),
    case(
        "compare a missing run", lambda w: ["compare", w.prev_side, w.root / "none.diagnostics.jsonl"], ["diagnostics file not found"], True
    ),
    case("compare plots into a file", lambda w: ["compare", w.prev_side, w.prev_side, "--plots", w.a_file], ["--plots", "is a file"], True),
]


@pytest.mark.parametrize("command, fragments, before_loading", CASES)
def test_mistake_is_one_line_and_changes_nothing(w, command, fragments, before_loading):
    args = command(w)
    args = [a(w) if callable(a) else a for a in args]
    before = snapshot(w.root, w.theta, w.target)
    result = invoke(*args)
    one_line_error(result, *fragments)
    assert (LOADING not in result.stdout) == before_loading, result.stdout
    assert snapshot(w.root, w.theta, w.target) == before


def test_a_mistake_in_a_real_process_is_one_line(w):
    """The same answers outside the test runner, in a real process without a terminal: rich wraps
    nothing (these lines are longer than 80 columns) and prints no traceback."""
    for args, fragment in [
        (["generate", *w.base, "--output", w.data, "--overwrite"], "would overwrite the input"),
        (["generate", *w.base, "--max-new-tokens", "abc", "--output", w.new], "Invalid value for '--max-new-tokens'"),
    ]:
        proc = subprocess.run([sys.executable, "-m", "qstar_cli", *map(str, args)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        [line] = proc.stderr.splitlines()
        assert line.startswith("error: ") and fragment in line and len(line) > 80, line


# --- --overwrite ------------------------------------------------------------------------------------


def test_overwrite_deletes_only_once_everything_has_loaded(w, tmp_path):
    out = tmp_path / "run.jsonl"
    args = ["generate", *w.base, "--output", out]
    assert invoke(*args).exit_code == 0
    files = snapshot(tmp_path)
    assert len(files) == 3
    # A typo in a model path, models that do not fit together, prompts that fit no context: the
    # first is found before loading, the others after; none of them costs the previous run.
    for bad, fragment in [
        (["--model-t", tmp_path / "typo"], "model directory not found"),
        (["--model-t", w.swapped], "do not share a vocabulary"),
        (["--model-theta", w.short], "too long for the context"),
        (["--t-format", w.bad_template], "bad.jinja line 1"),
    ]:
        one_line_error(invoke(*args, *bad, "--overwrite"), fragment)
        assert snapshot(tmp_path) == files
    # With nothing wrong, --overwrite starts afresh: the files are those of a fresh run.
    assert invoke(*args, "--seed", "7", "--overwrite").exit_code == 0
    assert invoke("generate", *w.base, "--seed", "7", "--output", tmp_path / "fresh.jsonl").exit_code == 0
    after = snapshot(tmp_path)
    for suffix in (".jsonl", ".diagnostics.jsonl"):
        assert after[str(tmp_path / f"run{suffix}")] == after[str(tmp_path / f"fresh{suffix}")] != files[str(tmp_path / f"run{suffix}")]


# --- Context length ---------------------------------------------------------------------------------

# Prompts of 1 to 40 words; pi_t's template repeats the text, so its prompts grow twice as fast.
WORDS = [1, 3, 6, 8, 10, 14, 18, 24, 40]
THETA_LIMIT, T_LIMIT, MAX_NEW = 40, 48, 30


@pytest.fixture(scope="module")
def short_context(tmp_path_factory, tiny_model_dirs):
    """pi_theta limited by its config (40 positions), pi_t by its tokenizer (48 tokens)."""
    root = tmp_path_factory.mktemp("context")
    theta, target = (shutil.copytree(d, root / name) for d, name in zip(tiny_model_dirs, ("theta", "target")))
    edit_json(theta / "config.json", max_position_embeddings=THETA_LIMIT)
    edit_json(target / "tokenizer_config.json", model_max_length=T_LIMIT)
    template = root / "twice.jinja"
    template.write_text("{% for m in messages %}{{ m.content }} {{ m.content }}{% endfor %}")
    data = write_jsonl(root / "lengths.jsonl", [{"prompt": " ".join(["the"] * n)} for n in WORDS])
    return SimpleNamespace(theta=theta, target=target, template=template, data=data)


def test_prompts_and_responses_stay_inside_both_contexts(short_context, tmp_path):
    c = short_context
    config = GenerateConfig(model_theta=str(c.theta), model_t=str(c.target), theta_format="plain", t_format=str(c.template),
                            dataset=str(c.data), output=str(tmp_path / "ctx.jsonl"), max_new_tokens=MAX_NEW, batch_size=4,
                            device="cpu")  # fmt: skip
    sampler = DualModelSampler.from_pretrained(
        config.model_theta, config.model_t, device="cpu", theta_format="plain", t_format=config.t_format, max_new_tokens=MAX_NEW
    )
    assert sampler.context_limits == (THETA_LIMIT, T_LIMIT)
    # The furthest position each model is ever fed, whatever the batch's padding.
    furthest = {}
    for name, loaded in (("theta", sampler.theta), ("t", sampler.target)):

        def record(module, args, kwargs, name=name):
            furthest[name] = max(furthest.get(name, -1), int(kwargs["position_ids"].max()))

        loaded.model.register_forward_pre_hook(record, with_kwargs=True)

    summary = run_generate(config, sampler=sampler)
    side = [orjson.loads(line) for line in open(tmp_path / "ctx.diagnostics.jsonl", "rb")]
    meta = json.loads((tmp_path / "ctx.meta.json").read_text())
    # The two longest prompts fill a context and are skipped, counted under a reason naming it.
    assert (
        summary.skipped
        == meta["counts"]["skipped"]
        == {
            f"prompt too long for the context of pi_t ({T_LIMIT} tokens)": 1,
            f"prompt too long for the context of pi_theta ({THETA_LIMIT} tokens) and pi_t ({T_LIMIT} tokens)": 1,
        }
    )
    assert [s["sample_idx"] for s in side] == list(range(len(WORDS) - 2))
    binding = set()
    for s in side:
        room = {"max_new_tokens": MAX_NEW, "pi_theta": THETA_LIMIT - len(s["prompt_ids_theta"]), "pi_t": T_LIMIT - len(s["prompt_ids_t"])}
        budget = min(room.values())
        assert budget >= 1
        if s["finish_reason"] == "length":
            assert s["num_tokens"] == budget
            binding.add(min(room, key=room.get))
        else:
            assert s["num_tokens"] <= budget and s["per_token"]["token_id"][-1] in sampler.eos
    assert binding == {"max_new_tokens", "pi_theta", "pi_t"}  # each limit ends some response
    # Prompt and response together fill a context exactly: the last fed token sits at limit - 2.
    assert furthest == {"theta": THETA_LIMIT - 2, "t": T_LIMIT - 2}


def test_sampler_refuses_a_prompt_without_room(short_context):
    sampler = DualModelSampler.from_pretrained(str(short_context.theta), str(short_context.target), device="cpu", max_new_tokens=4)
    with pytest.raises(ValueError, match="fills a model's context"):
        sampler.generate([[{"role": "user", "content": "x"}]], prompt_ids=[([1] * THETA_LIMIT, [1, 2])])


# --- Resuming keys on content, not spelling ----------------------------------------------------------


def test_resume_follows_content(w, tiny_tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", ROWS[:4])
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n")
    theta = shutil.copytree(w.theta, tmp_path / "theta")
    out = tmp_path / "out" / "run.jsonl"
    args = ["generate", *w.base, "--model-theta", theta, "--dataset", data, "--t-format", template, "--output", out]
    assert invoke(*args).exit_code == 0
    files = snapshot(out.parent)

    def refused(*fragments):
        one_line_error(invoke(*args), *fragments)
        assert snapshot(out.parent) == files

    # An edited row, an edited template: the prompt ids differ.
    write_jsonl(data, [ROWS[0], {**ROWS[1], "prompt": "edited"}, *ROWS[2:4]])
    refused("the prompt ids of the schedule changed")
    write_jsonl(data, ROWS[:4])
    template.write_text(template.read_text().replace("assistant", "bot"))
    refused("the prompt ids of the schedule changed")
    template.write_text(template.read_text().replace("bot", "assistant"))
    # A row removed: the schedule would shrink under the samples written.
    write_jsonl(data, ROWS[:3])
    refused("schedule of 4 prompts and this run has 3", "may grow")
    write_jsonl(data, ROWS[:4])
    # Other weights in the same directory: the model's files differ.
    saved = shutil.copytree(theta, tmp_path / "saved")
    build_tiny_model(tiny_tokenizer, seed=1, num_layers=3).save_pretrained(theta)
    refused("the files of pi_theta changed")
    shutil.rmtree(theta)
    shutil.copytree(saved, theta)

    # Rows added: the schedule grows and the run continues, ending as a fresh run over all rows would.
    write_jsonl(data, ROWS)
    result = invoke(*args)
    assert result.exit_code == 0 and "resuming: 4 of 6" in result.output, result.output
    fresh = tmp_path / "out" / "fresh.jsonl"
    assert invoke(*args[:-1], fresh).exit_code == 0
    for suffix in (".jsonl", ".diagnostics.jsonl"):
        assert out.with_name(f"run{suffix}").read_bytes() == out.with_name(f"fresh{suffix}").read_bytes()


def test_resume_sees_through_spelling(w, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data" / "p.jsonl", ROWS[:3])
    models = Path(w.theta).parent
    base = list(w.base)
    spellings = [
        ("data/p.jsonl", str(models / "theta")),
        ("./data/p.jsonl", str(models / "theta") + "/"),
        (str(tmp_path / "data" / "p.jsonl"), str(models / ".." / models.name / "theta")),
    ]
    outputs = ["out/run.jsonl", "./out/run.jsonl", str(tmp_path / "out" / "run.jsonl")]
    results = []
    for (dataset, theta), out in zip(spellings, outputs):
        args = base + ["--dataset", dataset, "--model-theta", theta, "--output", out]
        results.append(invoke("generate", *args))
        assert results[-1].exit_code == 0, results[-1].output
        if len(results) == 1:
            files = snapshot(tmp_path / "out")
    assert all("resuming: 3 of 3" in r.output for r in results[1:])
    data_files = {k: v for k, v in snapshot(tmp_path / "out").items() if not k.endswith(".meta.json")}  # the manifest logs sessions
    assert data_files == {k: v for k, v in files.items() if not k.endswith(".meta.json")} and len(data_files) == 2
    # A copy of the dataset elsewhere is another input, named as such.
    shutil.copy(tmp_path / "data" / "p.jsonl", tmp_path / "copy.jsonl")
    one_line_error(invoke("generate", *base, "--dataset", "copy.jsonl", "--output", "out/run.jsonl"), "dataset (", "copy.jsonl")


# --- Where the lesser cases land ----------------------------------------------------------------------


def test_conversation_must_end_in_a_user_or_tool_turn(tiny_tokenizer):
    import datasets

    turns = [
        [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Calling."}, {"role": "tool", "content": "Sunny."}],
        [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be brief."}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "assistant", "content": "Again"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    ]
    rows = datasets.Dataset.from_list([{"messages": t} for t in turns])
    adapted = adapt_rows(rows, resolve_adapter("auto", rows.column_names))
    assert [p.row_idx for p in adapted.prompts] == [0, 3]
    assert adapted.prompts[0].messages[-1]["role"] == "tool"  # the model answers the tool's result
    assert adapted.skipped == {"last turn is system, not user or tool": 1, "last turn is assistant, not user or tool": 1}
