"""Bad input to extract, train, workflow, tokens, evaluate, debug-tokens and star: each refused on one line naming the
flag or file and the problem, before any heavy work, with nothing already written lost."""

import hashlib
import json
import os
import shutil
import time

import pytest
import torch

from specalign.align.tokens import TokenPairs, write_pairs, write_reference_json
from specalign.cli import main
from specalign.models.registry import BUNDLED
from specalign.runs import exclusive
from specalign.world.build import WorldConfig, build_world

needs_models = pytest.mark.skipif(
    not all((p / "config.json").is_file() for p in BUNDLED.values()), reason="bundled models not present"
)
VOCAB = 30
TINY = ["--epochs", "2", "--embed-dim", "16", "--num-layers", "1", "--num-heads", "2", "--ffn-dim", "32",
        "--batch-size", "8", "--device", "cpu", "--checkpoint-every", "0", "--quiet"]  # fmt: skip


def refused(capsys, args, *fragments):
    """Run the CLI: exit 2, one line on stderr holding every fragment. Returns that line."""
    capsys.readouterr()
    assert main(args) == 2, args
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for f in fragments:
        assert str(f) in err, (f, err)
    return err


def digest(folder):
    """{relative path: sha256} of every file under folder (links by target): what 'nothing lost' compares."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def pairs(n, seed, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    d = torch.randint(1, vocab, (n, 8), generator=g).tolist()
    return TokenPairs(draft=d, target=[[1] + x[:-1] for x in d])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    write_reference_json(pairs(40, 1), root / "train.json")
    write_reference_json(pairs(16, 2), root / "test.json")
    write_reference_json(pairs(40, 3), root / "other.json")
    return root


def train_args(files, out, *extra):
    return ["train", "--train", str(files / "train.json"), "--test", str(files / "test.json"), "--out", str(out),
            "--vocab-size", str(VOCAB), *TINY, *extra]  # fmt: skip


# ---------------------------------------------------------------- train: numbers


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--epochs", "0", "--epochs: must be at least 1, got 0"),
    ("--batch-size", "0", "--batch-size: must be at least 1, got 0"),
    ("--batch-size", "-4", "--batch-size: must be at least 1, got -4"),
    ("--lr", "-1", "--lr: must be above 0, got -1.0"),
    ("--lr", "nan", "--lr: expected a finite number, got nan"),
    ("--vocab-size", str(10**12), "--vocab-size: at most 1048576, got 1000000000000"),
    ("--num-heads", "3", "--embed-dim 16 is not divisible by --num-heads 3"),
    ("--dropout", "1", "--dropout: must be below 1, got 1.0"),
])  # fmt: skip
def test_train_numbers(files, tmp_path, capsys, flag, value, message):
    refused(capsys, [*train_args(files, tmp_path / "task"), flag, value], message)
    assert not (tmp_path / "task").exists(), "nothing written"


# ---------------------------------------------------------------- train: token ids


def test_train_vocabulary_is_not_the_largest_id(tmp_path, capsys):
    """One stray id used to size the model (99999 -> a 100,000-token adapter; 10^12 -> 128 TB): now the vocabulary
    is the extraction's, else the reference's 32010, and an id outside it is named with its file and place."""
    for bad in (99_999, 10**12):
        p = pairs(8, 1)
        p.draft[3][2] = bad
        write_reference_json(p, tmp_path / "train.json")
        write_reference_json(pairs(4, 2), tmp_path / "test.json")
        refused(capsys, ["train", "--train", str(tmp_path / "train.json"), "--test", str(tmp_path / "test.json"),
                         "--out", str(tmp_path / "task"), *TINY],
                "train.json: pair 3 egpt_tokens[2]: token id", f"{bad} is outside the vocabulary of 32010",
                "pass --vocab-size")  # fmt: skip
    assert not (tmp_path / "task").exists()


def test_train_out_of_range_id_names_its_own_file(tmp_path, capsys):
    """The train store records vocab 30 (as an extraction's manifest does); the bad id is in the test file."""
    train = pairs(8, 1)
    train.vocab_size = VOCAB
    write_pairs(train, tmp_path / "store")
    test = pairs(4, 2)
    test.target[1][5] = 45
    write_reference_json(test, tmp_path / "test.json")
    err = refused(capsys, ["train", "--train", str(tmp_path / "store"), "--test", str(tmp_path / "test.json"),
                           "--out", str(tmp_path / "task"), *TINY],
                  "test.json: pair 1 vl_tokens[5]: token id 45 is outside the vocabulary of 30",
                  "store's manifest")  # fmt: skip
    assert not err.startswith(f"error: {tmp_path / 'store'}")


@pytest.mark.parametrize(("token", "message"), [
    ("-3", "token id must be a non-negative int, found -3"),
    ("2.5", "token id must be a non-negative int, found 2.5"),
    ('"7"', "token id must be a non-negative int, found '7'"),
    ("true", "token id must be a non-negative int, found True"),
])  # fmt: skip
def test_train_bad_token_ids(files, tmp_path, capsys, token, message):
    text = (files / "test.json").read_text().replace('"egpt_tokens": [', f'"egpt_tokens": [{token}, ', 1)
    (tmp_path / "bad.json").write_text(text)
    refused(capsys, ["train", "--train", str(files / "train.json"), "--test", str(tmp_path / "bad.json"), "--out",
                     str(tmp_path / "task"), "--vocab-size", str(VOCAB), *TINY],
            "bad.json: results[0].egpt_tokens[0]:", message)  # fmt: skip


def test_train_all_empty_token_lists(files, tmp_path, capsys):
    write_reference_json(TokenPairs(draft=[[]] * 5, target=[[]] * 5), tmp_path / "empty.json")
    refused(capsys, ["train", "--train", str(tmp_path / "empty.json"), "--test", str(files / "test.json"), "--out",
                     str(tmp_path / "task"), "--vocab-size", str(VOCAB), *TINY],
            "empty.json: no target token to learn from", "empty generations?")  # fmt: skip
    write_reference_json(TokenPairs(draft=[[5]], target=[[7]]), tmp_path / "one.json")  # one token: nothing to score
    refused(capsys, ["train", "--train", str(files / "train.json"), "--test", str(tmp_path / "one.json"), "--out",
                     str(tmp_path / "task"), "--vocab-size", str(VOCAB), *TINY],
            "one.json: no target token to score")  # fmt: skip


@pytest.mark.parametrize(("text", "message"), [
    ('{"results": [{"egpt_tokens": [1, 2], "vl_tok', "not valid JSON (truncated?)"),
    ("", "token file is empty"),
    ('{"results": [{"egpt_tokens": [1, 2]}]}', "results[0]: missing key 'vl_tokens'"),
    ("\x00\x01garbage", "not valid JSON"),
])  # fmt: skip
def test_corrupt_token_files(files, tmp_path, capsys, text, message):
    (tmp_path / "bad.json").write_text(text)
    refused(capsys, ["train", "--train", str(tmp_path / "bad.json"), "--test", str(files / "test.json"), "--out",
                     str(tmp_path / "task"), *TINY], "bad.json", message)  # fmt: skip
    refused(capsys, ["tokens", "import", str(tmp_path / "bad.json"), str(tmp_path / "store")], "bad.json", message)
    assert not (tmp_path / "store").exists()


def test_train_on_an_unfinished_extraction(files, tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "run_settings.json").write_text("{}")
    (tmp_path / "x" / "draft.rank0.jsonl").write_text("")
    refused(capsys, ["train", "--train", str(tmp_path / "x"), "--test", str(files / "test.json"), "--out",
                     str(tmp_path / "task"), *TINY], "an unfinished run: no pairs.jsonl yet")  # fmt: skip


# ---------------------------------------------------------------- train: resumes that cannot mix runs


def test_train_resume_with_other_data_or_settings_is_refused(files, tmp_path, capsys):
    assert main(train_args(files, tmp_path / "task")) == 0
    task = next((tmp_path / "task").glob("adapter_*"))
    assert (tmp_path / "task" / "latest").readlink().name == task.name, "a relative link to the newest task"
    before = digest(task)
    other_train = [*train_args(files, tmp_path / "task", "--resume", str(task))]
    other_train[other_train.index("--train") + 1] = str(files / "other.json")
    refused(capsys, other_train, f"{task}: holds a run with other settings (train.path:", "other.json",
            "pass --overwrite")  # fmt: skip
    refused(capsys, [*train_args(files, tmp_path / "task", "--resume", str(task)), "--lr", "0.01"],
            "(lr: 0.0001 then, 0.01 now)")  # fmt: skip
    # the same data rewritten with other content under the same name is another data set too
    shutil.copy(files / "train.json", tmp_path / "train.json")
    same_name = train_args(files, tmp_path / "t2")
    same_name[same_name.index("--train") + 1] = str(tmp_path / "train.json")
    assert main(same_name) == 0
    task2 = next((tmp_path / "t2").glob("adapter_*"))
    write_reference_json(pairs(40, 9), tmp_path / "train.json")
    refused(capsys, [*same_name, "--resume", str(task2)], "train.sha256:")
    assert digest(task) == before, "the refused resumes changed nothing"
    # --overwrite starts that task folder over with the new settings
    assert main([*other_train, "--overwrite"]) == 0
    saved = json.loads((task / "results.json").read_text())
    assert saved["config"]["train"] == str(files / "other.json") and len(saved["history"]) == 2


def test_train_two_writers_of_one_task_folder(files, tmp_path, capsys):
    assert main(train_args(files, tmp_path / "task")) == 0
    task = next((tmp_path / "task").glob("adapter_*"))
    with exclusive(task):  # another process training into it (flock: per open file, so this process counts)
        refused(capsys, [*train_args(files, tmp_path / "task", "--resume", str(task))],
                "another specalign process is writing here")  # fmt: skip


def test_below_baseline_is_flagged(tmp_path, capsys):
    """Draft tokens already equal the target's: nothing to add, and the result says so."""
    same = pairs(24, 1)
    same.target = [list(d) for d in same.draft]
    write_reference_json(same, tmp_path / "same.json")
    args = ["train", "--train", str(tmp_path / "same.json"), "--test", str(tmp_path / "same.json"), "--out",
            str(tmp_path / "task"), "--vocab-size", str(VOCAB), *TINY]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 0
    res = json.loads(next((tmp_path / "task").glob("adapter_*/results.json")).read_text())
    assert res["below_baseline"] is True and res["best"]["baseline"] == 1.0
    assert "below baseline" in next((tmp_path / "task").glob("adapter_*/RESULTS.md")).read_text()
    capsys.readouterr()
    assert main(["evaluate", "--pairs", str(tmp_path / "same.json"), "--token-adapter", str(tmp_path / "task")]) == 0
    assert "below baseline" in capsys.readouterr().out


# ---------------------------------------------------------------- evaluate / debug-tokens: adapters and tokenizers


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "task"
    assert main(train_args(files, out)) == 0
    return out


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_pickle_payload_adapter_never_runs(files, tmp_path, capsys, suffix):
    marker = tmp_path / "PWNED"
    torch.save({"model_state_dict": {"embedding.weight": torch.zeros(2, 2)}, "x": Payload(marker)},
               tmp_path / f"evil{suffix}")  # fmt: skip
    evil = tmp_path / f"evil{suffix}"
    refused(capsys, ["evaluate", "--pairs", str(files / "test.json"), "--token-adapter", str(evil)],
            f"evil{suffix}: not a readable torch checkpoint")  # fmt: skip
    assert not marker.exists(), "the payload ran"


def test_truncated_adapter_safetensors(files, trained, tmp_path, capsys):
    best = tmp_path / "best_model"
    shutil.copytree(trained / "latest" / "best_model", best)
    data = (best / "model.safetensors").read_bytes()
    (best / "model.safetensors").write_bytes(data[: len(data) // 2])
    refused(capsys, ["evaluate", "--pairs", str(files / "test.json"), "--token-adapter", str(best)],
            "model.safetensors: not a readable safetensors file")  # fmt: skip


def test_adapter_paths(files, trained, tmp_path, capsys):
    refused(capsys, ["evaluate", "--pairs", str(files / "test.json"), "--token-adapter", str(tmp_path / "nope")],
            "nope: no such TokenAdapter")  # fmt: skip
    (tmp_path / "empty").mkdir()
    refused(capsys, ["evaluate", "--pairs", str(files / "test.json"), "--token-adapter", str(tmp_path / "empty")],
            "empty: no task folder with a best_model/ here")  # fmt: skip
    # one adapter, spelled three ways: the folder of tasks (its latest), the task folder, its best_model/
    task = (trained / "latest").resolve()
    seen = set()
    for spelling in (trained, task, task / "best_model"):
        out = tmp_path / f"eval{len(seen)}.json"
        assert main(["evaluate", "--pairs", str(files / "test.json"), "--token-adapter", str(spelling), "--out",
                     str(out)]) == 0  # fmt: skip
        seen.add(json.loads(out.read_text())["adapter"])
    assert seen == {str(task / "best_model")}, "the resolved path is recorded"
    (tmp_path / "file").write_text("")
    refused(capsys, ["evaluate", "--pairs", str(files / "test.json"), "--token-adapter", str(trained), "--out",
                     str(tmp_path / "file" / "eval.json")], "cannot create directory")  # fmt: skip
    write_reference_json(TokenPairs(), tmp_path / "none.json")
    refused(capsys, ["evaluate", "--pairs", str(tmp_path / "none.json"), "--token-adapter", str(trained)],
            "none.json: no token pairs")  # fmt: skip


def test_debug_tokens_tokenizer_folder(files, trained, tmp_path, capsys):
    """Its own help example: a model folder holding tokenizer.json."""
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(BUNDLED["mini-target"] / "tokenizer.json", folder / "tokenizer.json")
    md = tmp_path / "a.md"
    assert main(["debug-tokens", "--pairs", str(files / "test.json"), "--token-adapter", str(trained),
                 "--tokenizer", str(folder), "--samples", "1", "--out", str(md)]) == 0  # fmt: skip
    assert md.read_text().count("## Pair") == 1
    refused(capsys, ["debug-tokens", "--pairs", str(files / "test.json"), "--token-adapter", str(trained),
                     "--tokenizer", str(tmp_path), "--out", str(md)],
            f"{tmp_path}: no tokenizer.json here")  # fmt: skip
    (tmp_path / "tokenizer.json").write_text('{"model": {')
    refused(capsys, ["debug-tokens", "--pairs", str(files / "test.json"), "--token-adapter", str(trained),
                     "--tokenizer", str(tmp_path), "--out", str(md)], "not a readable tokenizer.json")  # fmt: skip
    refused(capsys, ["debug-tokens", "--pairs", str(files / "test.json"), "--token-adapter", str(trained),
                     "--samples", "0"], "--samples: must be at least 1, got 0")  # fmt: skip


def test_star(trained, tmp_path, capsys):
    assert main(["star", str(trained / "latest")]) == 0
    task = (trained / "latest").resolve()
    assert (trained / "starred" / task.name / "results.json").is_file()
    refused(capsys, ["star", str(tmp_path)], "not a task folder (results.json is missing)")


# ---------------------------------------------------------------- extract and workflow


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    build_world(WorldConfig(out=str(out), train=2, test=2, clips_per_sequence=2, mp4=False), progress=False)
    return out / "my_egpt_dsec_seq_1s"


def extract_args(split, out, *extra):
    return ["extract", "--dataset", str(split), "--out", str(out), "--max-new-tokens", "4", "--device", "cpu",
            "--quiet", *extra]  # fmt: skip


@needs_models
@pytest.mark.parametrize(("extra", "message"), [
    (["--max-samples", "-1"], "--max-samples: must be at least 1, got -1"),
    (["--max-new-tokens", "0"], "--max-new-tokens: must be at least 1, got 0"),
    (["--questions", "0"], "--questions: must be at least 1, got 0"),
    (["--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
    (["--questions", "999"], "--questions 999: the split"),
    (["--target", "no-org/no-such-model"], "--target: no-org/no-such-model:"),
    (["--draft", "{tmp}"], "--draft: {tmp}: not a checkpoint directory: config.json is missing"),
])  # fmt: skip
def test_extract_values(split, tmp_path, capsys, extra, message):
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    message = message.replace("{tmp}", str(tmp_path))
    t = time.time()
    refused(capsys, extract_args(split, tmp_path / "x", *extra), message)
    assert time.time() - t < 10, "refused before any model is loaded"
    assert not (tmp_path / "x").exists(), "nothing written"


@needs_models
@pytest.mark.parametrize(("content", "message"), [
    ("[]", "the question list is empty"),
    ('[{"question": 3, "count": 1}]', "item 0: expected a {question, count} object with the question as text"),
    ('[{"count": 1}]', "item 0: expected a {question, count} object"),
    ('{"question": "not a list"}', "expected a list of {question, count} objects"),
    ('[{"question": "a?", "count": 1}, {"question": "b?", "count": 1}]', "holds only 2 questions"),
    ('[{"question": "a?"', "not valid JSON"),
])  # fmt: skip
def test_extract_questions_file(split, tmp_path, capsys, content, message):
    (tmp_path / "q.json").write_text(content)
    refused(capsys, extract_args(split, tmp_path / "x", "--questions-file", str(tmp_path / "q.json"), "--questions",
                                 "3"), "q.json", message)  # fmt: skip
    assert not (tmp_path / "x").exists()


@needs_models
def test_extract_split_with_fewer_questions_than_asked(split, tmp_path, capsys):
    """A split without a world's questions.json (like a build-dsec split) has one question: --questions 3 is
    refused, not silently 1."""
    lone = tmp_path / "dsec" / split.name
    shutil.copytree(split, lone)
    refused(capsys, extract_args(lone, tmp_path / "x", "--questions", "3"),
            f"--questions 3: the split {lone} has only 1 question", "pass --questions-file")  # fmt: skip


@needs_models
def test_extract_empty_and_missing_splits(split, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "EventGPT_Instruction_Subset.json").write_text("[]")
    refused(capsys, extract_args(empty, tmp_path / "x"), "empty: the split has no samples")
    refused(capsys, extract_args(tmp_path / "nope", tmp_path / "x"), "nope: dataset folder not found")
    (tmp_path / "file").write_text("")
    refused(capsys, extract_args(split, tmp_path / "file" / "x"), "cannot create directory")
    assert not (tmp_path / "x").exists()


@needs_models
def test_extract_into_a_folder_of_another_run(split, tmp_path, capsys):
    """Today's silent train/test leak: pairs of one split kept under a manifest naming another."""
    out = tmp_path / "x"
    assert main(extract_args(split, out)) == 0
    before = digest(out)
    other = split.parent / "my_egpt_dsec_train_1s"
    refused(capsys, extract_args(other, out), f"{out}: holds a run with other settings (dataset.path:",
            "train_1s' now", "pass --overwrite")  # fmt: skip
    refused(capsys, extract_args(split, out, "--max-new-tokens", "5"), "max_new_tokens: 4 then, 5 now")
    assert digest(out) == before, "nothing changed"
    # speed-only settings may change on a resume
    assert main(extract_args(split, out, "--batch-size", "3", "--mode", "parallel")) == 0
    assert main(extract_args(other, out, "--overwrite")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"]["path"] == str(other.resolve())
    ids = {json.loads(line)["sample_id"] for line in (out / "pairs.jsonl").read_text().splitlines()}
    assert ids == {e["id"] for e in json.loads((other / "EventGPT_Instruction_Subset.json").read_text())}
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    refused(capsys, extract_args(split, tmp_path / "mine"), "is not empty and holds no specalign run")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@needs_models
def test_two_extractions_into_one_folder(split, tmp_path, capsys):
    with exclusive(tmp_path / "x"):  # another extraction writing there
        refused(capsys, extract_args(split, tmp_path / "x"), "another specalign process is writing here")


@needs_models
def test_workflow_values(split, tmp_path, capsys):
    other = split.parent / "my_egpt_dsec_train_1s"
    base = ["workflow", "1q", "--train", str(other), "--test", str(split), "--out", str(tmp_path / "runs"),
            "--device", "cpu", "--quiet"]  # fmt: skip
    refused(capsys, [*base, "--epochs", "0"], "--epochs: must be at least 1, got 0")
    refused(capsys, [*base, "--max-test-samples", "-2"], "--max-test-samples: must be at least 1, got -2")
    refused(capsys, [*base, "--lr", "-1"], "--lr: must be above 0")
    lone = tmp_path / "dsec" / split.name  # a split without a world's questions.json has 1 question
    shutil.copytree(split, lone)
    t = time.time()
    refused(capsys, ["workflow", "10q", "--train", str(lone), *base[4:]],
            f"--questions 10: the split {lone} has only 1 question")  # fmt: skip
    refused(capsys, [*base, "--target", "no-org/no-such-model"], "--target: no-org/no-such-model")
    assert time.time() - t < 20
    assert not (tmp_path / "runs").exists(), "refused before any stage"
