"""Language tasks: token shards, GPT, GPT-2 tokenizer, PTB corpus, LSTM BPTT, data errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pisa_bench.config import compose_config
from pisa_bench.data import text
from pisa_bench.models.gpt import build_gpt, count_parameters
from pisa_bench.models.lstm import LSTMLM
from pisa_bench.tasks import DatasetMissing, build_task
from pisa_bench.tasks.language import LSTMLanguageModel

REPO = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path | None:
    """The data directory of these machines (PISA_DATA_DIR, else ../shared/data), if present."""
    for d in (os.environ.get("PISA_DATA_DIR"), REPO.parent / "shared" / "data"):
        if d and Path(d).is_dir():
            return Path(d)
    return None


def make_task(overrides: list[str], tmp_path: Path):
    cfg = compose_config([f"paths.out_dir={tmp_path / 'out'}", *overrides])
    return build_task(cfg, torch.device("cpu"))


# --- token shards ------------------------------------------------------------------------------
def test_shard_round_trip(tmp_path: Path) -> None:
    tokens = np.arange(1000, dtype=np.int64) * 61 % 50257
    path = tmp_path / "fineweb_train_000001.bin"
    text.write_shard(path, tokens)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[0] == 20240520 and header[1] == 1 and header[2] == 1000
    assert path.stat().st_size == 256 * 4 + 2 * 1000
    assert text.read_shard_header(path) == 1000
    loaded = text.load_shard(path)
    assert loaded.dtype == np.uint16 and np.array_equal(np.asarray(loaded, np.int64), tokens)


def test_shard_with_bad_header_raises(tmp_path: Path) -> None:
    good = tmp_path / "good.bin"
    text.write_shard(good, [1, 2, 3])
    raw = bytearray(good.read_bytes())
    bad_magic = tmp_path / "bad_magic.bin"
    bad_magic.write_bytes(b"\x00\x00\x00\x00" + raw[4:])
    with pytest.raises(ValueError, match="magic"):
        text.load_shard(bad_magic)
    bad_version = tmp_path / "bad_version.bin"
    bad_version.write_bytes(raw[:4] + (2).to_bytes(4, "little") + raw[8:])
    with pytest.raises(ValueError, match="version"):
        text.load_shard(bad_version)
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(raw[:-2])
    with pytest.raises(ValueError, match="claims 3 tokens"):
        text.load_shard(truncated)


def test_token_windows_stay_inside_each_shard(tmp_path: Path) -> None:
    text.write_shard(tmp_path / "a_000.bin", np.arange(0, 21))   # 2 windows of 8 + 1
    text.write_shard(tmp_path / "a_001.bin", np.arange(100, 110))  # 1 window
    files = text.find_shards(tmp_path, "a_*.bin", "test")
    w = text.TokenWindows([text.load_shard(f) for f in files], seq_len=8)
    assert len(w) == 3
    assert w.window(0).tolist() == list(range(0, 9))
    assert w.window(1).tolist() == list(range(8, 17))
    assert w.window(2).tolist() == list(range(100, 109))
    assert w.batch([2, 0]).shape == (2, 9)
    with pytest.raises(DatasetMissing, match="fineweb_train_"):
        text.find_shards(tmp_path, "fineweb_train_*.bin", "fineweb10B")


# --- GPT ---------------------------------------------------------------------------------------
def test_gpt_forward_shapes_tying_and_causality() -> None:
    torch.manual_seed(0)
    model = build_gpt(vocab_size=97, n_layer=2, n_head=2, n_embd=32)
    for p in model.parameters():  # leave the zero-initialised projections: make every path live
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randint(0, 97, (3, 10))
    logits = model(x)
    assert logits.shape == (3, 10, 97) and logits.dtype == torch.float32
    assert model.lm_head.weight is model.transformer.wte.weight
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 1) % 97  # change the future only
    logits2 = model(y)
    assert torch.allclose(logits[:, :6], logits2[:, :6], atol=1e-5)
    assert not torch.allclose(logits[:, 6:], logits2[:, 6:], atol=1e-5)


def test_gpt_124m_parameter_count() -> None:
    """modded-nanogpt 124M: tied 50304 x 768 embedding + 12 blocks of 4 d^2 (attention) + 8 d^2
    (MLP 4d), no biases, no norm gains: 50304*768 + 12*12*768^2 = 38,633,472 + 84,934,656."""
    with torch.device("meta"):
        model = build_gpt(vocab_size=50304, n_layer=12, n_head=6, n_embd=768)
    assert count_parameters(model) == 50304 * 768 + 12 * 12 * 768**2 == 123_568_128
    names = [n for n, _ in model.named_parameters()]
    assert names[0] == "transformer.wte.weight" and not any("lm_head" in n for n in names)  # tied
    assert all(n.startswith("transformer.h.") for n in names[1:])


def test_gpt_paper_sizes_resolve() -> None:
    sizes = {"124M": (12, 768), "350M": (24, 1024), "1558M": (48, 1600)}
    for size, (layers, width) in sizes.items():
        cfg = compose_config(["task=gpt2", "scale=paper", "optim=adamw", f"task.size={size}"])
        assert (cfg.task.model.n_layer, cfg.task.model.n_embd) == (layers, width)
        assert cfg.train.max_steps == 5100 and cfg.train.batch_size * cfg.task.data.seq_len == 65536


# --- tokenizer ---------------------------------------------------------------------------------
def test_gpt2_tokenizer_from_files() -> None:
    data = shared_data_dir()
    if data is None or not (data / "gpt2-tokenizer" / "vocab.json").exists():
        pytest.skip("no data directory with gpt2-tokenizer/vocab.json + merges.txt")
    tok = text.load_gpt2_tokenizer(data / "gpt2-tokenizer", ["<|startoftext|>"])
    assert text.encode(tok, "Hello world") == [15496, 995]
    assert tok.token_to_id("<|endoftext|>") == 50256 and tok.token_to_id("<|startoftext|>") == 50257


def test_compact_vocabulary() -> None:
    train_ids, val_ids = np.array([50, 7, 50, 900]), np.array([7, 3, 900])
    (train, val), v, table = text.compact_vocabulary(train_ids, val_ids)
    assert v == 4 and train.tolist() == [1, 0, 1, 2] and val.tolist() == [0, 3, 2]
    assert table[[7, 50, 900, 3]].tolist() == [0, 1, 2, 3]
    (train2, none, val2), v2, _ = text.compact_vocabulary(train_ids, None, val_ids)
    assert none is None and v2 == 4  # an absent split comes back as None
    assert train2.tolist() == train.tolist() and val2.tolist() == val.tolist()


# --- PTB corpus --------------------------------------------------------------------------------
def test_ptb_corpus_builder(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text(" the cat sat \n the <unk> ran \n")
    (tmp_path / "test.txt").write_text(" the dog sat \n")
    vocab, (train, test) = text.build_word_corpus(tmp_path / "train.txt", tmp_path / "test.txt")
    assert vocab.idx2word == ["the", "cat", "sat", "<eos>", "<unk>", "ran"]
    assert train.tolist() == [0, 1, 2, 3, 0, 4, 5, 3]
    assert test.tolist() == [0, 4, 2, 3]  # unseen "dog" -> <unk>; one <eos> per line
    (tmp_path / "nounk.txt").write_text("the sat\n")
    with pytest.raises(KeyError, match="dog"):
        text.build_word_corpus(tmp_path / "nounk.txt", tmp_path / "test.txt")
    cols = text.batchify(torch.arange(10), 3)
    assert cols.tolist() == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]


# --- LSTM: BPTT windows cut along time, hidden state carried and checkpointed -------------------
def _lstm_task(tmp_path: Path, *extra: str) -> LSTMLanguageModel:
    task = make_task(["task=lstm2_ptb", "optim=adamw", "scale=smoke", "task.ar_alpha=0",
                      "task.tar_beta=0", "task.data.bptt=7", *extra], tmp_path)
    task.setup()
    assert isinstance(task, LSTMLanguageModel)
    return task


def _eval_model(task: LSTMLanguageModel) -> LSTMLM:
    torch.manual_seed(0)
    model = task.build_model()
    model.eval()  # no dropout: the same computation wherever the sequence is cut
    return model


def test_lstm_split_batch_cuts_along_time(tmp_path: Path) -> None:
    task = _lstm_task(tmp_path)
    batch = next(iter(task.train_batches(0)))
    window = batch["tokens"]
    assert window.shape == (8, 8) and batch["start"] == 0  # bptt 7 + 1 target row, 8 columns
    second = list(task.train_batches(0))[1]
    assert second["start"] == 7 and torch.equal(second["tokens"][0], window[-1])
    pieces = task.split_batch(batch, 3)
    assert [p["start"] for p in pieces] == [0, 2, 4]
    assert [p["tokens"].shape[0] - 1 for p in pieces] == [2, 2, 3]  # the last takes the remainder
    inputs = torch.cat([p["tokens"][:-1] for p in pieces])
    targets = torch.cat([p["tokens"][1:] for p in pieces])
    assert torch.equal(inputs, window[:-1]) and torch.equal(targets, window[1:])
    assert all(p["tokens"].shape[1] == 8 for p in pieces)  # every worker sees all columns
    assert task.count(batch) == 7 * 8 and sum(task.count(p) for p in pieces) == 7 * 8
    with pytest.raises(ValueError, match="cannot feed"):
        task.split_batch(batch, 8)


def test_lstm_hidden_state_runs_through_pieces_and_windows(tmp_path: Path) -> None:
    task = _lstm_task(tmp_path)
    model = _eval_model(task)
    w0, w1 = list(task.train_batches(0))[:2]
    # reference: one pass over the 14 steps of both windows from a zero state
    stream = torch.cat([w0["tokens"][:-1], w1["tokens"]])
    with torch.no_grad():
        logits, *_ = model(stream[:-1], model.init_hidden(8))
        ref = torch.nn.functional.cross_entropy(logits[7:].reshape(-1, logits.shape[-1]),
                                                stream[8:].reshape(-1))
        for piece in task.split_batch(w0, 3):  # the workers of round 1 hand the state on
            task.loss(model, piece)
        pieces = task.split_batch(w1, 2)
        losses = [task.loss(model, p) for p in pieces]
    lengths = [p["tokens"].shape[0] - 1 for p in pieces]
    carried = sum(float(loss) * n for loss, n in zip(losses, lengths)) / sum(lengths)
    assert carried == pytest.approx(float(ref), rel=1e-5)
    # from a zero state the second window's loss is different: the carry matters
    fresh = _lstm_task(tmp_path)
    with torch.no_grad():
        restart = float(fresh.loss(model, {**w1, "start": 7}))
    assert restart != pytest.approx(float(ref), rel=1e-5)
    # a new epoch (row 0) starts from zero again
    with torch.no_grad():
        again = float(task.loss(model, w0))
        first = float(_lstm_task(tmp_path).loss(model, w0))
    assert again == pytest.approx(first, rel=1e-6)


def test_lstm_hidden_state_survives_state_dict(tmp_path: Path) -> None:
    task = _lstm_task(tmp_path)
    model = _eval_model(task)
    w0, w1 = list(task.train_batches(0))[:2]
    with torch.no_grad():
        task.loss(model, w0)
        state = task.state_dict()
        expected = float(task.loss(model, w1))
    restored = _lstm_task(tmp_path)
    restored.load_state_dict(state)
    with torch.no_grad():
        got = float(restored.loss(model, w1))
    assert got == pytest.approx(expected, rel=1e-6)
    assert state["hidden"] is not None and len(state["hidden"]) == 2


def test_lstm_resume_reproduces_an_uninterrupted_run(preempt_and_resume) -> None:
    base = ["task=lstm2_ptb", "optim=adam", "scale=smoke", "train.max_steps=4"]
    full, first, second, _ = preempt_and_resume(base)
    assert first["status"] == "preempted" and first["steps"] == 2
    assert second["status"] == "ok" and second["steps"] == 4
    assert second["final_metric"] == pytest.approx(full["final_metric"], rel=1e-9)


# --- GPT-2 fine-tuning ----------------------------------------------------------------------------
def test_gpt2_selection_stream_is_the_tail_of_training(tmp_path: Path) -> None:
    """val_fraction moves the last share of the training tokens into the selection stream:
    train + selection is the old training stream, the held-out split is untouched."""
    base = ["task=gpt2", "scale=smoke"]
    plain = make_task(base, tmp_path)
    plain.setup()
    carved = make_task([*base, "task.data.val_fraction=0.25"], tmp_path)
    carved.setup()
    old = plain.train_windows.arrays[0]
    train, sel = carved.train_windows.arrays[0], carved.select_windows.arrays[0]
    assert len(sel) == round(0.25 * len(old)) and plain.select_windows is None
    assert np.array_equal(np.concatenate([train, sel]), old)
    assert np.array_equal(carved.val_windows.arrays[0], plain.val_windows.arrays[0])
    with torch.no_grad():
        out = carved.evaluate(carved.build_model())
    assert set(out) == {"loss", "ppl", "val_loss", "val_ppl"} and out["loss"] != out["val_loss"]


def test_gpt2_finetune_selection_recipes_leave_training(tmp_path: Path) -> None:
    """val_fraction moves a fixed share of the training recipes out of training; the held-out
    recipes (the reported loss) are the same as without it."""
    base = ["task=gpt2_finetune", "scale=smoke"]
    plain = make_task(base, tmp_path)
    plain.setup()
    carved = make_task([*base, "task.data.val_fraction=0.25"], tmp_path)
    carved.setup()
    assert carved.select_ids is not None and plain.select_ids is None
    assert len(carved.select_ids) == round(0.25 * len(plain.train_ids))
    rows = {tuple(r) for r in carved.train_ids.tolist()}
    assert not rows & {tuple(r) for r in carved.select_ids.tolist()}
    assert sorted([*carved.train_ids.tolist(), *carved.select_ids.tolist()]) == sorted(
        plain.train_ids.tolist())
    assert torch.equal(carved.val_ids, plain.val_ids)
    with torch.no_grad():
        assert set(carved.evaluate(carved.build_model())) == {"loss", "ppl", "val_loss",
                                                              "val_ppl"}


def test_gpt2_finetune_says_freshly_initialised(run_cfg) -> None:
    summary, _ = run_cfg(["task=gpt2_finetune", "optim=adamw", "scale=smoke"])
    assert summary["status"] == "ok"
    assert any("freshly initialised" in n for n in summary["notes"])
    assert summary["metric"] == "loss" and summary["final_metric"] > 0


def test_recipes_are_encoded_as_the_paper(tmp_path: Path) -> None:
    data = shared_data_dir()
    if data is None or not (data / "gpt2-tokenizer" / "vocab.json").exists():
        pytest.skip("no data directory with gpt2-tokenizer/vocab.json + merges.txt")
    root = tmp_path / "data"
    (root / "recipes").mkdir(parents=True)
    (root / "gpt2-tokenizer").symlink_to(data / "gpt2-tokenizer")
    rows = ['1,Toast,"bread, butter","Toast the bread, then butter it."',
            '2,Tea,"tea, water","Boil water.\nSteep the tea for ""3"" minutes."']
    rows += [f'{i},Dish {i},"salt","Cook dish number {i} with salt."' for i in range(3, 11)]
    (root / "recipes" / "recipes_1000.csv").write_text(
        "RecipeId,name,ingredients,instructions\n" + "\n".join(rows) + "\n")
    over = ["task=gpt2_finetune", "optim=adamw", f"paths.data_dir={root}",
            "task.data.max_length=24"]
    full = make_task([*over, "task.data.compact_vocab=false"], tmp_path)
    full.setup()
    assert full.vocab_size == 50260 and full.pad_id == 50258 and full.bos_id == 50257
    assert full.train_ids.shape == (9, 24) and full.val_ids.shape == (1, 24)
    ids = torch.cat([full.train_ids, full.val_ids])
    assert (ids[:, 0] == 50257).all()  # <|startoftext|>
    tok = text.load_gpt2_tokenizer(data / "gpt2-tokenizer")
    toast = [50257, *text.encode(tok, "Ingredients: bread, butter. Instructions: Toast the "
                                      "bread, then butter it."), 50256]
    assert any(r[: len(toast)].tolist() == toast and (r[len(toast):] == 50258).all() for r in ids)
    small = make_task(over, tmp_path)
    small.setup()
    assert small.vocab_size < 100 and int(small.train_ids.max()) < small.vocab_size
    pads = full.train_ids == full.pad_id
    assert torch.equal(small.train_ids == small.pad_id, pads)  # the mapping keeps padding apart
    model = small.build_model()
    with torch.no_grad():
        loss = small.loss(model, small.train_ids[:2])
    assert torch.isfinite(loss) and float(loss) == pytest.approx(np.log(small.vocab_size), rel=0.2)


def test_gpt2_finetune_from_local_checkpoint(run_cfg, tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    ckpt = tmp_path / "tiny-gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=1, n_head=2)
                    ).save_pretrained(ckpt)
    summary, _ = run_cfg(["task=gpt2_finetune", "optim=adamw", "scale=smoke",
                          f"task.model.pretrained_path={ckpt}"])
    assert summary["status"] == "ok"
    assert not any("freshly initialised" in n for n in summary["notes"])
    assert any(str(ckpt) in n for n in summary["notes"])
    with pytest.raises(DatasetMissing, match=r"config\.json"):
        make_task(["task=gpt2_finetune", "optim=adamw", "scale=smoke",
                   f"task.model.pretrained_path={tmp_path / 'nothing'}"], tmp_path).setup()


# --- missing data -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["task=gpt2", "scale=paper"], "fineweb_train_*.bin"),
        (["task=gpt2"], "vocab.json"),
        (["task=gpt2_finetune"], "recipes_1000.csv"),
        (["task=lstm1_ptb", "scale=paper"], "ptb.train.txt"),
        (["task=lstm3_ptb"], "ptb.valid.txt"),
    ],
)
def test_missing_data_names_the_files(overrides: list[str], named: str, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    task = make_task([*overrides, "optim=adamw", f"paths.data_dir={empty}"], tmp_path)
    with pytest.raises(DatasetMissing) as err:
        task.setup()
    assert named in str(err.value) and str(empty) in str(err.value)


def test_small_scale_notes_the_substitute_split(tmp_path: Path) -> None:
    data = shared_data_dir()
    if data is None or not (data / "ptb" / "ptb.valid.txt").exists():
        pytest.skip("no data directory with ptb/ptb.valid.txt + ptb.test.txt")
    task = make_task(["task=lstm1_ptb", "optim=adamw", f"paths.data_dir={data}"], tmp_path)
    task.setup()
    assert any("ptb.valid.txt" in n and "substitute" in n for n in task.notes)
    assert task.vocab_size == 6022  # the words of ptb.valid.txt (test words beyond it -> <unk>)
    assert task.train_data.numel() == 73760 // 20 * 20  # 73,760 tokens in 20 columns
    assert set(task.eval_sets) == {"test"} and task.eval_sets["test"].numel() == 82430 // 10 * 10
