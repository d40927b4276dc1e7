"""Hugging Face checkpoints in: ``turnout import`` and ``train.init_from=HF_DIR``.

Tiny random HF models are built locally from config objects (no download) for every
architecture turnout imports, saved with ``save_pretrained`` (one of them sharded), and
imported; our logits must equal HF's. Norm weights (q/k norms included) are drawn away
from 1 and the weights are large (std 0.2), so a wrong RoPE reorder, a transposed
expert, or a gate normalised the other way shows in the logits; the routers' top-k
choices are checked clear of ties (:mod:`tests.decisions`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.decisions import recorded
from turnout.config import TurnoutConfig
from turnout.errors import CheckpointError, ConfigError
from turnout.models.pretrained import from_pretrained, read_export
from turnout.trainer.weights.export import export
from turnout.trainer.weights.hf_import import import_hf, read_state
from turnout.trainer.weights.upcycle import check_init_from, read_source

transformers = pytest.importorskip("transformers")

V = 64
EOD = "<|endoftext|>"
COMMON = dict(
    vocab_size=V,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
    rms_norm_eps=1e-6,
    eos_token_id=V - 1,
)
ROPE = {"rope_type": "default", "rope_theta": 500.0}


def _hf_config(arch: str, **extra: object) -> object:
    kw: dict = dict(COMMON, rope_parameters=dict(ROPE))
    if arch == "llama":
        kw.update(intermediate_size=48)
        return transformers.LlamaConfig(**(kw | extra))
    if arch == "mistral":
        # Mistral's default window (4096) is past max_position_embeddings: it never applies.
        kw.update(intermediate_size=48)
        return transformers.MistralConfig(**(kw | extra))
    if arch == "qwen3":
        kw.update(intermediate_size=48, head_dim=12)
        return transformers.Qwen3Config(**(kw | extra))
    if arch == "mixtral":
        kw.update(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
        return transformers.MixtralConfig(**(kw | extra))
    assert arch == "qwen3_moe"
    # Fine-grained experts, a head dim other than hidden / heads, one dense layer, and
    # top-k gates left unnormalised (Qwen3-MoE's norm_topk_prob default).
    kw.update(
        num_hidden_layers=3,
        intermediate_size=40,
        moe_intermediate_size=8,
        num_experts=16,
        num_experts_per_tok=4,
        head_dim=16,
        mlp_only_layers=[1],
        norm_topk_prob=False,
    )
    return transformers.Qwen3MoeConfig(**(kw | extra))


CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


def _write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(V - 1)} | {EOD: V - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def _hf_model(
    arch: str, folder: Path, shard: str | None = None, **extra: object
) -> torch.nn.Module:
    """A random HF ``arch`` model saved into ``folder`` (with a tokenizer.json)."""
    torch.manual_seed(0)
    hf = getattr(transformers, CLASSES[arch])(_hf_config(arch, **extra)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)
            else:
                p.normal_(0.0, 0.2)
    kw = {"max_shard_size": shard} if shard else {}
    hf.save_pretrained(folder, **kw)
    _write_tokenizer(folder / "tokenizer.json")
    return hf


def _tokens() -> torch.Tensor:
    return torch.randint(0, V, (3, 16), generator=torch.Generator().manual_seed(1))


def _max_diff(hf: torch.nn.Module, folder: Path) -> float:
    """Max |our logits - HF's| of the export ``folder``, our routing clear of ties."""
    return logits_match_hf(from_pretrained(folder), hf, _tokens())


def logits_match_hf(ours: torch.nn.Module, hf: torch.nn.Module, tokens_BS: torch.Tensor) -> float:
    """Assert our logits equal HF's on ``tokens_BS`` (fp32); return the max difference.
    Shared with test_hf_export.py (the export direction)."""
    with torch.no_grad(), recorded(ours) as decisions:
        ours_BSV = ours(tokens_BS).logits
    # HF routes from its own router GEMM: the same experts only where ours are clear of a tie.
    decisions.assert_clear("our routers' top-k")
    with torch.no_grad():
        theirs_BSV = hf(tokens_BS).logits
    assert ours_BSV.abs().max() > 1.0  # logits large enough for a mapping error to show
    # The same fp32 math in another order (HF's separate q/k/v matmuls, its attention and
    # per-expert loop vs our fused projection, SDPA and grouped experts): rounding of a
    # few ulp per op, measured 1.8e-6 to 3.6e-6 on logits up to |5.2|; atol + rtol * |x|
    # allows ~6e-5, while a mapping error (a row order, a transpose, a gate) moves
    # logits by O(1).
    torch.testing.assert_close(ours_BSV, theirs_BSV, atol=1e-5, rtol=1e-5)
    return float((ours_BSV - theirs_BSV).abs().max())


