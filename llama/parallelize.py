"""How LLaMA is laid out on a topology: the tensor-parallel context and, per pipeline rank,
the model chunks it holds. The model itself (model.py) stays unaware of pipelines."""
from __future__ import annotations

from llama.config import LlamaConfig
from llama.model import Transformer
from parallel import comm
from parallel.layers import TensorParallel
from parallel.params import init_parameters
from parallel.pipeline.partition import chunks_of_rank


def build_chunks(cfg: LlamaConfig, topo, sp: bool = False, vpp: int = 1, stage_layers=None, seed: int | None = None,
                 overlap: bool = True, sp_keep_gathered: bool = False, **model_kwargs) -> list[Transformer]:
    """This rank's model chunks (one without interleaving), each initialised from `seed`
    exactly as the same layers of the whole model would be."""
    tp = TensorParallel(topo.tp_group, sp=sp, overlap=overlap, keep_gathered=sp and sp_keep_gathered)
    chunks = []
    for chunk in chunks_of_rank(cfg.n_layers, topo.pp, topo.pp_rank, vpp, stage_layers):
        model = Transformer(cfg, tp=tp, layer_ids=chunk.layer_ids, first_stage=chunk.first,
                            last_stage=chunk.last, **model_kwargs)
        if seed is not None:
            init_parameters(model, seed)
        chunks.append(model)
    if cfg.tie_word_embeddings and topo.pp > 1:
        tie_embeddings(chunks, topo)
    return chunks


def tie_embeddings(chunks: list[Transformer], topo) -> None:
    """Tied embeddings across pipeline stages (Megatron's embedding group): the last stage holds
    a copy of the first stage's embedding as its head, initialised and loaded as that same
    tensor (`tied_name`), and after each backward the two gradients are summed between the
    first and last stage ranks of the same tp and dp coordinates, so both apply one update.
    Only those two ranks create their group."""
    tied = [c.tok_embeddings.weight for c in chunks if c.first_stage] + \
           [c.output.weight for c in chunks if c.last_stage]
    if tied:
        group = comm.subgroup([topo.pp_ranks[0], topo.pp_ranks[-1]])
        for p in tied:
            p.tied_group = group


def activation_shape(cfg: LlamaConfig, micro_batch: int, seq_len: int, tp: int, sp: bool) -> tuple[int, int, int]:
    """What crosses between pipeline stages: the hidden state, sequence-sharded under sp."""
    return micro_batch, seq_len // tp if sp else seq_len, cfg.dim
