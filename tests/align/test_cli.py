"""The alignment commands end to end: tokens import/export, train, star."""

import json

import numpy as np
import pytest

from specalign.cli import main


def write_reference(path, n, seed):
    rng = np.random.default_rng(seed)
    perm = np.random.default_rng(0).permutation(np.arange(1, 30))  # the mapping to learn (0 is the pad)
    results = []
    for i in range(n):
        draft = rng.integers(1, 30, size=12).tolist()
        target = [int(rng.integers(1, 30))] + [int(perm[d - 1]) for d in draft[:-1]]  # target[i+1] = f(draft[i])
        results.append({"sample_idx": i, "question_idx": 0, "sample_id": f"s/{i:06d}", "query": "q",
                        "egpt_tokens": draft, "egpt_text": "", "vl_tokens": target, "vl_text": ""})  # fmt: skip
    path.write_text(json.dumps({"results": results}))


def test_tokens_train_star(tmp_path, capsys):
    write_reference(tmp_path / "train.json", 200, 1)
    write_reference(tmp_path / "test.json", 40, 2)
    assert main(["tokens", "import", str(tmp_path / "train.json"), str(tmp_path / "store")]) == 0
    assert main(["tokens", "export", str(tmp_path / "store"), str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())["results"]
    original = json.loads((tmp_path / "train.json").read_text())["results"]
    assert [r["egpt_tokens"] for r in again] == [r["egpt_tokens"] for r in original]
    args = ["train", "--train", str(tmp_path / "store"), "--test", str(tmp_path / "test.json"), "--task-name", "t",
            "--out", str(tmp_path / "task"), "--epochs", "6", "--embed-dim", "32", "--num-layers", "1",
            "--num-heads", "2", "--lr", "3e-3", "--batch-size", "16", "--device", "cpu",
            "--vocab-size", "30"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    task = next((tmp_path / "task").glob("t_*"))
    res = json.loads((task / "results.json").read_text())
    assert res["best"]["top1"] > 0.8 > res["best"]["baseline"] and str(task) in out
    assert main(["star", str(task)]) == 0
    assert (tmp_path / "task" / "starred" / task.name / "results.json").is_file()
    assert main(["star", str(tmp_path)]) == 2


def test_evaluate_and_debug_tokens(tmp_path, capsys):
    write_reference(tmp_path / "train.json", 200, 1)
    write_reference(tmp_path / "test.json", 40, 2)
    common = ["--epochs", "6", "--embed-dim", "32", "--num-layers", "1", "--num-heads", "2", "--lr", "3e-3",
              "--batch-size", "16", "--device", "cpu", "--vocab-size", "30"]  # fmt: skip
    assert main(["train", "--train", str(tmp_path / "train.json"), "--test", str(tmp_path / "test.json"),
                 "--out", str(tmp_path / "task"), *common]) == 0  # fmt: skip
    trained = json.loads(next((tmp_path / "task").glob("adapter_*/results.json")).read_text())
    out = tmp_path / "eval.json"
    # no --adapter: the latest task's best model
    assert main(["evaluate", "--pairs", str(tmp_path / "test.json"), "--token-adapter", str(tmp_path / "task"),
                 "--out", str(out)]) == 0  # fmt: skip
    r = json.loads(out.read_text())
    assert r["teacher_forced"]["top1"] == pytest.approx(trained["best"]["top1"], abs=1e-3), "same alignment"
    assert r["teacher_forced"]["improvement"] > 0.5
    assert "not an acceptance rate" in r["independent_generations_AR_comparison"]["note"]
    md = tmp_path / "TOKEN_ALIGNMENT_ANALYSIS.md"
    assert main(["debug-tokens", "--pairs", str(tmp_path / "test.json"), "--token-adapter", str(tmp_path / "task"),
                 "--samples", "2", "--out", str(md)]) == 0  # fmt: skip
    text = md.read_text()
    assert text.count("## Pair") == 2 and "| i | draft[i] | adapter → | target[i+1] | match |" in text
    assert main(["evaluate", "--pairs", str(tmp_path / "test.json"), "--token-adapter", str(tmp_path / "none")]) == 2

    # one adapter pass gives both metric families: the AR guesses equal a separate pass over the pairs
    from specalign.align.token_adapter import load_adapter
    from specalign.align.tokens import pad_batch, read_pairs
    from specalign.evaluate.adapter import latest_adapter, predictions

    best = latest_adapter(tmp_path / "task")
    pairs = read_pairs(tmp_path / "test.json")
    pred = predictions(load_adapter(best), pad_batch(pairs.draft, 0, 12))
    first = sum(int(p[0] == t[1]) for p, t in zip(pred.tolist(), pairs.target, strict=True)) / len(pairs.target)
    assert r["independent_generations_AR_comparison"]["first_token_accuracy"] == pytest.approx(first, abs=1e-4)

    bad = json.loads((tmp_path / "test.json").read_text())
    bad["results"][3]["egpt_tokens"][2] = 31  # outside the adapter's 30-token vocabulary
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    capsys.readouterr()
    assert main(["evaluate", "--pairs", str(tmp_path / "bad.json"), "--token-adapter", str(best)]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "token id 31 is outside the adapter vocabulary" in err