@pytest.mark.parametrize(
    ("arch", "shard"),
    [
        ("llama", None),
        ("mistral", None),
        ("qwen3", None),
        ("mixtral", "20KB"),
        ("qwen3_moe", "20KB"),
    ],
)
def test_imported_logits_equal_hf(tmp_path: Path, arch: str, shard: str | None) -> None:
    src, out = tmp_path / "hf", tmp_path / "ours"
    hf = _hf_model(arch, src, shard)
    if shard:  # the sharded layout really is what is read
        assert (src / "model.safetensors.index.json").is_file()
        assert not (src / "model.safetensors").exists()
    done = import_hf(src, out)
    assert done.arch == arch
    diff = _max_diff(hf, out)
    print(f"\n{arch}: max |logit diff| {diff:.3g}")
    _, cfg, _ = read_export(out)
    if arch in ("mixtral", "qwen3_moe"):
        assert cfg.model.moe.capacity_factor is None  # HF is dropless
        assert cfg.model.moe.gates_normalized() == (arch == "mixtral")
    if arch == "qwen3_moe":
        assert cfg.model.qk_norm and cfg.model.head_dim == 16
        assert cfg.model.block_kinds() == ["moe", "dense", "moe"]
    assert cfg.data.eod_token == EOD
    assert (out / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()


@pytest.mark.parametrize(("arch", "back"), [("mistral", "llama"), ("qwen3_moe", "qwen3_moe")])
def test_round_trip_import_export_import(tmp_path: Path, arch: str, back: str) -> None:
    hf = _hf_model(arch, tmp_path / "hf", "20KB")
    first = import_hf(tmp_path / "hf", tmp_path / "a")
    done = export(first.folder, tmp_path / "hf2", "hf")
    assert done.kind == back  # Mistral without a window is Llama
    again = import_hf(tmp_path / "hf2", tmp_path / "b")
    a, cfg_a, _ = read_export(first.folder)
    b, cfg_b, _ = read_export(again.folder)
    assert cfg_a.model == cfg_b.model
    assert a.keys() == b.keys()
    for k in a:  # reorders, splits and transposes only: bit-exact both ways
        assert torch.equal(a[k], b[k]), k
    # What we exported loads in transformers with nothing missing, and computes HF's logits.
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf2", local_files_only=True, output_loading_info=True, dtype=torch.float32
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(_tokens()).logits, hf(_tokens()).logits)


def test_init_from_reads_an_hf_folder(tmp_path: Path) -> None:
    _hf_model("mixtral", tmp_path / "hf", "20KB")
    done = import_hf(tmp_path / "hf", tmp_path / "ours")
    want, cfg, _ = read_export(done.folder)
    run = TurnoutConfig(model=cfg.model)
    run.train.init_from = str(tmp_path / "hf")
    src = check_init_from(run)  # the launcher's preflight: config only
    assert src is not None and src.model == cfg.model
    state, _, step = read_source(tmp_path / "hf")
    assert step == -1 and state.keys() == want.keys()
    assert all(torch.equal(state[k], want[k]) for k in state)


def test_init_from_upcycles_an_hf_llama_into_moe(tmp_path: Path) -> None:
    """Sparse upcycling straight from an HF folder: every expert a copy of the dense FFN,
    dropless, renormalised top-2: the first forward is HF's."""
    import dataclasses

    from turnout.models.lm import TransformerLM
    from turnout.trainer.weights.upcycle import init_from

    hf = _hf_model("llama", tmp_path / "hf")
    done = import_hf(tmp_path / "hf", tmp_path / "ours")
    _, dense, _ = read_export(done.folder)
    moe = dataclasses.replace(dense.model.moe, num_experts=4, top_k=2, expert_ffn_dim=0)
    run = TurnoutConfig(model=dataclasses.replace(dense.model, layer_pattern=["moe"], moe=moe))
    run.train.init_from = str(tmp_path / "hf")
    assert check_init_from(run) is not None
    model = TransformerLM(run.model).eval()
    init_from(model, run)
    with torch.no_grad():
        ours_BSV, theirs_BSV = model(_tokens()).logits, hf(_tokens()).logits
    # Four identical experts mixed with weights summing to 1 (the 1e-5 of _max_diff; the
    # router's choice does not matter, so no tie check).
    torch.testing.assert_close(ours_BSV, theirs_BSV, atol=1e-5, rtol=1e-5)


