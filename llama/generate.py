"""Text generation with a KV cache: greedy, temperature and top-p sampling, a batch of prompts
of different lengths, stopping at EOS or a token limit. Runs at any tp and pp (one model chunk
per pipeline rank, no sp). At pp > 1 every decoding step goes through the stages in turn, each
with the KV caches of its own layers; the last stage samples and broadcasts the tokens to every
stage. The stages take turns (one step at a time leaves nothing to overlap): pp is there to fit
a model too large for one tp group, not for speed.

    llama-generate --checkpoint runs/demo/ckpt --tokenizer data/demo/tokenizer.model \\
        --prompt "Return the" --prompt "def __init__(self" --max-new-tokens 40 --temperature 0.8 --top-p 0.9
    torchrun --nproc-per-node 2 -m llama.generate ... --tp 2
    torchrun --nproc-per-node 4 -m llama.generate ... --tp 2 --pp 2
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from llama import cli
from llama.config import LlamaConfig
from llama.convert import CHECKPOINT_ERRORS
from llama.model import Transformer, check_tensor_parallel
from llama.parallelize import activation_shape
from parallel.checkpoint import load_checkpoint, read_meta
from parallel.layers import NO_TP, TensorParallel
from parallel.params import logical_name, shard_of
from parallel.pipeline.p2p import PipelineP2P
from parallel.pipeline.partition import chunks_of_rank
from parallel.topology import divisors


class KVCache:
    """Keys and values of every position so far, for one layer: [batch, max_len, local heads, head_dim]."""

    def __init__(self, batch: int, max_len: int, heads: int, head_dim: int, dtype, device):
        self.k = torch.zeros(batch, max_len, heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, xk, xv, start_pos: int):
        end = start_pos + xk.shape[1]
        self.k[:, start_pos:end] = xk
        self.v[:, start_pos:end] = xv
        return self.k[:, :end], self.v[:, :end]


def new_caches(model: Transformer, batch: int, max_len: int) -> dict:
    """A cache for each layer this rank holds (a pipeline stage: its own layers only)."""
    any_layer = next(iter(model.layers.values())).attention
    weight = any_layer.wq.weight
    return {name: KVCache(batch, max_len, any_layer.n_local_kv_heads, any_layer.head_dim, weight.dtype, weight.device)
            for name in model.layers}


_TAG = 1  # one hidden state per link per forward, always in order: one tag is enough
_FORWARD_ONLY = 0  # the handshake's schedule: with one micro-batch and no backward, every schedule is the same


class Pipeline:
    """This rank's model, the whole model or one pipeline stage of it (vpp = 1), run as the
    whole model. `forward` passes the hidden state from stage to stage through PipelineP2P,
    whose handshake agrees on each new activation shape (it changes with the number of new
    tokens), and returns the last stage's output there, None on the other stages. `from_last`
    broadcasts what the last stage computed to every stage. At pp = 1 both are plain calls."""

    def __init__(self, model, topo=None):
        if isinstance(model, (list, tuple)):  # build_chunks' list
            if len(model) != 1:
                raise ValueError(f"{len(model)} model chunks on this rank (vpp={len(model)}): generation and "
                                 f"evaluation run one chunk per pipeline rank (vpp=1)")
            model = model[0]
        pp, pp_rank = (topo.pp, topo.pp_rank) if topo is not None else (1, 0)
        if (model.first_stage, model.last_stage) != (pp_rank == 0, pp_rank == pp - 1):
            raise ValueError(f"the model is a stage with first_stage={model.first_stage}, last_stage="
                             f"{model.last_stage}, but this rank is stage {pp_rank} of pp={pp}: pass the topology "
                             f"the stage was built for (topo=)")
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.layers.parameters()).dtype  # the hidden state's
        self.p2p = PipelineP2P(topo) if pp > 1 else None

    def forward(self, tokens, targets=None, start_pos: int = 0, kv_caches=None):
        """The model on `tokens` [b, s], which every stage knows (the first embeds them, the
        others take the activation shape from them)."""
        model, p2p = self.model, self.p2p
        if p2p is None:
            return model(tokens, targets, start_pos, kv_caches)
        shape = activation_shape(model.cfg, tokens.shape[0], tokens.shape[1], model.tp.size, model.tp.sp)
        p2p.handshake(shape, self.dtype, 1, 1, _FORWARD_ONLY, device=self.device)
        x = tokens if model.first_stage else p2p.exchange([], [(p2p.pp_rank - 1, _TAG)])[0]()
        out = model(x, targets, start_pos, kv_caches)
        if model.last_stage:
            return out
        p2p.exchange([(out, p2p.pp_rank + 1, _TAG)], [])
        p2p.flush()  # nothing pending once the caller is done with the pipeline
        return None

    def from_last(self, tensor: torch.Tensor) -> torch.Tensor:
        """The last stage's `tensor` on every stage (elsewhere, `tensor` is the buffer it lands in)."""
        if self.p2p is not None:
            dist.broadcast(tensor, self.p2p.ranks[-1], group=self.p2p.group)
        return tensor

    def float_from_last(self, value: float) -> float:
        """A number the last stage computed, on every stage (the others' `value` is ignored)."""
        return self.from_last(torch.tensor([value], dtype=torch.float64, device=self.device)).item()


