"""Instruction fine-tuning, as the paper's LLaMA-I (section 4.2): a pretrained model trained
further on instruction/response pairs, the loss on the responses only.

Data: JSONL, one example per line, in either schema

    {"prompt": "Reverse the letters: a b c", "response": "c b a"}
    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}

Template: each example is rendered to token ids, every one of them marked trained or not:

    <s>                                              not trained
    ### System:\\n{content}\\n\\n                        not trained   (a system turn)
    ### Instruction:\\n{content}\\n\\n                   not trained   (a user turn; "prompt")
    ### Response:\\n                                  not trained   (each assistant turn's header)
    {content}</s>                                    trained       (its content, and EOS)

so a prompt/response record is `<s>### Instruction:\\n{prompt}\\n\\n### Response:\\n{response}</s>`,
the same as a conversation of one user and one assistant turn. BOS and EOS are the tokenizer's
(the ids the base model was pretrained with: every pretraining document is `<s> text </s>`).
The text between two trained parts is encoded in one piece (SentencePiece encodes each piece
with its own leading-space marker), and each trained content in another, so a prompt for
generation, `prompt_ids`, is exactly the tokens training saw before the response. A record must
end with an assistant turn (what follows it would train nothing).

Loss: a target counts when the token is trained (the loss mask); the others are ignored.
`tools/preprocess_data.py --format sft` writes the tokens and the mask (PREFIX.mask, llama/shards.py);
`llama.data.PackedExamples` packs examples into sequences, with positions restarting at each
example and attention kept within it (llama/packing.py).

The step's loss is the mean over every trained target of the global batch: each micro-batch's
loss is its *sum* divided by N / (m · dp), N the trained targets of the whole global batch
(one all-reduce of a count over dp per step), m the micro-batches per dp rank. The schedules
scale each micro-batch's loss by 1/m and the gradient buckets average over dp, so the gradient
is that of Σ losses / N, whatever the layout or the number of micro-batches; and the trainer's
mean of the micro-batch losses over m and dp is that mean too.
"""
from __future__ import annotations

import random

import torch

from llama.inputs import InputError
from llama.packing import Packing
from parallel import comm

IGNORE = -100  # the target of an untrained token (vocab_parallel_cross_entropy's ignore_index)
HEADERS = {"system": "### System:\n", "user": "### Instruction:\n", "assistant": "### Response:\n"}
TURN_END = "\n\n"


def messages_of(record, where: str = "record") -> list[dict]:
    """A record of either schema as its list of turns; an InputError naming `where` otherwise."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: a fine-tuning record must be a JSON object")
    if "messages" in record:
        if "prompt" in record or "response" in record:
            raise InputError(f"{where}: has both 'messages' and 'prompt'/'response'; use one schema")
        turns = record["messages"]
        if not isinstance(turns, list) or not turns:
            raise InputError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        for i, turn in enumerate(turns):
            if (not isinstance(turn, dict) or turn.get("role") not in HEADERS
                    or not isinstance(turn.get("content"), str)):
                raise InputError(f"{where}: message {i} must be {{'role': one of {list(HEADERS)}, "
                                 f"'content': a string}}, not {turn!r}"[:300])
        if turns[-1]["role"] != "assistant":
            raise InputError(f"{where}: the last message must be the assistant's (what follows the last "
                             "response trains nothing)")
        return turns
    if not isinstance(record.get("prompt"), str) or not isinstance(record.get("response"), str):
        raise InputError(f"{where}: a fine-tuning record needs 'prompt' and 'response' strings, or 'messages'; "
                         f"it has keys {sorted(record)}")
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]


def _check_specials(tokenizer) -> None:
    if tokenizer.eos_id is None or tokenizer.eos_id < 0:
        raise InputError("fine-tuning needs a tokenizer with an EOS id: a response ends with it")


def render(record, tokenizer, where: str = "record") -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of one record: mask 1 for a response's tokens and its EOS."""
    _check_specials(tokenizer)
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None and tokenizer.bos_id >= 0 else []
    ids, mask, pending = list(bos), [0] * len(bos), ""
    for turn in messages_of(record, where):
        if turn["role"] != "assistant":
            pending += HEADERS[turn["role"]] + turn["content"] + TURN_END
            continue
        prompt = tokenizer.encode(pending + HEADERS["assistant"])
        response = tokenizer.encode(turn["content"]) + [tokenizer.eos_id]
        ids += prompt + response
        mask += [0] * len(prompt) + [1] * len(response)
        pending = ""
    return ids, mask


