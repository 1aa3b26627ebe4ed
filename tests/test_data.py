"""The embedded arithmetic task, SFT tokenization and padding, and exact-match evaluation."""

from __future__ import annotations

from petuning import testing
from petuning.recipe import task as data


def test_shipped_files_are_what_the_generator_makes():
    generated = data.make_embedded_task()
    for split in data.EMBEDDED_SPLITS:
        assert data.load_embedded_task(split) == generated[split]
    questions = {split: {ex["messages"][-2]["content"] for ex in generated[split]} for split in generated}
    assert len(questions["train"]) == len(generated["train"])  # distinct
    assert not questions["train"] & questions["test"]  # held out


def test_answer_only_labels_and_padding():
    tokenizer = testing.build_tiny_tokenizer()
    example = data.make_arithmetic_split(1, seed=0)[0]
    features = data.tokenize_for_sft(example, tokenizer)
    learned = [t for t in features["labels"] if t != data.IGNORE_INDEX]
    answer = example["messages"][-1]["content"]
    assert tokenizer.decode(learned) == answer + "<|im_end|>\n"
    assert features["labels"][-len(learned) :] == features["input_ids"][-len(learned) :]

    short = data.tokenize_for_sft(example, tokenizer, max_length=5)
    batch = data.SFTCollator(tokenizer.pad_token_id)([features, short])
    assert batch["input_ids"].shape == (2, len(features["input_ids"]))
    assert batch["attention_mask"][1].tolist() == [1] * 5 + [0] * (len(features["input_ids"]) - 5)
    assert (batch["labels"][1] == data.IGNORE_INDEX).all()


def test_exact_match_matches_unbatched_generation():
    """Left padding in batches gives the same greedy answers as one prompt at a time."""
    tokenizer = testing.build_tiny_tokenizer()
    model = testing.build_tiny_model("llama", seed=0)
    examples = data.make_arithmetic_split(5, seed=0)
    examples[0]["messages"][-2]["content"] = "What is 1 + 100?"  # a shorter prompt, so padding is needed
    accuracy, batched = data.exact_match_accuracy(model, tokenizer, examples, max_new_tokens=4, batch_size=5)
    singles = [data.generate_answers(model, tokenizer, [ex], max_new_tokens=4)[0] for ex in examples]
    assert batched == singles
    assert accuracy == 0.0 and not model.training

    examples[1]["messages"][-1]["content"] = batched[1]
    accuracy, _ = data.exact_match_accuracy(model, tokenizer, examples, max_new_tokens=4)
    assert accuracy == 0.2