def test_tied_llama_imports_and_a_tie_mismatch_is_refused(tmp_path: Path) -> None:
    hf = _hf_model("llama", tmp_path / "hf", tie_word_embeddings=True)
    import_hf(tmp_path / "hf", tmp_path / "ours")
    _max_diff(hf, tmp_path / "ours")
    # Say "tied" about an untied folder: its lm_head.weight differs from the embedding.
    _hf_model("llama", tmp_path / "untied")
    cfg_path = tmp_path / "untied" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tie_word_embeddings"] = True
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as err:
        import_hf(tmp_path / "untied", tmp_path / "x")
    assert err.value.key == "config.json:tie_word_embeddings"
    assert not (tmp_path / "x").exists()
    # And "untied" about a tied folder: it has no lm_head.weight.
    cfg_path = tmp_path / "hf" / "config.json"
    cfg_path.write_text(
        json.dumps(json.loads(cfg_path.read_text()) | {"tie_word_embeddings": False})
    )
    with pytest.raises(ConfigError) as err:
        import_hf(tmp_path / "hf", tmp_path / "y")
    assert err.value.key == "config.json:tie_word_embeddings"


@pytest.mark.parametrize(
    ("arch", "change", "field"),
    [
        ("mistral", {"sliding_window": 8}, "sliding_window"),
        ("llama", {"attention_bias": True}, "attention_bias"),
        (
            "llama",
            {"rope_parameters": {"rope_type": "linear", "factor": 2.0}},
            "rope_parameters.rope_type",
        ),
        ("llama", {"hidden_act": "gelu"}, "hidden_act"),
        ("llama", {"model_type": "gemma"}, "model_type"),
        ("llama", {"vocab_size": 32}, "vocab_size"),  # the tokenizer has 64 tokens
        ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise"),
        ("mixtral", {"num_experts_per_tok": 5}, "num_experts_per_tok"),  # of 4 experts
        ("llama", {"num_key_value_heads": 3}, "num_key_value_heads"),  # of 4 heads
    ],
)
def test_what_does_not_map_is_refused_naming_the_hf_field(
    tmp_path: Path, arch: str, change: dict, field: str
) -> None:
    _hf_model(arch, tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    cfg = json.loads(path.read_text()) | change
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as err:
        import_hf(tmp_path / "hf", tmp_path / "out")
    assert err.value.key == f"config.json:{field}", str(err.value)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_a_missing_tensor_is_one_line_naming_it(tmp_path: Path) -> None:
    _hf_model("llama", tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["num_hidden_layers"] = 3  # the weights have two layers
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model.layers.2.self_attn.q_proj.weight"):
        import_hf(tmp_path / "hf", tmp_path / "out")


def test_the_import_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from turnout.launch.cli import main

    _hf_model("mixtral", tmp_path / "hf", "20KB")
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    out = capsys.readouterr().out
    assert "imported mixtral" in out and "eod '<|endoftext|>'" in out, out
    assert (tmp_path / "ours" / "model.safetensors").is_file()
    # Into a folder that is not empty: refused in one line naming OUT, exit 2.
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "OUT" in err[0], err


def test_init_from_names_the_hf_field_it_cannot_map(tmp_path: Path) -> None:
    _hf_model("mistral", tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"sliding_window": 8}))
    run = TurnoutConfig()
    run.train.init_from = str(tmp_path / "hf")
    with pytest.raises(ConfigError) as err:
        check_init_from(run)
    assert err.value.key == "train.init_from"
    assert "config.json:sliding_window" in err.value.message


def test_read_state_is_model_config_shaped(tmp_path: Path) -> None:
    """The state read for init_from has exactly the keys and shapes the config builds."""
    _hf_model("qwen3_moe", tmp_path / "hf", "20KB")
    from turnout.models.lm import TransformerLM
    from turnout.trainer.weights.hf_import import read_config

    arch, cfg, _ = read_config(tmp_path / "hf")
    state = read_state(tmp_path / "hf", cfg, arch)
    expected = TransformerLM(cfg.model).state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in expected.items()}
