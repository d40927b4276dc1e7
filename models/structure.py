"""Function-name prediction over a syntax tree or graph: an encoder and a name decoder.

Shape legend: B functions, N nodes of the batch, Nm the most nodes of one function, D
width, K name positions (``max_name``), V name subtokens (the target vocabulary, ``<unk>``
first) plus one end class.

The encoder is the Tree-LSTM (:mod:`turnout.models.treelstm`), the message-passing
network (:mod:`turnout.models.gnn`) or the structure-free baseline, attention over the
nodes in order (:mod:`turnout.models.seq_encoder`); the latter two with or without MoE
FFNs. It gives node states ``h_ND``.
The decoder predicts the name's subtokens at K positions at once (not one after
another): position k has a learned query that attends over the function's nodes
(scaled dot product on projected node states, masked to the function), and its context
plus the function's root state go through one linear layer to V + 1 logits, the last
meaning "the name ended before k". Training: cross-entropy at the name's positions and
at the one end position after it (positions past that are not scored); a name longer
than K is cut to K with no end. Prediction: the argmax at each position, up to the
first end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from turnout.config.model import MoEConfig
from turnout.models.gnn import GraphBatch, GraphNet
from turnout.models.moe import MoEAux, aux_terms
from turnout.models.seq_encoder import Layout, SeqEncoder, padded_layout
from turnout.models.terms import Aux, Term, spec
from turnout.models.treelstm import Level, TreeBatch, TreeLSTM

IGNORE = -100
"""Target id of an unscored position."""


@dataclass
class StructureBatch:
    """One batch in the encoder's form (exactly one of ``tree`` and ``graph``)."""

    tree: TreeBatch | None
    graph: GraphBatch | None

    @property
    def form(self) -> TreeBatch | GraphBatch:
        form = self.tree if self.tree is not None else self.graph
        assert form is not None, "a StructureBatch holds a tree or a graph batch"
        return form

    @property
    def graph_N(self) -> torch.Tensor:
        """Which function each node belongs to."""
        return self.form.graph_N

    @property
    def roots_B(self) -> torch.Tensor:
        """Each function's first node (its root)."""
        return self.form.roots_B

    @property
    def size(self) -> int:
        return int(self.roots_B.shape[0])

    @property
    def num_nodes(self) -> int:
        return int(self.graph_N.shape[0])

    def to(self, device: torch.device | str) -> StructureBatch:
        """The batch with every tensor on ``device``."""

        def move(obj: object) -> object:
            if isinstance(obj, torch.Tensor):
                return obj.to(device)
            if isinstance(obj, list):
                return [move(o) for o in obj]
            if isinstance(obj, (TreeBatch, GraphBatch, Level)):
                moved: dict[str, Any] = {f.name: move(getattr(obj, f.name)) for f in fields(obj)}
                return replace(obj, **moved)
            return obj

        tree = move(self.tree) if self.tree is not None else None
        graph = move(self.graph) if self.graph is not None else None
        assert tree is None or isinstance(tree, TreeBatch)
        assert graph is None or isinstance(graph, GraphBatch)
        return StructureBatch(tree, graph)


@dataclass
class StructureOutput:
    logits_BKV: torch.Tensor
    loss: torch.Tensor | None = None
    """Cross-entropy of the scored positions plus the MoE layers' load-balance and z
    losses, weighted by ``model.moe.aux_loss_coef`` and ``z_loss_coef``."""
    ce: torch.Tensor | None = None
    """The cross-entropy alone (detached)."""
    stats: list[Aux] = field(default_factory=list)
    """Each MoE layer's terms, as a language model's ``LMOutput.stats`` (detached)."""
    terms: dict[Term, torch.Tensor] = field(default_factory=dict)
    """The aux losses, unweighted, summed over layers (detached)."""


def name_targets(ids: list[list[int]], max_name: int, end: int) -> torch.Tensor:
    """``[B, K]`` targets: each name's ids, then ``end``, then :data:`IGNORE`."""
    out = torch.full((len(ids), max_name), IGNORE, dtype=torch.long)
    for b, name in enumerate(ids):
        name = name[:max_name]
        out[b, : len(name)] = torch.tensor(name, dtype=torch.long)
        if len(name) < max_name:
            out[b, len(name)] = end
    return out


