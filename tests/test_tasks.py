"""The generated arithmetic problems and the greedy replies the example scripts read."""
from __future__ import annotations

from align.tasks import greedy_replies, last_number, train_and_heldout
from align.tiny import tiny_model


def test_heldout_problems_are_never_trained_on_and_answers_follow_the_operation():
    train, held = train_and_heldout(300, 100, seed=3)
    questions = {r["prompt"][0]["content"] for r in held}
    assert len(questions) == 100 and not questions & {r["prompt"][0]["content"] for r in train}
    for r in train + held:
        a, op, b = r["completion"].split(" =")[0].split(" ")
        assert int(r["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0
        assert last_number(r["completion"]) == r["answer"]


def test_greedy_replies_in_left_padded_batches_equal_one_row_at_a_time():
    model, tok = tiny_model(seed=1)
    _, held = train_and_heldout(10, 5, seed=0)
    batched = greedy_replies(model, tok, held, batch_size=5, max_new_tokens=6)
    alone = [greedy_replies(model, tok, [r], batch_size=1, max_new_tokens=6)[0] for r in held]
    assert batched == alone and len(set(batched)) > 1  # different prompts, different replies
    assert tok.padding_side == "right"  # left only while generating
