"""Evaluation with the paper's protocol (section 3): perplexity on a token shard, zero- and
few-shot multiple choice, and greedy-generation exact match.

Task files are JSONL, one example per line:

    multiple choice   {"context": "The capital of France is", "choices": [" Paris", " Rome"], "answer": 0}
    short answer      {"context": "Q: What is the capital of France?\\nA:", "answers": ["Paris"]}

Multiple choice picks the completion with the highest likelihood given the context, normalised
(`--normalization`) by its number of characters (`char`, the paper's default), by its
likelihood given "Answer:" as context (`answer`: log P(c | context) − log P(c | "Answer:"), the
paper's choice for OpenBookQA and BoolQ), by its number of characters without one leading space
(`lm-eval`: lm-evaluation-harness's acc_norm, whose choices leave out the space its
target_delimiter puts before them), or not at all (`none`). Few-shot (`--shots k`) puts k
solved examples before the context, separated by blank lines. Short answers are generated
greedily up to a newline and compared after SQuAD's normalisation (case, punctuation, articles).

At tp × pp > 1 (`--tp`, `--pp`), the last pipeline stage computes the likelihoods and
broadcasts them, so every rank holds the same results; global rank 0 prints them.

`--harness TASKS` runs EleutherAI's lm-evaluation-harness on the checkpoint as well (its `hf`
model, one process; llama/harness.py; the `eval` extra), `--harness-include DIR` adding local
task YAMLs; its metrics are printed under "harness".

    llama-eval --checkpoint runs/demo/ckpt --tokenizer data/demo/tokenizer.model \\
        --perplexity data/demo/prose-valid --task tasks/mc.jsonl --shots 1
    torchrun --nproc-per-node 4 -m llama.evaluate ... --tp 2 --pp 2
    llama-eval --checkpoint runs/demo/hf --format hf --harness arc_easy,hellaswag --harness-limit 100
"""
from __future__ import annotations

import json
import math
import random
import re
import string
import sys

import numpy as np
import torch

from llama import cli
from llama.convert import CHECKPOINT_ERRORS
from llama.generate import Pipeline, generate
from llama.inputs import InputError, read_jsonl
from llama.shards import Shard

NORMALIZATIONS = ("char", "answer", "lm-eval", "none")


def read_tasks(path) -> list[dict]:
    """A task file's examples: all multiple choice or all short answer, at least one."""
    examples = []
    for n, ex in read_jsonl(path, "task file"):
        if "context" not in ex or not ("choices" in ex or "answers" in ex):
            raise InputError(f"{path}:{n}: an example needs 'context' and 'choices' (+ 'answer') or 'answers'")
        answer = ex.get("answer")
        if "choices" in ex and not (isinstance(answer, int) and 0 <= answer < len(ex["choices"])):
            raise InputError(f"{path}:{n}: 'answer' must index 'choices' (0 to {len(ex['choices']) - 1}), "
                             f"not {answer!r}")
        if examples and ("choices" in ex) != ("choices" in examples[0]):
            raise InputError(f"{path}:{n}: mixes multiple-choice and short-answer examples; use one file for each")
        examples.append(ex)
    if not examples:
        raise InputError(f"task file {str(path)!r} has no examples")
    return examples


@torch.no_grad()
def continuation_logprob(model, tokenizer, context: str, continuation: str, topo=None) -> tuple[float, int]:
    """Σ log P(continuation tokens | context) and the number of continuation tokens.

    The continuation's tokens are those of encode(context + continuation) past the context's own
    (lm-evaluation-harness's convention), so tokens are what the model would have seen. `model`
    may be a pipeline stage of `topo`: the last stage computes the sum, every stage returns it."""
    pipe = Pipeline(model, topo)
    total, n = _logprob_on_last_stage(pipe, tokenizer, context, continuation)
    return pipe.float_from_last(total), n


def _logprob_on_last_stage(pipe: Pipeline, tokenizer, context: str, continuation: str) -> tuple[float, int]:
    """continuation_logprob's sum, on the last stage (0.0 on the others), and the token count."""
    ctx = tokenizer.encode(context, bos=tokenizer.bos_id is not None)
    full = tokenizer.encode(context + continuation, bos=tokenizer.bos_id is not None)
    split = len(ctx)
    while split > 0 and full[:split] != ctx[:split]:  # a merge across the boundary: split earlier
        split -= 1
    split = max(split, 1)  # the first token has no prediction
    ids = torch.tensor([full], device=pipe.device)
    logits = pipe.forward(ids)
    total = 0.0
    if pipe.model.last_stage:
        logp = torch.log_softmax(pipe.model.gather_logits(logits).float()[0, :-1], dim=-1)
        picked = logp.gather(-1, ids[0, 1:, None])[:, 0]
        total = picked[split - 1:].sum().item()
    return total, len(full) - split


