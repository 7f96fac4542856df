"""Per-layer stability diagnostics: why one placement trains deeper than another.

Every ``logging.diagnostics_interval`` steps, for each (global, 1-based) layer ``l``:

* ``rms``               RMS of the residual stream after layer ``l`` (Pre-LN's grows with depth;
                        Post-LN/B2T/SpanNorm keep it at the norm's scale);
* ``token_cosine``      mean pairwise cosine similarity of the tokens of one sequence after layer
                        ``l`` (-> 1 is rank collapse; HybridNorm Fig. 7, Noci et al. 2022);
* ``angular_distance``  mean over tokens of arccos(cos(x_in, x_out)) / pi between the layer's input
                        and output stream: how much the layer still changes the stream (near 0 in
                        Pre-LN's late layers = "wasted depth"; Gromov et al. 2024);
* ``max_abs``           max |activation| of the residual stream after layer ``l`` (outliers);
* ``attn_grad_norm``, ``mlp_grad_norm``  gradient norms of the attention and MLP/MoE parameters
                        (vanishing in early layers = Post-LN's failure, in late layers = Pre-LN's
                        "curse of depth"; Mix-LN / B2T papers);
* ``attn_update_ratio``, ``mlp_update_ratio``  ||W_after - W_before|| / ||W_before|| of the layer's
                        attention / MLP weight matrices over the optimizer step;
* ``attn_max_logit``    max attention logit (q.k x softmax scale, as fed to the softmax) over the
                        heads and the query/key pairs the mask allows (attention logit growth:
                        Dehghani et al. 2023, Wortsman et al. 2023);
* ``attn_entropy``      mean over heads and query positions of the entropy (nats) of the attention
                        distribution (entropy collapse: Zhai et al. 2023). Both on the local
                        backend (its ``FusedScaleMaskSoftmax``); null on Transformer Engine,
                        whose fused attention never materialises the scores;
* MoE layers: ``moe_tokens_per_expert`` (list: tokens routed to each expert, top-k counted once per
  choice), ``moe_load_cv`` (coefficient of variation of that load: 0 = balanced) and
  ``moe_router_entropy`` (mean entropy, in nats, of softmax(router logits) per token).

Model-level fields (the record's ``"model"`` object; TensorBoard ``diag/<field>``):

* ``lm_head_log_z``     mean over tokens of log Z = logsumexp of the LM head's output logits (over
                        the padded vocabulary, as the cross entropy sees it); the quantity PaLM's
                        z-loss (``training.z_loss``) pulls to 0;
* ``relative_update``   ||f(x; theta_t) - f(x; theta_0)|| / ||f(x; theta_0)||, f = the LM head's
                        input (the final hidden state, after the final norm where the placement
                        has one) on a fixed probe micro-batch (the first validation micro-batch of
                        data-parallel rank 0, run in eval mode), measured after steps 1, 2, 4, 8,
                        ... and every armed step (DeepNet's "model update", Wang et al. 2022);
                        f(x; theta_0) is kept in ``<run_dir>/diagnostics_probe/`` so a resumed
                        run continues the curve (null if it resumes into another layout).

Step 1 is always armed: its ``attn_grad_norm`` / ``mlp_grad_norm`` rows are the gradient profile
at initialisation (Xiong et al. 2020). ``<run_dir>/summary.json`` gets a ``"diagnostics"`` object
(:meth:`DiagnosticsHook.summary`): ``init_grad_profile`` ({"attn_grad_norm": [per layer],
"mlp_grad_norm": [...]}, step 1), ``relative_update`` ({"<step>": value}), and from the last armed
step ``step``, ``attn_max_logit`` and ``attn_entropy`` (per-layer lists) and ``lm_head_log_z``, plus
``max_attn_logit`` (the largest over all armed steps and layers).

Activation statistics come from the first micro-batch of the step on data-parallel rank 0 (TP
rank 0's token shard under sequence parallelism). Parameter statistics (gradient norms, update
ratios) are exact for the whole model under TP/PP/EP/DP: every rank adds its shard's sum of
squares divided by the number of ranks holding an identical copy, then one all-reduce over all
ranks. Under the distributed optimizer a rank's ``main_grad`` is reduced only inside its own
shard of each gradient bucket (the reduce-scatter leaves local partial sums elsewhere), and with
``overlap_param_gather`` only that shard of the weights is updated until the next forward; there
each rank counts only its own shard, whose gradient is exactly what Megatron's own grad norm
reads. The MoE load sums the first micro-batch's routing over every data-parallel replica.

Cost on a large model (armed steps only): statistics stay on the device as 0-dim tensors until
one ``tolist()`` per phase (after the backward, after the optimizer step): no host sync per layer
or per parameter; gradient and weight norms are batched with ``torch._foreach_norm``. The weight
snapshot for the update ratios is kept OFF the device, in the weights' own dtype (pinned host
buffers reused across armed steps on CUDA); each weight comes back one at a time for its
difference, so the device holds at most one extra weight (in fp32) at a time, never an fp32 copy of
every attention/MLP matrix.

Hybrid models (``model.arch=hybrid``) report per GPT *block*: a block's two hybrid layers (the
attention half ``*`` and the MLP/MoE half ``-``/``E``) are one row, keyed on ``block_number``
(global across pipeline stages), with the block input (the attention half's input) and the
block output (the MLP half's output) for the stream statistics. A hybrid run and the GPT run of
the same weights write the same rows.

Records go to TensorBoard (``diag/<field>/layer_NNN``) and, one JSON object per armed step, to
``<run_dir>/diagnostics.jsonl`` (``{"step": s, "layers": {"<l>": {field: value}}, "model":
{"lm_head_log_z": v, "relative_update": v}}``), the source of ``megaspan report``'s per-layer
profiles. docs/diagnostics.md lists every field.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist

from megaspan.models.hybrid import HybridHalfLayer
from megaspan.norms.layer import NormPlacementTransformerLayer
from megaspan.training.hooks import Hook
from megaspan.training.zloss import output_layers, vocab_parallel_logsumexp

_MAX_TOKENS = 128  # cosine similarity is O(s^2): a sample of positions is enough
JSONL = "diagnostics.jsonl"
PROBE_DIR = "diagnostics_probe"  # <run_dir>/diagnostics_probe/rank*.pt: f(x; theta_0) per LM-head rank

# Activation columns (per layer; reduced over the model-parallel group) and their names: TB tag
# component, JSON key.
ACT_FIELDS = (
    ("rms", "rms"),
    ("token_cos", "token_cosine"),
    ("angular_distance", "angular_distance"),
    ("max_abs", "max_abs"),
)
# Parameter columns (sums of squares; reduced over all ranks with copy weights).
GRAD_FIELDS = (("grad_attn", "attn_grad_norm"), ("grad_mlp", "mlp_grad_norm"))
UPDATE_FIELDS = (("update_attn", "attn_update_ratio"), ("update_mlp", "mlp_update_ratio"))


# Attention columns per layer: entropy sum, query rows, then per TP rank (its heads): max logit and
# a flag that the rank saw scores (max over TP in one SUM all-reduce: each rank fills its slot).
ATTN_FIELDS = (("attn_max_logit", "attn_max_logit"), ("attn_entropy", "attn_entropy"))
MODEL_FIELDS = ("lm_head_log_z", "relative_update")


def _is_core_softmax(module) -> bool:
    """The local backend's ``FusedScaleMaskSoftmax`` (scores in, probabilities out)."""
    return type(module).__name__ == "FusedScaleMaskSoftmax"


