import json
import os
from pathlib import Path

import pytest

from gspo.data import (
    GSM8K_INSTRUCTION,
    Example,
    format_prompt,
    hellaswag_preprocess,
    load_examples,
    read_snapshot,
    write_snapshot,
)

FIXTURES = Path(__file__).parent / "fixtures"


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


# ---- loaders ------------------------------------------------------------------------------------------------


def test_gsm8k_real_test_split(gsm8k_dir):
    examples = load_examples("gsm8k", path=gsm8k_dir, split="test")
    assert len(examples) == 1319
    first = examples[0]
    assert first.id == "gsm8k/test/0" and first.task == "gsm8k"
    assert first.prompt.startswith("Janet’s ducks lay 16 eggs per day.")
    assert first.prompt.endswith("\n" + GSM8K_INSTRUCTION)
    assert first.reference.endswith("#### 18")
    assert len({e.id for e in examples}) == len(examples)


def test_gsm8k_file_path_and_limit(gsm8k_dir):
    examples = load_examples("gsm8k", path=gsm8k_dir / "train.jsonl", split="train", limit=5)
    assert [e.id for e in examples] == [f"gsm8k/train/{i}" for i in range(5)]
    rows = [json.loads(line) for line in (gsm8k_dir / "train.jsonl").read_text().splitlines()[:5]]
    assert [e.reference for e in examples] == [r["answer"] for r in rows]


def test_humaneval_package_file():
    examples = load_examples("humaneval")
    assert len(examples) == 164
    e = examples[0]
    assert e.id == "humaneval/HumanEval/0" and e.task == "humaneval"
    assert set(e.reference) == {"task_id", "prompt", "test", "entry_point", "canonical_solution"}
    assert e.prompt == e.reference["prompt"] and e.reference["entry_point"] == "has_close_elements"
    assert examples[-1].id == "humaneval/HumanEval/163"


