"""Data-free distillation rows (``petuning.sample_teacher_rows``): text sampled from the original, unscored, and
distilled on every position by PAT's ``distill_weight``."""

from __future__ import annotations

import pytest
import torch
from test_pat_distill import student as pat_student

from petuning import sample_teacher_rows
from petuning.recipe.task import SFTCollator
from petuning.testing import build_tiny_model, build_tiny_tokenizer
from petuning.training import collect_metrics

TOKENIZER = build_tiny_tokenizer()


def test_rows_are_unscored_samples_cut_at_the_first_eos_and_seeded():
    model = build_tiny_model("llama", seed=0).train()
    state = torch.random.get_rng_state()
    rows = sample_teacher_rows(model, TOKENIZER, 40, length=12, batch_size=16, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert model.training  # the training flag is restored
    assert len(rows) == 40
    eos = TOKENIZER.eos_token_id
    cut = 0
    for row in rows:
        ids = row["input_ids"]
        assert 1 <= len(ids) <= 12
        assert row["attention_mask"] == [1] * len(ids) and row["labels"] == [-100] * len(ids)
        assert eos not in ids[:-1]  # nothing after the first EOS
        cut += ids[-1] == eos and len(ids) < 12
    assert cut > 0  # a random 128-token model ends some of 40 rows early: the cut is exercised
    assert sample_teacher_rows(model, TOKENIZER, 40, length=12, batch_size=16, seed=5) == rows
    assert sample_teacher_rows(model, TOKENIZER, 40, length=12, batch_size=16, seed=6) != rows
    assert sample_teacher_rows(model, TOKENIZER, 40, length=12, batch_size=40, seed=5) != rows  # batching draws


def test_a_peft_model_samples_as_its_original_and_keeps_its_adapter_enabled():
    student = pat_student(1.0)
    original = build_tiny_model("llama", seed=0, dtype=torch.float64)
    probe = torch.arange(4, 14)[None]
    with torch.no_grad():
        assert not torch.allclose(student(input_ids=probe).logits, original(input_ids=probe).logits)
    rows = sample_teacher_rows(student, TOKENIZER, 8, length=10, seed=1)
    assert rows == sample_teacher_rows(original, TOKENIZER, 8, length=10, seed=1)
    with torch.no_grad():  # the adapter is active again after the call
        assert not torch.allclose(student(input_ids=probe).logits, original(input_ids=probe).logits)


def test_pat_distils_every_position_of_a_teacher_row():
    """A batch of one task row (last 3 tokens scored) and two teacher rows: the distillation term is the mean KL over
    the task row's 7 unscored positions and all of the teacher rows' kept positions, against the original."""
    student = pat_student(1.0).train()
    original = build_tiny_model("llama", seed=0, dtype=torch.float64)
    task_ids = list(range(10, 20))
    task = {"input_ids": task_ids, "attention_mask": [1] * 10, "labels": [-100] * 7 + task_ids[7:]}
    teacher_rows = sample_teacher_rows(original, TOKENIZER, 2, length=6, seed=2)
    batch = SFTCollator(TOKENIZER.pad_token_id)([task, *teacher_rows])
    student(**batch)
    measured = collect_metrics(student)["pat_distill_loss"]

    with torch.no_grad():
        logits = student(**batch).logits  # the same training-mode forward
        reference = original(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    positions = batch["attention_mask"].bool()
    positions[0, 6:] = False  # positions 6..8 predict the scored tokens 7..9; position 9 predicts nothing scored
    positions[0, 9] = True
    assert int(positions.sum()) == 7 + sum(len(row["input_ids"]) for row in teacher_rows)
    log_p, log_q = reference[positions].log_softmax(-1), logits[positions].log_softmax(-1)
    assert measured == pytest.approx(float((log_p.exp() * (log_p - log_q)).sum(-1).mean()), rel=1e-9)


def test_rows_end_at_any_stop_token_of_the_generation_config():
    """An instruct model stops at several ids (Llama 3: <|eot_id|> and <|end_of_text|>); generate pads after any of
    them, so a row cut only at the tokenizer's EOS would carry padding that then gets distilled."""
    model = build_tiny_model("llama", seed=0)
    model.generation_config.eos_token_id = [TOKENIZER.eos_token_id, 5]
    rows = sample_teacher_rows(model, TOKENIZER, 40, length=12, seed=5)
    ended = 0
    for row in rows:
        ids = row["input_ids"]
        assert not {TOKENIZER.eos_token_id, 5} & set(ids[:-1])
        ended += ids[-1] == 5
    assert ended > 0  # the second stop id is exercised


def test_the_start_token_is_kept_where_the_tokenizer_starts_text_with_it():
    from tokenizers import processors

    model = build_tiny_model("llama", seed=0)
    with_bos = build_tiny_tokenizer()
    bos = with_bos.bos_token_id
    with_bos._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{with_bos.bos_token} $A", special_tokens=[(with_bos.bos_token, bos)]
    )
    assert with_bos("a").input_ids[0] == bos
    plain = sample_teacher_rows(model, TOKENIZER, 4, length=6, seed=1)
    started = sample_teacher_rows(model, with_bos, 4, length=6, seed=1)
    assert started == [
        {
            "input_ids": [bos, *r["input_ids"]],
            "attention_mask": [1, *r["attention_mask"]],
            "labels": [-100, *r["labels"]],
        }
        for r in plain
    ]


def test_an_adapted_model_it_cannot_bypass_is_refused():
    with pytest.raises(ValueError, match="cannot bypass"):
        sample_teacher_rows(pat_student(1.0).base_model.model, TOKENIZER, 2)


def test_bad_arguments_are_refused_by_name():
    model = build_tiny_model("llama", seed=0)
    with pytest.raises(ValueError, match="num_rows >= 1"):
        sample_teacher_rows(model, TOKENIZER, 0)
    no_start = build_tiny_tokenizer()
    no_start.bos_token = no_start.eos_token = None
    with pytest.raises(ValueError, match="BOS"):
        sample_teacher_rows(model, no_start, 2)
