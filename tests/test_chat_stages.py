"""Mid-training and SFT batches: packing, padding, assistant-only targets, resume. (The stage scripts end to end are
tested on the run_cpu.sh smoke run, in test_run_cpu.py.)"""

import itertools
import json

import numpy as np
import pytest

from nanochat_jax.chat_data import (BESTFIT_BUFFER, BestFitConversations, PackedConversations, SFTBatches,
                                   bestfit_rows_per_epoch, collate_sft)
from nanochat_jax.tasks.corpuschat import SmallTalk, WordProblems
from nanochat_jax.tasks.base import TaskMixture
from nanochat_jax.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer({bytes([i]): i for i in range(256)})


@pytest.fixture(scope="module")
def task():
    return TaskMixture([WordProblems(20), SmallTalk(20)])


# ---------------------------------------------------------------------------------------------
# Batches


def test_sft_targets_are_the_assistant_tokens_only(tok, task):
    seq_len = 512
    batches = SFTBatches(task, tok, rows=4, seq_len=seq_len, process_index=0, process_count=1)
    micro = batches.next_step(2)
    pad = tok.encode_special("<|assistant_end|>")
    width = micro[0]["inputs"].shape[1]
    rendered = [tok.render_conversation(task[i], max_tokens=seq_len + 1) for i in range(8)]
    longest = max(len(ids) - 1 for ids, _ in rendered)
    assert width == 1 << (longest - 1).bit_length() and width <= seq_len  # one power-of-two width per step
    for b in range(2):
        assert micro[b]["inputs"].shape == micro[b]["targets"].shape == (4, width)
        for r in range(4):
            ids, mask = rendered[4 * b + r]
            inputs, targets = micro[b]["inputs"][r], micro[b]["targets"][r]
            n = len(ids) - 1
            for t in range(width):  # token by token against the render
                if t < n:
                    assert inputs[t] == ids[t]
                    assert targets[t] == (ids[t + 1] if mask[t + 1] else -1)
                else:
                    assert inputs[t] == pad and targets[t] == -1
    # a tool-using conversation: the calculator's output is never a target, the python call is
    ids, mask = rendered[next(i for i in range(8) if isinstance(task[i]["messages"][1]["content"], list))]
    out_start = tok.encode_special("<|output_start|>")
    k = ids.index(out_start)
    assert mask[k] == 0 and mask[k - 1] == 1  # <|python_end|> trained, <|output_start|> not


def test_sft_truncates_strides_processes_and_resumes(tok, task):
    short = SFTBatches(task, tok, rows=2, seq_len=24, process_index=0, process_count=1)
    micro = short.next_step(1)[0]
    assert micro["inputs"].shape == (2, 24)  # capped at seq_len
    second = SFTBatches(task, tok, rows=4, seq_len=512, process_index=1, process_count=2)
    (micro,) = second.next_step(1)
    expected = collate_sft([tok.render_conversation(task[i], max_tokens=513) for i in (1, 3)],
                           micro["inputs"].shape[1], tok.encode_special("<|assistant_end|>"))
    np.testing.assert_array_equal(micro["inputs"], expected["inputs"])
    np.testing.assert_array_equal(micro["targets"], expected["targets"])
    state = second.get_state()
    after = second.next_step(3)
    again = SFTBatches(task, tok, rows=4, seq_len=512, process_index=1, process_count=2)
    again.set_state(state)
    for a, b in zip(after, again.next_step(3)):
        np.testing.assert_array_equal(a["targets"], b["targets"])


def test_mid_packing_preserves_the_token_stream(tok, task):
    seq_len, rows = 32, 3
    it = PackedConversations(task, tok, rows=rows, seq_len=seq_len, process_index=0, process_count=1)
    batches = [next(it) for _ in range(12)]
    stream = np.concatenate([tok.render_conversation(task[i])[0] for i in range(len(task))] * 2)
    for k, b in enumerate(batches):
        assert b["inputs"].shape == b["targets"].shape == (rows, seq_len)
        for r in range(rows):
            start = (k * rows + r) * (seq_len + 1)
            np.testing.assert_array_equal(b["inputs"][r], stream[start:start + seq_len])
            np.testing.assert_array_equal(b["targets"][r], stream[start + 1:start + seq_len + 1])
    assert it.get_state()["epoch"] >= 0 and 0 < it.progress


