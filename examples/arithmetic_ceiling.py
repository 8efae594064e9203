"""How much of the main job's arithmetic the model can do when it is handed the operation: the
reply is started for it ("Anna has 38 + 49 =") and only the result is generated. Greedy accuracy
and pass@k of sampled results (temperature 0.9, the preset's) on the main job's held-out problems,
for the base model or a trained adapter: the measurement behind the README's note on where the
main job's held-out accuracy stops.

    .venv/bin/python examples/arithmetic_ceiling.py --seeds 0 1
    .venv/bin/python examples/arithmetic_ceiling.py --seeds 0 --adapter runs/main/final --replies
"""
import argparse
import re
from collections import Counter

import torch
from tqdm.auto import tqdm

from align.config import ModelConfig
from align.evaluate import pass_at_k
from align.models import load_causal_lm, load_tokenizer
from align.tasks import greedy_replies, last_number, train_and_heldout

SUFFIX = " Reply with only the final number."  # the main job's instruction until session 21 (the README's measurements with this script)
RESULT = re.compile(r"\s*(\d+)")  # the first number the model writes after "="
WRITTEN = re.compile(r"(\d+)\s*([-+])\s*(\d+)\s*=\s*(\d+)")  # the first written sum of a reply


def started_replies(tok, rows: list[dict]) -> list[str]:
    """Each row's chat prompt followed by the start of a reply in the policy's own format, up to "="."""
    texts = []
    for r in rows:
        a, op, b = r["completion"].split(" =")[0].split(" ")  # the generator's demonstration "a op b = c"
        name = r["prompt"][0]["content"].split(" ")[0]
        texts.append(tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
                     + f"{name} has {a} {op} {b} =")
    return texts


def results(model, tok, texts: list[str], n: int, temperature: float) -> list[list[str | None]]:
    """`n` generated results per text (greedy when `n` is 1 and `temperature` 0)."""
    out = []
    tok.padding_side = "left"  # the prompts end where generation starts
    for i in tqdm(range(0, len(texts), 25), desc="generate", leave=False):
        enc = tok(texts[i:i + 25], return_tensors="pt", padding=True, add_special_tokens=False)
        kw = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature else {"do_sample": False}
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=5, num_return_sequences=n, pad_token_id=tok.pad_token_id, **kw)
        new = [tok.decode(x, skip_special_tokens=True) for x in ids[:, enc["input_ids"].shape[1]:]]
        for j in range(0, len(new), n):
            out.append([m.group(1) if (m := RESULT.match(t)) else None for t in new[j:j + n]])
    return out


def reply_kinds(model, tok, rows: list[dict]) -> Counter:
    """Greedy whole replies (64 new tokens, as the held-out eval) sorted by what went wrong."""
    kinds: Counter = Counter()
    for r, text in zip(rows, greedy_replies(model, tok, rows, batch_size=25, max_new_tokens=64)):
        a, op, b = r["completion"].split(" =")[0].split(" ")
        m = WRITTEN.search(text)
        if last_number(text) == r["answer"]:
            kinds["right"] += 1
        elif not m or {m.group(1), m.group(3)} != {a, b}:
            kinds["no written sum of the question's numbers"] += 1
        elif m.group(2) != op:
            kinds[f"wrong operation ({m.group(2)} for {op})"] += 1
        else:  # how far off: by 1-9 (the ones digit wrong) or by 10 or more (a carry, a borrow, worse)
            off = abs(int(m.group(4)) - int(r["answer"]))
            kinds["operation right, result wrong" + (" (off by 1-9)" if off < 10 else " (off by 10+)")] += 1
    return kinds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--adapter", default=None, help="a trained LoRA adapter directory (a run's final/)")
    p.add_argument("--samples", type=int, default=16, help="sampled results per problem for pass@k (0: none)")
    p.add_argument("--replies", action="store_true", help="also sort whole greedy replies by what went wrong")
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    mc = ModelConfig(name="smollm2-135m-instruct")
    tok = load_tokenizer(mc)
    model = load_causal_lm(mc, device="cpu")
    if a.adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, a.adapter)
    model.eval()
    for seed in a.seeds:
        _, held = train_and_heldout(200, 100, seed=seed, suffix=SUFFIX)  # the main job's held-out set
        texts = started_replies(tok, held)
        greedy = sum(r[0] == h["answer"] for r, h in zip(results(model, tok, texts, 1, 0.0), held)) / len(held)
        line = f"seed {seed}{' + ' + a.adapter if a.adapter else ''}: operation given, greedy {greedy:.0%}"
        if a.samples:
            sampled = results(model, tok, texts, a.samples, a.temperature)
            right = [sum(x == h["answer"] for x in r) for r, h in zip(sampled, held)]
            ks = [k for k in (1, 4, 8, 16, 32) if k <= a.samples]
            at = {k: sum(pass_at_k(a.samples, c, k) for c in right) / len(held) for k in ks}
            line += f"; sampled at T {a.temperature}: " + ", ".join(f"pass@{k} {v:.0%}" for k, v in at.items())
        if a.replies:
            kinds = reply_kinds(model, tok, held)
            line += "; whole greedy replies: " + ", ".join(f"{k} {v / len(held):.0%}" for k, v in kinds.most_common())
        print(line + f" ({len(held)} held-out problems)", flush=True)


if __name__ == "__main__":
    main()