def few_shot_prefix(shots: list[dict]) -> str:
    return "".join(f"{ex['context']}{ex['choices'][ex['answer']]}\n\n" if "choices" in ex else
                   f"{ex['context']} {ex['answers'][0]}\n\n" for ex in shots)


def multiple_choice(model, tokenizer, examples: list[dict], shots: int = 0, normalization: str = "char",
                    seed: int = 0, pool: list[dict] | None = None, topo=None) -> dict:
    """Accuracy with the paper's protocol; `pool` gives the few-shot examples (default: the
    other examples of the task). `model` may be a pipeline stage of `topo`."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization={normalization!r} is not one of {NORMALIZATIONS}")
    rng = random.Random(seed)
    pipe = Pipeline(model, topo)
    local = []  # every choice's score, computed on the last stage; broadcast once for the task
    for i, ex in enumerate(examples):
        candidates = [e for j, e in enumerate(pool or examples) if pool is not None or j != i]
        prefix = few_shot_prefix(rng.sample(candidates, min(shots, len(candidates)))) if shots else ""
        for choice in ex["choices"]:
            logp, _ = _logprob_on_last_stage(pipe, tokenizer, prefix + ex["context"], choice)
            if normalization == "char":
                logp /= max(1, len(choice))
            elif normalization == "lm-eval":  # acc_norm: len(doc_to_choice), target_delimiter " " left out
                logp /= max(1, len(choice.removeprefix(" ")))
            elif normalization == "answer":
                logp -= _logprob_on_last_stage(pipe, tokenizer, "Answer:", choice)[0]
            local.append(logp)
    flat = pipe.from_last(torch.tensor(local, dtype=torch.float64, device=pipe.device)).tolist()
    correct, details = 0, []
    for ex in examples:
        scores, flat = flat[:len(ex["choices"])], flat[len(ex["choices"]):]
        pick = int(np.argmax(scores))
        correct += pick == ex["answer"]
        details.append({"scores": scores, "pick": pick, "answer": ex["answer"]})
    return {"accuracy": correct / len(examples), "examples": len(examples), "details": details}


def normalize_answer(text: str) -> str:
    """SQuAD's: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(model, tokenizer, examples: list[dict], max_new_tokens: int = 16, shots: int = 0,
                seed: int = 0, topo=None) -> dict:
    rng = random.Random(seed)
    correct, details = 0, []
    for i, ex in enumerate(examples):
        others = [e for j, e in enumerate(examples) if j != i]
        prefix = few_shot_prefix(rng.sample(others, min(shots, len(others)))) if shots else ""
        prompt = tokenizer.encode(prefix + ex["context"], bos=tokenizer.bos_id is not None)
        new = generate(model, [prompt], max_new_tokens, tokenizer.eos_id, topo=topo)[0]
        text = tokenizer.decode(new).split("\n")[0]
        hit = any(normalize_answer(text) == normalize_answer(a) for a in ex["answers"])
        correct += hit
        details.append({"generated": text, "correct": hit})
    return {"exact_match": correct / len(examples), "examples": len(examples), "details": details}


@torch.no_grad()
def perplexity(model, shard_prefix, seq_len: int, max_windows: int | None = None, batch: int = 8,
               topo=None) -> dict:
    """exp(mean next-token loss) over consecutive windows of the shard's token stream. `model`
    may be a pipeline stage of `topo`: the last stage sums the losses, every stage returns the result."""
    pipe = Pipeline(model, topo)
    model = pipe.model
    if seq_len > model.cfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={model.cfg.max_seq_len}")
    shard = Shard(shard_prefix)
    shard.check_vocab(model.cfg.vocab_size)
    n = (shard.n_tokens - 1) // seq_len
    n = min(n, max_windows) if max_windows else n
    if n < 1:
        raise ValueError(f"shard {shard_prefix} has {shard.n_tokens} tokens, fewer than one window of {seq_len + 1}")
    total, count = 0.0, 0
    for start in range(0, n, batch):
        rows = [np.asarray(shard.tokens[k * seq_len:k * seq_len + seq_len + 1], dtype=np.int64)
                for k in range(start, min(n, start + batch))]
        ids = torch.from_numpy(np.stack(rows)).to(pipe.device)
        loss = pipe.forward(ids[:, :-1], ids[:, 1:])
        if model.last_stage:
            total += loss.item() * ids[:, 1:].numel()
        count += ids[:, 1:].numel()
    total = pipe.float_from_last(total)  # once, at the end: no stage waits for each batch's loss
    return {"perplexity": math.exp(total / count), "loss": total / count, "tokens": count}