def test_mid_packing_resumes_exactly_and_wraps(tok, task):
    it = PackedConversations(task, tok, rows=4, seq_len=50, process_index=1, process_count=2)
    for _ in range(5):
        next(it)
    state = it.get_state()
    assert state["cursor"] % 2 == 1  # this process only takes odd conversations
    expected = [next(it) for _ in range(60)]  # runs through more than an epoch of the 20 odd conversations
    assert it.get_state()["epoch"] >= 1
    again = PackedConversations(task, tok, rows=4, seq_len=50, process_index=1, process_count=2)
    again.set_state(json.loads(json.dumps(state)))  # as stored in a checkpoint
    for e in expected:
        np.testing.assert_array_equal(next(again)["inputs"], e["inputs"])
    odd = np.concatenate([tok.render_conversation(task[i])[0] for i in range(1, len(task), 2)])
    first = next(PackedConversations(task, tok, rows=4, seq_len=50, process_index=1, process_count=2))
    assert first["inputs"].shape == (2, 50)  # rows are global: each of the 2 processes yields half
    np.testing.assert_array_equal(first["inputs"][0], odd[:50])
    np.testing.assert_array_equal(first["inputs"][1], odd[51:101])


def master_bestfit(rendered, rows: int, capacity: int, pad: int) -> list[tuple[list[int], list[int]]]:
    """nanochat master's SFT packing, as its loader states it: refill a buffer to BESTFIT_BUFFER conversations,
    put the longest one that fits the space left (the first of equal lengths), else pad the row's rest."""
    buffer: list = []
    out = []
    for _ in range(rows):
        row, mask = [], []
        while len(row) < capacity:
            while len(buffer) < BESTFIT_BUFFER:
                buffer.append(next(rendered))
            space = capacity - len(row)
            best, best_len = -1, 0
            for i, (ids, _) in enumerate(buffer):
                if best_len < len(ids) <= space:
                    best, best_len = i, len(ids)
            if best < 0:
                row, mask = row + [pad] * space, mask + [0] * space
                break
            ids, conv_mask = buffer.pop(best)
            row, mask = row + ids, mask + conv_mask
        out.append((row, mask))
    return out


def test_bestfit_rows_are_nanochat_masters_packing(tok, task):
    """sft.recipe = "master": whole conversations best fit into rows of seq_len + 1, padded (never cut) when none
    fits; targets are the assistant's tokens only, padding never is one."""
    seq_len, rows, bos = 300, 3, tok.bos_token_id
    it = BestFitConversations(task, tok, rows=rows, seq_len=seq_len, process_index=0, process_count=1)
    rendered = itertools.cycle([tok.render_conversation(task[i], max_tokens=seq_len + 1) for i in range(len(task))])
    expected = master_bestfit(rendered, 6 * rows, seq_len + 1, bos)
    padded = 0
    for k in range(6):
        batch = next(it)
        assert batch["inputs"].shape == batch["targets"].shape == (rows, seq_len)
        for r in range(rows):
            ids, mask = (np.asarray(a) for a in expected[k * rows + r])
            np.testing.assert_array_equal(batch["inputs"][r], ids[:-1])
            np.testing.assert_array_equal(batch["targets"][r], np.where(mask[1:] == 1, ids[1:], -1))
            assert batch["inputs"][r][0] == bos  # every row starts a conversation
            padded += ids[-1] == bos and batch["targets"][r][-1] == -1
    assert padded > 0  # some rows end in padding, none cut a conversation
    assert 0 < it.epoch < it.fetched / len(task)  # the buffer's conversations are not trained on yet

    cut = next(BestFitConversations(task, tok, rows=2, seq_len=24, process_index=0, process_count=1))
    for r in range(2):  # a conversation longer than a row is cut to it (master leaves it in the buffer for good)
        ids, mask = tok.render_conversation(task[r], max_tokens=25)
        np.testing.assert_array_equal(cut["inputs"][r], ids[:-1])