def _layers(chunks) -> list[NormPlacementTransformerLayer]:
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, NormPlacementTransformerLayer)]


def block_number(layer) -> int:
    """The global (1-based) row of ``layer``: its layer number, or a hybrid half's block number."""
    return layer.block_number if isinstance(layer, HybridHalfLayer) else layer.layer_number


def _half(layer) -> str | None:
    """``"attention"`` / ``"mlp"`` / ``"moe"`` for a hybrid half layer, None for a whole block
    (not ``getattr(layer, "half")``: every ``nn.Module`` has a ``half()`` method)."""
    return layer.half if isinstance(layer, HybridHalfLayer) else None


def own_shards(model) -> dict[torch.nn.Parameter, tuple[int, int, int]]:
    """Under the distributed optimizer: param -> (start, end, shard group size), the flat range of
    the param inside this rank's shard of its DDP bucket (empty when none of it is), from the
    DDP-wrapped chunks ``model``. Params not sharded (no distributed optimizer) are absent.

    The rule is Megatron's (``shard_buffer`` / ``DistributedOptimizer._build_model_gbuf_range``):
    each bucket's ``grad_data`` splits into equal contiguous shards, shard ``r`` on group rank ``r``.
    """
    out: dict[torch.nn.Parameter, tuple[int, int, int]] = {}
    for chunk in model or ():
        for param, group in getattr(chunk, "param_to_bucket_group", {}).items():
            if not group.ddp_config.use_distributed_optimizer:
                continue
            size = group.intra_distributed_optimizer_instance_size
            rank = group.intra_distributed_optimizer_instance_rank
            bucket = group.param_to_bucket[param]
            shard = bucket.grad_data.numel() // size
            start, end = bucket.param_to_index[param]
            lo = max(start, rank * shard) - start
            hi = min(end, (rank + 1) * shard) - start
            out[param] = (lo, max(lo, hi), size)
    return out