def prompt_ids(record, tokenizer) -> list[int]:
    """The tokens a model is prompted with to answer a record's last turn: everything `render`
    gives before that response (for a prompt/response record: BOS, the instruction, the
    response header); the response and any later turn are left out."""
    turns = messages_of(record)
    ids, _ = render({"messages": turns[:-1] + [{"role": "assistant", "content": ""}]}, tokenizer)
    return ids[:-1]  # without the empty response's EOS


def packed_micro_batches(mine: torch.Tensor, micro_batch: int, topo) -> list[tuple]:
    """This dp rank's packed rows [n, 4, seq_len + 1] (llama.data.PackedExamples) as the
    schedules' micro-batches (tokens, targets, Packing): untrained targets are IGNORE, and each
    micro-batch's summed loss is divided by N / (m · dp), N the trained targets of the global
    batch (see the module docstring)."""
    tokens, mask, positions, segments = mine.unbind(1)
    trained = mask[:, 1:] != 0
    count = trained.sum().to(torch.float64).reshape(1)
    if topo.dp > 1:
        comm.all_reduce(count, topo.dp_group, name="loss_all_reduce")
    m = -(-len(mine) // micro_batch)
    share = max(count.item(), 1.0) / (m * topo.dp)
    targets = tokens[:, 1:].masked_fill(~trained, IGNORE)
    return [(t, y, Packing(p, s, share)) for t, y, p, s in zip(
        tokens[:, :-1].split(micro_batch), targets.split(micro_batch), positions[:, :-1].split(micro_batch),
        segments[:, :-1].split(micro_batch))]


@torch.no_grad()
def response_accuracy(model, tokenizer, records, max_new_tokens: int = 32, batch: int = 32) -> tuple[float, list]:
    """Exact match of greedy responses (generated up to EOS) with the records' responses, after
    stripping surrounding whitespace: (accuracy, [(prompt text, expected, generated)])."""
    from llama.generate import generate
    results = []
    for i in range(0, len(records), batch):
        chunk = records[i:i + batch]
        prompts = [prompt_ids(r, tokenizer) for r in chunk]
        outs = generate(model, prompts, max_new_tokens, eos_id=tokenizer.eos_id)
        for r, out in zip(chunk, outs):
            turns = messages_of(r)
            results.append((turns[-2]["content"] if len(turns) > 1 else "", turns[-1]["content"],
                            tokenizer.decode(out)))
    correct = sum(want.strip() == got.strip() for _, want, got in results)
    return correct / max(len(results), 1), results


TASKS = {  # name -> (instruction, answer from the letters)
    "reverse": ("Reverse the letters: {}", lambda s: s[::-1]),
    "repeat": ("Repeat the letters: {}", lambda s: s),
    "first": ("Say the first letter: {}", lambda s: s[:1]),
    "last": ("Say the last letter: {}", lambda s: s[-1:]),
    "count": ("Count the letters: {}", lambda s: str(len(s))),
}


def synthetic_instructions(n: int, seed: int, letters: str = "abcdefghij", lengths=(3, 5),
                           exclude: set | None = None, messages_every: int = 3,
                           tasks=("repeat", "first", "last", "count")) -> list[dict]:
    """n instruction records over random letter strings (the demo's and the tests' instruction
    set): one of `tasks` (of TASKS: repeat, first or last letter, count, and reverse, which a
    tiny model learns far more slowly) on 3-5 space-separated letters. Every
    `messages_every`-th record is in the messages schema, the others prompt/response. Strings in
    `exclude` are never drawn (a held-out set shares none with the training set); each record's
    "letters" key names its string."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        word = "".join(rng.choice(letters) for _ in range(rng.randint(*lengths)))
        if exclude and word in exclude:
            continue
        task = rng.choice(sorted(tasks))
        instruction, answer = TASKS[task]
        prompt, response = instruction.format(" ".join(word)), " ".join(answer(word))
        if messages_every and len(out) % messages_every == messages_every - 1:
            out.append({"messages": [{"role": "user", "content": prompt},
                                     {"role": "assistant", "content": response}], "letters": word})
        else:
            out.append({"prompt": prompt, "response": response, "letters": word})
    return out
