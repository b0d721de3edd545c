"""Tests of mone_export.calibration: sources, the train/held-out split, sampling and errors (no network)."""

from __future__ import annotations

import hashlib
import json
import logging
import sys

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mone_export import calibration as cal
from mone_export.errors import UsageError

EOS = 100


def _word_tokenizer(with_eos: bool = True, model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    """Whitespace word tokenizer: the word "i" (0 <= i < 100) is token i, "<eos>" is 100, "<unk>" 101."""
    vocab = {str(i): i for i in range(100)} | {"<eos>": EOS, "<unk>": 101}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = {"eos_token": "<eos>"} if with_eos else {}
    if model_max_length is not None:
        kwargs["model_max_length"] = model_max_length
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


@pytest.fixture(scope="module")
def words() -> PreTrainedTokenizerFast:
    """The word tokenizer, with an eos token."""
    return _word_tokenizer()


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE (any text tokenizes, no unknowns) trained on a few strings."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["def foo(x):\n    return x + 1\n", 'class Bar:\n    """Doc."""\n'] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _write_jsonl(path, texts):
    """Write one {"text": ...} object per line."""
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


# Documents i = "i i i" for i < 20: with the rule, only document 18 is held out.
DOCS = [f"{i} {i} {i}" for i in range(20)]


def _stream(doc_ids, eos=EOS):
    """The expected token stream of DOCS restricted to doc_ids, joined by eos."""
    out = []
    for n, i in enumerate(doc_ids):
        if n and eos is not None:
            out.append(eos)
        out += [i, i, i]
    return out


# --- split rule ------------------------------------------------------------------------------------


def test_is_heldout_is_the_documented_sha256_rule():
    keys = [str(i) for i in range(200)] + ["json/decoder.py", "ast.py", "os.py"]
    for key in keys:
        assert cal.is_heldout(key) == (int(hashlib.sha256(key.encode()).hexdigest(), 16) % 10 == 0)
    assert cal.is_heldout("18") and cal.is_heldout("ast.py")
    assert not cal.is_heldout("0") and not cal.is_heldout("os.py")
    assert 10 <= sum(cal.is_heldout(str(i)) for i in range(200)) <= 30


def test_real_stdlib_split_is_disjoint_by_file_and_about_ten_percent():
    all_files = cal.stdlib_files("all")
    train, heldout = cal.stdlib_files("train"), cal.stdlib_files("heldout")
    assert len(all_files) > 100 and all_files == sorted(all_files)
    assert set(train).isdisjoint(heldout) and sorted(train + heldout) == all_files
    assert all(cal.is_heldout(f) for f in heldout) and not any(cal.is_heldout(f) for f in train)
    assert 0.05 < len(heldout) / len(all_files) < 0.15
    parts = {p for f in all_files for p in f.split("/")[:-1]}
    assert parts.isdisjoint({"test", "tests", "site-packages", "idlelib", "lib2to3", "__pycache__"})
    assert "os.py" in all_files and "json/decoder.py" in all_files


@pytest.fixture()
def fake_stdlib(tmp_path, monkeypatch):
    """A small fake stdlib root: 30 modules with unique docstrings, plus excluded and broken files."""
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    names = [f"mod{i:02d}.py" for i in range(20)] + [f"pkg/sub{i}.py" for i in range(10)]
    for rel in names:
        tag = rel.replace("/", "_")[:-3]
        (root / rel).write_text(f'"""doc of {tag}"""\n\ndef f_{tag}():\n    """fn of {tag}"""\n', encoding="utf-8")
    for excluded in ("test", "pkg/tests", "site-packages/x", "idlelib", "config-3.11-x86_64", "__pycache__"):
        (root / excluded).mkdir(parents=True, exist_ok=True)
        (root / excluded / "hidden.py").write_text('"""excluded"""\n', encoding="utf-8")
    (root / "zz_latin1.py").write_bytes(b'"""caf\xe9"""\n')  # not UTF-8: skipped
    (root / "zz_broken.py").write_text('"""broken doc"""\ndef (:\n', encoding="utf-8")  # unparsable
    (root / "notes.txt").write_text("not python", encoding="utf-8")
    monkeypatch.setattr(cal, "stdlib_root", lambda: root)
    return names


def test_fake_stdlib_files_order_and_exclusions(fake_stdlib):
    expected = sorted(fake_stdlib + ["zz_broken.py", "zz_latin1.py"])
    assert cal.stdlib_files("all") == expected
    heldout = [f for f in expected if cal.is_heldout(f)]
    assert heldout and cal.stdlib_files("heldout") == heldout
    code = list(cal.iter_texts("python-code", "all"))
    assert len(code) == len(expected) - 1  # the latin-1 file is skipped
    assert not any("excluded" in text for text in code)
    assert code[0].startswith('"""doc of mod00"""') and code[-1].startswith('"""broken doc"""')


def test_python_docs_follow_the_file_split(fake_stdlib):
    heldout_tags = {f.replace("/", "_")[:-3] for f in fake_stdlib if cal.is_heldout(f)}
    train_tags = {f.replace("/", "_")[:-3] for f in fake_stdlib if not cal.is_heldout(f)}
    assert heldout_tags and train_tags
    heldout_docs = list(cal.iter_texts("python-docs", "heldout"))
    train_docs = list(cal.iter_texts("python-docs", "train"))
    assert {d.split()[-1] for d in heldout_docs} == heldout_tags
    assert {d.split()[-1] for d in train_docs} == train_tags  # broken file skipped, no "broken doc"
    assert set(heldout_docs).isdisjoint(train_docs)
    # code of a held-out file is held out too, and its docstring is in it
    heldout_code = list(cal.iter_texts("python-code", "heldout"))
    assert all(any(doc in code for code in heldout_code) for doc in heldout_docs)


def test_docstrings_in_source_order_and_cleaned():
    src = (
        '"""Module."""\n'
        "class A:\n"
        '    """Class A.\n\n        indented line\n    """\n'
        "    def m(self):\n"
        '        """Method m."""\n'
        "        def inner():\n"
        '            """Inner."""\n'
        "async def g():\n"
        '    """Async g."""\n'
        "def nodoc():\n    pass\n"
    )
    assert cal.docstrings(src) == ["Module.", "Class A.\n\nindented line", "Method m.", "Inner.", "Async g."]
    assert cal.docstrings("def (:") == []


def test_real_python_docs_heldout_starts_with_first_heldout_file_docstring():
    first = next(cal.iter_texts("python-docs", "heldout"))
    for rel in cal.stdlib_files("heldout"):
        docs = cal.docstrings((cal.stdlib_root() / rel).read_text(encoding="utf-8"))
        if docs:
            assert first == docs[0]
            break
    else:
        pytest.fail("no held-out file has a docstring")


# --- sampling ----------------------------------------------------------------------------------------


def test_python_code_batches_deterministic_shapes_and_from_the_pool(bpe):
    a = cal.calibration_batches("python-code", bpe, num_samples=20, seq_len=32, seed=0, batch_size=8)
    b = cal.calibration_batches("python-code", bpe, num_samples=20, seq_len=32, seed=0, batch_size=8)
    c = cal.calibration_batches("python-code", bpe, num_samples=20, seq_len=32, seed=1, batch_size=8)
    assert [t.shape for t in a] == [torch.Size([8, 32]), torch.Size([8, 32]), torch.Size([4, 32])]
    assert all(t.dtype == torch.long for t in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(torch.cat(a), torch.cat(c))
    # every row is a chunk of the pool (first tokens of the train split), chosen in ascending order
    pool = cal.token_stream(cal.iter_texts("python-code", "train"), bpe, cal.pool_tokens(20, 32))
    assert len(pool) == cal.pool_tokens(20, 32) == 80 * 32
    chunks = pool.reshape(-1, 32)
    rows = torch.cat(a).numpy()
    positions = [int(np.flatnonzero((chunks == row).all(axis=1))[0]) for row in rows]
    assert positions == sorted(set(positions)) and len(positions) == 20
    expected = np.sort(np.random.default_rng(0).choice(80, size=20, replace=False))
    assert positions == expected.tolist()


def test_heldout_batches_never_come_from_train_text(bpe):
    train = torch.cat(cal.calibration_batches("python-code", bpe, 8, 64, split="train"))
    heldout = torch.cat(cal.calibration_batches("python-code", bpe, 8, 64, split="heldout"))
    first_heldout = (cal.stdlib_root() / cal.stdlib_files("heldout")[0]).read_text(encoding="utf-8")
    ids = bpe(first_heldout, add_special_tokens=False)["input_ids"]
    assert heldout.shape == train.shape == (8, 64)
    assert not torch.equal(train, heldout)
    # the held-out pool starts with the first held-out file's tokens
    pool = cal.token_stream(cal.iter_texts("python-code", "heldout"), bpe, 64)
    assert pool.tolist() == ids[:64]


def test_jsonl_exact_stream_all_chunks_in_order(tmp_path, words):
    path = _write_jsonl(tmp_path / "d.jsonl", DOCS)
    batches = cal.calibration_batches(path, words, num_samples=19, seq_len=4, split="all", batch_size=5)
    stream = _stream(range(20))
    assert len(stream) == 79
    assert [t.shape[0] for t in batches] == [5, 5, 5, 4]
    assert torch.cat(batches).tolist() == np.array(stream[:76]).reshape(19, 4).tolist()


def test_jsonl_split_by_document_and_too_short_heldout(tmp_path, words):
    path = _write_jsonl(tmp_path / "d.jsonl", DOCS)
    assert list(cal.iter_texts(path, "heldout")) == ["18 18 18"]
    assert list(cal.iter_texts(str(path), "train")) == [d for i, d in enumerate(DOCS) if i != 18]
    train = torch.cat(cal.calibration_batches(path, words, 18, 4, split="train"))
    assert 18 not in train.tolist() and train.shape == (18, 4)
    assert cal.calibration_batches(path, words, 1, 2, split="heldout")[0].tolist() == [[18, 18]]
    with pytest.raises(UsageError, match=r"has 3 tokens.*seq_len=4"):
        cal.calibration_batches(path, words, 1, 4, split="heldout")


def test_not_enough_samples_says_how_many(tmp_path, words):
    path = _write_jsonl(tmp_path / "d.jsonl", DOCS)
    with pytest.raises(UsageError, match=r"only 19 samples of seq_len=4 \(79 tokens\) but 20"):
        cal.calibration_batches(path, words, 20, 4, split="all")


def test_no_eos_tokenizer_joins_documents_directly(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", DOCS[:4])
    rows = torch.cat(cal.calibration_batches(path, _word_tokenizer(with_eos=False), 4, 3, split="all"))
    assert rows.tolist() == [[0, 0, 0], [1, 1, 1], [2, 2, 2], [3, 3, 3]]


def test_token_stream_is_lazy_and_truncated(words):
    consumed = []

    def endless():
        i = 0
        while True:
            consumed.append(i)
            yield f"{i % 100} {i % 100}"
            i += 1

    stream = cal.token_stream(endless(), words, 10)
    assert stream.tolist() == [0, 0, EOS, 1, 1, EOS, 2, 2, EOS, 3]
    assert len(consumed) == 4 and stream.dtype == np.int64


def test_long_text_does_not_warn_about_sequence_length(tmp_path, caplog, monkeypatch):
    tok = _word_tokenizer(model_max_length=8)
    path = tmp_path / "long.txt"
    path.write_text(" ".join(str(i % 100) for i in range(300)), encoding="utf-8")
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)
    with caplog.at_level(logging.WARNING):
        rows = torch.cat(cal.calibration_batches(path, tok, 2, 10, split="all"))
    assert rows.shape == (2, 10) and rows.max() < 100
    assert not [r for r in caplog.records if "sequence length" in r.getMessage()]


def test_txt_is_one_text_and_has_no_heldout(tmp_path, words):
    path = tmp_path / "t.txt"
    path.write_text("1 2 3\n4 5 6\n", encoding="utf-8")
    assert list(cal.iter_texts(path, "train")) == ["1 2 3\n4 5 6\n"]
    assert torch.cat(cal.calibration_batches(path, words, 2, 3)).tolist() == [[1, 2, 3], [4, 5, 6]]
    with pytest.raises(UsageError, match="no held-out part"):
        cal.iter_texts(path, "heldout")


# --- random ------------------------------------------------------------------------------------------


def test_random_source_range_determinism_and_vocab_size(words):
    a = cal.calibration_batches("random", words, 30, 16, seed=3, batch_size=7)
    b = cal.calibration_batches("random", words, 30, 16, seed=3, batch_size=7)
    c = cal.calibration_batches("random", words, 30, 16, seed=4, batch_size=7)
    assert [t.shape for t in a] == [torch.Size([7, 16])] * 4 + [torch.Size([2, 16])]
    assert all(t.dtype == torch.long for t in a)
    flat = torch.cat(a)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(flat, torch.cat(c))
    assert flat.min() >= 0 and flat.max() < len(words) == 102 and flat.max() >= 90
    small = torch.cat(cal.calibration_batches("random", None, 50, 20, vocab_size=5))
    assert set(small.unique().tolist()) == {0, 1, 2, 3, 4}
    expected = np.random.default_rng(0).integers(0, 5, size=(50, 20), dtype=np.int64)
    assert small.tolist() == expected.tolist()
    with pytest.raises(UsageError, match="vocab_size"):
        cal.calibration_batches("random", None, 2, 4)
    with pytest.raises(UsageError, match="no texts"):
        cal.iter_texts("random")


# --- datasets ----------------------------------------------------------------------------------------


class _FakeDataset:
    """Duck-typed stand-in for datasets.Dataset: column_names, __len__, iteration over row dicts."""

    column_names = ["text", "id"]
    _fingerprint = "abc123"

    def __init__(self, texts):
        self._rows = [{"text": t, "id": i} for i, t in enumerate(texts)]

    def __len__(self):
        return len(self._rows)

    def __iter__(self):
        return iter(self._rows)


def test_dataset_object_source(words):
    ds = _FakeDataset(DOCS)
    assert list(cal.iter_texts(ds, "heldout")) == ["18 18 18"]
    rows = torch.cat(cal.calibration_batches(ds, words, 19, 4, split="all"))
    assert rows.tolist() == np.array(_stream(range(20))[:76]).reshape(19, 4).tolist()
    record = cal.describe_source(ds, "all")
    assert record["num_rows"] == 20 and record["fingerprint"] == "abc123"
    json.dumps(record)
    with pytest.raises(UsageError, match="row 1 has no string 'text'"):
        list(cal.iter_texts(_FakeDataset(["0 1", None]), "all"))


def test_datasets_prefix_without_datasets_says_pip_install(tmp_path, monkeypatch, words):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(UsageError, match="pip install datasets"):
        cal.calibration_batches(f"datasets:{tmp_path}", words, 1, 4)


# --- errors ------------------------------------------------------------------------------------------


def test_unknown_source_lists_builtins(words):
    with pytest.raises(UsageError) as info:
        cal.calibration_batches("wikitext", words, 4, 8)
    message = str(info.value)
    assert "'wikitext'" in message and all(name in message for name in cal.SOURCES)
    assert ".txt" in message and ".jsonl" in message and "\n" not in message
    with pytest.raises(UsageError, match="unknown calibration source"):
        cal.iter_texts(12345)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"num_samples": 0}, "num_samples is 0"),
        ({"seq_len": 1}, "seq_len is 1"),
        ({"batch_size": 0}, "batch_size is 0"),
        ({"split": "test"}, "unknown split 'test'.*train, heldout, all"),
    ],
)
def test_bad_arguments(words, kwargs, pattern):
    args = {"num_samples": 2, "seq_len": 4} | kwargs
    with pytest.raises(UsageError, match=pattern):
        cal.calibration_batches("python-code", words, **args)


def test_file_errors(tmp_path, words):
    with pytest.raises(UsageError, match="not found"):
        cal.calibration_batches(tmp_path / "missing.jsonl", words, 1, 2)
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(UsageError, match="is empty"):
        cal.calibration_batches(tmp_path / "empty.txt", words, 1, 2)
    (tmp_path / "blank.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(UsageError, match="is empty"):
        cal.calibration_batches(tmp_path / "blank.jsonl", words, 1, 2)
    (tmp_path / "d.json").write_text('{"text": "1 2"}', encoding="utf-8")
    with pytest.raises(UsageError, match=r"unsupported extension '\.json'.*\.jsonl"):
        cal.calibration_batches(tmp_path / "d.json", words, 1, 2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "1 2"}\n\n{"body": "3 4"}\n', encoding="utf-8")
    with pytest.raises(UsageError, match=r"line 3 has no string \"text\" field"):
        cal.calibration_batches(bad, words, 1, 2)
    bad.write_text('{"text": "1 2"}\n{"text": 5}\n', encoding="utf-8")
    with pytest.raises(UsageError, match="line 2"):
        list(cal.iter_texts(bad, "all"))
    bad.write_text('{"text": "1 2"}\nnot json\n', encoding="utf-8")
    with pytest.raises(UsageError, match="line 2 is not valid JSON"):
        list(cal.iter_texts(bad, "all"))


def test_text_source_needs_tokenizer():
    with pytest.raises(UsageError, match="needs a tokenizer"):
        cal.calibration_batches("python-code", None, 2, 4)


# --- describe_source ---------------------------------------------------------------------------------


def test_describe_source_records_are_json(tmp_path):
    code = cal.describe_source("python-code")
    assert code["source"] == "python-code" and code["split"] == "train"
    assert code["num_files"] == len(cal.stdlib_files("train"))
    assert "site-packages" in code["excluded_dirs"]
    docs = cal.describe_source("python-docs", split="heldout")
    assert docs["split"] == "heldout" and docs["num_files"] == len(cal.stdlib_files("heldout"))
    assert cal.describe_source("random")["source"] == "random"
    path = _write_jsonl(tmp_path / "d.jsonl", DOCS)
    record = cal.describe_source(path)
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["kind"] == "jsonl" and record["size_bytes"] == path.stat().st_size
    for rec in (code, docs, record, cal.describe_source("random")):
        assert json.loads(json.dumps(rec)) == rec
    with pytest.raises(UsageError, match="unknown calibration source"):
        cal.describe_source("nope")