def _grad(param):
    grad = getattr(param, "main_grad", None)
    return param.grad if grad is None else grad


def _token_cosine(hidden: torch.Tensor) -> torch.Tensor:
    x = hidden[:_MAX_TOKENS, 0, :].float()
    x = torch.nn.functional.normalize(x, dim=-1)
    s = x.shape[0]
    if s < 2:
        return torch.ones((), device=hidden.device)
    sim = x @ x.t()
    return (sim.sum() - sim.diagonal().sum()) / (s * (s - 1))


def token_cosine(hidden: torch.Tensor) -> float:
    """Mean off-diagonal cosine similarity between positions of the first sequence; [s, b, h]."""
    return float(_token_cosine(hidden))


def _angular_distance(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1, eps=1e-12)
    return torch.arccos(cos.clamp(-1.0, 1.0)).mean() / math.pi


def angular_distance(x_in: torch.Tensor, x_out: torch.Tensor) -> float:
    """Mean over tokens of arccos(cos(x_in_t, x_out_t)) / pi, in [0, 1]; [s, b, h] each."""
    return float(_angular_distance(x_in, x_out))


def _norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """fp32 2-norms of ``tensors`` as 0-dim device tensors, batched (one kernel per device/dtype
    group), no host sync."""
    return list(torch._foreach_norm(tensors, 2, dtype=torch.float32)) if tensors else []


def _column(name: str) -> int | None:
    """0 = attention, 1 = MLP/MoE, None = neither (norms owned by the layer)."""
    return 0 if name.startswith("self_attention.") else 1 if name.startswith("mlp.") else None


def _copies(name: str, param) -> int:
    """How many ranks hold an identical copy of this tensor (shard)."""
    from megatron.core import parallel_state as ps

    tp_sharded = getattr(param, "tensor_model_parallel", False)
    if ".experts." in f".{name}":
        copies = ps.get_expert_data_parallel_world_size()
        return copies if tp_sharded else copies * ps.get_expert_tensor_parallel_world_size()
    copies = ps.get_data_parallel_world_size(with_context_parallel=True)
    return copies if tp_sharded else copies * ps.get_tensor_model_parallel_world_size()