def test_humaneval_local_path_without_solution(tmp_path):
    row = {"task_id": "T/0", "prompt": "def f():\n", "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}
    path = write_lines(tmp_path / "he.jsonl", json.dumps(row))
    [e] = load_examples("humaneval", path=path)
    assert e.reference == row and e.id == "humaneval/T/0"


def test_hellaswag_preprocess_matches_harness():
    assert (
        hellaswag_preprocess("  Home: [header] How to x [title] Do it. [step] Now.  ") == "Home: How to x. Do it. Now."
    )
    assert hellaswag_preprocess("a  b [substeps] c") == "a b c"
    # The harness strips before removing tags and halves runs of spaces once; both quirks are kept.
    assert hellaswag_preprocess("[title] Go.") == " Go."
    assert hellaswag_preprocess("a    b") == "a  b"


def test_hellaswag_fixture():
    examples = load_examples("hellaswag", path=FIXTURES / "hellaswag.jsonl", split="validation")
    assert len(examples) == 6
    assert [e.reference for e in examples] == [0, 1, 0, 2, 2, 3]  # int and "1"-style labels alike
    e = examples[1]
    assert e.id == "hellaswag/validation/1" and e.task == "hellaswag"
    assert e.meta["context"] == "Playing guitar: A man sits on a stool holding an acoustic guitar. The man"
    assert e.meta["endings"][1] == "tunes the strings and begins strumming a song."
    assert e.meta["ind"] == 12 and e.meta["source_id"] == "activitynet~v_fixture02"
    assert e.prompt.endswith("Answer:")
    assert "\nB. tunes the strings and begins strumming a song.\n" in e.prompt
    assert e.meta["context"] in e.prompt
    # WikiHow artifacts: [title] becomes a sentence break, other bracketed tags vanish, empty ctx_b leaves no space
    wiki = examples[2]
    assert wiki.meta["context"] == (
        "Home and Garden: How to water a houseplant. Check the soil. "
        "Push a finger an inch into the soil to feel whether it is dry."
    )
    assert wiki.meta["endings"][0] == " If the soil is dry, the plant needs water.. Pour water slowly around the base."
    assert wiki.meta["endings"][3] == " Paint the pot. Use a brush with thick bristles."
    assert examples[3].meta["context"] == (
        "Running a marathon: Hundreds of runners wait behind a starting line. A horn sounds. The runners"
    )


def test_custom_jsonl():
    examples = load_examples("custom", path=FIXTURES / "custom.jsonl", reward="gsm8k")
    assert [e.id for e in examples] == ["apples", "custom/1", "3"]
    assert [e.reference for e in examples] == ["7", "42", "15"]
    assert {e.task for e in examples} == {"gsm8k"}
    assert examples[0].meta == {"topic": "addition"} and examples[1].meta == {}


def test_reward_override_for_a_known_source():
    examples = load_examples("hellaswag", path=FIXTURES / "hellaswag.jsonl", reward="choice", limit=2)
    assert [e.task for e in examples] == ["choice", "choice"]


def test_arithmetic_delegates_to_the_generator():
    from gspo.arithmetic import make_examples

    examples = load_examples("arithmetic", limit=7, seed=3, max_operand=9)
    assert examples == make_examples(7, 3, max_operand=9)
    assert {e.task for e in examples} == {"arithmetic"}


def test_hub_unreachable_is_one_clear_error(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub.constants

    # Offline mode makes the failure immediate instead of a retry loop; empty caches rule out a stored copy.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError) as err:
        load_examples("gsm8k", split="test")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("cannot load openai/gsm8k split 'test' from the Hugging Face Hub (")
    assert msg.endswith("pass a local JSONL path instead")


# ---- malformed input: one line naming file, line and field -------------------------------------------------

GOOD_GSM = json.dumps({"question": "1+1?", "answer": "#### 2"})
GOOD_HS = {"ind": 1, "activity_label": "A", "ctx_a": "b.", "ctx_b": "c", "endings": ["w", "x", "y", "z"], "label": 1}


def hs(**change) -> str:
    row = {**GOOD_HS, **change}
    return json.dumps({k: v for k, v in row.items() if v is not None})


@pytest.mark.parametrize(
    "lines, source, message",
    [
        ([GOOD_GSM, GOOD_GSM, '{"question": "no answer"}'], "gsm8k", "{f}:3: missing field 'answer'"),
        ([GOOD_GSM, '{"question": "1+1?", "answer": 2}'], "gsm8k", "{f}:2: field 'answer' must be str, got int"),
        ([GOOD_GSM, '{"question": "1+1?", "answer": '], "gsm8k", "{f}:2: invalid JSON (Expecting value, column 32)"),
        (["", '["question", "answer"]'], "gsm8k", "{f}:2: expected a JSON object, got list"),
        ([], "gsm8k", "{f}: empty file (no JSON rows)"),
        (["", "   "], "gsm8k", "{f}: empty file (no JSON rows)"),
        ([hs(), hs(endings=["a", "b", "c"])], "hellaswag", "{f}:2: field 'endings' must be a list of 4 strings"),
        ([hs(endings="abcd")], "hellaswag", "{f}:1: field 'endings' must be list, got str"),
        ([hs(), hs(), hs(label="")], "hellaswag", "{f}:3: field 'label' must be 0, 1, 2 or 3, got ''"),
        ([hs(label=4)], "hellaswag", "{f}:1: field 'label' must be 0, 1, 2 or 3, got 4"),
        ([hs(label=1.0)], "hellaswag", "{f}:1: field 'label' must be int or str, got float"),
        ([hs(ctx_b=None)], "hellaswag", "{f}:1: missing field 'ctx_b'"),
        (['{"reference": "1"}'], "custom", "{f}:1: missing field 'prompt'"),
        (['{"prompt": "p"}'], "custom", "{f}:1: missing field 'reference'"),
        (['{"prompt": "p", "reference": 1, "meta": [1]}'], "custom", "{f}:1: field 'meta' must be an object, got list"),
        (['{"prompt": "p", "reference": 1, "id": 1.5}'], "custom", "{f}:1: field 'id' must be str or int, got float"),
        (
            ['{"prompt": "p", "reference": 1, "id": "a"}', "", '{"prompt": "q", "reference": 2, "id": "a"}'],
            "custom",
            "{f}:3: field 'id' repeats 'a' from line 1",
        ),
        (
            ['{"task_id": "T/0", "prompt": "p", "test": "t", "entry_point": "f"}', '{"task_id": "T/0", "prompt": "p"}'],
            "humaneval",
            "{f}:2: missing field 'test'",
        ),
    ],
)
def test_malformed_input_messages(tmp_path, lines, source, message):
    path = write_lines(tmp_path / "data.jsonl", *lines) if lines else tmp_path / "data.jsonl"
    path.touch()
    with pytest.raises(ValueError) as err:
        load_examples(source, path=path, reward="gsm8k" if source == "custom" else None)
    assert str(err.value) == message.format(f=path)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(GOOD_GSM.encode() + b"\n" + b'{"question": "\xff", "answer": "x"}\n')
    with pytest.raises(ValueError, match=r"^.*data\.jsonl:2: not valid UTF-8$"):
        load_examples("gsm8k", path=path)


def test_unknown_reward_and_source(tmp_path):
    path = FIXTURES / "custom.jsonl"
    with pytest.raises(ValueError) as err:
        load_examples("custom", path=path, reward="nope")
    assert str(err.value).startswith(f"{path}: unknown reward 'nope'; known rewards: ")
    assert "gsm8k" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"^custom data needs both path= .* and reward= "):
        load_examples("custom", path=path)
    with pytest.raises(
        ValueError,
        match=r"^unknown data source 'squad'; choose one of humaneval, gsm8k, hellaswag, arithmetic, custom$",
    ):
        load_examples("squad")
    with pytest.raises(ValueError, match=r"^arithmetic: limit= is required"):
        load_examples("arithmetic")
    with pytest.raises(ValueError, match=r"^gsm8k: unexpected options max_operand$"):
        load_examples("gsm8k", path=path, max_operand=3)


# ---- snapshots and prompt formatting -----------------------------------------------------------------------


def test_snapshot_roundtrip_deterministic_and_atomic(tmp_path):
    examples = load_examples("hellaswag", path=FIXTURES / "hellaswag.jsonl", split="validation")
    examples += load_examples("humaneval", limit=2)
    path, digest = write_snapshot(examples, tmp_path / "a")
    assert read_snapshot(path) == examples
    # Same examples, built again in another order of dict keys, give the same bytes and hash.
    rebuilt = [Example.from_dict(json.loads(json.dumps(dict(reversed(list(e.to_dict().items())))))) for e in examples]
    path2, digest2 = write_snapshot(rebuilt, tmp_path / "b")
    assert digest2 == digest and path2.name == path.name and path2.read_bytes() == path.read_bytes()
    assert digest[:16] in path.name
    # Rewriting into the same directory leaves exactly one file, no temporaries.
    write_snapshot(examples, tmp_path / "a")
    assert os.listdir(tmp_path / "a") == [path.name]
    _, other = write_snapshot(examples[:3], tmp_path / "a")
    assert other != digest and len(os.listdir(tmp_path / "a")) == 2


def test_snapshot_failure_leaves_nothing(tmp_path, monkeypatch):
    examples = load_examples("custom", path=FIXTURES / "custom.jsonl", reward="gsm8k")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_snapshot(examples, tmp_path / "s")
    assert os.listdir(tmp_path / "s") == []
    with pytest.raises(TypeError):  # not JSON-serialisable: fails before anything is written
        write_snapshot([Example(id="x", prompt="p", reference=object(), task="gsm8k")], tmp_path / "s")
    with pytest.raises(ValueError, match=r"^no examples to snapshot$"):
        write_snapshot([], tmp_path / "s")
    assert os.listdir(tmp_path / "s") == []


def test_snapshot_read_errors(tmp_path):
    path = write_lines(
        tmp_path / "snap.jsonl",
        json.dumps({"id": "a", "prompt": "p", "reference": 1, "task": "gsm8k"}),
        json.dumps({"id": "b", "prompt": "p", "reference": 1}),
    )
    with pytest.raises(ValueError) as err:
        read_snapshot(path)
    assert str(err.value) == f"{path}:2: missing field 'task'"


def test_format_prompt_uses_chat_template_when_present():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "2+2=": 1}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    e = Example(id="x", prompt="2+2=", reference="4", task="arithmetic")
    assert format_prompt(tok, e) == "2+2="  # no template: the raw prompt
    tok.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    assert format_prompt(tok, e) == "<|user|>2+2=\n<|assistant|>"
    assert format_prompt(tok, e, use_chat_template=False) == "2+2="