def build_parser() -> cli.Parser:
    parser = cli.Parser(prog="llama-eval", description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory (or a root with `latest`)")
    parser.add_argument("--format", default="native", choices=["native", "meta", "hf"], help="the checkpoint's format")
    parser.add_argument("--tokenizer", help="SentencePiece model (needed for --task; default: none)")
    parser.add_argument("--perplexity", metavar="SHARD", help="a token shard prefix (PREFIX.bin/.idx; default: none)")
    parser.add_argument("--seq-len", type=cli.int_at_least(1), default=256, help="perplexity window, in tokens")
    parser.add_argument("--max-windows", type=cli.int_at_least(1), help="perplexity windows (default: all)")
    parser.add_argument("--task", action="append", default=[], help="a JSONL task file (repeatable; default: none)")
    parser.add_argument("--shots", type=cli.int_at_least(0),
                        help="solved examples before each one (default: 0; with --harness, each task's own)")
    parser.add_argument("--normalization", choices=NORMALIZATIONS, default="char",
                        help="multiple-choice score normalisation")
    parser.add_argument("--max-new-tokens", type=cli.int_at_least(1), default=16,
                        help="short answers: tokens generated at most")
    parser.add_argument("--harness", metavar="TASKS",
                        help="lm-evaluation-harness tasks, comma-separated (names, groups, globs or YAML paths), "
                             "run through its hf model on this checkpoint (an HF export with tokenizer.json as is; "
                             "otherwise converted, with --tokenizer); needs the eval extra (default: none)")
    parser.add_argument("--harness-include", metavar="DIR", action="append", default=[],
                        help="a directory (or YAML file) of local lm-eval task configs (repeatable; default: none)")
    parser.add_argument("--harness-limit", type=cli.int_at_least(1), metavar="N",
                        help="--harness: items per task (default: all)")
    parser.add_argument("--harness-model-args", metavar="K=V,...",
                        help="--harness: more arguments of lm-eval's hf model, e.g. batch_size=8,dtype=bfloat16 "
                             "(default: dtype=float32, the GPU if there is one)")
    parser.add_argument("--harness-samples", metavar="FILE",
                        help="--harness: write every item's log-likelihoods and metrics as JSONL (default: none)")
    parser.add_argument("--tp", type=cli.int_at_least(1), default=1,
                        help="tensor-parallel size (tp × pp must divide the world size; the rest are replicas)")
    parser.add_argument("--pp", type=cli.int_at_least(1), default=1,
                        help="pipeline-parallel size: stages of n_layers / pp layers (it must divide n_layers)")
    return parser


def _launch_world_size() -> int:
    try:
        from launcher.env import detect
        return detect().world_size
    except Exception:
        return 1


def run(args) -> int:
    if not args.perplexity and not args.task and not args.harness:  # checked before anything slow, as are the tasks
        raise InputError("nothing to evaluate: give --perplexity SHARD and/or --task FILE.jsonl and/or --harness TASKS")
    if args.task and not args.tokenizer:
        raise InputError("--task needs --tokenizer (the SentencePiece model of the checkpoint)")
    harness_tasks = [t.strip() for t in (args.harness or "").split(",") if t.strip()]
    if args.harness is not None and not harness_tasks:
        raise InputError("--harness needs task names, comma-separated (e.g. arc_easy,hellaswag)")
    if harness_tasks:
        from llama.harness import check_inputs, parse_model_args, require_lm_eval
        if args.tp * args.pp > 1 or _launch_world_size() > 1:
            raise InputError("--harness runs lm-eval's own model in one process: run it without --tp, --pp "
                             "or a launcher (or apart from them)")
        parse_model_args(args.harness_model_args)  # the checks that need no lm-eval first
        check_inputs(args.checkpoint, args.format, args.tokenizer, args.harness_include)
        require_lm_eval()
    tasks = {path: read_tasks(path) for path in args.task}
    shots = args.shots or 0
    results = {}
    if args.perplexity or tasks:
        from launcher.init import initialize
        from llama.generate import load_model
        from llama.tokenizer import Tokenizer
        from parallel.layers import TensorParallel
        with cli.process_group_scope():
            topo = initialize(tp=args.tp, pp=args.pp)
            tokenizer = Tokenizer(args.tokenizer) if args.tokenizer else None
            model = load_model(args.checkpoint, args.format, TensorParallel(topo.tp_group), topo=topo)
            if args.perplexity:
                results["perplexity"] = perplexity(model, args.perplexity, args.seq_len, args.max_windows, topo=topo)
            for path, examples in tasks.items():
                if "choices" in examples[0]:
                    r = multiple_choice(model, tokenizer, examples, shots, args.normalization, topo=topo)
                else:
                    r = exact_match(model, tokenizer, examples, args.max_new_tokens, shots, topo=topo)
                results[path] = {k: v for k, v in r.items() if k != "details"}
            rank = topo.rank
            del model
    else:
        rank = 0
    if harness_tasks:
        from llama import harness
        results["harness"] = harness.evaluate(args.checkpoint, args.format, harness_tasks, args.tokenizer,
                                              args.harness_include, args.shots, args.harness_limit,
                                              args.harness_model_args, args.harness_samples)
    if rank == 0:  # every rank holds the same results (the last stage broadcast them)
        print(json.dumps(results, indent=1))
    return 0


def main(argv=None) -> int:
    return cli.run(build_parser(), run, argv, errors=CHECKPOINT_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