def _world_sum(table: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(table)
    return table


def _is_moe_router(module) -> bool:
    return type(module).__name__.endswith("Router") and hasattr(module, "weight")


class LayerDiagnostics:
    """Forward hooks on every placement layer (and MoE router); inert except on armed steps."""

    FIELDS = tuple(f for f, _ in ACT_FIELDS) + tuple(f for f, _ in GRAD_FIELDS)

    def __init__(self, chunks, num_layers: int, interval: int | None, model=None):
        """``chunks``: the bare model chunks; ``num_layers``: GPT blocks (``model.num_layers``);
        ``model``: the DDP-wrapped chunks, needed only under the distributed optimizer."""
        self.chunks = chunks
        self.num_layers = num_layers
        self.interval = interval
        self.layers = _layers(chunks)
        self.shards = own_shards(model)
        self.armed = False
        self._acts: dict[int, tuple[float, ...]] = {}
        self._block_in: dict[int, torch.Tensor] = {}  # hybrid: attention half's input, per block
        self._moe: dict[int, tuple[torch.Tensor, float, int]] = {}
        self._before: dict[int, torch.Tensor] = {}  # id(param) -> host copy (snapshot_weights)
        self._before_norms: list[torch.Tensor] = []
        self._before_entries: list = []
        self._host: dict[int, torch.Tensor] = {}  # reusable (pinned on CUDA) host buffers
        self.num_experts = 0
        from megatron.core import parallel_state as ps

        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self._attn: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}
        self._log_z: torch.Tensor | None = None
        self.probing = False  # a probe forward (eval mode): capture the LM head's input
        self.probe_out: torch.Tensor | None = None
        self.model_record: dict[str, float] = {}
        if interval:
            for module in output_layers(chunks):
                module.register_forward_hook(self._output_hook)
            for layer in self.layers:
                layer.register_forward_hook(self._hook, with_kwargs=True)
                for module in layer.modules():
                    if _is_moe_router(module):
                        self.num_experts = max(self.num_experts, int(module.weight.shape[0]))
                        module.register_forward_hook(self._router_hook(block_number(layer)))
                    if _is_core_softmax(module):
                        module.register_forward_hook(self._softmax_hook(layer, block_number(layer)))

    def arm(self, step: int) -> bool:
        """Record during the step that will be numbered ``step`` (1-based)? Every ``interval``-th
        step, and step 1 (the gradient profile at initialisation)."""
        self.armed = bool(self.interval) and (step % self.interval == 0 or step == 1)
        self._acts.clear()
        self._attn.clear()
        self._log_z = None
        self._block_in.clear()
        self._moe.clear()
        self._before.clear()
        return self.armed

    def _hook(self, layer, args, kwargs, output) -> None:
        # Keep the first micro-batch only: one sample per step is the diagnostic, not a mean.
        number = block_number(layer)
        if not self.armed or not layer.training or number in self._acts:
            return
        x_in = kwargs.get("hidden_states", args[0] if args else None)
        if _half(layer) == "attention":
            # Hybrid: the block's input; its output is the MLP half's, which runs right after in
            # the same stack (megaspan.models.hybrid.check_pattern keeps the halves together).
            self._block_in.setdefault(number, x_in)
            return
        if _half(layer) is not None:
            x_in = self._block_in.pop(number, None)
        hidden = output[0] if isinstance(output, tuple) else output
        with torch.no_grad():  # 0-dim device tensors: read to the host once, in collect()
            h = hidden.float()
            nan = torch.full((), math.nan, device=h.device)
            angle = _angular_distance(x_in, hidden) if isinstance(x_in, torch.Tensor) else nan
            self._acts[number] = torch.stack(
                [h.pow(2).mean().sqrt(), _token_cosine(hidden), angle, h.abs().max()]
            )

    def _softmax_hook(self, layer, number: int):
        def hook(softmax, args, output) -> None:
            # ``layer.training``: the probe and evaluation forwards run in eval mode.
            if not self.armed or not layer.training or number in self._attn or not args:
                return
            with torch.no_grad():
                scale = softmax.scale if softmax.scale is not None else 1.0
                b, heads, sq, _ = output.shape  # scores in, probabilities out: [b, heads, sq, sk]
                top = torch.full((), -math.inf, device=output.device)
                entropy = torch.zeros((), device=output.device)
                for h in range(heads):  # one head at a time: fp32 temporaries of [b, sq, sk] only
                    probs = output[:, h].float()  # exactly 0 where the mask forbids
                    logits = args[0][:, h].float() * scale
                    # The max logit is never an underflowed one: its probability is >= 1/sk.
                    top = torch.maximum(top, logits.masked_fill(probs <= 0, -math.inf).amax())
                    entropy = entropy - torch.special.xlogy(probs, probs).sum()
                self._attn[number] = (entropy, b * heads * sq, top)

        return hook

    def _output_hook(self, module, args, output) -> None:
        if self.probing:
            if self.probe_out is None and args:  # the first micro-batch of the probe
                self.probe_out = args[0].detach()
            return
        if not self.armed or not module.training or self._log_z is not None:
            return
        logits = output[0] if isinstance(output, tuple) else output
        with torch.no_grad():
            self._log_z = vocab_parallel_logsumexp(logits).mean()

    def _router_hook(self, layer_number: int):
        def hook(router, args, output) -> None:
            if not self.armed or not router.training or layer_number in self._moe or not args:
                return
            with torch.no_grad():
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                bias = getattr(router, "bias", None)
                logits = torch.nn.functional.linear(
                    x, router.weight.float(), None if bias is None else bias.float()
                )
                logp = torch.log_softmax(logits, dim=-1)
                entropy = -(logp.exp() * logp).sum(-1).sum()
                routing_map = output[1] if isinstance(output, tuple) and len(output) > 1 else None
                if isinstance(routing_map, torch.Tensor) and routing_map.shape == logits.shape:
                    load = routing_map.float().sum(0)
                else:  # fall back to the top-k of the logits
                    k = router.config.moe_router_topk
                    load = torch.zeros_like(logits[0]).index_add_(
                        0,
                        logits.topk(k, dim=-1).indices.flatten(),
                        torch.ones(x.shape[0] * k, device=logits.device),
                    )
                self._moe[layer_number] = (load.double(), entropy, x.shape[0])

        return hook

    def _own(self, param, tensor: torch.Tensor) -> torch.Tensor:
        """The part of ``tensor`` (shaped like ``param``) that this rank counts: all of it, or
        its own distributed-optimizer shard."""
        flat = tensor.reshape(-1)
        if param not in self.shards:
            return flat
        lo, hi, _ = self.shards[param]
        return flat[lo:hi]

    def _entries(self, matrices_only: bool = False):
        """(table index = 2 * (row - 1) + column, sharers, name, param) of every attention/MLP
        parameter of this rank's layers. ``sharers``: how many ranks count the same elements, so
        that a world sum of value / sharers is exact (ranks of one distributed-optimizer group
        count disjoint shards)."""
        out = []
        for layer in self.layers:
            for name, param in layer.named_parameters():
                col = _column(name)
                if col is None or (matrices_only and param.dim() < 2):
                    continue
                sharers = _copies(name, param) / self.shards.get(param, (0, 0, 1))[2]
                out.append((2 * (block_number(layer) - 1) + col, sharers, name, param))
        return out

    def _table(self, entries, norms: list[torch.Tensor], device) -> torch.Tensor:
        """[num_layers * 2] (attn, mlp per row) float64 on ``device``: the sum over ``entries`` of
        norm^2 / sharers, without leaving the device."""
        table = torch.zeros(self.num_layers * 2, dtype=torch.float64, device=device)
        if entries:
            # Built on the host, sent without waiting (a blocking host-to-device copy would
            # synchronise the stream: the sync this code exists to avoid).
            index = torch.tensor([e[0] for e in entries]).to(device, non_blocking=True)
            weight = torch.tensor([1.0 / e[1] for e in entries], dtype=torch.float64).to(
                device, non_blocking=True
            )
            sq = torch.stack([n.to(device) for n in norms]).double().pow(2)
            table.index_add_(0, index, sq * weight)
        return table

    def collect(self, device: torch.device) -> dict[str, float]:
        """All ranks call this after the backward of an armed step; returns tag -> value.

        Everything stays on ``device`` up to one all-reduce and ONE host read (``tolist``)."""
        from megatron.core import parallel_state as ps

        first = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
        acts = torch.zeros(self.num_layers, len(ACT_FIELDS), dtype=torch.float64, device=device)
        if first:
            for number, values in self._acts.items():
                acts[number - 1] = values.to(device, torch.float64)

        entries = [e for e in self._entries() if _grad(e[3]) is not None]
        grads = self._table(entries, _norms([self._own(e[3], _grad(e[3])) for e in entries]), device)
        # MoE: per layer [load per expert..., entropy sum, tokens]; with SP every TP rank routes its
        # own tokens, without it TP ranks route the same ones (count TP rank 0 only).
        moe = torch.zeros(self.num_layers, self.num_experts + 2, dtype=torch.float64, device=device)
        sp = any(getattr(getattr(layer, "config", None), "sequence_parallel", False) for layer in self.layers)
        if sp or ps.get_tensor_model_parallel_rank() == 0:
            for number, (load, entropy, tokens) in self._moe.items():
                moe[number - 1, : load.numel()] = load.to(device)
                moe[number - 1, -2] = entropy.to(device, torch.float64)
                moe[number - 1, -1] = tokens
        # Attention: [entropy sum, rows, max logit per TP rank..., seen per TP rank...] per layer;
        # every TP rank of data-parallel rank 0 (each holds its own heads).
        tp = self.tp_size
        attn = torch.zeros(self.num_layers, 2 + 2 * tp, dtype=torch.float64, device=device)
        if ps.get_data_parallel_rank() == 0:
            for number, (entropy, rows, top) in self._attn.items():
                attn[number - 1, 0] = entropy.to(device, torch.float64)
                attn[number - 1, 1] = rows
                attn[number - 1, 2 + self.tp_rank] = top.to(device, torch.float64)
                attn[number - 1, 2 + tp + self.tp_rank] = 1.0
        # Model: [log Z sum, count] from the LM head of TP rank 0, data-parallel rank 0.
        model = torch.zeros(2, dtype=torch.float64, device=device)
        if first and self._log_z is not None:
            model[0], model[1] = self._log_z.to(device, torch.float64), 1.0
        flat = torch.cat([acts.flatten(), grads, moe.flatten(), attn.flatten(), model])
        flat = _world_sum(flat).tolist()  # the one sync
        n_act, n_moe = acts.numel(), self.num_experts + 2
        acts = [flat[i * len(ACT_FIELDS) : (i + 1) * len(ACT_FIELDS)] for i in range(self.num_layers)]
        grads = [math.sqrt(v) for v in flat[n_act : n_act + 2 * self.num_layers]]
        base = n_act + 2 * self.num_layers
        moe = [flat[base + i * n_moe : base + (i + 1) * n_moe] for i in range(self.num_layers)]
        base += self.num_layers * n_moe
        n_attn = 2 + 2 * tp
        attn = [flat[base + i * n_attn : base + (i + 1) * n_attn] for i in range(self.num_layers)]
        log_z_sum, log_z_n = flat[-2:]
        self.model_record = {"lm_head_log_z": log_z_sum / log_z_n if log_z_n else math.nan}
        self.armed = False

        self.record: dict[int, dict[str, object]] = {}
        out: dict[str, float] = {}
        for n in range(self.num_layers):
            row: dict[str, object] = {}
            for i, (_tag, key) in enumerate(ACT_FIELDS):
                row[key] = acts[n][i]
            for i, (_tag, key) in enumerate(GRAD_FIELDS):
                row[key] = grads[2 * n + i]
            a = attn[n]
            tops = [a[2 + r] for r in range(tp) if a[2 + tp + r] > 0]
            row["attn_max_logit"] = max(tops) if tops else math.nan
            row["attn_entropy"] = a[0] / a[1] if a[1] else math.nan
            if self.num_experts and moe[n][-1] > 0:
                load = moe[n][: self.num_experts]
                mean = sum(load) / len(load)
                std = math.sqrt(sum((v - mean) ** 2 for v in load) / len(load))
                row["moe_tokens_per_expert"] = load
                row["moe_load_cv"] = std / mean if mean > 0 else math.nan
                row["moe_router_entropy"] = moe[n][-2] / moe[n][-1]
            self.record[n + 1] = row
            for tag, key in ACT_FIELDS + GRAD_FIELDS + ATTN_FIELDS:
                out[f"diag/{tag}/layer_{n + 1:03d}"] = row[key]
            for tag, key in (("moe_load_cv", "moe_load_cv"), ("router_entropy", "moe_router_entropy")):
                if key in row:
                    out[f"diag/{tag}/layer_{n + 1:03d}"] = row[key]
        out["diag/lm_head_log_z"] = self.model_record["lm_head_log_z"]
        return out

    def snapshot_weights(self) -> None:
        """Before the optimizer step (armed steps only): the attention/MLP weight matrices (under
        the distributed optimizer only this rank's shard, the part its step updates), copied off
        the device in their own dtype, and their norms (on the device, batched, no sync)."""
        entries = self._entries(matrices_only=True)
        tensors = [self._own(e[3], e[3].detach()) for e in entries]
        self._before_norms = _norms(tensors)
        pin = torch.cuda.is_available()
        before: dict[int, torch.Tensor] = {}
        for (_, _, _, p), t in zip(entries, tensors):
            buf = self._host.get(id(p))
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
                self._host[id(p)] = buf  # reused at the next armed step: no re-pinning
            # Non-blocking from pinned memory: queued on the current stream before the optimizer
            # step's in-place update, so it copies the weights as they are now.
            buf.copy_(t, non_blocking=pin and t.is_cuda)
            before[id(p)] = buf
        self._before = before
        self._before_entries = entries

    def update_ratios(self, device: torch.device) -> dict[str, float]:
        """After the optimizer step: ||W_after - W_before|| / ||W_before|| per layer, attn and MLP."""
        if not self._before:
            return {}
        entries, deltas = self._before_entries, []
        for _, _, _, p in entries:
            after = self._own(p, p.detach())
            # One weight at a time back on the device: at most one fp32 temporary per weight.
            before = self._before[id(p)].to(after.device, non_blocking=True)
            deltas.append(torch.linalg.vector_norm(after.float() - before.float()))
        flat = torch.cat(
            [self._table(entries, deltas, device), self._table(entries, self._before_norms, device)]
        )
        flat = _world_sum(flat).tolist()  # the one sync
        delta = [math.sqrt(v) for v in flat[: 2 * self.num_layers]]
        weight = [math.sqrt(v) for v in flat[2 * self.num_layers :]]
        self._before, self._before_norms, self._before_entries = {}, [], []
        out = {}
        for n in range(self.num_layers):
            for i, (tag, key) in enumerate(UPDATE_FIELDS):
                d, w = delta[2 * n + i], weight[2 * n + i]
                value = d / w if w > 0 else math.nan
                getattr(self, "record", {}).setdefault(n + 1, {})[key] = value
                out[f"diag/{tag}/layer_{n + 1:03d}"] = value
        return out