def test_bestfit_rows_per_epoch_counts_the_padding(tok, task):
    """sft.num_iterations = -1 with the master recipe: the rows one pass fills as the run packs it (padding
    included, as master trains until its loader has consumed the mixture), not the mean length's estimate."""
    seq_len, bos, user = 600, tok.bos_token_id, tok.encode_special("<|user_start|>")  # ~2 conversations a row
    rendered = itertools.cycle([tok.render_conversation(task[i], max_tokens=seq_len + 1) for i in range(len(task))])
    starts = [sum(row[i] == bos and row[i + 1] == user for i in range(len(row) - 1))  # conversations per row
              for row, _ in master_bestfit(rendered, 40, seq_len + 1, bos)]
    rows = next(r for r in range(1, 41) if sum(starts[:r]) >= len(task))
    assert bestfit_rows_per_epoch(task, tok, seq_len) == rows == 19
    total = sum(len(tok.render_conversation(task[i], max_tokens=seq_len + 1)[0]) for i in range(len(task)))
    assert rows > total / (seq_len + 1)  # the padding costs rows


def test_bestfit_strides_processes_and_resumes_exactly(tok, task):
    it = BestFitConversations(task, tok, rows=4, seq_len=128, process_index=1, process_count=2)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # as stored in a checkpoint
    expected = [next(it) for _ in range(40)]  # well past an epoch of the 20 odd conversations
    again = BestFitConversations(task, tok, rows=4, seq_len=128, process_index=1, process_count=2)
    again.set_state(state)
    for e in expected:
        b = next(again)
        assert b["inputs"].shape == (2, 128)  # rows are global: each of the 2 processes yields half
        np.testing.assert_array_equal(b["inputs"], e["inputs"])
        np.testing.assert_array_equal(b["targets"], e["targets"])
    odd = itertools.cycle([tok.render_conversation(task[i], max_tokens=129) for i in range(1, len(task), 2)])
    first = next(BestFitConversations(task, tok, rows=4, seq_len=128, process_index=1, process_count=2))
    for r, (ids, _) in enumerate(master_bestfit(odd, 2, 129, tok.bos_token_id)):  # process 1: the odd ones
        np.testing.assert_array_equal(first["inputs"][r], ids[:-1])


def test_a_position_saved_for_another_mixture_size_restarts_the_order(tok, task, capsys):
    """A mixture that shrank (or grew) since the checkpoint: the saved cursor would point past the end or at other
    conversations, so both iterators warn and start over."""
    packed = PackedConversations(task, tok, rows=2, seq_len=50, process_index=0, process_count=1)
    for _ in range(5):
        next(packed)
    state = packed.get_state()
    assert state["conversations"] == len(task) == 40 and state["cursor"] > 0
    smaller = TaskMixture([WordProblems(20)])
    again = PackedConversations(smaller, tok, rows=2, seq_len=50, process_index=0, process_count=1)
    again.set_state(state)
    assert "saved for a mixture of 40 conversations" in capsys.readouterr().err
    np.testing.assert_array_equal(next(again)["inputs"],
                                  next(PackedConversations(smaller, tok, rows=2, seq_len=50))["inputs"])

    sft = SFTBatches(task, tok, rows=2, seq_len=64, process_index=0, process_count=1)
    sft.next_step(5)
    moved = SFTBatches(smaller, tok, rows=2, seq_len=64, process_index=0, process_count=1)
    moved.set_state(sft.get_state())
    assert moved.position == 0 and "its order starts from the beginning" in capsys.readouterr().err

    bestfit = BestFitConversations(task, tok, rows=2, seq_len=64, process_index=0, process_count=1)
    next(bestfit)
    moved = BestFitConversations(smaller, tok, rows=2, seq_len=64, process_index=0, process_count=1)
    moved.set_state(bestfit.get_state())
    assert moved.fetched == 0 and moved.buffer == [] and "saved for a mixture of 40" in capsys.readouterr().err