class StructureModel(nn.Module):
    def __init__(
        self,
        encoder: str,
        num_types: int,
        vocab_size: int,
        edge_types: int,
        targets: int,
        max_name: int,
        d_model: int,
        ffn_dim: int,
        layers: int,
        moe: MoEConfig | None = None,
        init_std: float = 0.02,
        n_heads: int = 4,
        max_nodes: int = 512,
    ) -> None:
        super().__init__()
        self.encoder_kind = encoder
        self.encoder: nn.Module
        if encoder == "treelstm":
            self.encoder = TreeLSTM(num_types, vocab_size, d_model, init_std)
        elif encoder == "gnn":
            self.encoder = GraphNet(
                num_types, vocab_size, edge_types, d_model, ffn_dim, layers, moe, init_std
            )
        elif encoder == "transformer":
            self.encoder = SeqEncoder(
                num_types, vocab_size, d_model, ffn_dim, layers, n_heads, max_nodes, moe, init_std
            )
        else:
            raise ValueError(
                f"unknown encoder {encoder!r}; expected 'treelstm', 'gnn' or 'transformer'"
            )
        D = d_model
        self.max_name = max_name
        self.end = targets  # the end class comes after the V target subtokens
        self.queries_KD = nn.Parameter(torch.randn(max_name, D) * init_std)
        self.keys = nn.Linear(D, D, bias=False)
        self.out = nn.Linear(2 * D, targets + 1)
        # The MoE layers' aux losses, weighted as in a language model (model.moe.*).
        self.coefs = {
            Term.MOE_LB: moe.aux_loss_coef if moe is not None else 0.0,
            Term.MOE_Z: moe.z_loss_coef if moe is not None else 0.0,
        }
        nn.init.normal_(self.keys.weight, std=init_std)
        nn.init.normal_(self.out.weight, std=init_std)
        nn.init.zeros_(self.out.bias)

    @property
    def layers(self) -> nn.ModuleList:
        """The encoder's layers (the Tree-LSTM's one cell has none): the index of
        ``StructureOutput.stats``, as a language model's blocks."""
        layers = getattr(self.encoder, "layers", None)
        return layers if isinstance(layers, nn.ModuleList) else nn.ModuleList()

    def encode(
        self, batch: StructureBatch, layout: Layout | None = None
    ) -> tuple[torch.Tensor, list[MoEAux]]:
        """Node states and each MoE layer's aux; ``layout``: the batch's padded layout
        when the caller has it (the attention encoder needs it too)."""
        if batch.tree is not None:
            return self.encoder(batch.tree), []
        assert batch.graph is not None
        if isinstance(self.encoder, SeqEncoder):
            return self.encoder(batch.graph, layout)
        h_ND, auxes = self.encoder(batch.graph)
        return h_ND, auxes

    def forward(
        self, batch: StructureBatch, targets_BK: torch.Tensor | None = None
    ) -> StructureOutput:
        # Each function's nodes into a padded [B, Nm, D] layout (its own nodes first).
        layout = padded_layout(batch.graph_N, batch.roots_B)
        pos_N, real_BN, Nm = layout
        h_ND, auxes = self.encode(batch, layout)
        B, D = batch.size, h_ND.shape[1]
        start_B = batch.roots_B
        both_ND2 = torch.cat([h_ND, self.keys(h_ND)], dim=-1)  # keys on the real nodes only
        both_BN2 = h_ND.new_zeros(B, Nm, 2 * D).index_put((batch.graph_N, pos_N), both_ND2)
        nodes_BND, keys_BND = both_BN2.split(D, dim=-1)
        scores_BKN = torch.einsum("kd,bnd->bkn", self.queries_KD, keys_BND)
        scores_BKN = scores_BKN / math.sqrt(D)
        scores_BKN = scores_BKN.masked_fill(~real_BN.unsqueeze(1), float("-inf"))
        context_BKD = torch.einsum("bkn,bnd->bkd", scores_BKN.softmax(-1), nodes_BND)
        root_BKD = h_ND[start_B].unsqueeze(1).expand(B, self.max_name, D)
        logits_BKV = self.out(torch.cat([context_BKD, root_BKD], dim=-1))
        # The layers' terms as a language model reports them: losses weighted into the
        # loss and summed into ``terms``, everything detached into ``stats``.
        aux_loss = logits_BKV.new_zeros((), dtype=torch.float32)
        terms: dict[Term, torch.Tensor] = {}
        stats: list[Aux] = []
        for aux in (aux_terms(a, with_noop=False) for a in auxes):
            for name, value in aux.items():
                if spec(name).is_loss:
                    aux_loss = aux_loss + self.coefs[name] * value.float()
                    terms[name] = terms.get(name, 0) + value.detach().float()
            stats.append({name: value.detach() for name, value in aux.items()})
        out = StructureOutput(logits_BKV, stats=stats, terms=terms)
        if targets_BK is not None:
            ce = F.cross_entropy(
                logits_BKV.flatten(0, 1), targets_BK.flatten(), ignore_index=IGNORE
            )
            out.loss = ce + aux_loss
            out.ce = ce.detach()
        return out

    def predict(self, logits_BKV: torch.Tensor) -> list[list[int]]:
        """Each function's predicted subtoken ids, up to the first end."""
        out = []
        for row in logits_BKV.argmax(-1).tolist():
            ids = []
            for i in row:
                if i == self.end:
                    break
                ids.append(i)
            out.append(ids)
        return out