class DiagnosticsHook(Hook):
    """Runs :class:`LayerDiagnostics` every ``interval`` steps (and at step 1): armed before the
    step's forward, collected after its backward and before the optimizer clips the gradients in
    place; update ratios after the optimizer step; then one line in
    ``<run_dir>/diagnostics.jsonl``. The probe forward for ``relative_update`` runs before step 1
    (theta_0) and after steps 1, 2, 4, ... and every armed step."""

    def __init__(self, interval: int | None) -> None:
        self.interval = interval
        self.diagnostics: LayerDiagnostics | None = None
        self._pending: int | None = None
        self._probe_base: torch.Tensor | None = None  # f(x; theta_0), on the host (LM-head ranks)
        self._probed_at_start = False
        self.summary: dict = {}  # summary.json's "diagnostics" object (see the module doc)

    def on_fit_start(self, trainer) -> None:
        self.diagnostics = LayerDiagnostics(
            trainer.objs.chunks, trainer.cfg.model.num_layers, self.interval, model=trainer.objs.model
        )
        trainer.diagnostics = self.summary
        # f(x; theta_0) is probed before step 1 and kept in the run dir (one file per LM-head rank),
        # so that a resumed run (Slurm requeue, resume=auto) continues the same curve.
        rank = dist.get_rank() if dist.is_initialized() else 0
        path = Path(trainer.cfg.training.run_dir) / PROBE_DIR / f"rank{rank:05d}.pt"
        if trainer.progress.step == 0:
            out = self._probe(trainer)
            if out is not None:
                self._probe_base = out.to("cpu", copy=True)
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(self._probe_base, path)
            has_lm_head = out is not None
        else:
            has_lm_head = bool(output_layers(trainer.objs.chunks))
            if has_lm_head and path.is_file():
                self._probe_base = torch.load(path, map_location="cpu", weights_only=True)
        # The probe is collective: probe later only if every LM-head rank has its theta_0 output.
        missing = torch.tensor([float(has_lm_head and self._probe_base is None)], device=trainer.device)
        self._probed_at_start = _world_sum(missing).item() == 0
        self.diagnostics.arm(trainer.progress.step + 1)

    def _probe(self, trainer) -> torch.Tensor | None:
        """The LM head's input on the probe micro-batch (None on ranks without the LM head)."""
        diag = self.diagnostics
        ds = trainer.valid_ds if trainer.valid_ds is not None else trainer.train_ds
        iterators = trainer.iterators(ds, 0)
        for chunk in trainer.objs.model:
            chunk.eval()
        diag.probing, diag.probe_out = True, None
        try:
            with torch.no_grad():
                trainer.fwd_bwd(
                    forward_step_func=trainer.step_fn,
                    data_iterator=iterators,
                    model=trainer.objs.model,
                    # One micro-batch (the interleaved schedule needs a multiple of the PP size).
                    num_microbatches=1 if len(iterators) == 1 else trainer.position.layout.pp,
                    seq_length=trainer.cfg.model.seq_length,
                    micro_batch_size=trainer.cfg.training.micro_batch_size,
                    forward_only=True,
                )
        finally:
            diag.probing = False
            for it in iterators:
                getattr(it, "close", lambda: None)()
            for chunk in trainer.objs.model:
                chunk.train()
        return diag.probe_out

    def _relative_update(self, trainer) -> float:
        """||f_t - f_0|| / ||f_0|| on the probe batch (every rank calls it: one all-reduce)."""
        from megatron.core import parallel_state as ps

        out = self._probe(trainer)
        sums = torch.zeros(3, dtype=torch.float64, device=trainer.device)
        # Data-parallel rank 0's probe; TP ranks hold sequence shards under SP, copies otherwise.
        sp = trainer.cfg.parallel.sequence_parallel
        counts = ps.get_data_parallel_rank() == 0 and (sp or ps.get_tensor_model_parallel_rank() == 0)
        if counts and out is not None and self._probe_base is not None:
            if out.shape != self._probe_base.shape:  # resumed into another layout: not comparable
                sums[2] = 1.0
            else:
                base = self._probe_base.to(out.device, non_blocking=True).float()
                sums[0] = (out.float() - base).pow(2).sum()
                sums[1] = base.pow(2).sum()
        delta, ref, mismatched = _world_sum(sums).tolist()
        return math.sqrt(delta / ref) if ref > 0 and not mismatched else math.nan

    def before_optimizer_step(self, trainer, step: int) -> None:
        if self.diagnostics is not None and self.diagnostics.armed:
            trainer.log.scalars(self.diagnostics.collect(trainer.device), step)
            self.diagnostics.snapshot_weights()
            self._pending = step

    def on_step_end(self, trainer, result) -> None:
        if self.diagnostics is None:
            return
        diag, step = self.diagnostics, result.step
        armed = self._pending is not None
        if armed:
            diag.model_record["relative_update"] = math.nan
        # The same decision on every rank (the probe is collective): theta_0 was probed here.
        if self._probed_at_start and (armed or step & (step - 1) == 0):  # armed, or a power of 2
            value = self._relative_update(trainer)
            diag.model_record["relative_update"] = value
            if math.isfinite(value):
                self.summary.setdefault("relative_update", {})[str(step)] = value
                trainer.log.scalars({"diag/relative_update": value}, step)
        if armed:
            step, self._pending = self._pending, None
            trainer.log.scalars(diag.update_ratios(trainer.device), step)
            self._summarise(step, diag.record, diag.model_record)
            if not dist.is_initialized() or dist.get_rank() == 0:
                write_record(Path(trainer.cfg.training.run_dir), step, diag.record, diag.model_record)
        diag.arm(result.step + 1)

    def _summarise(self, step: int, rows: dict[int, dict], model: dict) -> None:
        layers = sorted(rows)

        def column(key):
            return [_finite(rows[n].get(key)) for n in layers]

        if step == 1:
            self.summary["init_grad_profile"] = {k: column(k) for k in ("attn_grad_norm", "mlp_grad_norm")}
        self.summary["step"] = step
        self.summary["attn_max_logit"] = column("attn_max_logit")
        self.summary["attn_entropy"] = column("attn_entropy")
        self.summary["lm_head_log_z"] = _finite(model.get("lm_head_log_z"))
        tops = [v for v in column("attn_max_logit") if v is not None]
        previous = self.summary.get("max_attn_logit")
        if tops:
            self.summary["max_attn_logit"] = max(tops + ([previous] if previous is not None else []))


def _finite(value):
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def write_record(
    run_dir: Path, step: int, layers: dict[int, dict[str, object]], model: dict[str, float] | None = None
) -> None:
    """Append one line to ``<run_dir>/diagnostics.jsonl`` (NaN written as null: strict JSON)."""

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    record = {
        "step": step,
        "layers": {str(n): {k: clean(v) for k, v in row.items()} for n, row in layers.items()},
    }
    if model:
        record["model"] = {k: clean(v) for k, v in model.items()}
    with open(run_dir / JSONL, "a") as f:
        f.write(json.dumps(record) + "\n")