def check_sampling(temperature: float, top_p: float) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0: greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (1: the whole distribution)")


def check_prompts(prompts: list[list[int]], max_seq_len: int) -> int:
    """Room for new tokens after the longest prompt; a prompt that leaves none is an error
    (prompt and new tokens share the model's context of max_seq_len positions)."""
    for i, p in enumerate(prompts, 1):
        if not p:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token (e.g. BOS)")
        if len(p) >= max_seq_len:
            raise ValueError(f"prompt {i} is {len(p)} tokens long; model.max_seq_len={max_seq_len} allows at most "
                             f"{max_seq_len - 1}, leaving room for one new token")
    return max_seq_len - max(len(p) for p in prompts)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """logits [batch, vocab] → token ids [batch]. temperature 0: greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:  # nucleus: the smallest set of tokens whose probability reaches top_p
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(dim=-1) - sorted_p < top_p
        sorted_p = sorted_p * keep
        choice = torch.multinomial(sorted_p / sorted_p.sum(dim=-1, keepdim=True), 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None = None,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, use_cache: bool = True,
             topo=None) -> list[list[int]]:
    """Continue each prompt (token ids); returns the new tokens of each, EOS excluded.

    All sequences share absolute positions from 0 (as Meta's code): decoding starts after the
    shortest prompt, and a longer prompt's own tokens overwrite the samples until it ends.
    Prompts and new tokens share the context: a prompt must be shorter than max_seq_len, and
    decoding stops there (the longest prompt gets at most max_seq_len - its length new tokens).
    Without `use_cache` every step recomputes the whole prefix (the reference for the cache).
    `model` may be one pipeline stage of `topo` (every rank of the pipeline calls generate with
    the same prompts): only the last stage samples, and every stage gets its tokens."""
    pipe = Pipeline(model, topo)
    model = pipe.model
    if model.tp.sp:
        raise ValueError("generation runs without sequence parallelism (one new token cannot be split over tp)")
    check_sampling(temperature, top_p)
    check_prompts(prompts, model.cfg.max_seq_len)
    batch, shortest = len(prompts), min(len(p) for p in prompts)
    total = min(model.cfg.max_seq_len, max(len(p) for p in prompts) + max_new_tokens)
    device = pipe.device
    tokens = torch.zeros(batch, total, dtype=torch.long, device=device)
    is_prompt = torch.zeros(batch, total, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p)
        is_prompt[i, :len(p)] = True
    caches = new_caches(model, batch, total) if use_cache else None
    generator = torch.Generator(device=device).manual_seed(seed)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    prev = 0
    for pos in range(shortest, total):
        if use_cache:
            logits = pipe.forward(tokens[:, prev:pos], start_pos=prev, kv_caches=caches)
        else:
            logits = pipe.forward(tokens[:, :pos])
        if model.last_stage:  # the only stage that draws from the generator: sampling as at pp = 1
            nxt = sample_next(model.gather_logits(logits)[:, -1], temperature, top_p, generator)
        else:
            nxt = torch.empty(batch, dtype=torch.long, device=device)
        nxt = torch.where(is_prompt[:, pos], tokens[:, pos], pipe.from_last(nxt))
        tokens[:, pos] = nxt
        # every stage has the same tokens, so each finds the same `done` and stops at the same step
        if eos_id is not None:
            done |= ~is_prompt[:, pos] & (nxt == eos_id)
        prev = pos
        if done.all():
            break
    out = []
    for i, p in enumerate(prompts):
        new = tokens[i, len(p):prev + 1].tolist()
        if eos_id is not None and eos_id in new:
            new = new[:new.index(eos_id)]
        out.append(new[:max_new_tokens])
    return out


def load_model(checkpoint: str, fmt: str = "native", tp: TensorParallel = NO_TP, dtype=torch.float32,
               device=None, max_seq_len: int | None = None, topo=None) -> Transformer:
    """A model from a checkpoint of any format (saved at any layout), on the GPU when there is
    one; with `topo` at pp > 1, this rank's pipeline stage of it (n_layers / pp layers, plus the
    embedding on the first stage and the head on the last). Meta's and HF's are read through the
    converter's readers, one logical tensor at a time, each rank keeping its shard: nothing is
    written to disk."""
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    reader = None
    if fmt == "native":
        cfg = LlamaConfig(**read_meta(checkpoint)["config"]["model"])
    else:
        from llama.convert import open_reader
        reader = open_reader(fmt, checkpoint, max_seq_len or 2048)
        cfg = reader.cfg
    if max_seq_len:
        cfg.max_seq_len = max_seq_len
    pp, pp_rank = (topo.pp, topo.pp_rank) if topo is not None else (1, 0)
    check_tensor_parallel(cfg, tp.size, ranks=dist.get_world_size() // pp if dist.is_initialized() else None)
    if cfg.n_layers % pp:
        raise ValueError(f"n_layers={cfg.n_layers} is not divisible by pp={pp}: every stage holds as many layers; "
                         f"choose pp in {divisors(cfg.n_layers)}")
    stage = chunks_of_rank(cfg.n_layers, pp, pp_rank)[0]
    model = Transformer(cfg, tp=tp, attention="auto", layer_ids=stage.layer_ids, first_stage=stage.first,
                        last_stage=stage.last, device=device, dtype=dtype).eval()
    if reader is None:
        load_checkpoint(checkpoint, [model], None, None, weights_only=True)
    else:
        with torch.no_grad():
            for name, p in model.named_parameters():  # a tied head's copy reads the embedding
                p.copy_(shard_of(reader.tensor(logical_name(name, p), p.logical_shape), p).to(p.dtype))
    return model


def build_parser() -> cli.Parser:
    parser = cli.Parser(prog="llama-generate", description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory (or a root with `latest`)")
    parser.add_argument("--format", default="native", choices=["native", "meta", "hf"], help="the checkpoint's format")
    parser.add_argument("--tokenizer", required=True, help="the SentencePiece model the checkpoint was trained with")
    parser.add_argument("--prompt", action="append", required=True, help="repeatable: a batch of prompts")
    parser.add_argument("--max-new-tokens", type=cli.int_at_least(1), default=64,
                        help="per prompt; capped (with a warning) to what the context has left after the longest "
                             "prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help=">= 0; 0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, in (0, 1]; 1: off")
    parser.add_argument("--seed", type=int, default=0, help="the sampling seed")
    parser.add_argument("--tp", type=cli.int_at_least(1), default=1,
                        help="tensor-parallel size (tp × pp must divide the world size; the rest are replicas)")
    parser.add_argument("--pp", type=cli.int_at_least(1), default=1,
                        help="pipeline-parallel size: stages of n_layers / pp layers (it must divide n_layers)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="the model's precision")
    return parser


def run(args) -> int:
    check_sampling(args.temperature, args.top_p)  # before anything slow
    from launcher.init import initialize
    from llama.tokenizer import Tokenizer
    with cli.process_group_scope():
        topo = initialize(tp=args.tp, pp=args.pp)
        tokenizer = Tokenizer(args.tokenizer)
        model = load_model(args.checkpoint, args.format, TensorParallel(topo.tp_group),
                           torch.bfloat16 if args.dtype == "bf16" else torch.float32, topo=topo)
        tokenizer.check_fits(model.cfg.vocab_size)
        prompts = [tokenizer.encode(p, bos=True) for p in args.prompt]
        room = check_prompts(prompts, model.cfg.max_seq_len)
        if args.max_new_tokens > room and topo.rank == 0:
            cli.warn("llama-generate", f"--max-new-tokens {args.max_new_tokens} capped to {room}: the longest prompt "
                     f"({max(map(len, prompts))} tokens) and its new tokens share model.max_seq_len="
                     f"{model.cfg.max_seq_len}")
        outs = generate(model, prompts, args.max_new_tokens, tokenizer.eos_id, args.temperature, args.top_p,
                        args.seed, topo=topo)
        if topo.rank == 0:  # on the first stage: the tokens were broadcast to it
            for prompt, new in zip(prompts, outs):  # decoded together: the space before a new word is kept
                print(f"{tokenizer.decode(prompt + new)}\n{'-' * 40}")
    return 0


def main(argv=None) -> int:
    return cli.run(build_parser(), run, argv, errors=CHECKPOINT_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
